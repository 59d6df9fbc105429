#!/usr/bin/env bash
# scripts/check-cuda.sh - type-checks and lints the `cuda` build (no GPU, no driver needed: nothing
# is linked), so that GPU code cannot rot on machines without one. Run by .ci/run.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
eval "$(scripts/cuda-toolkit.sh)"
nvcc --version | tail -n 1
cargo clippy --features cuda --lib --bins -- -D warnings
