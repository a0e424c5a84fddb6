#!/bin/sh
# Configures and builds layerx into ./build (Ninja, two jobs), for the install
# prefix /usr (PREFIX=... to change it; `cmake --install build --prefix DIR`
# still relocates the tree).
# The suite runs every test binary once more as uid 65534: when this checkout
# is not reachable by other users (say under /root), the build tree goes to
# /var/tmp and ./build links to it.
set -eu
cd "$(dirname "$0")/.."
if [ ! -e build ] && [ "$(id -u)" = 0 ] && command -v setpriv >/dev/null &&
   ! setpriv --reuid=65534 --regid=65534 --clear-groups test -r "$PWD/CMakeLists.txt" 2>/dev/null; then
  out=/var/tmp/layerx-build-$(printf '%s' "$PWD" | sha1sum | cut -c1-12)
  mkdir -p "$out" && chmod 0755 "$out"
  ln -s "$out" build
  echo "build: $PWD is private; building in $out (./build links there)"
fi
cmake -S . -B "$(readlink -f build 2>/dev/null || echo build)" -G Ninja -DCMAKE_BUILD_TYPE="${BUILD_TYPE:-RelWithDebInfo}" \
  -DCMAKE_INSTALL_PREFIX="${PREFIX:-/usr}" >/dev/null
ninja -C "$(readlink -f build)" -j"${JOBS:-2}"
