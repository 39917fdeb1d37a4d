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
cells="-v --kv-recall host -ngl 99 -fa on --kv-recall-cells 2048"
go new-t3-a chunkkv "$new"
go old-t3-a chunkkv-old "$old"
go long-new chunkkv "$new" LONG=256
go long-none chunkkv "$new" LONG=256 NONE=1 NP_FULL=4 BUDGETS=" " EXTRA="-ngl 99 -fa on"
go cells-t3-a chunkkv "$new" EXTRA="$cells"
go new-t3-b chunkkv "$new" FIRST=20
go old-t3-b chunkkv-old "$old" FIRST=20
go cells-t3-b chunkkv "$new" FIRST=20 EXTRA="$cells"
go long-old chunkkv-old "$old" LONG=256
go new-t1-a chunkkv "$new" TURNS=1
go ref-t3-a chunkkv "$new" NONE=0 NP_FULL=4 BUDGETS=" " QUEUED=1 EXTRA="-ngl 99 -fa on"
echo "$(date -u +%T) all done"
