#!/usr/bin/env bash
# The server's capacity benchmark: the same total -c served three ways —
# uncompressed with as many slots as fit a conversation, and ChunkKV at 20%
# and 10% with four times the slots — each driven by benches/serve_load.py
# (N concurrent conversations opening with a document; nothing queues, so a
# conversation without a slot is refused and counted).
# Usage: benches/serve_load.sh OUT_DIR
#   env: CHUNKKV_BIN, MODEL, CTX, DOCS, N, NP_FULL, NP_COMPRESSED, BUDGETS ("20 10"), EXTRA
#   (EXTRA goes to every server, e.g. "--kv-recall host -ngl 99"), QUEUED=1 (the
#   uncompressed server once more with a queue, so every conversation is answered:
#   its recall over all N documents is the quality floor's reference), NONE=0 (skip the
#   uncompressed server), TURNS=1 (the question right after the document, no
#   earlier turns) or 2 (a summary turn, then the question), FIRST=20 (the number of the
#   first conversation: another set of documents and facts), LONG=256 (with 3 turns, the
#   middle turn asks for a detailed answer of up to 256 tokens: a decode-bound load),
#   REPLAY=run.json (an earlier run's replies stand in for the earlier turns; only the
#   question is sent, so two servers answer it after the same history)
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:?usage: benches/serve_load.sh OUT_DIR}"
mkdir -p "$out"
bin="${CHUNKKV_BIN:-target/release/chunkkv}"
model="${MODEL:-smollm2-135m}"
ctx="${CTX:-16384}"
docs="${DOCS:-2000-6000}"
n="${N:-8}"
np_full="${NP_FULL:-2}"
np_comp="${NP_COMPRESSED:-8}"
read -r -a extra <<< "${EXTRA:-}"
read -r -a budgets <<< "${BUDGETS:-20 10}"

run() {
  local slug="$1" label="$2" queue="$3"; shift 3
  "$bin" serve -m "$model" -c "$ctx" --port 0 --queue "$queue" "$@" "${extra[@]}" 2> "$out/$slug.server.log" &
  local pid=$! port=""
  for _ in $(seq 1 600); do
    port="$(sed -n 's/.*listening on http:\/\/127.0.0.1:\([0-9]*\).*/\1/p' "$out/$slug.server.log")"
    [ -n "$port" ] && break
    kill -0 "$pid" 2>/dev/null || { cat "$out/$slug.server.log" >&2; exit 1; }
    sleep 0.5
  done
  python3 benches/serve_load.py --url "http://127.0.0.1:$port" --conversations "$n" \
    --doc-tokens "$docs" --turns "${TURNS:-3}" --first "${FIRST:-0}" --long-reply "${LONG:-0}" ${REPLAY:+--replay "$REPLAY"} --label "$label" --json-out "$out/$slug.json" $header >> "$out/table.md"
  header=""
  curl -s "http://127.0.0.1:$port/metrics" > "$out/$slug.metrics.txt"
  # What "the same memory" means: the KV cache each server allocated.
  kv_sizes+="$label: $(sed -n 's/.*listening on http:[^ ]* (\(.*\))$/\1/p' "$out/$slug.server.log")"$'\n'
  kill -TERM "$pid"
  wait "$pid"
}

header="--header"
kv_sizes=""
: > "$out/table.md"
if [ "${NONE:-1}" = 1 ]; then
  run none "none, -np $np_full" 0 --kv-method none -np "$np_full"
fi
for b in "${budgets[@]}"; do
  run "chunkkv-$b" "chunkkv $b%, -np $np_comp" 0 --kv-method chunkkv --kv-budget "$b%" -np "$np_comp"
done
if [ "${QUEUED:-0}" = 1 ]; then
  run none-queued "none, -np $np_full, queued" "$n" --kv-method none -np "$np_full"
fi
{
  echo
  echo "model $model, -c $ctx, $n conversations, documents of $docs tokens (conversations from ${FIRST:-0}), ${TURNS:-3} turns, long reply ${LONG:-0}, extra flags: ${EXTRA:-none}, $(date -u +%F)"
  printf '%s' "$kv_sizes"
  echo "commit ${CHUNKKV_COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || echo unknown)}, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//'), $(nproc) CPUs"
  command -v nvidia-smi > /dev/null && nvidia-smi --query-gpu=name --format=csv,noheader | sed 's/^/GPU: /' | sort | uniq -c
} >> "$out/table.md"
cat "$out/table.md"
