#!/usr/bin/env bash
# The ablation a reader of the paper asks for first: the same run as
# run.sh, at equal steps, with GRPO's credit on the retry's tokens instead
# of the reflection's (train_on = "retry"). It reuses run.sh's split and
# mined failures and compares with its eval-base, so run it after run.sh
# has finished (it refuses otherwise; two runs would share the 2 cores).
# Resumable like run.sh: rerun the same command.
#   bash experiments/bfcl-qwen2.5-coder-1.5b/ablation.sh [OUT]
here=$(cd "$(dirname "$0")" && pwd)
source "$here/settings.sh" "$@"

if [[ ! -f $OUT/results.md ]]; then
    echo "finish experiments/bfcl-qwen2.5-coder-1.5b/run.sh first: the ablation trains on its mined failures and compares with its eval-base" >&2
    exit 1
fi
start
# A checkpoint every step (train.toml's 2 is changeable on resume and
# changes no result): a step takes ~50 minutes here and a session stops
# without warning, so every other stop lost a finished step.
timed train-retry "$R" train --config "$TRAIN" --resume auto \
    --set "failures=\"$OUT/failures.jsonl\"" --set "output_dir=\"$OUT/train-retry\"" \
    --set "model=\"$MODEL\"" --set 'train_on="retry"' --set save_steps=1
checkpoint="$OUT/train-retry/$(cat "$OUT/train-retry/last")"
evaluate eval-trained-retry "$checkpoint" "$OUT/heldout.jsonl"
"$R" report --compare "$OUT/eval-base" "$OUT/eval-trained-retry" >"$OUT/results-retry.md"
cat "$OUT/results-retry.md"
