#!/usr/bin/env bash
# Accuracy of the main job on 2 workers (batch 2 x 32) against 1 worker (batch 64), same epochs, for
# each seed given (default: 1 2 3). Each run is a real `thaw launch`; results go to runs/parity/ and
# a table to stdout. BN=frozen_stats (or train_affine) sets the schedule's BatchNorm policy; the
# default, train, is DDP's: statistics per replica, so 2 x 32 normalises over 32 images, not 64.
# LR=... overrides the learning rate (frozen_stats needs a lower one: 0.001).
#   [BN=POLICY] [LR=RATE] bash scripts/parity.sh [SEED...]
set -euo pipefail
cd "$(dirname "$0")/.."
seeds=("$@")
[ ${#seeds[@]} -gt 0 ] || seeds=(1 2 3)
cargo build --release --quiet
specs=$(mktemp -d)
trap 'rm -rf "$specs"' EXIT
bn="${BN:-train}"
printf '%5s %8s %10s %13s %10s %8s\n' seed workers batch bn val_acc time_s
for seed in "${seeds[@]}"; do
  for run in "2 fashion-mnist-mobilenet 2x32" "1 fashion-mnist-mobilenet-1w 1x64"; do
    read -r nproc base batch <<<"$run"
    name="parity-$base-$bn-seed$seed"
    out="$PWD/runs/parity/$name"
    # Same spec, another seed and output directory; paths made absolute.
    sed -e "s|^name = .*|name = \"$name\"|" -e "s|^seed = .*|seed = $seed|" \
        -e "s|^dir = .*|dir = \"$out\"|" -e "s|\"\.\./|\"$PWD/|g" \
        -e "s|^strategy = .*|&\nbn = \"$bn\"|" ${LR:+-e "s|^lr = .*|lr = $LR|"} \
        "examples/$base.toml" >"$specs/$name.toml"
    start=$(date +%s)
    ./target/release/thaw launch --nproc "$nproc" "$specs/$name.toml" >"$specs/$name.out"
    acc=$(python3 -c "import json,sys; print(json.load(open(sys.argv[1]))[-1]['val_acc'])" "$out/metrics.json")
    printf '%5s %8s %10s %13s %10.4f %8s\n' "$seed" "$nproc" "$batch" "$bn" "$acc" "$(($(date +%s) - start))"
  done
done
