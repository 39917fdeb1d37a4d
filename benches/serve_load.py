#!/usr/bin/env python3
"""Load test for `chunkkv serve`: N concurrent multi-turn conversations, each
opening with a document that has one planted fact, asked for in the last turn.

Standard library only (runs on a GPU host without pip). Each request streams,
so time to first token and the gaps between tokens are measured as a client
sees them. Only for servers on 127.0.0.1.

Usage:
  serve_load.py --url http://127.0.0.1:8080 --conversations 8 --doc-tokens 3000 \
      --label "chunkkv 10%" --json-out run.json   (--doc-tokens 2000-6000: a range)
Prints one markdown row (see --header) and writes the details as JSON.
"""

import argparse
import glob
import http.client
import json
import os
import random
import statistics
import threading
import time
import urllib.parse


def essays(data_dir):
    files = sorted(
        f for f in glob.glob(os.path.join(data_dir, "paul-graham-essays", "*.txt")) if "LICENSE" not in f
    )
    if not files:
        raise SystemExit(f"no essays under {data_dir}/paul-graham-essays (set --data)")
    return [" ".join(open(f, encoding="utf-8").read().split()) for f in files]


def document(texts, i, n_chars, code):
    """About n_chars of essay text, the fact planted at a seeded depth."""
    rng = random.Random(i)
    text = ""
    k = rng.randrange(len(texts))
    while len(text) < n_chars:
        text += texts[k % len(texts)] + " "
        k += 1
    text = text[:n_chars]
    cut = text.rfind(" ", 0, int(len(text) * rng.uniform(0.1, 0.9)))
    fact = f"The access code of vault {i} is {code}."
    return f"{text[:cut]} {fact} {text[cut:]}"


def percentile(xs, p):
    if not xs:
        return float("nan")
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(p / 100 * (len(xs) - 1))))]


class Stats:
    def __init__(self):
        self.lock = threading.Lock()
        self.ttft = []
        self.gaps = []
        self.tokens = 0
        self.refused = {}
        self.served = 0
        self.recalled = 0
        self.answers = []
        # (first token, last token, conversation, turn, tokens) of every reply,
        # and the replies' tokens after their first
        self.replies = []
        self.decode_tokens = 0


def union_length(spans):
    """Seconds covered by at least one of the (start, end) spans."""
    total, end = 0.0, None
    for a, b in sorted(spans):
        if end is None or a > end:
            total += b - a
            end = b
        elif b > end:
            total += b - end
            end = b
    return total


def stream_chat(url, messages, max_tokens, extra, timeout):
    """One streamed chat request: (status, text, ttft_s, gaps_s, completion_tokens, span),
    span being the (first, last) token times on the perf_counter clock."""
    u = urllib.parse.urlparse(url)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=timeout)
    body = {"messages": messages, "max_tokens": max_tokens, "temperature": 0, "stream": True}
    body.update(extra)
    t0 = time.perf_counter()
    conn.request("POST", "/v1/chat/completions", json.dumps(body), {"content-type": "application/json"})
    resp = conn.getresponse()
    if resp.status != 200:
        err = resp.read().decode(errors="replace")
        conn.close()
        return resp.status, err, None, [], 0, None
    text, first, last, gaps, usage = [], None, None, [], 0
    for raw in resp:
        line = raw.decode().strip()
        if not line.startswith("data: "):
            continue
        data = line[6:]
        if data == "[DONE]":
            break
        ev = json.loads(data)
        if "error" in ev:
            conn.close()
            return 500, ev["error"]["message"], None, [], 0, None
        if ev.get("usage"):
            usage = ev["usage"]["completion_tokens"]
        piece = ev["choices"][0]["delta"].get("content") if ev.get("choices") else None
        if piece:
            now = time.perf_counter()
            if first is None:
                first = now - t0
            else:
                gaps.append(now - last)
            last = now
            text.append(piece)
    conn.close()
    span = (t0 + first, last) if first is not None else None
    return 200, "".join(text), first, gaps, usage, span


