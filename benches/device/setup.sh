#!/usr/bin/env bash
# Call 1: unpack the bundle and data outside the checkout, start the CUDA build.
set -e
mkdir -p /root/w
rm -rf /root/w/b /root/w/data /root/w/qwen.gguf
cp -r gpu-bundle /root/w/b
cp -r .gpu/data /root/w/data
cd /root/w/b
# Libraries a lease before built from the same source (libs.sh, libs-in.sh) save the build.
key="$(bash "$OLDPWD/benches/device/key.sh")"
if [ -e "/root/w/libs-$key.txz" ] && xz -dc "/root/w/libs-$key.txz" | tar -xf -; then
  echo "built: carried libraries $key" | tee /root/w/build.log
else
  echo "no libraries for $key: building"
  setsid nohup bash build.sh > /root/w/build.log 2>&1 < /dev/null &
fi
sleep 2
nvidia-smi --query-gpu=name,memory.used --format=csv
grep -m1 'model name' /proc/cpuinfo; nproc
cat /root/w/b/COMMIT
