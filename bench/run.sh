#!/bin/bash
# layerx against the tools people use today, side by side in one run,
# alternating, several runs each; medians, min-max, ratios, peak RSS, image
# sizes and layerx's own time split (sandbox setup, extraction, the ext4
# build's phases as its --json names them).
#
#   bench/run.sh [--quick] [--scaling] [--wide] [--runs N] [IMAGE...]
#                IMAGE: debian node (../shared/corpus), scale-K or wide-N (generated, below)
#
# Pipelines (each run in a fresh dir; removal is not timed):
#   floor       tar -x of each layer in order + mkfs.ext4 -d (no sandbox, no
#               whiteouts, no ownership: a speed floor, not an extraction)
#   umoci+mkfs  umoci unpack as root + mkfs.ext4 -d                  (if umoci)
#   rootless    umoci unpack --rootless + mkfs.ext4 -d + debugfs ownership
#               script, as uid 65534 (../shared/corpus/peer-steps.sh C)  (if umoci)
#   layerx      --rootfs as root; --ext4 rootless (uid 65534); --ext4 as root
#   tar2ext4    ../shared/anchors/tar2ext4/tar2ext4 -i FLAT.tar -o IMG, rootless,
#               against layerx_flat = layerx extract FLAT.tar --ext4 IMG, rootless,
#               on the same FLAT.tar = $LAYERX_CORPUS/flat-IMAGE.tar (the image as
#               one uncompressed tar, made by ../shared/corpus/flatten.sh when
#               missing), and layerx_ext4_rootless on the gzip layers  (if tar2ext4)
# Image sizes: apparent (stat %s) / allocated (du -k), MiB, of the last run.
# --quick: a small generated image (the example image plus 2,000 small files),
# 2 runs, no peers: keeps the harness working in CI; no figure is asserted.
# --scaling: the images scale-1 scale-4 scale-16: one gzip layer of 2,500 x K
# files of 1 KiB in 50 x K dirs (entries and bytes both K times), to show the
# cost is linear in both: prints seconds per 1,000 entries for each K.
# --wide: the images wide-10k wide-100k: one uncompressed layer of N files of a
# few bytes in ONE directory (wide-N: N a count, or Nk). Only layerx --ext4
# rootless and tar2ext4 on the same tar, alternating between the sizes inside
# each run; prints microseconds per name and each per-name cost relative to the
# smallest N (1.00x everywhere = linear). --quick adds wide-1k wide-4k.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
layerx=${LAYERX:-$here/build/layerx}
corpus=${LAYERX_CORPUS:-/var/tmp/layerx-corpus}
peer_steps=$here/../shared/corpus/peer-steps.sh
flatten=$here/../shared/corpus/flatten.sh
tar2ext4=${TAR2EXT4:-$here/../shared/anchors/tar2ext4/tar2ext4}
[ -x "$tar2ext4" ] || tar2ext4=""
runs=3 quick=0 images=() wides=()
while [ $# -gt 0 ]; do
  case $1 in
    --quick) quick=1; runs=2 ;;
    --scaling) images+=(scale-1 scale-4 scale-16) ;;
    --wide) wides+=(wide-10k wide-100k) ;;
    --runs) runs=$2; shift ;;
    wide-*) wides+=("$1") ;;
    *) images+=("$1") ;;
  esac
  shift
