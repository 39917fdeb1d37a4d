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
# The same bytes as the f16 -c 135168 (135168 x 16 / 8.5 = 254,434 cells of q8_0, rounded down to
# 20 slots of 12,544 = 49 x 256): a q8_0 cache gives each of 20 compressed slots 1.8x the room.
q8="-ctk q8_0 -ctv q8_0"
rec="-v --kv-recall host -ngl 99 -fa on"
# second batch: a third run of each set, and this lease's f16 references
go q8-t3-a3 chunkkv "$new" CTX=250880 EXTRA="$rec $q8"
go q8-t3-b3 chunkkv "$new" CTX=250880 FIRST=20 EXTRA="$rec $q8"
go none-t3-a chunkkv "$new" NONE=0 BUDGETS=" " QUEUED=1 NP_FULL=4
go f16-t3-b chunkkv "$new" FIRST=20
go none-t3-b chunkkv "$new" NONE=0 BUDGETS=" " QUEUED=1 NP_FULL=4 FIRST=20
echo "$(date -u +%T) all done"
