#!/usr/bin/env bash
# After the build: packs the CUDA libraries (prefix/) into $OUT as pieces of at most 15 MiB, so a
# later lease can carry them back (libs-in.sh) instead of building for 4.5 minutes. The name
# carries a key of the bundle's llama.cpp source and build script: setup.sh uses the pieces only
# for the same key.
set -e
cd /root/w/b
[ -e prefix/lib/libllama.so ] || { echo "not built yet"; tail -c 300 /root/w/build.log; exit 1; }
key="$(bash /root/w/gpux/key.sh)"
tar -cf - prefix | xz -T0 -6 | split -b 15M -d - "$OUT/libs-$key.txz."
ls -la "$OUT"
