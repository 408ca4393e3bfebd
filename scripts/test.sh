#!/usr/bin/env bash
# The test command: set-up (idempotent), then every test of the workspace, unit and end-to-end.
# Needs no GPU, no Python torch and no network beyond the package registries used by set-up.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
bash scripts/setup.sh
# Benches are compiled (not run) so they cannot rot; running them is `cargo bench`.
cargo test --workspace --benches --no-run --quiet
# The NCCL engine is behind a feature: build it and run its tests, which pass without a GPU.
cargo test -p thaw-worker --features nccl --lib collective::nccl
cargo test --workspace
