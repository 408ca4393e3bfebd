#!/usr/bin/env bash
# The GPU check: NCCL and CUDA training on a machine with an NVIDIA GPU and driver. CI never runs it
# (scripts/test.sh needs no GPU); run it by hand where a GPU is lent. Each step prints what it does:
#   1. `setup.sh --cuda`: torch 2.13.0's CUDA libraries and NCCL into .thaw/venv (2.7 GB download,
#      4.7 GB installed) and the libnccl.so link cudarc looks for (shared/DESIGN.md, "Collectives")
#   2. thaw built with --features nccl, with no extra flags: build/rpath.rs links libtorch_cuda
#      (without which libtorch sees no GPU; DESIGN.md, "GPU machines") and finds NCCL
#   3. the NCCL engine's tests with a GPU required: a world of 1 through all-reduce (sum, mean),
#      broadcast, barrier and the in-place CUDA tensor path, and a group that cannot form failing in time
#   4. one training step of LeNet-5 on Fashion-MNIST on cuda:0, then benches/gpu.rs (GPU vs CPU
#      losses, NCCL through the overlapped step, ResNet50 bf16 images/s; PyTorch's side runs in
#      .thaw/bench-venv when the benches installed it)
# Needs: nvidia-smi, cargo, python3 with venv, and PyPI (plus Debian, once, for the data through
# scripts/setup.sh). A lent machine without Rust or network uses scripts/gpu-lent.sh instead.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"

step() { printf '\033[1m[gpu-check]\033[0m %s\n' "$*"; }
fail() { printf '\033[1;31m[gpu-check] FAILED:\033[0m %s\n' "$*" >&2; exit 1; }

step "1/4 GPU, toolchain, and torch with CUDA (setup.sh --cuda)"
command -v nvidia-smi >/dev/null || fail "nvidia-smi not found: no NVIDIA driver on this machine"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || fail "nvidia-smi sees no GPU"
command -v cargo >/dev/null || fail "cargo not found: install Rust first"
bash scripts/setup.sh --cuda
.thaw/venv/bin/python -c '
import torch
assert torch.cuda.is_available(), "torch sees no GPU"
print("torch", torch.__version__, "on", torch.cuda.get_device_name(0), "with NCCL", torch.cuda.nccl.version())'

step "2/4 building thaw --features nccl"
cargo build -p thaw --features nccl

step "3/4 NCCL: a world of 1 through every operation, and a group that cannot form"
THAW_REQUIRE_NCCL=1 cargo test -p thaw-worker --features nccl --lib collective::nccl

step "4/4 one training step on cuda:0 (LeNet-5, Fashion-MNIST)"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
sed -e "s|^root = .*|root = \"$root/.thaw/data/fashion-mnist\"|" -e "s|^dir = .*|dir = \"$tmp/run\"|" \
  examples/fashion-mnist-lenet5.toml >"$tmp/job.toml"
target/debug/thaw train "$tmp/job.toml" --device cuda --max-steps 1
[ -x .thaw/bench-venv/bin/python ] && export THAW_GPU_TORCH_PY=$root/.thaw/bench-venv/bin/python
cargo bench --features nccl --bench gpu

step "OK: NCCL and CUDA training work on this machine"
