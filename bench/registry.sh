#!/bin/bash
# docker:// pulls against what people do today, alternating in one run:
#
#   bench/registry.sh [--runs N] [--rate MBIT] [--no-limit] [IMAGE...]
#                     IMAGE: debian node (the ../shared/corpus images; default debian)
#
# A local registry (tests/registry/registry.sh: Debian's docker-registry, plain
# http on 127.0.0.1) holds IMAGE, pushed with skopeo. Everything runs rootless
# (uid 65534), each run into a fresh dir, in the same loop:
#
# 1. Unlimited loopback:
#      pair     skopeo copy docker://HOST/IMAGE:test oci:DIR:test
#               then layerx extract oci:DIR:test --ext4 IMG
#      layerx   layerx extract docker://HOST/IMAGE:test --ext4 IMG
#    ratio layerx/pair; issue 16 asks <= 0.70.
# 2. Limited bandwidth (root only: a network namespace made here, its loopback
#    shaped with `tc qdisc ... tbf rate MBIT`, default 200 Mbit/s; the registry
#    and every client run in it):
#      download the blobs (manifest, config, layers) with curl, one after the
#               other, to /dev/null: the pure download time
#      layerx   layerx extract docker://HOST/IMAGE:test --ext4 IMG
#    ratio layerx/download; issue 16 asks <= 1.15.
# Medians of --runs (default 3), min-max beside them.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
layerx=${LAYERX:-$here/build/layerx}
corpus=${LAYERX_CORPUS:-/var/tmp/layerx-corpus}
registry=$here/tests/registry/registry.sh
runs=3 rate=200 limit=1 images=()
while [ $# -gt 0 ]; do
  case $1 in
    --runs) runs=$2; shift ;;
    --rate) rate=$2; shift ;;
    --no-limit) limit=0 ;;
    *) images+=("$1") ;;
  esac
  shift
