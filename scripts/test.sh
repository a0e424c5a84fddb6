#!/bin/sh
# The whole test suite: install, build, build the real-image corpus when the
# shared corpus builder is present (so the umoci comparison runs), run ctest
# (every suite as root and as uid 65534, the installed tree with its consumer
# project and examples), then, as root, the .deb: built, installed with
# dpkg, used, purged (tests/packaging/deb_test.sh; LAYERX_DEB_SKIP=1 leaves it
# out). The sanitizer suite and the fuzzers are scripts/test-sanitize.sh and
# scripts/fuzz.sh; CI (.ci/run) runs them after this.
set -eu
cd "$(dirname "$0")/.."
scripts/install-deps.sh
scripts/build.sh
if [ -z "${LAYERX_CORPUS_SKIP:-}" ] && [ -x ../shared/corpus/make-corpus.sh ] && [ "$(id -u)" = 0 ]; then
  # Real images made by debootstrap/umoci/skopeo; tests that need them skip
  # with a message if this fails.
  ../shared/corpus/make-corpus.sh >build/corpus.log 2>&1 || echo "test: corpus build failed, see build/corpus.log" >&2
fi
status=0
ctest --test-dir build --output-on-failure -j2 --timeout 600 || status=1
if [ -z "${LAYERX_DEB_SKIP:-}" ] && [ "$(id -u)" = 0 ]; then
  tests/packaging/deb_test.sh || { rc=$?; [ "$rc" = 77 ] || status=1; }
fi
exit "$status"
