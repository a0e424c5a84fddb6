#!/bin/sh
# Builds the .deb from ./build (CPack, dpkg-shlibdeps for the dependencies):
# build/layerx_VERSION_ARCH.deb. Run scripts/build.sh first.
set -eu
cd "$(dirname "$0")/.."
scripts/install-deps.sh dpkg-dev file
cd "$(readlink -f build)"
cpack -G DEB >/dev/null
ls "$PWD"/layerx_*.deb
