#!/usr/bin/env bash
# The runs, one after another on the one GPU; results under /root/w/out/NAME.
# Edit the list at the bottom before go.sh; the most wanted runs first, since
# the device time may end before the last.
cd /root/w/repo
while [ ! -e /root/w/b/prefix/lib/libllama.so ] && ! grep -q "Error\|error:" /root/w/build.log; do sleep 5; done
export LD_LIBRARY_PATH=/root/w/b/prefix/lib CHUNKKV_DATA=/root/w/data
new="$(cat /root/w/b/COMMIT)"
old=3a32260
# go NAME BINARY COMMIT [VAR=VALUE...]: ChunkKV 10% at -np 20 with recall unless the
# variables say otherwise (NONE=1 BUDGETS=" " NP_FULL=4 for the uncompressed server).
go() {
  local name="$1" bin="$2" commit="$3"; shift 3
  echo "$(date -u +%T) start $name"
  env CHUNKKV_BIN="/root/w/b/$bin" CHUNKKV_COMMIT="$commit" MODEL=/root/w/qwen.gguf CTX=135168 DOCS=30000-32000 N=20 \
    NP_COMPRESSED=20 BUDGETS=10 NONE=0 TURNS=3 FIRST=0 EXTRA="-v --kv-recall host -ngl 99 -fa on" "$@" \
    bash benches/serve_load.sh "/root/w/out/$name" > "/root/w/out-$name.log" 2>&1
  echo "$(date -u +%T) done $name rc $?"
}
mkdir -p /root/w/out
# Replays: each server answers the last turn after another run's first two replies.
res=/root/w/repo/docs/results
ref_a=$res/serve-load-gpu-rank-ahead/ref-t3-a/none-queued.json
ref_b=$res/serve-load-h200/after-reply-7fdd2cb/none-t3-b/none-queued.json
c10_a=$res/serve-load-gpu-rank-ahead/new-t3-a/chunkkv-10.json
c10_b=$res/serve-load-gpu-rank-ahead/new-t3-b/chunkkv-10.json
none=(NONE=0 NP_FULL=4 BUDGETS=" " QUEUED=1 EXTRA="-ngl 99 -fa on")
go none-after-c10-a chunkkv "$new" "${none[@]}" REPLAY="$c10_a"
go c10-after-none-a chunkkv "$new" REPLAY="$ref_a"
go none-after-c10-b chunkkv "$new" "${none[@]}" FIRST=20 REPLAY="$c10_b"
go c10-after-none-b chunkkv "$new" FIRST=20 REPLAY="$ref_b"
go c10-after-c10-a chunkkv "$new" REPLAY="$c10_a"
go none-after-none-a chunkkv "$new" "${none[@]}" REPLAY="$ref_a"
echo "$(date -u +%T) all done"