def conversation(args, i, doc, code, stats):
    extra = {}
    if args.method:
        extra["chunkkv"] = {"kv_method": args.method}
        if args.budget:
            extra["chunkkv"]["kv_budget"] = args.budget
    question = f"What is the access code of vault {i}? Answer with the number only."
    if args.turns == 1:
        # The question right after the document: recall without earlier turns.
        turns = [f"Here is a document.\n\n{doc}\n\n{question}"]
    else:
        turns = [
            f"Here is a document.\n\n{doc}\n\nRemember the access code of vault {i}. "
            "In one short sentence, what is the document about?",
            "Name one idea from the document, briefly.",
            question,
        ]
        if args.long_reply:
            # A decode-bound middle turn: what a server's freed memory buys in
            # tokens per second when replies are long.
            turns[1] = "Explain one idea from the document in detail, in several paragraphs."
        if args.turns == 2:
            # The summary turn, then the question: the idea turn left out.
            turns = [turns[0], question]
    messages = []
    ttfts = []
    earlier = args.replayed.get(i)
    for k, turn in enumerate(turns):
        messages.append({"role": "user", "content": turn})
        if earlier is not None and k < len(turns) - 1:
            # Replay: an earlier run's reply stands in for this turn, and only
            # the last turn is sent (the whole history as one prompt).
            messages.append({"role": "assistant", "content": earlier[k]})
            continue
        max_tokens = args.long_reply if args.long_reply and k == 1 and args.turns == 3 else args.max_tokens
        status, text, ttft, gaps, n, span = stream_chat(args.url, messages, max_tokens, extra, args.timeout)
        with stats.lock:
            if status != 200:
                stats.refused[status] = stats.refused.get(status, 0) + 1
                stats.answers.append({"conversation": i, "turn": k, "status": status, "error": text[:200]})
                return
            if ttft is not None:
                stats.ttft.append(ttft)
                ttfts.append(round(ttft, 3))
            stats.gaps.extend(gaps)
            stats.tokens += n
            if span is not None:
                stats.replies.append((*span, i, k, n))
                stats.decode_tokens += max(n - 1, 0)
        messages.append({"role": "assistant", "content": text})
    with stats.lock:
        stats.served += 1
        ok = code in text
        stats.recalled += ok
        replies = [m["content"] for m in messages if m["role"] == "assistant"]
        stats.answers.append(
            {"conversation": i, "code": code, "answer": text[:80], "recalled": ok, "replies": replies, "ttft_s": ttfts}
        )


def metrics(url):
    u = urllib.parse.urlparse(url)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=30)
    conn.request("GET", "/metrics")
    text = conn.getresponse().read().decode()
    conn.close()
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            out[name] = float(value)
    return out


