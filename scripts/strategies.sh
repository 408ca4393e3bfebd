#!/usr/bin/env bash
# The transfer strategies side by side on real Fashion-MNIST (60k training images, evaluated on the
# 10k test images), each given the same wall-clock budget with `thaw train --time-budget`, one
# process on this machine. Prints a table; runs go to runs/strategies/.
#   bash scripts/strategies.sh [BUDGET_SECONDS]      (default 240)
set -euo pipefail
cd "$(dirname "$0")/.."
budget="${1:-240}"
cargo build --release --quiet
specs=$(mktemp -d)
trap 'rm -rf "$specs"' EXIT
data="$PWD/.thaw/data/fashion-mnist"

# name | arch | weights | [train] extras | [schedule]
rows=(
  "feature_extract|mobilenet_v2|imagenet|lr = 0.05|strategy = \"feature_extract\""
  "freeze_bottom|mobilenet_v2|imagenet|lr = 0.01\nwarmup_steps = 100|strategy = \"freeze_bottom\"\nk = 2"
  "finetune_all|mobilenet_v2|imagenet|lr = 0.01\nwarmup_steps = 100|strategy = \"finetune_all\""
  "progressive|mobilenet_v2|imagenet|lr = 0.01\nwarmup_steps = 100|strategy = \"progressive\"\nevery = 2\nlayer_decay = 0.5"
  "scratch_lenet5|lenet5|none|lr = 0.05|strategy = \"scratch\""
  "scratch_mobilenet_v2|mobilenet_v2|none|lr = 0.05\nwarmup_steps = 100|strategy = \"scratch\""
)
printf '%-22s %-13s %7s %9s %8s %8s\n' strategy arch epochs images val_acc wall_s
for row in "${rows[@]}"; do
  IFS='|' read -r name arch weights train schedule <<<"$row"
  out="$PWD/runs/strategies/$name"
  rm -rf "$out"
  printf 'name = "%s"\nseed = 1\n[model]\narch = "%s"\nweights = "%s"\n[data]\nformat = "idx"\nroot = "%s"\nimage_size = 32\n[train]\nepochs = 1000\nbatch_size = 64\n%b\n[schedule]\n%b\n[output]\ndir = "%s"\n' \
    "$name" "$arch" "$weights" "$data" "$train" "$schedule" "$out" >"$specs/$name.toml"
  start=$(date +%s)
  ./target/release/thaw train "$specs/$name.toml" --time-budget "$budget" >"$specs/$name.out" 2>"$specs/$name.err" ||
    { echo "$name failed:"; tail -5 "$specs/$name.err"; continue; }
  wall=$(($(date +%s) - start))
  python3 - "$out/metrics.json" "$name" "$arch" "$wall" <<'EOF'
import json, sys
h = json.load(open(sys.argv[1]))
images = sum(m["images"] for m in h)
print(f'{sys.argv[2]:<22} {sys.argv[3]:<13} {len(h):>7} {images:>9} {h[-1]["val_acc"]:>8.4f} {sys.argv[4]:>8}')
EOF
done
