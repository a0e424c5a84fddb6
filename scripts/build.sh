#!/bin/sh
# Configures and builds layerx into ./build (Ninja, two jobs).
set -eu
cd "$(dirname "$0")/.."
cmake -S . -B build -G Ninja -DCMAKE_BUILD_TYPE="${BUILD_TYPE:-RelWithDebInfo}" >/dev/null
ninja -C build -j"${JOBS:-2}"
