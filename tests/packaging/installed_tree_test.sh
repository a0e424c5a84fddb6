#!/bin/sh
# layerx as library users and packagers get it: `cmake --install` into a temp
# prefix, then, against that tree only:
#   - the files are where they belong (bin, libexec, include, lib, cmake, pkgconfig, man);
#   - liblayerx.so.0 has its SONAME and exports the public API and nothing else;
#   - tests/consumer (C++17, find_package(layerx), shared and static) builds and passes;
#   - examples/extract.c builds with pkg-config and extracts, as root and as uid 65534;
#   - examples/extract.py (ctypes) extracts, finding the helper from the library;
#   - `layerx --version` and layerx_version() agree.
#   installed_tree_test.sh BUILD_DIR
set -eu
build=$(cd "${1:?usage: installed_tree_test.sh BUILD_DIR}" && pwd)
src=$(cd "$(dirname "$0")/../.." && pwd)
work=$(mktemp -d /tmp/layerx-install-test-XXXXXX)
chmod 0755 "$work"
trap 'rm -rf "$work"' EXIT
fail() { echo "installed_tree_test: FAILED: $*" >&2; exit 1; }

inst=$work/inst
cmake --install "$build" --prefix "$inst" >/dev/null
libdir=$(cd "$inst" && dirname "$(find . -name liblayerx.so.0 | head -1)")
[ "$libdir" != . ] || fail "no liblayerx.so.0 installed"
libdir=$inst/${libdir#./}
for f in bin/layerx libexec/layerx/layerx-extractor include/layerx/layerx.h \
         include/layerx/layerx.hpp share/man/man1/layerx.1 share/doc/layerx/policy.example.toml \
         lib/systemd/system/layerx.socket lib/systemd/system/layerx.service; do
  [ -e "$inst/$f" ] || fail "$f not installed"
done
for f in liblayerx.so liblayerx.a pkgconfig/layerx.pc cmake/layerx/layerxConfig.cmake \
         cmake/layerx/layerxConfigVersion.cmake cmake/layerx/layerxTargets.cmake; do
  [ -e "$libdir/$f" ] || fail "$libdir/$f not installed"
done

# The SONAME, and no symbol outside the public API.
soname=$(objdump -p "$libdir/liblayerx.so.0" | awk '$1 == "SONAME" {print $2}')
[ "$soname" = liblayerx.so.0 ] || fail "SONAME is '$soname'"
extra=$(nm -D --defined-only "$libdir/liblayerx.so.0" | awk '{print $3}' | c++filt |
        grep -v -E '^(layerx_[a-z_]+(@@LAYERX_0)?|layerx::(Version|FailureKindName|Extract|Inspect|ShowPolicy|Serve|QueryService|ToJson(\[abi:cxx11\])?)\(.*|LAYERX_0)$' || true)
[ -z "$extra" ] || fail "liblayerx exports more than the API: $(echo "$extra" | head -5)"
echo "installed_tree_test: $(nm -D --defined-only "$libdir/liblayerx.so.0" | grep -c ' T ') exported functions, SONAME $soname"

# The example image (owners only when root).
img=$work/img
"$src/examples/make-example-image.sh" "$img" >/dev/null
layers="$img/layer1.tar.gz $img/layer2.tar.zst $img/layer3.tar"
export LD_LIBRARY_PATH="$libdir"
unset LAYERX_EXTRACTOR || true

# C++: find_package, shared and static.
cmake -S "$src/tests/consumer" -B "$work/consumer" -G Ninja -DCMAKE_PREFIX_PATH="$inst" \
  -DCMAKE_BUILD_TYPE=Release >/dev/null
ninja -C "$work/consumer" >/dev/null
for exe in consumer consumer_static; do
  out=$work/out-$exe
  mkdir -p "$out"
  # A static user has no liblayerx to look beside: it finds the helper at the
  # configured install path (/usr/libexec/layerx), or where it is told.
  helper=""
  [ "$exe" = consumer ] || helper="$inst/libexec/layerx/layerx-extractor"
  LAYERX_EXTRACTOR="$helper" "$work/consumer/$exe" "$out" $layers >"$work/$exe.log" 2>&1 ||
    { cat "$work/$exe.log" >&2; fail "$exe"; }
  grep -q '^consumer: ok$' "$work/$exe.log" || fail "$exe did not say ok"
done
ldd "$work/consumer/consumer_static" | grep -q liblayerx && fail "consumer_static links liblayerx.so"

# C: pkg-config against the installed tree (layerx.pc finds its own prefix).
export PKG_CONFIG_PATH="$libdir/pkgconfig"
# shellcheck disable=SC2046
cc -std=c11 -Wall -Wextra -Werror -o "$work/extract-c" "$src/examples/extract.c" \
  $(pkg-config --cflags --libs layerx)
"$work/extract-c" "$work/c.img" $layers >"$work/c.log" || fail "extract-c"
grep -q '^ok: ' "$work/c.log" || fail "extract-c did not extract"
version=$(head -1 "$work/c.log")
cli_version=$("$inst/bin/layerx" --version)
[ "$version" = "$cli_version" ] || fail "library says '$version', CLI '$cli_version'"
# A bad layer: exit 1, a structured error.
printf 'not a tar' > "$work/bad.tar"
if "$work/extract-c" "$work/bad.img" "$work/bad.tar" 2>"$work/bad.log"; then fail "bad layer accepted"; fi
grep -q 'status=invalid input layer=1' "$work/bad.log" || { cat "$work/bad.log" >&2; fail "bad layer error"; }
[ ! -e "$work/bad.img" ] || fail "output left after a failure"
if [ "$(id -u)" = 0 ] && command -v setpriv >/dev/null; then
  mkdir -m 0777 "$work/nobody"
  setpriv --reuid=65534 --regid=65534 --clear-groups env LD_LIBRARY_PATH="$libdir" \
    "$work/extract-c" "$work/nobody/c.img" $layers >/dev/null || fail "extract-c as uid 65534"
fi

# Python (ctypes): the helper is found relative to liblayerx, not python3.
LAYERX_LIBRARY="$libdir/liblayerx.so.0" python3 "$src/examples/extract.py" "$work/py-rootfs" $layers \
  >"$work/py.log" 2>&1 || { cat "$work/py.log" >&2; fail "extract.py"; }
grep -q '^ok: ' "$work/py.log" || fail "extract.py did not extract"
[ -d "$work/py-rootfs/usr/bin" ] || fail "extract.py wrote no rootfs"
echo "installed_tree_test: ok ($version)"
