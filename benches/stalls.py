#!/usr/bin/env python3
"""What held up the replies of one serve_load.py run.

Lines up the run's replies (the JSON's `replies` and `start_unix`) with the
server's `-v` log (wall-clock times; each phase line is written when its work
ends) and prints, per turn, how long the replies spanned and which kinds of
engine work ended while a reply streamed.

Usage: benches/stalls.py RUN.json SERVER.log
"""

import collections
import datetime
import json
import re
import sys

ANSI = re.compile(r"\x1b\[[0-9;]*m")
STAMP = re.compile(r"^(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(?:\.\d+)?)Z\s+\w+\s+(.*)$")
# The kind of a phase line: its words up to the first number or parenthesis.
KIND = re.compile(r"^(?:seq \d+: )?([^(\d]+)")


def load_row(path):
    data = json.load(open(path))
    rows = data if isinstance(data, list) else data.get("rows", [data])
    row = next(r for r in rows if isinstance(r, dict) and "replies" in r)
    if "start_unix" not in row:
        sys.exit(f"{path}: no start_unix (written by serve_load.py from 2026-12-07 on)")
    return row


def log_events(path):
    """(unix seconds, kind) of every chunkkv phase line of the log."""
    events = []
    for raw in open(path, errors="replace"):
        m = STAMP.match(ANSI.sub("", raw.rstrip("\n")))
        if not m or m.group(2).startswith("llama"):
            continue
        when = datetime.datetime.fromisoformat(m.group(1)).replace(tzinfo=datetime.timezone.utc)
        kind = KIND.match(m.group(2))
        events.append((when.timestamp(), kind.group(1).strip(" :,") if kind else m.group(2)[:30]))
    return events


def main():
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    row = load_row(sys.argv[1])
    events = log_events(sys.argv[2])
    t0 = row["start_unix"]
    by_turn = collections.defaultdict(lambda: {"replies": 0, "span": 0.0, "tokens": 0, "kinds": collections.Counter()})
    for r in row["replies"]:
        a, b = t0 + r["first_s"], t0 + r["last_s"]
        turn = by_turn[r["turn"]]
        turn["replies"] += 1
        turn["span"] += b - a
        turn["tokens"] += r["tokens"]
        for when, kind in events:
            if a < when < b:
                turn["kinds"][kind] += 1
    print("| turn | replies | tokens | mean span (ms) | work that ended inside spans (count) |")
    print("|---:|---:|---:|---:|---|")
    for k in sorted(by_turn):
        t = by_turn[k]
        kinds = ", ".join(f"{name} {n}" for name, n in t["kinds"].most_common(6)) or "none"
        print(f"| {k} | {t['replies']} | {t['tokens']} | {t['span'] / t['replies'] * 1e3:.0f} | {kinds} |")


if __name__ == "__main__":
    main()
