#!/usr/bin/env bash
# Does the held-out gain grow with training? The run's 30 steps moved the
# parallel categories from 7 to 15 of 100 (p = 0.039) and the whole
# held-out set by +3 points (p = 0.18); the paper trains about 1000 steps.
# This continues the committed adapter (checkpoint 30) for 30 more steps
# of the same recipe, 60 in all: the same mined failures, drawn in a new
# order (seed 1), a fresh AdamW state after 2 warm-up steps, the KL still
# to the base model. It evaluates checkpoint 60 on the same held-out
# records and compares it with the base model and with checkpoint 30.
# Run after run.sh (it refuses otherwise); resumable like run.sh.
#   bash experiments/bfcl-qwen2.5-coder-1.5b/longer.sh [OUT]
here=$(cd "$(dirname "$0")" && pwd)
source "$here/settings.sh" "$@"

if [[ ! -f $OUT/results.md ]]; then
    echo "finish experiments/bfcl-qwen2.5-coder-1.5b/run.sh first: this continues its adapter on its mined failures" >&2
    exit 1
fi
start
adapter=$root/docs/results/bfcl-qwen2.5-coder-1.5b/adapter
timed train-60 "$R" train --config "$TRAIN" --resume auto \
    --set "failures=\"$OUT/failures.jsonl\"" --set "output_dir=\"$OUT/train-60\"" \
    --set "model=\"$MODEL\"" --set "adapter=\"$adapter\"" --set seed=1
checkpoint="$OUT/train-60/$(cat "$OUT/train-60/last")"
evaluate eval-trained-60 "$checkpoint" "$OUT/heldout.jsonl"
{
    "$R" report --compare "$OUT/eval-base" "$OUT/eval-trained-60"
    "$R" report --compare "$OUT/eval-trained" "$OUT/eval-trained-60"
} >"$OUT/results-60.md"
cat "$OUT/results-60.md"
