#!/usr/bin/env bash
# The runs, one after another on the one GPU; results under /root/w/out/NAME.
cd /root/w/repo
while [ ! -e /root/w/b/prefix/lib/libllama.so ] && ! grep -q "Error\|error:" /root/w/build.log; do sleep 5; done
export LD_LIBRARY_PATH=/root/w/b/prefix/lib CHUNKKV_DATA=/root/w/data
go() {
  local name="$1" bin="$2" turns="$3" first="$4"
  echo "$(date -u +%T) start $name"
  CHUNKKV_BIN="/root/w/b/$bin" CHUNKKV_COMMIT="$5" MODEL=/root/w/qwen.gguf CTX=135168 DOCS=30000-32000 N=20 \
    NP_COMPRESSED=20 BUDGETS=10 NONE=0 TURNS="$turns" FIRST="$first" \
    EXTRA="-v --kv-recall host -ngl 99 -fa on" bash benches/serve_load.sh "/root/w/out/$name" > "/root/w/out-$name.log" 2>&1
  echo "$(date -u +%T) done $name rc $?"
}
mkdir -p /root/w/out
new="$(cat /root/w/b/COMMIT)"
go new-t3-a chunkkv 3 0 "$new"
go old-t3-a chunkkv-old 3 0 3a32260
go new-t3-b chunkkv 3 20 "$new"
go old-t3-b chunkkv-old 3 20 3a32260
go new-t1-a chunkkv 1 0 "$new"
go old-t1-a chunkkv-old 1 0 3a32260
echo "$(date -u +%T) start ref-t3-a"
CHUNKKV_BIN=/root/w/b/chunkkv CHUNKKV_COMMIT="$new" MODEL=/root/w/qwen.gguf CTX=135168 DOCS=30000-32000 N=20 \
  NP_FULL=4 BUDGETS=" " NONE=0 QUEUED=1 TURNS=3 FIRST=0 EXTRA="-ngl 99 -fa on" \
  bash benches/serve_load.sh /root/w/out/ref-t3-a > /root/w/out-ref-t3-a.log 2>&1
echo "$(date -u +%T) done ref-t3-a rc $?"
echo "$(date -u +%T) all done"
