#!/usr/bin/env bash
# R3 on the default model (SmolLM2-135M-Instruct) and two-number arithmetic:
# 200 held-out records, failures mined from 400 others, GRPO on the
# reflection tokens, both evaluated before and after; a forgetting check on
# arithmetic with larger operands (another distribution, first try).
#   bash experiments/arithmetic-smollm2/run.sh [OUT]
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
OUT=${1:-$root/runs/arithmetic-smollm2}
R=${R:-$root/target/release/r3}
TASK=answer
MODEL=""
ATTEMPT_TOKENS=16
REFLECTION_TOKENS=64
PROMPTS=$here/prompts.toml
TRAIN=$here/train.toml
source "$root/experiments/lib.sh"

start
"$R" data arithmetic --count 200 --seed 101 --out "$OUT/heldout.jsonl" --overwrite
"$R" data arithmetic --count 400 --seed 202 --out "$OUT/pool.jsonl" --overwrite
# Held out means never mined or trained on: drop repeats of held-out records.
grep -vxF -f "$OUT/heldout.jsonl" "$OUT/pool.jsonl" >"$OUT/train.jsonl"
"$R" data arithmetic --count 200 --max-operand 99 --seed 303 --out "$OUT/forget.jsonl" --overwrite
log "$(wc -l <"$OUT/train.jsonl") training records after removing held-out repeats"

evaluate eval-base "$MODEL" "$OUT/heldout.jsonl"
evaluate forget-base "$MODEL" "$OUT/forget.jsonl"
mine "$OUT/train.jsonl" 8
checkpoint=$(train)
evaluate eval-trained "$checkpoint" "$OUT/heldout.jsonl"
evaluate forget-trained "$checkpoint" "$OUT/forget.jsonl"
table
