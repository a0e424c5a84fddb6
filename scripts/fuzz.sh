#!/bin/sh
# Builds the libFuzzer targets (tests/fuzz) with clang 16 into ./build-fuzz and
# runs each for a bounded time on a working copy of its seed corpus
# (build-fuzz/corpus/TARGET: the committed seeds plus the generated ones; it
# keeps what the fuzzer finds between runs, the repository's seeds are never
# touched). Crashes land in build-fuzz/artifacts/TARGET/. See tests/fuzz/README.md.
#
#   scripts/fuzz.sh [TARGET...]       default: fuzz_apply fuzz_records fuzz_sources fuzz_policy
#   FUZZ_SECONDS=60                   per target (-max_total_time)
#   FUZZ_TIMEOUT=10 FUZZ_RSS_MB=2048  per input (-timeout), memory (-rss_limit_mb)
#   FUZZ_BUILD_ONLY=1                 build, run nothing
# Exit status 1 when a target found a crash (or failed to run).
set -eu
cd "$(dirname "$0")/.."

scripts/install-deps.sh clang-16 libclang-rt-16-dev

build=build-fuzz
cmake -S . -B "$build" -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo \
  -DCMAKE_C_COMPILER=clang-16 -DCMAKE_CXX_COMPILER=clang++-16 \
  -DLAYERX_FUZZ=ON -DBUILD_TESTING=OFF >/dev/null
ninja -C "$build" -j"${JOBS:-2}" fuzz
[ -z "${FUZZ_BUILD_ONLY:-}" ] || exit 0

targets="${*:-fuzz_apply fuzz_records fuzz_sources fuzz_policy}"
seconds="${FUZZ_SECONDS:-60}"
symbolizer="$(command -v llvm-symbolizer-16 || command -v llvm-symbolizer || true)"
[ -z "$symbolizer" ] || export ASAN_SYMBOLIZER_PATH="$symbolizer"
export UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1"

"$build/make_fuzz_seeds" "$build/corpus"
# The targets make and remove files in /tmp for every input, which is slow on a
# disk (ext4 with discard: milliseconds per removed directory). As root, each
# runs in a mount namespace of its own with a tmpfs on /tmp: five times the
# executions, and nothing it writes outlives it.
private_tmp=""
case "$PWD/" in
  /tmp/*) ;;
  *) if [ "$(id -u)" = 0 ] && unshare -m true 2>/dev/null; then private_tmp=1; fi ;;
esac
run() {
  if [ -n "$private_tmp" ]; then
    unshare -m --propagation private sh -c \
      'mount -t tmpfs -o size=1g,mode=1777 layerx-fuzz /tmp && exec "$@"' sh "$@"
  else
    "$@"
  fi
}
failed=""
for t in $targets; do
  corpus="$build/corpus/$t"
  artifacts="$build/artifacts/$t"
  mkdir -p "$corpus" "$artifacts"
  if [ -d "tests/fuzz/corpus/$t" ]; then cp -n "tests/fuzz/corpus/$t"/* "$corpus"/ 2>/dev/null || true; fi
  [ "$t" != fuzz_policy ] || cp -n packaging/policy.example.toml "$corpus"/ 2>/dev/null || true
  dict=""
  [ ! -f "tests/fuzz/$t.dict" ] || dict="-dict=tests/fuzz/$t.dict"
  echo "fuzz: $t for ${seconds}s (corpus $corpus)"
  if ! run "$build/$t" -max_total_time="$seconds" -timeout="${FUZZ_TIMEOUT:-10}" \
      -rss_limit_mb="${FUZZ_RSS_MB:-2048}" -artifact_prefix="$artifacts/" -print_final_stats=1 \
      $dict "$corpus" >"$artifacts/log" 2>&1; then
    failed="$failed $t"
    echo "fuzz: $t FAILED: see $artifacts/log; reproduce with $build/$t $artifacts/crash-..." >&2
  fi
  grep -E '^stat::(number_of_executed_units|average_exec_per_sec|new_units_added)' "$artifacts/log" |
    sed "s/^/fuzz: $t /" || true
done
if [ -n "$failed" ]; then
  echo "fuzz: crashes in:$failed" >&2
  exit 1
fi
