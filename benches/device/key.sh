#!/usr/bin/env bash
# The key of a bundle's build (run in the bundle): its llama.cpp source's contents and build script.
{ tar -xzOf llama.cpp-src.tar.gz; cat build.sh; } | sha256sum | cut -c1-16
