#!/usr/bin/env bash
# Waits up to S seconds for the jobs, then copies what is done to $OUT.
S="${S:-500}"; t=0
while [ $t -lt "$S" ] && ! grep -q "all done" /root/w/jobs.log; do sleep 10; t=$((t+10)); done
cat /root/w/jobs.log; tail -c 400 /root/w/build.log
cd /root/w && tar czf "$OUT/out.tgz" out out-*.log jobs.log build.log 2>/dev/null; ls -la "$OUT"
for d in out/*/; do cat "$d/table.md" 2>/dev/null | grep chunkkv; done
# Once per lease, the built libraries come back too (libs.sh), for a later lease to carry.
if [ ! -e /root/w/libs.done ] && [ -e /root/w/b/prefix/lib/libllama.so ] && ! grep -q "carried libraries" /root/w/build.log; then
  bash /root/w/gpux/libs.sh && touch /root/w/libs.done
fi
