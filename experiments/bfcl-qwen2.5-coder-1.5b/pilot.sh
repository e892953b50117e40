#!/usr/bin/env bash
# The pilot that chose this experiment's task: Qwen2.5-Coder-1.5B-Instruct,
# greedy, the paper's generic reflection prompt, first and second try on
#   - 60 Countdown puzzles (3-4 numbers up to 100, targets up to 100, seed
#     1505, records 251-310: outside the 250 a Countdown run would hold out),
#     answer only, 64-token attempts, 128-token reflections;
#   - 40 BFCL records of the 0.5B run's held-out split (line n % 8 == 1,
#     the first 10 of each category), 256-token attempts, 128-token
#     reflections.
# Its results are in docs/results/bfcl-qwen2.5-coder-1.5b/pilot/.
#   bash experiments/bfcl-qwen2.5-coder-1.5b/pilot.sh [OUT]
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
OUT=${1:-$root/runs/bfcl-qwen2.5-coder-1.5b-pilot}
R=${R:-$root/target/release/r3}
TASK=countdown
MODEL=$("$R" fetch qwen2.5-coder-1.5b)
ATTEMPT_TOKENS=64
REFLECTION_TOKENS=128
PROMPTS=""
source "$root/experiments/lib.sh"
start

"$R" data countdown --count 2000 --numbers 3..=4 --max-number 100 --max-target 100 \
    --seed 1505 --out "$OUT/countdown.jsonl" --overwrite
sed -n '251,310p' "$OUT/countdown.jsonl" >"$OUT/pilot-countdown.jsonl"
evaluate eval-countdown "$MODEL" "$OUT/pilot-countdown.jsonl"
: >"$OUT/bfcl.jsonl"
for category in simple_python multiple parallel parallel_multiple; do
    awk 'NR % 8 == 1 && ++n <= 10' "$root/data/bfcl/$category.jsonl" >>"$OUT/bfcl.jsonl"
done
evaluate eval-bfcl "$MODEL" "$OUT/bfcl.jsonl" bfcl 256 128
log "pilot done"
