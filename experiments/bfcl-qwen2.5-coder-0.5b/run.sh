#!/usr/bin/env bash
# R3 on Qwen2.5-Coder-0.5B-Instruct (Q4_K_M GGUF) and BFCL function calling,
# with LoRA adapters on the frozen, packed base. Split by category: failures
# are mined from simple_python and multiple (600 records); evaluation is on
# parallel and parallel_multiple (400 records never mined or trained on).
# The forgetting check is first-try arithmetic before and after.
#   bash experiments/bfcl-qwen2.5-coder-0.5b/run.sh [OUT]
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
OUT=${1:-$root/runs/bfcl-qwen2.5-coder-0.5b}
R=${R:-$root/target/release/r3}
TASK=bfcl
MODEL=$(bash "$root/../shared/models/fetch.sh" qwen2.5-coder-0.5b)
ATTEMPT_TOKENS=256
REFLECTION_TOKENS=128
PROMPTS=""
TRAIN=$here/train.toml
source "$root/experiments/lib.sh"

start
bfcl=$root/data/bfcl
cat "$bfcl/simple_python.jsonl" "$bfcl/multiple.jsonl" >"$OUT/train.jsonl"
cat "$bfcl/parallel.jsonl" "$bfcl/parallel_multiple.jsonl" >"$OUT/heldout.jsonl"
"$R" data arithmetic --count 200 --seed 303 --out "$OUT/forget.jsonl"

evaluate eval-base "$MODEL" "$OUT/heldout.jsonl"
evaluate forget-base "$MODEL" "$OUT/forget.jsonl" answer 16 64
mine "$OUT/train.jsonl" 8
checkpoint=$(train)
evaluate eval-trained "$checkpoint" "$OUT/heldout.jsonl"
evaluate forget-trained "$checkpoint" "$OUT/forget.jsonl" answer 16 64
table
