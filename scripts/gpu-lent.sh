#!/usr/bin/env bash
# The check for a lent GPU machine (one H200, PyTorch 2.11.0+cu130 in /opt/torch/.venv, no
# network, no Rust, 64 MiB carried, 15 minutes of device time in all): build here, carry one
# binary, run one script there.
#
#   bash scripts/gpu-lent.sh build   # here: torch 2.11.0's libtorch from PyPI (the wheel alone,
#                                    # into .thaw/torch-2.11), benches/gpu.rs built against it with
#                                    # NCCL and tch 0.24 (2.11's), stripped, staged in
#                                    # .thaw/gpu-carry/ with its scripts
#   bash scripts/gpu-lent.sh run     # there (what the device tool runs; well under 10 minutes):
#                                    # benches/gpu.rs against the machine's torch/lib: GPU vs CPU
#                                    # losses of MobileNetV2 and ResNet50, an NCCL world of 1 through
#                                    # the device-resident path, ResNet50 bf16 images/s at batch 128
#                                    # against the same loop in the machine's PyTorch
#
# The device tool's call, after `build`:
#   run(command="bash scripts/gpu-lent.sh run", carry=[".thaw/gpu-carry"], timeout_s=590)
# Results also land in $OUT/gpu.txt when $OUT is set.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
carry="$root/.thaw/gpu-carry"
step() { printf '\033[1m[gpu-lent]\033[0m %s\n' "$*"; }
fail() { printf '\033[1;31m[gpu-lent] FAILED:\033[0m %s\n' "$*" >&2; exit 1; }

case "${1:-}" in
build)
  TORCH=2.11.0
  dir="$root/.thaw/torch-2.11"
  if [ ! -f "$dir/.thaw-torch-$TORCH" ]; then
    step "fetching the torch $TORCH wheel (libtorch and its headers; no CUDA libraries needed to link)"
    python3 -m pip install --quiet --disable-pip-version-check --no-deps --no-cache-dir \
      --target "$dir" "torch==$TORCH"
    touch "$dir/.thaw-torch-$TORCH"
  fi
  # tch 0.26's generated bindings call ops libtorch 2.11 lacks (torch-sys fails to compile against
  # its headers), so the device build uses tch 0.24, the one made for 2.11, in a copy of the
  # working tree: Cargo.toml's two pins are the only change.
  src="$root/.thaw/gpu-src"
  step "copying the working tree to $src with tch and torch-sys pinned to 0.24.0"
  rm -rf "$src" && mkdir -p "$src"
  git ls-files -z | tar --null -T - -cf - | tar -xf - -C "$src"
  sed -i 's/^tch = "=0.26.0"/tch = "=0.24.0"/' "$src/Cargo.toml"
  sed -i 's/^torch-sys = "=0.26.0"/torch-sys = "=0.24.0"/' "$src/worker/Cargo.toml"
  grep -q '^tch = "=0.24.0"' "$src/Cargo.toml" || fail "could not pin tch in $src/Cargo.toml"
  cd "$src"
  export LIBTORCH="$dir/torch" PROTOC="$root/.thaw/bin/protoc" PROTOC_INCLUDE="$root/.thaw/protoc-include"
  export CARGO_TARGET_DIR="$root/.thaw/target-gpu"
  # libtorch_cuda is linked by name (nothing references it by symbol, and without it libtorch sees
  # no GPU); its own CUDA libraries are on the GPU machine only, hence --allow-shlib-undefined.
  # An explicit --target keeps these flags off build scripts.
  export RUSTFLAGS="-L native=$LIBTORCH/lib -C link-arg=-Wl,--no-as-needed,-ltorch_cuda,--as-needed -C link-arg=-Wl,--allow-shlib-undefined"
  step "building benches/gpu.rs against libtorch $TORCH with NCCL"
  cargo bench --no-run --target x86_64-unknown-linux-gnu --features nccl --bench gpu
  bin=$(ls -t "$CARGO_TARGET_DIR"/x86_64-unknown-linux-gnu/release/deps/gpu-* | grep -v '\.d$' | head -1)
  cd "$root"
  rm -rf "$carry" && mkdir -p "$carry"
  strip -o "$carry/gpu" "$bin"
  cp benches/gpu_torch.py scripts/gpu-lent.sh "$carry/"
  du -sh "$carry"
  [ "$(du -sm "$carry" | cut -f1)" -lt 64 ] || fail "$carry is over the 64 MiB that can be carried"
  step "ready: run(command=\"bash scripts/gpu-lent.sh run\", carry=[\".thaw/gpu-carry\"], timeout_s=590)"
  ;;
run)
  venv=${THAW_GPU_VENV:-/opt/torch/.venv}
  [ -x "$carry/gpu" ] || fail "no $carry/gpu: run 'bash scripts/gpu-lent.sh build' first, then carry .thaw/gpu-carry"
  site=$("$venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || fail "nvidia-smi sees no GPU"
  # cudarc opens libnccl.so; the wheel ships libnccl.so.2.
  links=$(mktemp -d)
  ln -s "$site/nvidia/nccl/lib/libnccl.so.2" "$links/libnccl.so"
  export LD_LIBRARY_PATH="$site/torch/lib:$site/nvidia/nccl/lib:$links${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
  export THAW_GPU_TORCH_PY="$venv/bin/python" THAW_GPU_TORCH_SCRIPT="$carry/gpu_torch.py"
  log=${OUT:-$links}/gpu.txt
  step "benches/gpu.rs on $(hostname): checks, then ResNet50 bf16 images/s against PyTorch"
  timeout 540 "$carry/gpu" 2>&1 | tee "$log"
  ;;
*)
  sed -n '2,19p' "$0"
  exit 2
  ;;
esac
