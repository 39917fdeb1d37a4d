#!/usr/bin/env bash
# Before setup.sh: appends the carried pieces of .gpul/ (libs-KEY.txz.NN from libs.sh, in order,
# as many per call as fit) to /root/w/libs-KEY.txz.
set -e
mkdir -p /root/w
for f in .gpul/libs-*.txz.*; do
  cat "$f" >> "/root/w/$(basename "${f%.*}")"; echo "appended $f"
done
ls -la /root/w/libs-*.txz
