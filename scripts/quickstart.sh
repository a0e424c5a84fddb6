#!/bin/sh
# Quick start: install, build, make the example image, extract it; then the
# same image pulled from a registry (a local docker-registry) into an ext4 image.
set -eu
cd "$(dirname "$0")/.."
scripts/install-deps.sh
scripts/build.sh
ex=build/example
rm -rf $ex && mkdir -p $ex
examples/make-example-image.sh $ex
./build/layerx extract $ex/layer1.tar.gz $ex/layer2.tar.zst \
  $ex/layer3.tar --rootfs $ex/rootfs --manifest $ex/manifest.jsonl -v
echo
echo "rootfs:   $ex/rootfs"
echo "manifest: $ex/manifest.jsonl"
find $ex/rootfs -mindepth 1 -printf '%M %U:%G /%P' \( -type l -printf ' -> %l' -o -true \) -printf '\n' | sort -k3

# The same layers as an OCI image (umoci), pushed to a registry on 127.0.0.1
# (tests/registry/registry.sh: Debian's docker-registry, TLS with its own CA
# and a user), and pulled by layerx: docker:// streams each layer from the
# network into its jail and checks every digest on the way.
echo
echo "== the same image from a registry =="
umoci init --layout $ex/oci
umoci new --image $ex/oci:example
zcat $ex/layer1.tar.gz >$ex/l1.tar
zstdcat -q $ex/layer2.tar.zst >$ex/l2.tar
for l in $ex/l1.tar $ex/l2.tar $ex/layer3.tar; do umoci raw add-layer --image $ex/oci:example "$l"; done
tests/registry/registry.sh start $ex/registry >/dev/null
trap 'tests/registry/registry.sh stop $ex/registry >/dev/null 2>&1 || true' EXIT
tests/registry/registry.sh push $ex/registry $ex/oci:example example:latest tls >/dev/null
. $ex/registry/env
set -x
./build/layerx extract "docker://$TLS_HOST/example:latest" --cert-dir "$CERT_DIR" \
  --authfile "$AUTH_FILE" --ext4 $ex/example.img --manifest $ex/pulled.jsonl -v
{ set +x; } 2>/dev/null
cmp $ex/manifest.jsonl $ex/pulled.jsonl && echo "pulled: $ex/example.img, the same tree as $ex/rootfs ($ex/pulled.jsonl)"
