#!/usr/bin/env bash
# Copies a finished run's artifacts into
# docs/results/countdown-qwen2.5-coder-1.5b/ for committing (lib.sh's
# `artifacts`). Run after run.sh.
#   bash experiments/countdown-qwen2.5-coder-1.5b/artifacts.sh [OUT]
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
OUT=${1:-$root/runs/countdown-qwen2.5-coder-1.5b}
R=${R:-$root/target/release/r3}
TRAIN=$here/train.toml
BASE_MODEL=qwen2.5-coder-1.5b
source "$root/experiments/lib.sh"

# The forgetting checks' "before" (forget-base, forget-bfcl-base) are the
# BFCL run's committed evaluations, not copied again.
artifacts "${DEST:-$root/docs/results/countdown-qwen2.5-coder-1.5b}" \
    eval-base eval-trained forget-trained forget-bfcl-trained
