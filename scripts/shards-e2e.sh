#!/usr/bin/env bash
# Packed shards end to end: pack Fashion-MNIST and a synthetic ImageNet-shaped tree of real JPEGs,
# verify them, and train from each with `thaw launch --nproc 2`; prints every rank's wait for data
# per step against its step time (the loader must never be the bottleneck).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
source scripts/release.sh
mkdir -p runs/shards
"$thaw" data pack .thaw/data/fashion-mnist --out runs/shards/fmnist --shard-size 16MB
"$thaw" data verify runs/shards/fmnist
[ -d runs/shards/synth-tree ] || "$thaw" data synth --classes 10 --images 1200 --out runs/shards/synth-tree --seed 1
"$thaw" data pack runs/shards/synth-tree --out runs/shards/synth --shard-size 16MB
"$thaw" data verify runs/shards/synth
for job in fashion-mnist-shards synthetic-imagenet-shards; do
  "$thaw" launch --nproc 2 "examples/$job.toml"
  echo "== $job: wait for data per step, per rank"
  grep -h "rank epoch data" "runs/$job/logs/"*.log | sed 's/^.*INFO //'
done
