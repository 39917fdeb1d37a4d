"""Drives a running `chunkkv serve` with the official openai client.

Usage: python openai_client.py BASE_URL DOCUMENT_FILE
Prints one `ok: ...` line per check; any failure raises (non-zero exit).
"""

import re
import sys
import threading
import urllib.request

import openai

base, doc_file = sys.argv[1], sys.argv[2]
client = openai.OpenAI(base_url=base + "/v1", api_key="unused", max_retries=0, timeout=600)


def metric(name):
    text = urllib.request.urlopen(base + "/metrics").read().decode()
    return sum(float(v) for v in re.findall(r"^" + name + r"(?:\{[^}]*\})? (\S+)$", text, re.M))


models = client.models.list()
assert len(models.data) == 1 and models.data[0].id, models
print("ok: models", models.data[0].id)

ask = [{"role": "user", "content": "What is the capital of France? Answer in one word."}]
r = client.chat.completions.create(model="anything", messages=ask, max_tokens=16, temperature=0)
assert r.model == "anything", "the model field is echoed"
text = r.choices[0].message.content
assert text and r.choices[0].finish_reason in ("stop", "length"), r
assert r.usage.prompt_tokens > 0 and r.usage.completion_tokens > 0
assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
print("ok: chat", repr(text))

pieces, finish, usage = [], None, None
for chunk in client.chat.completions.create(
    model="anything", messages=ask, max_tokens=16, temperature=0, stream=True
):
    if chunk.choices:
        pieces.append(chunk.choices[0].delta.content or "")
        finish = chunk.choices[0].finish_reason or finish
    usage = chunk.usage or usage
assert "".join(pieces) == text, ("greedy stream and non-stream agree", pieces, text)
assert finish in ("stop", "length") and usage and usage.completion_tokens > 0
print("ok: chat stream", len(pieces), "chunks")

c = client.completions.create(model="x", prompt="The first three letters of the alphabet are", max_tokens=8, temperature=0, seed=3)
assert c.choices[0].text and c.usage.completion_tokens > 0, c
print("ok: completions", repr(c.choices[0].text))

# Three turns under compression (the server's default, ChunkKV at 25%): a
# document with a fact, an unrelated question, then the fact. Each request
# sends the whole conversation; the slot keeps it compressed in between.
document = " ".join(open(doc_file).read().split())
cut = document.rfind(" ", 0, len(document) // 2)
fact = "The secret code of the archive is PELICAN-7431."
compressions = metric("chunkkv_compressions_total")
conv = []
for turn in [
    "Here is a text. %s %s %s Remember the secret code of the archive.\n"
    "In one short sentence, what is the text about?" % (document[:cut], fact, document[cut:]),
    "Which people does the text mention? Be brief.",
    "What is the secret code of the archive?",
]:
    conv.append({"role": "user", "content": turn})
    r = client.chat.completions.create(model="x", messages=conv, max_tokens=24, temperature=0)
    conv.append({"role": "assistant", "content": r.choices[0].message.content})
answer = r.choices[0].message.content
assert metric("chunkkv_compressions_total") >= compressions + 2, "the turns compressed"
slots = urllib.request.urlopen(base + "/metrics").read().decode()
cells = max(float(v) for v in re.findall(r'chunkkv_kv_cells_used\{slot="\d+"\} (\S+)', slots))
assert cells < 0.5 * r.usage.prompt_tokens, ("the conversation's slot is compressed", cells, r.usage.prompt_tokens)
assert "7431" in answer, ("the turn-1 fact is recalled", answer)
print("ok: three turns at 25%%: %r (%d prompt tokens, %d cells live)" % (answer, r.usage.prompt_tokens, cells))

# Eight at once on four slots: four wait in the queue, all are answered.
answers = [None] * 8


def one(i):
    q = [{"role": "user", "content": "Give me one word that rhymes with cat. (%d)" % i}]
    answers[i] = client.chat.completions.create(model="x", messages=q, max_tokens=12, temperature=0.7, seed=i).choices[0].message.content


threads = [threading.Thread(target=one, args=(i,)) for i in range(8)]
for t in threads:
    t.start()
for t in threads:
    t.join()
assert all(a for a in answers), answers
print("ok: 8 concurrent requests on 4 slots")

try:
    client.chat.completions.create(model="x", messages=ask, max_tokens=8, extra_body={"chunkkv": {"kv_budget": 0}})
    raise AssertionError("a zero budget is refused")
except openai.BadRequestError as e:
    assert e.body and "kv_budget" in str(e.body.get("param")), e.body
print("ok: bad budget is a 400 in OpenAI's shape")
