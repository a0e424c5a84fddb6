#!/bin/sh
# Quick start: install, build, make the example image, extract it.
set -eu
cd "$(dirname "$0")/.."
scripts/install-deps.sh
scripts/build.sh
rm -rf build/example && mkdir -p build/example
examples/make-example-image.sh build/example
./build/layerx extract build/example/layer1.tar.gz build/example/layer2.tar.zst \
  build/example/layer3.tar --rootfs build/example/rootfs --manifest build/example/manifest.jsonl -v
echo
echo "rootfs:   build/example/rootfs"
echo "manifest: build/example/manifest.jsonl"
find build/example/rootfs -mindepth 1 -printf '%M %U:%G /%P' \( -type l -printf ' -> %l' -o -true \) -printf '\n' | sort -k3