done
[ ${#images[@]} -gt 0 ] || [ ${#wides[@]} -gt 0 ] || images=(debian)
[ $quick = 1 ] && images=(quick) wides=(wide-1k wide-4k) tar2ext4=""   # no peers, tar2ext4 included
for w in "${wides[@]}"; do
  [[ $w =~ ^wide-[0-9]+k?$ ]] || { echo "bench: bad image $w (wide-N or wide-Nk)" >&2; exit 1; }
done
as_nobody() { setpriv --reuid=65534 --regid=65534 --clear-groups "$@"; }
work=$(mktemp -d /var/tmp/layerx-bench-XXXXXX)
trap 'rm -rf "$work"' EXIT
chmod 0777 "$work"
now() { date +%s.%N; }
rss_of() { sed -n 's/^maxrss=//p' "$1" | tail -1; }
size_of() { echo "$(stat -c %s "$1") $(du -k "$1" | cut -f1)"; }   # apparent bytes, allocated KiB
names_of() { local n=${1#wide-}; echo $(( ${n/k/000} + 1 )); }   # wide-N: N files + their directory
mib_of() { [ -n "$1" ] || { echo -; return; }; set -- $1; echo "$(($1 / 1048576))/$(($2 / 1024))"; }
ext4_split() {  # LABEL JSON: one line from layerx's --json of an --ext4 run
  python3 - "$@" <<'PY'
import json, sys
j = json.load(open(sys.argv[2])); e = j.get("ext4", {})
def f(d, k, fmt, scale=1):  # a missing field prints "-"
    return fmt % (d[k] / scale) if k in d else "-"
def ms(e):  # the ext4 build's phases, whatever they are called (mkfs_ms, ownership_pass_ms, build_ms...)
    return " ".join("%s %.1f" % (k, v) for k, v in e.items() if k.endswith("_ms")) or "-"
print(sys.argv[1], "extract_ms " + " ".join(f(l, "extract_ms", "%.0f") for l in j["layers"]) +
      "  records_send_ms " + " ".join(f(l, "records_send_ms", "%.1f") for l in j["layers"]) +
      "  merge_ms " + " ".join(f(l, "merge_ms", "%.1f") for l in j["layers"]) +
      "  " + ms(e))
PY
}

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

declare -A T RSS SZ
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
    source_spec=("oci:$oci:$image:test")
  fi
  flat=""
  if [ -n "$oci" ] && [ -n "$tar2ext4" ]; then
    flat=$corpus/flat-$image.tar
    [ -s "$flat" ] || LAYERX_CORPUS=$corpus "$flatten" "$image" >/dev/null ||
      { echo "bench: no $flat (flatten.sh failed): no tar2ext4 on $image" >&2; flat=""; }
  fi
  peers=0
  # The peers run on the corpus images only (peer-steps.sh knows those).
  [ -n "${oci:-}" ] && command -v umoci >/dev/null && [ -x "$peer_steps" ] && peers=1
  T=() RSS=() SZ=()
  for ((r = 0; r < runs; r++)); do
    d=$work/run; rm -rf "$d"; mkdir -p "$d"; chmod 0777 "$d"; sync
    # floor: tar -x + mkfs.ext4 -d
    s=$(now)
    mkdir "$d/tar"
    for l in "${layers[@]}"; do tar --numeric-owner --xattrs --xattrs-include='*' -xf "$l" -C "$d/tar" 2>/dev/null || true; done
    kib=$(( $(du -sb "$d/tar" | cut -f1) * 13 / 10 / 1024 + 65536 )); n=$(find "$d/tar" | wc -l)
    mkfs.ext4 -q -F -N $(( n + n / 4 + 1024 )) -d "$d/tar" "$d/floor.img" "${kib}k" >/dev/null 2>&1
    record floor "$(echo "$(now) - $s" | bc)"; SZ[floor]=$(size_of "$d/floor.img")
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
    SZ[layerx_ext4_rootless]=$(size_of "$d/rl.img"); rm -f "$d/rl.img"
    s=$(now); /usr/bin/time -f "maxrss=%M" -o "$d/t3" "$layerx" extract "${source_spec[@]}" --ext4 "$d/root.img" --json > "$d/ext4.json"
    record layerx_ext4_root "$(echo "$(now) - $s" | bc)"; RSS[layerx_ext4_root]+="$(rss_of "$d/t3") "
    SZ[layerx_ext4_root]=$(size_of "$d/root.img"); rm -f "$d/root.img"
    if [ -n "$flat" ]; then  # one uncompressed tar in, one image out, both rootless
      s=$(now); as_nobody /usr/bin/time -f "maxrss=%M" -o "$d/t4" "$tar2ext4" -i "$flat" -o "$d/t2e.img"
      record tar2ext4 "$(echo "$(now) - $s" | bc)"; RSS[tar2ext4]+="$(rss_of "$d/t4") "
      SZ[tar2ext4]=$(size_of "$d/t2e.img"); rm -f "$d/t2e.img"
      s=$(now); as_nobody /usr/bin/time -f "maxrss=%M" -o "$d/t5" "$layerx" extract "$flat" --ext4 "$d/flat.img" --json > "$d/flat.json"
      record layerx_flat "$(echo "$(now) - $s" | bc)"; RSS[layerx_flat]+="$(rss_of "$d/t5") "
      SZ[layerx_flat]=$(size_of "$d/flat.img"); rm -f "$d/flat.img"
    fi
    python3 - "$d/root.json" "$d/rl.json" >> "$work/split-$image" <<'PY'
import json, sys
root, rl = (json.load(open(p)) for p in sys.argv[1:])
def f(d, k, fmt, scale=1):  # a missing field prints "-"
    return fmt % (d[k] / scale) if k in d else "-"
def ms(e):  # the ext4 build's phases, whatever they are called (mkfs_ms, ownership_pass_ms, build_ms...)
    return " ".join("%s %.1f" % (k, v) for k, v in e.items() if k.endswith("_ms")) or "-"
print("setup_ms " + " ".join(f(l, "setup_ms", "%.1f") for l in root["layers"]))
print("extract_ms " + " ".join(f(l, "extract_ms", "%.0f") for l in root["layers"]) +
      "  records_send_ms " + " ".join(f(l, "records_send_ms", "%.1f") for l in root["layers"]) +
      "  merge_ms " + " ".join(f(l, "merge_ms", "%.1f") for l in root["layers"]) +
      "  extractor_rss_mib " + " ".join(f(l, "extractor_peak_rss_kib", "%.1f", 1024) for l in root["layers"]))
e = rl.get("ext4", {})
print("%s size_mib %s content_mib %s" % (ms(e), f(e, "size_bytes", "%.0f", 2**20), f(e, "content_bytes", "%.0f", 2**20)))
PY
    [ -z "$flat" ] || ext4_split "  flat tar:" "$d/flat.json" >> "$work/split-$image"
  done
  read -r floor_m floor_lo floor_hi <<<"$(median "${T[floor]}")"
  echo
  echo "== $image: ${#layers[@]} layers, $runs runs each, alternating ($(date -u +%FT%TZ), $(nproc) cores)"
  printf '%-24s %9s %17s %9s %12s %20s\n' pipeline "median s" "min-max s" "x floor" "peak RSS MB" "image MiB app/alloc"
  for k in floor umoci rootless_peer layerx_rootfs layerx_ext4_rootless layerx_ext4_root tar2ext4 layerx_flat; do
    [ -n "${T[$k]:-}" ] || continue
    read -r m lo hi <<<"$(median "${T[$k]}")"
    rss=$(printf '%s\n' ${RSS[$k]:-} | sort -n | tail -1)
    printf '%-24s %9.3f %8.3f-%-8.3f %8.2fx %12s %20s\n' "$k" "$m" "$lo" "$hi" "$(echo "$m / $floor_m" | bc -l)" \
      "$([ -n "$rss" ] && echo "$((rss / 1024))" || echo -)" "$(mib_of "${SZ[$k]:-}")"
  done
  if [ -n "${T[rootless_peer]:-}" ]; then
    read -r rp _ _ <<<"$(median "${T[rootless_peer]}")"; read -r lr _ _ <<<"$(median "${T[layerx_ext4_rootless]}")"
    read -r up _ _ <<<"$(median "${T[umoci]}")"; read -r lx _ _ <<<"$(median "${T[layerx_ext4_root]}")"
    printf 'layerx --ext4 rootless is %.1fx faster than the rootless peer pipeline; as root %.1fx faster than umoci+mkfs\n' \
      "$(echo "$rp / $lr" | bc -l)" "$(echo "$up / $lx" | bc -l)"
  fi
  if [ -n "${T[tar2ext4]:-}" ]; then
    read -r te _ _ <<<"$(median "${T[tar2ext4]}")"; read -r lf _ _ <<<"$(median "${T[layerx_flat]}")"
    read -r lr _ _ <<<"$(median "${T[layerx_ext4_rootless]}")"
    printf 'rootless, against tar2ext4 on %s (%d MiB): layerx_flat/tar2ext4 %.2fx (same tar), layerx_ext4_rootless/tar2ext4 %.2fx (%d gzip layers)\n' \
      "$(basename "$flat")" "$(( $(stat -c %s "$flat") / 1048576 ))" "$(echo "$lf / $te" | bc -l)" "$(echo "$lr / $te" | bc -l)" "${#layers[@]}"
  fi
  echo "layerx time split per run (rootfs as root; ext4 rootless; flat tar: layerx_flat):"
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

# The wide series: N names in one directory; the sizes alternate inside each run
# so that the per-name ratio between them sees the same machine.
[ ${#wides[@]} -gt 0 ] || exit 0
for w in "${wides[@]}"; do
  mkdir -p "$work/$w"
  python3 - "$work/$w/layer.tar" "$(( $(names_of "$w") - 1 ))" <<'PY'
import io, sys, tarfile
out, n = sys.argv[1], int(sys.argv[2])
with tarfile.open(out, "w", format=tarfile.GNU_FORMAT) as t:
    d = tarfile.TarInfo("wide"); d.type = tarfile.DIRTYPE; d.mode = 0o755; d.mtime = 1700000000
    t.addfile(d)
    for i in range(n):
        data = b"%d\n" % i
        f = tarfile.TarInfo(f"wide/f{i}"); f.size = len(data); f.mode = 0o644; f.mtime = 1700000000
        t.addfile(f, io.BytesIO(data))
PY
done
T=() RSS=() SZ=()
for ((r = 0; r < runs; r++)); do
  for w in "${wides[@]}"; do
    d=$work/run; rm -rf "$d"; mkdir -p "$d"; chmod 0777 "$d"; sync
    s=$(now); as_nobody /usr/bin/time -f "maxrss=%M" -o "$d/t1" "$layerx" extract "$work/$w/layer.tar" --ext4 "$d/w.img" --json > "$d/w.json"
    record "$w:layerx_ext4_rootless" "$(echo "$(now) - $s" | bc)"; RSS[$w:layerx_ext4_rootless]+="$(rss_of "$d/t1") "
    SZ[$w:layerx_ext4_rootless]=$(size_of "$d/w.img"); rm -f "$d/w.img"
    ext4_split "$w:" "$d/w.json" >> "$work/split-wide"
    if [ -n "$tar2ext4" ]; then
      s=$(now); as_nobody /usr/bin/time -f "maxrss=%M" -o "$d/t2" "$tar2ext4" -i "$work/$w/layer.tar" -o "$d/t2e.img"
      record "$w:tar2ext4" "$(echo "$(now) - $s" | bc)"; RSS[$w:tar2ext4]+="$(rss_of "$d/t2") "
      SZ[$w:tar2ext4]=$(size_of "$d/t2e.img"); rm -f "$d/t2e.img"
    fi
  done
done
echo
echo "== wide: N files of a few bytes in one directory, one uncompressed layer, rootless, $runs runs each, alternating ($(date -u +%FT%TZ), $(nproc) cores)"
printf '%-11s %-22s %8s %9s %17s %10s %12s %10s %12s %20s\n' image pipeline names "median s" "min-max s" "µs/name" "x ${wides[0]}" "x tar2ext4" "peak RSS MB" "image MiB app/alloc"
for k in layerx_ext4_rootless tar2ext4; do
  for w in "${wides[@]}"; do
    [ -n "${T[$w:$k]:-}" ] || continue
    n=$(names_of "$w")
    read -r m lo hi <<<"$(median "${T[$w:$k]}")"
    us=$(echo "$m * 1000000 / $n" | bc -l)
    [ "$w" = "${wides[0]}" ] && us0=$us
    vs_t2e=-; [ -n "${T[$w:tar2ext4]:-}" ] && { read -r te _ _ <<<"$(median "${T[$w:tar2ext4]}")"; vs_t2e=$(printf '%.2fx' "$(echo "$m / $te" | bc -l)"); }
    rss=$(printf '%s\n' ${RSS[$w:$k]:-} | sort -n | tail -1)
    printf '%-11s %-22s %8d %9.3f %8.3f-%-8.3f %9.1f %11.2fx %10s %12s %20s\n' "$w" "$k" "$n" "$m" "$lo" "$hi" "$us" \
      "$(echo "$us / $us0" | bc -l)" "$vs_t2e" "$([ -n "$rss" ] && echo "$((rss / 1024))" || echo -)" "$(mib_of "${SZ[$w:$k]:-}")"
  done
done
if [ ${#wides[@]} -gt 1 ]; then
  first=${wides[0]} last=${wides[-1]}
  line="per-name($last)/per-name($first):"
  for k in layerx_ext4_rootless tar2ext4; do
    [ -n "${T[$first:$k]:-}" ] || continue
    read -r m0 _ _ <<<"$(median "${T[$first:$k]}")"; read -r m1 _ _ <<<"$(median "${T[$last:$k]}")"
    line+=$(printf ' %s %.2fx' "$k" "$(echo "($m1 / $(names_of "$last")) / ($m0 / $(names_of "$first"))" | bc -l)")
  done
  echo "$line"
fi
echo "layerx time split per run (ms):"
sed 's/^/  /' "$work/split-wide"
