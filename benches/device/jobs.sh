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
# Room for recall: half the slots in the same -c (-np 10: 13,824 cells a slot, 2.5x the
# uncompressed server's conversations), 10 conversations at a time (no queue); sinks at -np 20.
go np10-t3-a0 chunkkv "$new" NP_COMPRESSED=10 N=10 FIRST=0
go np10-t3-a1 chunkkv "$new" NP_COMPRESSED=10 N=10 FIRST=10
go np10-t3-b0 chunkkv "$new" NP_COMPRESSED=10 N=10 FIRST=20
go np10-t3-b1 chunkkv "$new" NP_COMPRESSED=10 N=10 FIRST=30
go sinks-t3-a chunkkv "$new" EXTRA="-v --kv-recall host -ngl 99 -fa on --kv-sinks 4"
go sinks-t3-b chunkkv "$new" FIRST=20 EXTRA="-v --kv-recall host -ngl 99 -fa on --kv-sinks 4"
go new-t3-a chunkkv "$new"
echo "$(date -u +%T) all done"
