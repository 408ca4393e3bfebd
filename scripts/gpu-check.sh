#!/usr/bin/env bash
# The GPU check: NCCL and CUDA training on a machine with an NVIDIA GPU and driver. CI never runs it
# (scripts/test.sh needs no GPU); run it by hand where a GPU is lent. Each step prints what it does:
#   1. a venv, .thaw/gpu-venv, with the full torch==2.13.0 wheel (CUDA 13; 2.7 GB download, 4.7 GB
#      installed) and NCCL at torch's own pin; libnccl.so -> libnccl.so.2, the name cudarc looks for
#      (shared/DESIGN.md, "Collectives")
#   2. thaw built against it with --features nccl and `-Wl,--no-as-needed -ltorch_cuda`, without
#      which libtorch sees no GPU (DESIGN.md, "GPU machines"); in .thaw/target-gpu, apart from the
#      CPU build
#   3. the NCCL engine's tests with a GPU required: a world of 1 through all-reduce (sum, mean),
#      broadcast, barrier and the in-place CUDA tensor path, and a group that cannot form failing in time
#   4. one training step of LeNet-5 on Fashion-MNIST on cuda:0
# Needs: nvidia-smi, cargo, python3 with venv, and PyPI (plus Debian, once, for the data through
# scripts/setup.sh). Offline, THAW_WHEELS=DIR installs the wheels from DIR instead of PyPI.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"

TORCH_VERSION=2.13.0
NCCL_WHEEL='nvidia-nccl-cu13==2.29.7' # torch 2.13.0's Requires-Dist
venv="$root/.thaw/gpu-venv"
target=x86_64-unknown-linux-gnu

step() { printf '\033[1m[gpu-check]\033[0m %s\n' "$*"; }
fail() { printf '\033[1;31m[gpu-check] FAILED:\033[0m %s\n' "$*" >&2; exit 1; }

step "1/4 GPU, toolchain and torch $TORCH_VERSION with CUDA"
command -v nvidia-smi >/dev/null || fail "nvidia-smi not found: no NVIDIA driver on this machine"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || fail "nvidia-smi sees no GPU"
command -v cargo >/dev/null || fail "cargo not found: install Rust first"
[ -f .thaw/data/fashion-mnist/train-images-idx3-ubyte.gz ] || bash scripts/setup.sh
marker="$venv/.thaw-gpu-torch-$TORCH_VERSION"
if [ ! -f "$marker" ]; then
  python3 -m venv "$venv"
  from=(); [ -n "${THAW_WHEELS:-}" ] && from=(--no-index --find-links "$THAW_WHEELS")
  "$venv/bin/pip" install --quiet --disable-pip-version-check "${from[@]}" "torch==$TORCH_VERSION" "$NCCL_WHEEL"
  touch "$marker"
fi
site=$("$venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
export LIBTORCH="$site/torch"
nccl_dir="$site/nvidia/nccl/lib"
[ -f "$nccl_dir/libnccl.so.2" ] || fail "no libnccl.so.2 in $nccl_dir"
ln -sf libnccl.so.2 "$nccl_dir/libnccl.so"
export LD_LIBRARY_PATH="$nccl_dir${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
"$venv/bin/python" -c '
import torch
assert torch.cuda.is_available(), "torch sees no GPU"
print("torch", torch.__version__, "on", torch.cuda.get_device_name(0), "with NCCL", torch.cuda.nccl.version())'

step "2/4 building thaw --features nccl, linked to libtorch_cuda"
# An explicit --target keeps RUSTFLAGS off build scripts, which could not link libtorch_cuda.
export CARGO_TARGET_DIR="$root/.thaw/target-gpu"
export RUSTFLAGS="-L native=$LIBTORCH/lib -C link-arg=-Wl,--no-as-needed -C link-arg=-ltorch_cuda"
cargo build --target "$target" -p thaw --features thaw-worker/nccl

step "3/4 NCCL: a world of 1 through every operation, and a group that cannot form"
THAW_REQUIRE_NCCL=1 cargo test --target "$target" -p thaw-worker --features nccl --lib collective::nccl

step "4/4 one training step on cuda:0 (LeNet-5, Fashion-MNIST)"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
sed -e "s|^root = .*|root = \"$root/.thaw/data/fashion-mnist\"|" -e "s|^dir = .*|dir = \"$tmp/run\"|" \
  examples/fashion-mnist-lenet5.toml >"$tmp/job.toml"
"$CARGO_TARGET_DIR/$target/debug/thaw" train "$tmp/job.toml" --device cuda --max-steps 1

step "OK: NCCL and CUDA training work on this machine"
