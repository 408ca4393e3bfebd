#!/usr/bin/env bash
# The test command: set-up (idempotent), then every test of the workspace, unit and end-to-end.
# Needs no GPU, no Python torch and no network beyond the package registries used by set-up.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
bash scripts/setup.sh
# One build configuration for everything, with the NCCL engine's feature on: its tests pass without
# a GPU (it must fail cleanly there), and a single feature set means the workspace compiles once.
features="thaw-worker/nccl"
# Benches are compiled (not run) so they cannot rot; running them is `cargo bench`.
cargo test --workspace --features "$features" --benches --no-run --quiet
cargo test --workspace --features "$features"
