#!/bin/bash
# The service against local extraction, same jobs, same concurrency, one run:
# N jobs of a small image (the example image, three layers) to --ext4 from C
# concurrent clients, first through `layerx serve` (`extract --connect`, the
# clients as uid 65534, the service as uid 65533 with max_concurrent_jobs =
# C), then as C
# concurrent local `layerx extract` processes (uid 65534, the same scratch dir
# as the service's, on /var/tmp). Prints jobs per
# second, p50/p99 job latency (client-side, queueing included), and the
# service's RSS after a warm-up and at the end. Ratios are service / local.
#
#   bench/service.sh [--jobs N] [--clients C] [--image oci:DIR | FILE...]
#   (as root; the default image is examples/make-example-image.sh's)
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
layerx=${LAYERX:-$here/build/layerx}
jobs=200 clients=8 sources=()
while [ $# -gt 0 ]; do
  case $1 in
    --jobs) jobs=$2; shift ;;
    --clients) clients=$2; shift ;;
    --image) shift; sources+=("$1") ;;
    *) sources+=("$1") ;;
  esac
  shift
done
[ "$(id -u)" = 0 ] || { echo "bench/service.sh: run as root (clients run as uid 65534)" >&2; exit 2; }
work=$(mktemp -d /var/tmp/layerx-svc-bench-XXXXXX)
chmod 0777 "$work"
service=
trap '[ -n "$service" ] && kill "$service" 2>/dev/null; wait 2>/dev/null; rm -rf "$work"' EXIT
if [ ${#sources[@]} = 0 ]; then
  "$here/examples/make-example-image.sh" "$work/img" >/dev/null
  chmod -R a+rX "$work/img"
  sources=("$work/img/layer1.tar.gz" "$work/img/layer2.tar.zst" "$work/img/layer3.tar")
fi
mkdir -p "$work/out" "$work/scratch" && chmod 0777 "$work/out" "$work/scratch"
cat > "$work/serve.toml" <<EOF
[service]
max_concurrent_jobs = $clients
queue_limit = 1024
scratch_dir = "$work/scratch"
[[tenant]]
name = "bench"
uids = [65534]
max_concurrent = $clients
max_queued = 1024
EOF
chmod 0644 "$work/serve.toml"

# run_clients NAME EXTRA...: $clients loops of $jobs/$clients jobs; per-job ms in $work/NAME.ms
run_clients() {
  local name=$1; shift
  local per=$((jobs / clients)) pids=()
  for c in $(seq 1 "$clients"); do
    setpriv --reuid=65534 --regid=65534 --clear-groups bash -c '
      layerx=$1 out=$2 per=$3; shift 3
      for i in $(seq 1 "$per"); do
        t0=$(date +%s%N)
        "$layerx" extract "$@" --ext4 "$out.img" -q || { echo FAIL >&2; exit 1; }
        echo $(( ($(date +%s%N) - t0) / 1000000 ))
      done' _ "$layerx" "$work/out/$name-$c" "$per" "$@" "${sources[@]}" > "$work/$name.$c.ms" &
    pids+=($!)
  done
  wait "${pids[@]}"  # not the service
  cat "$work/$name".*.ms > "$work/$name.ms"
}
calc() { awk "BEGIN {print $*}"; }
pct() { sort -n "$1" | awk -v p="$2" '{a[NR]=$1} END {i=int(p*(NR-1))+1; print a[i]}'; }
rss() { awk '/^VmRSS:/ {print $2}' "/proc/$service/status"; }

# The service unprivileged, as the packaged unit runs it (uid 65533), so both
# sides take the rootless path.
setpriv --reuid=65533 --regid=65533 --clear-groups \
  "$layerx" serve --socket "$work/sock" --config "$work/serve.toml" -q 2> "$work/serve.log" &
service=$!
for _ in $(seq 100); do "$layerx" status --socket "$work/sock" >/dev/null 2>&1 && break; sleep 0.05; done
# Warm-up: one job per client.
jobs_saved=$jobs; jobs=$clients; run_clients warm --connect "$work/sock"; jobs=$jobs_saved
rss_warm=$(rss)
t0=$(date +%s.%N)
run_clients svc --connect "$work/sock"
t1=$(date +%s.%N)
rss_end=$(rss)
fds=$(ls "/proc/$service/fd" | wc -l)
t2=$(date +%s.%N)
run_clients local --scratch "$work/scratch"  # the service's scratch too: same disk
t3=$(date +%s.%N)

svc_s=$(calc "$t1 - $t0") local_s=$(calc "$t3 - $t2")
n=$(( (jobs / clients) * clients ))
printf 'service: %d jobs from %d clients in %.2f s: %.1f jobs/s; latency p50 %d ms, p99 %d ms\n' \
  "$n" "$clients" "$svc_s" "$(calc "$n / $svc_s")" "$(pct "$work/svc.ms" 0.5)" "$(pct "$work/svc.ms" 0.99)"
printf 'local:   %d jobs from %d processes in %.2f s: %.1f jobs/s; latency p50 %d ms, p99 %d ms\n' \
  "$n" "$clients" "$local_s" "$(calc "$n / $local_s")" "$(pct "$work/local.ms" 0.5)" "$(pct "$work/local.ms" 0.99)"
printf 'ratio service/local: throughput %.2fx, p50 latency %.2fx\n' \
  "$(calc "$local_s / $svc_s")" "$(calc "$(pct "$work/svc.ms" 0.5) / $(pct "$work/local.ms" 0.5)")"
printf 'service RSS: %d KiB after warm-up, %d KiB after %d jobs; %d fds open\n' "$rss_warm" "$rss_end" "$n" "$fds"
