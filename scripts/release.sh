# Sourced by the run scripts: set-up (idempotent), a release build, and the ImageNet weights of
# MobileNetV2 and EfficientNet-Lite0 in the weights cache ($THAW_HOME, default ~/.cache/thaw).
# Sets $thaw to the binary.
# With network access `--weights imagenet` would download the weights instead of importing them.
bash scripts/setup.sh
cargo build --release --quiet
thaw=target/release/thaw
for w in mobilenet_v2:mobilenet_v2-b0353104 efficientnet_lite0:efficientnet-lite0-57934424; do
  if ! "$thaw" weights path --arch "${w%%:*}" | grep -q present; then
    "$thaw" weights import ".thaw/weights/${w#*:}.pth" --arch "${w%%:*}"
  fi
done
