#!/bin/bash
# Times `layerx extract --rootfs` (as root and rootless) against the floor,
# plain `tar -x` of the same layers in order, alternating runs in one script so
# both see the same machine. Prints medians, min-max and the ratio layerx/tar,
# and layerx's per-layer sandbox setup time.
# The floor is the peer-baseline one (../shared/corpus/peer-baseline.sh, A): GNU tar
# without whiteout processing, errors ignored; a speed floor, not an extraction.
# usage: bench/extract-vs-tar.sh [IMAGE] [RUNS]   (IMAGE from ../shared/corpus: debian, node)
set -euo pipefail
image=${1:-debian}
runs=${2:-5}
here=$(cd "$(dirname "$0")/.." && pwd)
layerx=${LAYERX:-$here/build/layerx}
oci=${LAYERX_CORPUS:-/var/tmp/layerx-corpus}/images/$image/oci
[ -f "$oci/index.json" ] || { echo "no corpus image at $oci (run ../shared/corpus/make-corpus.sh)" >&2; exit 1; }
mapfile -t layers < <(python3 - "$oci" <<'PY'
import json, sys
oci = sys.argv[1]
idx = json.load(open(f"{oci}/index.json"))
d = idx["manifests"][0]["digest"].split(":")[1]
for l in json.load(open(f"{oci}/blobs/sha256/{d}"))["layers"]:
    print(f"{oci}/blobs/sha256/" + l["digest"].split(":")[1])
PY
)
work=$(mktemp -d /var/tmp/layerx-bench-XXXXXX)
trap 'rm -rf "$work"' EXIT
chmod 0777 "$work"
now() { date +%s.%N; }
declare -a t_tar t_root t_rootless setup
for ((i = 0; i < runs; i++)); do
  sync
  rm -rf "$work/tar"; mkdir "$work/tar"
  s=$(now); for l in "${layers[@]}"; do tar --numeric-owner --xattrs --xattrs-include="*" -xf "$l" -C "$work/tar" 2>/dev/null || true; done; e=$(now)
  t_tar+=("$(echo "$e - $s" | bc)")
  rm -rf "$work/tar" "$work/root"
  s=$(now); "$layerx" extract "${layers[@]}" --rootfs "$work/root" --json > "$work/root.json"; e=$(now)
  t_root+=("$(echo "$e - $s" | bc)")
  setup+=("$(python3 -c "import json; print(' '.join('%.1f' % l['setup_ms'] for l in json.load(open('$work/root.json'))['layers']))")")
  rm -rf "$work/root" "$work/rl"
  s=$(now); setpriv --reuid=65534 --regid=65534 --clear-groups "$layerx" extract "${layers[@]}" --rootfs "$work/rl" -q; e=$(now)
  t_rootless+=("$(echo "$e - $s" | bc)")
  rm -rf "$work/rl"
done
stats() { printf '%s\n' "$@" | sort -n | awk '{a[NR]=$1} END {m=(NR%2)?a[(NR+1)/2]:(a[NR/2]+a[NR/2+1])/2; printf "%.3f %.3f %.3f", m, a[1], a[NR]}'; }
read -r mt lt ht <<<"$(stats "${t_tar[@]}")"
read -r mr lr hr <<<"$(stats "${t_root[@]}")"
read -r ml ll hl <<<"$(stats "${t_rootless[@]}")"
printf 'image %s, %d layers, %d runs each, alternating\n' "$image" "${#layers[@]}" "$runs"
printf '%-28s median %7.3f s  (min %.3f max %.3f)\n' "tar -x (floor)" "$mt" "$lt" "$ht"
printf '%-28s median %7.3f s  (min %.3f max %.3f)  = %.2fx tar\n' "layerx --rootfs (root)" "$mr" "$lr" "$hr" "$(echo "$mr / $mt" | bc -l)"
printf '%-28s median %7.3f s  (min %.3f max %.3f)  = %.2fx tar\n' "layerx --rootfs (rootless)" "$ml" "$ll" "$hl" "$(echo "$ml / $mt" | bc -l)"
printf 'sandbox setup per layer (ms), each run: %s\n' "$(printf '[%s] ' "${setup[@]}")"
