#!/bin/sh
# The whole test suite: install, build, build the real-image corpus when the
# shared corpus builder is present (so the umoci comparison runs), run ctest.
set -eu
cd "$(dirname "$0")/.."
scripts/install-deps.sh
scripts/build.sh
if [ -z "${LAYERX_CORPUS_SKIP:-}" ] && [ -x ../shared/corpus/make-corpus.sh ] && [ "$(id -u)" = 0 ]; then
  # Real images made by debootstrap/umoci/skopeo; tests that need them skip
  # with a message if this fails.
  ../shared/corpus/make-corpus.sh >build/corpus.log 2>&1 || echo "test: corpus build failed, see build/corpus.log" >&2
fi
ctest --test-dir build --output-on-failure -j2 --timeout 600
