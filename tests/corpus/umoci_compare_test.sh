#!/bin/sh
# layerx against umoci on the real images of ../shared/corpus: same tree (paths,
# kinds, link targets, contents, modes, owners), as root and rootless.
# With EXT4_DUMP, also the rootless --ext4 image, read back with libext2fs: every
# uid/gid/mode, device and file capability as umoci as root has it; e2fsck clean.
# usage: umoci_compare_test.sh LAYERX_BIN IMAGE [EXT4_DUMP]  (skips, exit 77, without the corpus)
set -eu
layerx=$1
image=$2
ext4_dump=${3:-}
here=$(cd "$(dirname "$0")" && pwd)
corpus=${LAYERX_CORPUS:-/var/tmp/layerx-corpus}
oci=$corpus/images/$image/oci
if [ ! -f "$oci/index.json" ]; then
  echo "SKIP: corpus image $oci not built (run ../shared/corpus/make-corpus.sh as root)"
  exit 77
fi
command -v umoci >/dev/null || { echo "SKIP: umoci not installed"; exit 77; }
[ "$(id -u)" = 0 ] || { echo "SKIP: needs root (umoci unpack as root is the reference)"; exit 77; }
work=$(mktemp -d /tmp/layerx-umoci-XXXXXX)
trap 'rm -rf "$work"' EXIT
chmod 0755 "$work"
layers=$(python3 - "$oci" <<'PY'
import json, sys
oci = sys.argv[1]
idx = json.load(open(f"{oci}/index.json"))
d = idx["manifests"][0]["digest"].split(":")[1]
man = json.load(open(f"{oci}/blobs/sha256/{d}"))
print(" ".join(f"{oci}/blobs/sha256/" + l["digest"].split(":")[1] for l in man["layers"]))
PY
)
tag=$(python3 -c "import json,sys; print(json.load(open('$oci/index.json'))['manifests'][0]['annotations']['org.opencontainers.image.ref.name'])")
umoci unpack --image "$oci:$tag" "$work/umoci" >/dev/null

# As root from the OCI layout (umoci-made, digests and diff_ids verified).
"$layerx" extract "oci:$oci:$tag" --rootfs "$work/root" --manifest "$work/root.jsonl" -q
python3 "$here/compare_with_umoci.py" "$work/umoci/rootfs" "$work/root" "$work/root.jsonl" --mode root
# As root from the skopeo-made docker-archive.
if [ -f "$corpus/images/$image/docker-archive.tar" ]; then
  rm -rf "$work/root" "$work/root.jsonl"
  "$layerx" extract "docker-archive:$corpus/images/$image/docker-archive.tar" --rootfs "$work/root" \
    --manifest "$work/root.jsonl" -q
  python3 "$here/compare_with_umoci.py" "$work/umoci/rootfs" "$work/root" "$work/root.jsonl" --mode root
fi

mkdir "$work/rl" && chown 65534:65534 "$work/rl"
# Rootless from the plain layer blobs, in order (no digests to check).
# shellcheck disable=SC2086
setpriv --reuid=65534 --regid=65534 --clear-groups \
  "$layerx" extract $layers --rootfs "$work/rl/rootfs" --manifest "$work/rl/m.jsonl" -q
python3 "$here/compare_with_umoci.py" "$work/umoci/rootfs" "$work/rl/rootfs" "$work/rl/m.jsonl" --mode rootless

if [ -n "$ext4_dump" ]; then
  # Rootless to ext4 from the skopeo-made zstd layout when there is one.
  src="oci:$oci:$tag"
  [ -f "$corpus/images/$image/oci-zstd/index.json" ] && src="oci:$corpus/images/$image/oci-zstd"
  setpriv --reuid=65534 --regid=65534 --clear-groups \
    "$layerx" extract "$src" --ext4 "$work/rl/image.ext4" --manifest "$work/rl/m4.jsonl" -q
  e2fsck -fn "$work/rl/image.ext4" >"$work/fsck.log" 2>&1 || { cat "$work/fsck.log"; echo "e2fsck: image not clean"; exit 1; }
  "$ext4_dump" "$work/rl/image.ext4" > "$work/rl/dump.jsonl"
  python3 "$here/compare_with_umoci.py" "$work/umoci/rootfs" "$work/rl/dump.jsonl" "$work/rl/m4.jsonl" --mode ext4

  # The same through `layerx serve` (unprivileged, as packaged; the client
  # passes the blobs as fds): the same manifest, the same ext4 tree.
  mkdir "$work/svc" && chmod 0777 "$work/svc"
  printf '[service]\nscratch_dir = "%s"\n[[tenant]]\nname = "corpus"\nuids = [65534]\n' \
    "$work/svc" > "$work/serve.toml"
  chmod 0644 "$work/serve.toml"
  setpriv --reuid=65533 --regid=65533 --clear-groups \
    "$layerx" serve --socket "$work/svc/sock" --config "$work/serve.toml" -q &
  service=$!
  for _ in $(seq 100); do [ -S "$work/svc/sock" ] && break; sleep 0.05; done
  status=0
  setpriv --reuid=65534 --regid=65534 --clear-groups \
    "$layerx" extract --connect "$work/svc/sock" "$src" --ext4 "$work/rl/svc.ext4" \
    --manifest "$work/rl/m5.jsonl" -q || status=$?
  kill -TERM "$service"; wait "$service" || true
  [ $status = 0 ] || { echo "extract --connect failed: $status"; exit 1; }
  cmp "$work/rl/m4.jsonl" "$work/rl/m5.jsonl" || { echo "the service's manifest differs"; exit 1; }
  e2fsck -fn "$work/rl/svc.ext4" >"$work/fsck.log" 2>&1 || { cat "$work/fsck.log"; echo "e2fsck: service image not clean"; exit 1; }
  "$ext4_dump" "$work/rl/svc.ext4" > "$work/rl/dump5.jsonl"
  python3 "$here/compare_with_umoci.py" "$work/umoci/rootfs" "$work/rl/dump5.jsonl" "$work/rl/m5.jsonl" --mode ext4
fi
