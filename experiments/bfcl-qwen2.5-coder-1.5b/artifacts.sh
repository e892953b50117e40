#!/usr/bin/env bash
# Copies a finished run's artifacts into docs/results/bfcl-qwen2.5-coder-1.5b/
# for committing (lib.sh's `artifacts`). Run after run.sh (and ablation.sh,
# whose evaluation is copied too when it has finished).
#   bash experiments/bfcl-qwen2.5-coder-1.5b/artifacts.sh [OUT]
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
OUT=${1:-$root/runs/bfcl-qwen2.5-coder-1.5b}
R=${R:-$root/target/release/r3}
TRAIN=$here/train.toml
BASE_MODEL=qwen2.5-coder-1.5b
source "$root/experiments/lib.sh"

artifacts "${DEST:-$root/docs/results/bfcl-qwen2.5-coder-1.5b}" \
    eval-base eval-trained forget-base forget-trained \
    forget-countdown-base forget-countdown-trained eval-trained-retry \
    eval-trained-60
