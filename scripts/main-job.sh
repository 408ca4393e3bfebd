#!/usr/bin/env bash
# The main job: set-up (idempotent), then fine-tune ImageNet-pretrained MobileNetV2 on
# Fashion-MNIST with 2 data-parallel worker processes on this machine (an in-process coordinator,
# gRPC on 127.0.0.1, a TCP ring all-reduce). Prints progress, a line per epoch and the final test
# accuracy, and leaves a checkpoint, the resolved spec and the worker logs under
# runs/fashion-mnist-mobilenet/.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
source scripts/release.sh
"$thaw" launch --nproc 2 examples/fashion-mnist-mobilenet.toml "$@"
