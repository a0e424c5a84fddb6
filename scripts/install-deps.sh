#!/bin/sh
# Installs what layerx needs to build and test, from Debian bookworm's packages,
# and any further packages named as arguments (scripts/fuzz.sh: clang).
# docker-registry, skopeo, openssl, apache2-utils (htpasswd -B), curl, iproute2
# (ss): the local registry of tests/registry/registry.sh. Where policy-rc.d
# does not forbid it, the package may start its own service on :5000; the tests
# do not use it.
set -eu
PKGS="cmake ninja-build g++ pkg-config git python3
  libarchive-dev libseccomp-dev libcap-dev capnproto libcapnp-dev libspdlog-dev libfmt-dev
  libcli11-dev nlohmann-json3-dev libtomlplusplus-dev libssl-dev libcurl4-openssl-dev libext2fs-dev e2fsprogs
  libgtest-dev libgmock-dev libbenchmark-dev
  libzstd-dev liblzma-dev libbz2-dev zlib1g-dev libisal-dev
  tar gzip zstd xz-utils bzip2 attr util-linux umoci strace
  docker-registry skopeo openssl apache2-utils curl iproute2 $*"
missing=""
for p in $PKGS; do
  dpkg-query -W -f '${Status}' "$p" 2>/dev/null | grep -q 'ok installed' || missing="$missing $p"
done
if [ -n "$missing" ]; then
  [ "$(id -u)" = 0 ] || { echo "install-deps: need root to apt-get install:$missing" >&2; exit 1; }
  echo "install-deps: apt-get install$missing"
  apt-get update -q >/dev/null
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends $missing >/dev/null
fi
