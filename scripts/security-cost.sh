#!/usr/bin/env bash
# What security costs the main job: `thaw launch` of the main job's spec (MobileNetV2, 2 CPU workers,
# 32x32, batch 32 per worker) on the first TRAIN_LIMIT training images, alternately with its default
# ephemeral mutual TLS + tokens + authenticated ring, and with `--insecure` (plaintext gRPC, no
# tokens; the ring's link handshake is always authenticated, and costs nothing per step). Prints
# each run's step time (rank 0's `step_ms` over the epoch) and the medians side by side.
#   bash scripts/security-cost.sh [ROUNDS=3] [TRAIN_LIMIT=9600]
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
rounds=${1:-3}
limit=${2:-9600}
source scripts/release.sh
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
sed -e "s|^root = \"../.thaw|root = \"$root/.thaw|" -e "s|^dir = .*|dir = \"$work/run\"|" \
  -e "s|^image_size = 32|image_size = 32\ntrain_limit = $limit\nval_limit = 1000|" \
  examples/fashion-mnist-mobilenet.toml > "$work/job.toml"
run() { # $1: label, rest: launch flags
  local label=$1; shift
  rm -rf "$work/run"
  local t0=$(date +%s.%N)
  "$thaw" launch --nproc 2 "$@" "$work/job.toml" > "$work/out" 2>&1 || { cat "$work/out"; exit 1; }
  local t1=$(date +%s.%N)
  local ms=$(grep -h "rank epoch data" "$work/run/logs/worker-0.log" | sed -n 's/.*step_ms="\{0,1\}\([0-9.]*\).*/\1/p' | tail -1)
  printf '%-10s step_ms %8s   wall_s %6.1f\n' "$label" "$ms" "$(echo "$t1 - $t0" | bc)"
  echo "$label $ms" >> "$work/results"
}
echo "main job spec, first $limit images, 2 workers; load average: $(cut -d' ' -f1-3 /proc/loadavg)"
for i in $(seq "$rounds"); do
  run secure
  run insecure --insecure
done
median() { sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
s=$(awk '$1=="secure"{print $2}' "$work/results" | median)
p=$(awk '$1=="insecure"{print $2}' "$work/results" | median)
echo "median step_ms: secure (mTLS + tokens + ring HMAC) $s, insecure $p, ratio $(echo "scale=3; $s / $p" | bc)"
echo "load average after: $(cut -d' ' -f1-3 /proc/loadavg)"
