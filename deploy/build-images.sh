#!/usr/bin/env bash
# Builds thaw's images: the binary with the workspace's toolchain (release, stripped; with
# --features nccl for cuda), then deploy/Dockerfile around it.
#   bash deploy/build-images.sh [cpu|cuda ...]      # default: cpu
# THAW_IMAGE (default thaw), THAW_VERSION (the workspace's), THAW_BASE (default
# debian:bookworm-slim if it can be pulled, else thaw-base:bookworm from deploy/base.sh).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
image=${THAW_IMAGE:-thaw}
version=${THAW_VERSION:-$(sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -1)}
variants=("$@"); [ ${#variants[@]} -gt 0 ] || variants=(cpu)
step() { printf '\033[1m[images]\033[0m %s\n' "$*"; }

base=${THAW_BASE:-}
if [ -z "$base" ]; then
  if docker image inspect debian:bookworm-slim >/dev/null 2>&1 || timeout 60 docker pull -q debian:bookworm-slim >/dev/null 2>&1; then
    base=debian:bookworm-slim
  else
    step "no registry: building the base from Debian packages (deploy/base.sh)"
    bash deploy/base.sh thaw-base:bookworm
    base=thaw-base:bookworm
  fi
fi
for v in "${variants[@]}"; do
  case "$v" in
    cpu) features=() ;;
    cuda) features=(--features nccl) ;;
    *) echo "build-images: unknown variant '$v' (cpu, cuda)" >&2; exit 2 ;;
  esac
  # The images are Debian bookworm with its Python 3.11, as this machine is expected to be: the
  # wheels pip picks here are the ones the image's pip takes.
  wheels="deploy/out/wheels-$v"
  if [ ! -f "$wheels/.done" ]; then
    step "downloading the $v wheels from PyPI into $wheels"
    rm -rf "$wheels" && mkdir -p "$wheels"
    if [ "$v" = cuda ]; then
      # torch with every CUDA library it depends on, and NCCL (scripts/setup.sh --cuda).
      python3 -m pip download --quiet --disable-pip-version-check --only-binary=:all: -d "$wheels" \
        torch==2.13.0 nvidia-nccl-cu13==2.29.7
    else
      python3 -m pip download --quiet --disable-pip-version-check --no-deps --only-binary=:all: -d "$wheels" \
        torch==2.13.0 'nvidia-cuda-runtime==13.0.96.*' 'nvidia-cuda-cupti==13.0.85.*'
    fi
    touch "$wheels/.done"
  fi
  step "building thaw ($v) in release"
  cargo build --release -p thaw "${features[@]}"
  mkdir -p "deploy/out/$v"
  strip -o "deploy/out/$v/thaw" target/release/thaw
  step "building $image:$version-$v on $base"
  start=$(date +%s)
  docker build -q -f deploy/Dockerfile --build-arg BASE="$base" --build-arg VARIANT="$v" \
    --build-arg VERSION="$version" -t "$image:$version-$v" deploy >/dev/null
  step "$image:$version-$v built in $(( $(date +%s) - start )) s: $(docker image inspect -f '{{.Size}}' "$image:$version-$v" | awk '{printf "%.0f MB", $1/1e6}')"
done
