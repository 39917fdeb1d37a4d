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
# The same bytes as the f16 -c 135168 (1584 MiB): q8_0 K and V, 20 slots of 12,544 cells; q8_0 K
# with q4_0 V (4,992 bytes a cell against 12,288), 20 slots of 16,384 = 64 x 256 (1560 MiB).
q8="-ctk q8_0 -ctv q8_0"
q84="-ctk q8_0 -ctv q4_0"
rec="-v --kv-recall host -ngl 99 -fa on"
# The defaults as shipped from 7af9190 on (--decode-share replies --batch-replies 1500, pinned
# staging for recall's reads and uploads). On the H100 lease of de03380 these two flags decoded
# 3.65x as fast as the uncompressed server on sets a and c (runs rfb, docs/results/
# serve-load-h100-replies-first/). Here: the compressed server with no scheduling flags, and the
# uncompressed one, on sets a and c; then set d compressed. About 35 s a compressed run, 65 s an
# uncompressed one (H100).
for set in a:0 c:40; do
  s="${set%%:*}" first="${set##*:}"
  go "q84-$s" chunkkv "$new" CTX=327680 FIRST="$first" EXTRA="$rec $q84"
  go "none-$s" chunkkv "$new" NONE=0 BUDGETS=" " QUEUED=1 NP_FULL=4 FIRST="$first"
done
go "q84-d" chunkkv "$new" CTX=327680 FIRST=60 EXTRA="$rec $q84"
echo "$(date -u +%T) all done"
