#!/usr/bin/env bash
# R3 on Qwen2.5-Coder-0.5B-Instruct (Q4_K_M GGUF) and BFCL function calling,
# with LoRA adapters on the frozen, packed base.
#
# Split by id, within each of the four categories: line n of a category
# file is held out when n % 8 == 1 (125 records: 50 simple_python,
# 25 each of multiple, parallel, parallel_multiple) and mined when
# n % 8 is 3 or 5 (250 records). The two sets never share a record.
# (Splitting by category was tried first: the base model fails every
# parallel record the same way, one call where two or more are asked for,
# which simple_python and multiple never teach.) Sized to run in about
# 1.5 hours on a 2-core CPU. The forgetting check is first-try arithmetic
# before and after.
#   bash experiments/bfcl-qwen2.5-coder-0.5b/run.sh [OUT]
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
OUT=${1:-$root/runs/bfcl-qwen2.5-coder-0.5b}
R=${R:-$root/target/release/r3}
TASK=bfcl
MODEL=$("$R" fetch qwen2.5-coder-0.5b)
ATTEMPT_TOKENS=256
REFLECTION_TOKENS=128
PROMPTS=""
TRAIN=$here/train.toml
source "$root/experiments/lib.sh"

start
: >"$OUT/train.jsonl"
: >"$OUT/heldout.jsonl"
for category in simple_python multiple parallel parallel_multiple; do
    file=$root/data/bfcl/$category.jsonl
    awk 'NR % 8 == 1' "$file" >>"$OUT/heldout.jsonl"
    awk 'NR % 8 == 3 || NR % 8 == 5' "$file" >>"$OUT/train.jsonl"
done
"$R" data arithmetic --count 100 --seed 303 --out "$OUT/forget.jsonl" --overwrite

evaluate eval-base "$MODEL" "$OUT/heldout.jsonl"
evaluate forget-base "$MODEL" "$OUT/forget.jsonl" answer 16 64
mine "$OUT/train.jsonl" 4
checkpoint=$(train)
evaluate eval-trained "$checkpoint" "$OUT/heldout.jsonl"
evaluate forget-trained "$checkpoint" "$OUT/forget.jsonl" answer 16 64
table
