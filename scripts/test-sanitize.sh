#!/bin/sh
# The unit and integration suites once more under ASan + UBSan: configures
# build-asan/ with -DLAYERX_SANITIZE=ON (Ninja, two jobs), builds, runs ctest
# there, root and rootless variants alike. Any sanitizer report fails its test.
# The jailed extractor is instrumented too; see LAYERX_SANITIZE in
# sandbox/seccomp.cc, sandbox/jail.cc and sandbox/spawn.cc for what its jail
# allows in this mode.
#
#   scripts/test-sanitize.sh [build|test]    (default: both)
#
# Left out by default, to keep CI's time in check (LAYERX_SANITIZE_TESTS=all
# runs them too): corpus_umoci_node (~9 minutes even uninstrumented, spent in
# umoci and python; corpus_umoci_debian-opq takes the same paths through the
# jailed extractor on a real image), corpus_umoci_debian (a subset of
# debian-opq), the benchmarks (they assert nothing) and installed_tree (it
# builds an uninstrumented consumer against the installed tree). Like
# build.sh, a checkout that uid 65534 cannot read builds in /var/tmp.
set -eu
cd "$(dirname "$0")/.."
stage=${1:-all}
dir=build-asan
if [ ! -e $dir ] && [ "$(id -u)" = 0 ] && command -v setpriv >/dev/null &&
   ! setpriv --reuid=65534 --regid=65534 --clear-groups test -r "$PWD/CMakeLists.txt" 2>/dev/null; then
  out=/var/tmp/layerx-build-asan-$(printf '%s' "$PWD" | sha1sum | cut -c1-12)
  mkdir -p "$out" && chmod 0755 "$out"
  ln -s "$out" $dir
fi
dir=$(readlink -f $dir 2>/dev/null || echo $dir)
if [ "$stage" != test ]; then
  # -O0: with ASan + UBSan, gcc takes 3.4x the CPU at -O2 (broker/cli/main.cc: 60 s
  # vs 204 s), while the suites spend their time in mkfs, e2fsck, umoci and
  # python, not in instrumented code. -g1: line tables are all a report needs.
  cmake -S . -B "$dir" -G Ninja -DCMAKE_BUILD_TYPE=Debug -DLAYERX_SANITIZE=ON \
    -DCMAKE_C_FLAGS_DEBUG=-g1 -DCMAKE_CXX_FLAGS_DEBUG=-g1 >/dev/null
  ninja -C "$dir" -j"${JOBS:-2}"
fi
[ "$stage" = build ] && exit 0
exclude='^(corpus_umoci_node|corpus_umoci_debian|bench_quick|micro_bench_quick|installed_tree)$'
[ "${LAYERX_SANITIZE_TESTS:-}" = all ] && exclude='^$'
ASAN_OPTIONS=${ASAN_OPTIONS:-detect_leaks=1:check_initialization_order=1:strict_string_checks=1} \
UBSAN_OPTIONS=${UBSAN_OPTIONS:-print_stacktrace=1} \
  ctest --test-dir "$dir" --output-on-failure -j2 --timeout 900 -E "$exclude"
