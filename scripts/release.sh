# Sourced by the run scripts: set-up (idempotent), a release build, and torchvision's MobileNetV2
# weights in the weights cache ($THAW_HOME, default ~/.cache/thaw). Sets $thaw to the binary.
# With network access `--weights imagenet` would download the weights instead of importing them.
bash scripts/setup.sh
cargo build --release --quiet
thaw=target/release/thaw
if ! "$thaw" weights path --arch mobilenet_v2 | grep -q present; then
  "$thaw" weights import .thaw/weights/mobilenet_v2-b0353104.pth --arch mobilenet_v2
fi