done
[ ${#images[@]} -gt 0 ] || images=(debian)
"$registry" check || exit $?
[ -x "$layerx" ] || { echo "bench: $layerx missing (scripts/build.sh)" >&2; exit 1; }
if [ $limit = 1 ] && { [ "$(id -u)" != 0 ] || ! command -v tc >/dev/null; }; then
  echo "bench: the bandwidth-limited part needs root and tc: skipped" >&2
  limit=0
fi

work=$(mktemp -d /var/tmp/layerx-bench-registry-XXXXXX)
chmod 0777 "$work"
mkdir -m 0777 "$work/home"
ns=layerx-bench-$$
cleanup() {
  "$registry" stop "$work/reg" >/dev/null 2>&1 || true
  if [ $limit = 1 ]; then
    ip netns exec "$ns" "$registry" stop "$work/reg-limited" >/dev/null 2>&1 || true
    ip netns del "$ns" 2>/dev/null || true
  fi
  rm -rf "$work"
}
trap cleanup EXIT
# HOME of its own: skopeo reads ~/.config/containers, which root's HOME refuses.
as_nobody() { setpriv --reuid=65534 --regid=65534 --clear-groups env HOME="$work/home" "$@"; }
now() { date +%s.%N; }
stats() {  # VALUES...: "median (min-max)"
  printf '%s\n' "$@" | sort -g | awk '{v[NR]=$1} END {printf "%.3f (%.3f-%.3f)", v[int((NR+1)/2)], v[1], v[NR]}'
}
ratio() { awk -v a="$1" -v b="$2" 'BEGIN {printf "%.2f", a / b}'; }
median() { printf '%s\n' "$@" | sort -g | awk '{v[NR]=$1} END {print v[int((NR+1)/2)]}'; }
timed() {  # OUTVAR CMD...: seconds of CMD into OUTVAR
  local var=$1; shift
  local t0 t1; t0=$(now); "$@"; t1=$(now)
  printf -v "$var" '%s' "$(awk -v a="$t0" -v b="$t1" 'BEGIN {printf "%.3f", b - a}')"
}

layout_of() {
  local dir=$corpus/images/$1/oci
  [ -d "$dir" ] || { echo "bench: $dir missing: run ../shared/corpus/make-corpus.sh" >&2; exit 1; }
  echo "$dir:$1:test"
}

# The blobs of IMAGE:test as the registry serves them: "manifest config layer..." digests.
blob_urls() {  # HOST IMAGE
  local host=$1 name=$2
  curl -sf -H 'Accept: application/vnd.oci.image.manifest.v1+json, application/vnd.docker.distribution.manifest.v2+json' \
    "http://$host/v2/$name/manifests/test" |
    python3 -c '
import json, sys
m = json.load(sys.stdin)
host, name = sys.argv[1], sys.argv[2]
print("http://%s/v2/%s/manifests/test" % (host, name))
for d in [m["config"]] + m["layers"]:
    print("http://%s/v2/%s/blobs/%s" % (host, name, d["digest"]))' "$host" "$name"
}
download_all() {  # URL...
  local u
  for u in "$@"; do
    curl -sf -o /dev/null -H 'Accept: application/vnd.oci.image.manifest.v1+json' "$u"
  done
}

echo "# bench/registry.sh $(date -u +%FT%TZ), $(nproc) cores, runs=$runs, rootless"
"$registry" start "$work/reg" >/dev/null
( . "$work/reg/env"; echo "registry: docker-registry on $HTTP_HOST (plain http)" )
for image in "${images[@]}"; do
  "$registry" push "$work/reg" "$(layout_of "$image")" "$image:test" http >/dev/null
done
host=$(. "$work/reg/env"; echo "$HTTP_HOST")

echo
echo "## 1. unlimited loopback: skopeo copy + layerx oci: against layerx docker://"
for image in "${images[@]}"; do
  pair=() skopeo_t=() oci_t=() direct=()
  for r in $(seq "$runs"); do
    d=$work/run; rm -rf "$d"; mkdir -m 0777 "$d"
    timed t_skopeo as_nobody skopeo copy -q --src-tls-verify=false \
      "docker://$host/$image:test" "oci:$d/oci:$image:test"
    timed t_oci as_nobody "$layerx" extract -q "oci:$d/oci:$image:test" --ext4 "$d/pair.img"
    rm -rf "$d"; mkdir -m 0777 "$d"
    timed t_direct as_nobody "$layerx" extract -q --tls-verify=false \
      "docker://$host/$image:test" --ext4 "$d/direct.img" 2>/dev/null
    skopeo_t+=("$t_skopeo") oci_t+=("$t_oci")
    pair+=("$(awk -v a="$t_skopeo" -v b="$t_oci" 'BEGIN {printf "%.3f", a + b}')") direct+=("$t_direct")
  done
  p=$(median "${pair[@]}") x=$(median "${direct[@]}")
  echo "$image: skopeo copy $(stats "${skopeo_t[@]}") + layerx oci: $(stats "${oci_t[@]}")" \
    "= $(stats "${pair[@]}") s"
  echo "$image: layerx docker:// $(stats "${direct[@]}") s  -> $(ratio "$x" "$p")x of the pair (target <= 0.70)"
done

if [ $limit = 1 ]; then
  echo
  echo "## 2. loopback limited to $rate Mbit/s (tbf in a network namespace)"
  ip netns add "$ns"
  ip -n "$ns" link set lo up
  tc -n "$ns" qdisc add dev lo root tbf rate "${rate}mbit" burst 256kb latency 100ms
  ip netns exec "$ns" "$registry" start "$work/reg-limited" >/dev/null
  for image in "${images[@]}"; do
    ip netns exec "$ns" "$registry" push "$work/reg-limited" "$(layout_of "$image")" \
      "$image:test" http >/dev/null
  done
  lhost=$(. "$work/reg-limited/env"; echo "$HTTP_HOST")
  for image in "${images[@]}"; do
    mapfile -t urls < <(ip netns exec "$ns" bash -c "$(declare -f blob_urls); blob_urls $lhost $image")
    down=() pull=()
    for r in $(seq "$runs"); do
      timed t_down ip netns exec "$ns" bash -c "$(declare -f download_all); download_all ${urls[*]}"
      d=$work/run; rm -rf "$d"; mkdir -m 0777 "$d"
      timed t_pull ip netns exec "$ns" setpriv --reuid=65534 --regid=65534 --clear-groups \
        env HOME="$work/home" "$layerx" extract -q --tls-verify=false "docker://$lhost/$image:test" \
        --ext4 "$d/limited.img" 2>/dev/null
      down+=("$t_down") pull+=("$t_pull")
    done
    dm=$(median "${down[@]}") pm=$(median "${pull[@]}")
    echo "$image: download $(stats "${down[@]}") s, layerx docker:// $(stats "${pull[@]}") s" \
      "-> $(ratio "$pm" "$dm")x of the download (target <= 1.15)"
  done
fi