HEADER = (
    "| server | conversations | served | refused | recalled | agg. tok/s | decode tok/s | TTFT p50 / p99 (s) "
    "| per-token p50 / p99 (ms) | peak KV cells in one slot |\n|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--url", default="http://127.0.0.1:8080")
    ap.add_argument("--conversations", type=int, default=8)
    ap.add_argument(
        "--doc-tokens",
        default="3000",
        help="document length in tokens (about 4 characters each), or a range LO-HI drawn per conversation",
    )
    ap.add_argument("--max-tokens", type=int, default=24)
    ap.add_argument(
        "--long-reply",
        type=int,
        default=0,
        help="with 3 turns: the middle turn asks for a detailed answer of up to this many tokens",
    )
    ap.add_argument(
        "--first", type=int, default=0, help="number of the first conversation (another set of documents)"
    )
    ap.add_argument(
        "--turns",
        type=int,
        choices=(1, 2, 3),
        default=3,
        help="3: document, a summary, an idea, then the question; 2: without the idea; "
        "1: the question right after the document",
    )
    ap.add_argument(
        "--replay",
        metavar="JSON",
        help="an earlier run's --json-out: its replies to the earlier turns stand in for this "
        "server's, and each conversation sends only its last turn (the same history for both servers)",
    )
    ap.add_argument("--method", help="per-request chunkkv.kv_method (default: the server's)")
    ap.add_argument("--budget", help="per-request chunkkv.kv_budget")
    ap.add_argument("--label", default="")
    ap.add_argument("--data", default=os.environ.get("CHUNKKV_DATA", "../shared/data"))
    ap.add_argument("--timeout", type=float, default=1800)
    ap.add_argument("--json-out")
    ap.add_argument("--header", action="store_true", help="print the table header first")
    args = ap.parse_args()
    if urllib.parse.urlparse(args.url).hostname not in ("127.0.0.1", "localhost"):
        raise SystemExit("load tests run against 127.0.0.1 only")

    # Replay: each conversation's earlier replies, by conversation number.
    args.replayed = {}
    if args.replay:
        try:
            with open(args.replay, encoding="utf-8") as f:
                ran = json.load(f)
            args.replayed = {
                a["conversation"]: a["replies"]
                for a in ran["answers"]
                if len(a.get("replies", [])) >= args.turns - 1
            }
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise SystemExit(f"--replay {args.replay}: not a serve_load JSON with replies ({e!r})")
    texts = essays(args.data)
    ids = range(args.first, args.first + args.conversations)
    codes = [str(random.Random(1000 + i).randrange(10000, 99999)) for i in ids]
    lo, _, hi = args.doc_tokens.partition("-")
    lo, hi = int(lo), int(hi or lo)
    sizes = [random.Random(2000 + i).randint(lo, hi) for i in ids]
    docs = [document(texts, i, sizes[k] * 4, codes[k]) for k, i in enumerate(ids)]
    stats = Stats()
    peak = {"cells": 0.0}
    done = threading.Event()

    def watch():
        while not done.is_set():
            try:
                m = metrics(args.url)
                cells = max((v for k, v in m.items() if k.startswith("chunkkv_kv_cells_used")), default=0)
                peak["cells"] = max(peak["cells"], cells)
            except OSError:
                pass
            time.sleep(0.5)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    t0 = time.perf_counter()
    t0_unix = time.time()
    threads = [
        threading.Thread(target=conversation, args=(args, i, docs[k], codes[k], stats))
        for k, i in enumerate(ids)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    done.set()
    refused = sum(stats.refused.values())
    spans = sorted((a, b) for a, b, *_ in stats.replies)
    span = max(union_length(spans), 1e-9)
    row = {
        "label": args.label,
        "conversations": args.conversations,
        "served": stats.served,
        "refused": refused,
        "refused_by_status": stats.refused,
        "recalled": stats.recalled,
        "wall_s": wall,
        "tokens": stats.tokens,
        "agg_tok_s": stats.tokens / wall,
        # Aggregate decode throughput: tokens after each reply's first, over the
        # time at least one reply was streaming (prefill before a first token is not in it).
        "decode_tok_s": stats.decode_tokens / span,
        "decode_span_s": span,
        # Replies streaming at once, on average while any streams: the rate
        # is about one reply's over the whole span times this.
        "streams_mean": sum(b - a for a, b in spans) / span,
        # Each reply's (first, last) token, in seconds from the load's start.
        "decode_spans": [(a - t0, b - t0) for a, b in spans],
        # The same per reply, with its conversation, turn and tokens; and the
        # load's start in Unix seconds, to line them up with a `-v` server log.
        "replies": [
            {"conversation": i, "turn": k, "first_s": a - t0, "last_s": b - t0, "tokens": n}
            for a, b, i, k, n in sorted(stats.replies)
        ],
        "start_unix": t0_unix,
        "ttft_p50_s": percentile(stats.ttft, 50),
        "ttft_p99_s": percentile(stats.ttft, 99),
        "token_p50_ms": percentile(stats.gaps, 50) * 1e3,
        "token_p99_ms": percentile(stats.gaps, 99) * 1e3,
        # The longest stall a streaming reply saw, and how many gaps passed
        # half a second (p99 hides a few long stalls among many short ones).
        "token_max_ms": max(stats.gaps, default=float("nan")) * 1e3,
        "gaps_over_500ms": sum(g > 0.5 for g in stats.gaps),
        "peak_slot_cells": peak["cells"],
        "answers": stats.answers,
        "doc_tokens": args.doc_tokens,
        "replay_from": args.replay,
    }
    if args.header:
        print(HEADER)
    print(
        f"| {args.label} | {args.conversations} | {stats.served} | {refused} | {stats.recalled}/{stats.served} "
        f"| {row['agg_tok_s']:.1f} | {row['decode_tok_s']:.1f} | {row['ttft_p50_s']:.2f} / {row['ttft_p99_s']:.2f} "
        f"| {row['token_p50_ms']:.0f} / {row['token_p99_ms']:.0f} | {peak['cells']:.0f} |"
    )
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump(row, f, indent=1)


if __name__ == "__main__":
    main()
