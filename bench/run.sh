#!/bin/bash
# layerx against the tools people use today, side by side in one run,
# alternating, several runs each; medians, min-max, ratios, peak RSS and
# layerx's own time split (sandbox setup, extraction, mkfs, ownership pass).
#
#   bench/run.sh [--quick] [--scaling] [--runs N] [IMAGE...]
#                IMAGE: debian node (../shared/corpus), or scale-K (generated, below)
#
# Pipelines (each run in a fresh dir; removal is not timed):
#   floor       tar -x of each layer in order + mkfs.ext4 -d (no sandbox, no
#               whiteouts, no ownership: a speed floor, not an extraction)
#   umoci+mkfs  umoci unpack as root + mkfs.ext4 -d                  (if umoci)
#   rootless    umoci unpack --rootless + mkfs.ext4 -d + debugfs ownership
#               script, as uid 65534 (../shared/corpus/peer-steps.sh C)  (if umoci)
#   layerx      --rootfs as root; --ext4 rootless (uid 65534); --ext4 as root
# --quick: a small generated image (the example image plus 2,000 small files),
# 2 runs, no peers: keeps the harness working in CI; no figure is asserted.
# --scaling: the images scale-1 scale-4 scale-16: one gzip layer of 2,500 x K
# files of 1 KiB in 50 x K dirs (entries and bytes both K times), to show the
# cost is linear in both: prints seconds per 1,000 entries for each K.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
layerx=${LAYERX:-$here/build/layerx}
corpus=${LAYERX_CORPUS:-/var/tmp/layerx-corpus}
peer_steps=$here/../shared/corpus/peer-steps.sh
runs=3 quick=0 images=()
while [ $# -gt 0 ]; do
  case $1 in
    --quick) quick=1; runs=2 ;;
    --scaling) images+=(scale-1 scale-4 scale-16) ;;
    --runs) runs=$2; shift ;;
    *) images+=("$1") ;;
  esac
  shift
