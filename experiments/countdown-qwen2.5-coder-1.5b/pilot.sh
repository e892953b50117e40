#!/usr/bin/env bash
# The pilot before the long run (issue: R3 at 1.5B): Qwen2.5-Coder-1.5B-
# Instruct Q4_K_M, the paper's generic reflection prompt, greedy evaluation.
#   1. first and second try on 60 Countdown records of the mining pool (never
#      the held-out set) and on 40 BFCL records of the 0.5B run's held-out
#      split;
#   2. a small mining sample (30 pool records x 8 samples at T = 0.9);
#   3. two training steps (B = 4 failures, G = 8 reflections): the share of
#      groups with signal (the trainable fraction) and the step's cost.
# Every step is kept when finished; a rerun continues.
#   bash experiments/countdown-qwen2.5-coder-1.5b/pilot.sh [OUT]
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
OUT=${1:-$root/runs/countdown-qwen2.5-coder-1.5b-pilot}
R=${R:-$root/target/release/r3}
TASK=countdown
MODEL=$("$R" fetch qwen2.5-coder-1.5b)
ATTEMPT_TOKENS=64
REFLECTION_TOKENS=128
PROMPTS=""
TRAIN=$here/pilot-train.toml
source "$root/experiments/lib.sh"
start
source "$here/split.sh"

head -n 60 "$OUT/pool.jsonl" >"$OUT/pilot-eval.jsonl"
evaluate eval-countdown "$MODEL" "$OUT/pilot-eval.jsonl"
: >"$OUT/bfcl.jsonl"
for category in simple_python multiple parallel parallel_multiple; do
    awk 'NR % 8 == 1 && ++n <= 10' "$root/data/bfcl/$category.jsonl" >>"$OUT/bfcl.jsonl"
done
evaluate eval-bfcl "$MODEL" "$OUT/bfcl.jsonl" bfcl 256 128
tail -n 30 "$OUT/pool.jsonl" >"$OUT/pilot-mine.jsonl"
mine "$OUT/pilot-mine.jsonl" 8
train >/dev/null
log "pilot done"
