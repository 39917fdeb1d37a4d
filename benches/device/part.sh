#!/usr/bin/env bash
set -e
for f in .gpux/p/qwen.*; do cat "$f" >> /root/w/qwen.gguf; echo "appended $f"; done
ls -la /root/w/qwen.gguf; tail -c 300 /root/w/build.log