done
[ ${#images[@]} -gt 0 ] || images=(debian)
[ $quick = 1 ] && images=(quick)
as_nobody() { setpriv --reuid=65534 --regid=65534 --clear-groups "$@"; }
work=$(mktemp -d /var/tmp/layerx-bench-XXXXXX)
trap 'rm -rf "$work"' EXIT
chmod 0777 "$work"
now() { date +%s.%N; }
rss_of() { sed -n 's/^maxrss=//p' "$1" | tail -1; }

layers_of() {  # OCI layout dir -> layer blob paths
  python3 - "$1" <<'PY'
import json, sys
oci = sys.argv[1]
idx = json.load(open(f"{oci}/index.json"))
d = idx["manifests"][0]["digest"].split(":")[1]
for l in json.load(open(f"{oci}/blobs/sha256/{d}"))["layers"]:
    print(f"{oci}/blobs/sha256/" + l["digest"].split(":")[1])
PY
}

declare -A T RSS
record() { T[$1]+="$2 "; }
median() { printf '%s\n' $1 | sort -n | awk '{a[NR]=$1} END {if (NR==0) {print "- - -"; exit} m=(NR%2)?a[(NR+1)/2]:(a[NR/2]+a[NR/2+1])/2; printf "%.3f %.3f %.3f", m, a[1], a[NR]}'; }

for image in "${images[@]}"; do
  oci=""
  if [[ $image == scale-* ]]; then
    k=${image#scale-}; src=$work/$image; mkdir -p "$src" "$work/gen-$k"
    python3 - "$work/gen-$k" "$k" <<'PY'
import os, sys
root, k = sys.argv[1], int(sys.argv[2])
for d in range(50 * k):
    os.makedirs(f"{root}/d{d}", exist_ok=True)
    for f in range(50):
        with open(f"{root}/d{d}/f{f}", "wb") as out:
            out.write((f"{d}:{f}:" * 200)[:1024].encode())
PY
    tar -C "$work/gen-$k" -czf "$src/layer.tar.gz" . && rm -rf "$work/gen-$k"
    layers=("$src/layer.tar.gz"); source_spec=("${layers[@]}")
  elif [ "$image" = quick ]; then
    src=$work/quick; mkdir -p "$src"
    "$here/examples/make-example-image.sh" "$src" >/dev/null
    mkdir -p "$work/gen/many"
    for i in $(seq 2000); do echo "$i" > "$work/gen/many/f$i"; done
    tar -C "$work/gen" -czf "$src/layer4.tar.gz" many
    mapfile -t layers < <(ls "$src"/layer1.tar.gz "$src"/layer2.tar.zst "$src"/layer3.tar "$src"/layer4.tar.gz)
    source_spec=("${layers[@]}")
  else
    oci=$corpus/images/$image/oci
    [ -f "$oci/index.json" ] || { echo "bench: no corpus image $image (run ../shared/corpus/make-corpus.sh)" >&2; exit 1; }
    mapfile -t layers < <(layers_of "$oci")
    source_spec=("oci:$oci")
  fi
  peers=0
  # The peers run on the corpus images only (peer-steps.sh knows those).
  [ -n "${oci:-}" ] && command -v umoci >/dev/null && [ -x "$peer_steps" ] && peers=1
  T=() RSS=()
  for ((r = 0; r < runs; r++)); do
    d=$work/run; rm -rf "$d"; mkdir -p "$d"; chmod 0777 "$d"; sync
    # floor: tar -x + mkfs.ext4 -d
    s=$(now)
    mkdir "$d/tar"
    for l in "${layers[@]}"; do tar --numeric-owner --xattrs --xattrs-include='*' -xf "$l" -C "$d/tar" 2>/dev/null || true; done
    kib=$(( $(du -sb "$d/tar" | cut -f1) * 13 / 10 / 1024 + 65536 )); n=$(find "$d/tar" | wc -l)
    mkfs.ext4 -q -F -N $(( n + n / 4 + 1024 )) -d "$d/tar" "$d/floor.img" "${kib}k" >/dev/null 2>&1
    record floor "$(echo "$(now) - $s" | bc)"
    rm -rf "$d/tar" "$d/floor.img"
    if [ $peers = 1 ]; then
      export SCR=$d/scr; mkdir -p "$SCR"; chmod 1777 "$SCR"
      s=$(now); "$peer_steps" B "$image"; record umoci "$(echo "$(now) - $s" | bc)"
      s=$(now); as_nobody env SCR="$SCR" "$peer_steps" C "$image"; record rootless_peer "$(echo "$(now) - $s" | bc)"
      rm -rf "$SCR"
    fi
    # layerx
    s=$(now); /usr/bin/time -f "maxrss=%M" -o "$d/t1" "$layerx" extract "${source_spec[@]}" --rootfs "$d/root" --json > "$d/root.json"
    record layerx_rootfs "$(echo "$(now) - $s" | bc)"; RSS[layerx_rootfs]+="$(rss_of "$d/t1") "
    rm -rf "$d/root"
    s=$(now); as_nobody /usr/bin/time -f "maxrss=%M" -o "$d/t2" "$layerx" extract "${source_spec[@]}" --ext4 "$d/rl.img" --json > "$d/rl.json"
    record layerx_ext4_rootless "$(echo "$(now) - $s" | bc)"; RSS[layerx_ext4_rootless]+="$(rss_of "$d/t2") "
    rm -f "$d/rl.img"
    s=$(now); /usr/bin/time -f "maxrss=%M" -o "$d/t3" "$layerx" extract "${source_spec[@]}" --ext4 "$d/root.img" --json > "$d/ext4.json"
    record layerx_ext4_root "$(echo "$(now) - $s" | bc)"; RSS[layerx_ext4_root]+="$(rss_of "$d/t3") "
    python3 - "$d/root.json" "$d/rl.json" >> "$work/split-$image" <<'PY'
import json, sys
root, rl = (json.load(open(p)) for p in sys.argv[1:])
print("setup_ms " + " ".join("%.1f" % l["setup_ms"] for l in root["layers"]))
print("extract_ms " + " ".join("%.0f" % l["extract_ms"] for l in root["layers"]) +
      "  records_send_ms " + " ".join("%.1f" % l["records_send_ms"] for l in root["layers"]) +
      "  merge_ms " + " ".join("%.1f" % l["merge_ms"] for l in root["layers"]) +
      "  extractor_rss_mib " + " ".join("%.1f" % (l["extractor_peak_rss_kib"] / 1024) for l in root["layers"]))
print("mkfs_ms %.0f pass_ms %.1f size_mib %.0f content_mib %.0f" % (rl["ext4"]["mkfs_ms"], rl["ext4"]["ownership_pass_ms"], rl["ext4"]["size_bytes"] / 2**20, rl["ext4"]["content_bytes"] / 2**20))
PY
  done
  read -r floor_m floor_lo floor_hi <<<"$(median "${T[floor]}")"
  echo
  echo "== $image: ${#layers[@]} layers, $runs runs each, alternating ($(date -u +%FT%TZ), $(nproc) cores)"
  printf '%-24s %9s %17s %9s %12s\n' pipeline "median s" "min-max s" "x floor" "peak RSS MB"
  for k in floor umoci rootless_peer layerx_rootfs layerx_ext4_rootless layerx_ext4_root; do
    [ -n "${T[$k]:-}" ] || continue
    read -r m lo hi <<<"$(median "${T[$k]}")"
    rss=$(printf '%s\n' ${RSS[$k]:-} | sort -n | tail -1)
    printf '%-24s %9.3f %8.3f-%-8.3f %8.2fx %12s\n' "$k" "$m" "$lo" "$hi" "$(echo "$m / $floor_m" | bc -l)" \
      "$([ -n "$rss" ] && echo "$((rss / 1024))" || echo -)"
  done
  if [ -n "${T[rootless_peer]:-}" ]; then
    read -r rp _ _ <<<"$(median "${T[rootless_peer]}")"; read -r lr _ _ <<<"$(median "${T[layerx_ext4_rootless]}")"
    read -r up _ _ <<<"$(median "${T[umoci]}")"; read -r lx _ _ <<<"$(median "${T[layerx_ext4_root]}")"
    printf 'layerx --ext4 rootless is %.1fx faster than the rootless peer pipeline; as root %.1fx faster than umoci+mkfs\n' \
      "$(echo "$rp / $lr" | bc -l)" "$(echo "$up / $lx" | bc -l)"
  fi
  echo "layerx time split per run (rootfs as root; ext4 rootless):"
  sed 's/^/  /' "$work/split-$image"
  if [[ $image == scale-* ]]; then
    read -r lr _ _ <<<"$(median "${T[layerx_ext4_rootless]}")"
    echo "scale ${image#scale-} $((2550 * ${image#scale-})) $lr $floor_m" >> "$work/scaling"
  fi
done
if [ -f "$work/scaling" ]; then
  echo
  echo "== scaling: layerx --ext4 rootless and the floor per 1,000 entries (1 KiB each)"
  printf '%-6s %9s %12s %14s %12s %14s\n' K entries "layerx s" "ms/1k entries" "floor s" "ms/1k entries"
  while read -r _ k n lr fl; do
    printf '%-6s %9s %12.3f %14.2f %12.3f %14.2f\n' "$k" "$n" "$lr" "$(echo "$lr * 1000000 / $n" | bc -l)" \
      "$fl" "$(echo "$fl * 1000000 / $n" | bc -l)"
  done < "$work/scaling"
fi
