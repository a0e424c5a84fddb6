#!/bin/sh
# The .deb on this machine, as an operator gets it: build it, `dpkg -i` it
# (apt-get installs what its Depends name), check what it says it depends on,
# run the installed /usr/bin/layerx on the example image with no build tree
# around (the helper from /usr/libexec/layerx), then purge it. Root only; it
# changes the system, so CI runs it (scripts/test.sh), not ctest.
set -eu
cd "$(dirname "$0")/../.."
[ "$(id -u)" = 0 ] || { echo "deb_test: needs root (dpkg -i)"; exit 77; }
if dpkg-query -W -f '${Status}' layerx 2>/dev/null | grep -q 'ok installed'; then
  echo "deb_test: layerx is already installed here; not touching it"; exit 77
fi
deb=$(scripts/package.sh | tail -1)
echo "deb_test: $deb"
dpkg-deb -f "$deb" Depends | tee /tmp/layerx-deb-depends
# (libarchive, capnp for the extractor, libcap: linked statically into the helper;
# libcurl4: dlopen'd for docker://, so named by hand)
for dep in libseccomp2 libext2fs2 libcapnp libisal2 libssl3 libcurl4 e2fsprogs util-linux; do
  grep -q "$dep" /tmp/layerx-deb-depends || { echo "deb_test: Depends lacks $dep" >&2; exit 1; }
done
work=$(mktemp -d /tmp/layerx-deb-test-XXXXXX)
chmod 0755 "$work"
cleanup() { dpkg --purge layerx >/dev/null 2>&1 || true; rm -rf "$work" /tmp/layerx-deb-depends; }
trap cleanup EXIT
DEBIAN_FRONTEND=noninteractive apt-get install -y -q "$deb" >/dev/null
examples/make-example-image.sh "$work/img" >/dev/null
cd "$work"  # nothing of the build tree is reachable from here
env -u LAYERX_EXTRACTOR -u LD_LIBRARY_PATH /usr/bin/layerx extract \
  img/layer1.tar.gz img/layer2.tar.zst img/layer3.tar --ext4 "$work/root.img" --rootfs "$work/rootfs" -q
[ -s "$work/root.img" ] && [ -e "$work/rootfs/usr/bin/sudo" ] || { echo "deb_test: no output" >&2; exit 1; }
mkdir -m 0777 "$work/nobody"
setpriv --reuid=65534 --regid=65534 --clear-groups /usr/bin/layerx extract \
  img/layer1.tar.gz img/layer2.tar.zst img/layer3.tar --ext4 "$work/nobody/root.img" -q
[ -s "$work/nobody/root.img" ] || { echo "deb_test: rootless: no output" >&2; exit 1; }
/usr/bin/layerx --version
man -w layerx >/dev/null 2>&1 || [ -e /usr/share/man/man1/layerx.1.gz ] || [ -e /usr/share/man/man1/layerx.1 ] ||
  { echo "deb_test: no man page" >&2; exit 1; }
pkg-config --exists layerx || [ -e "$(ls /usr/lib/*/pkgconfig/layerx.pc 2>/dev/null | head -1)" ] ||
  { echo "deb_test: no layerx.pc" >&2; exit 1; }
echo "deb_test: ok"
