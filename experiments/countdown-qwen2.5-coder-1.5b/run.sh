#!/usr/bin/env bash
# R3 at the paper's smallest scale on the paper's Countdown:
# Qwen2.5-Coder-1.5B-Instruct (Q4_K_M GGUF, `r3 fetch qwen2.5-coder-1.5b`),
# LoRA r = 16 on every linear projection of the frozen, packed base, the
# paper's generic reflection prompt, answer-only attempts (64 tokens).
#
# Why this recipe (pilot.sh, docs/results/countdown-qwen2.5-coder-1.5b.md):
# greedy, the model solves no puzzle on either try; sampled (T = 0.9, 16
# attempts a puzzle) it solves some puzzles sometimes. Those are the
# failures R3 can learn from, so mining keeps only failures solved by at
# least one of 16 samples (train.toml's max_failure_rate), and retries are
# sampled during training (evaluation stays greedy).
#
# Data: `r3 data countdown --numbers 3..=4 --seed 2026` (numbers up to 100,
# targets up to 100), split by line, fixed, never overlapping:
#   held out: puzzles 1-250 (never mined or trained on);
#   mined:    puzzles 251-850;
#   the pilot used 1001-1060.
# Forgetting, first try before and after, on the same records: the BFCL
# run's 200 held-out records (its committed base evaluation is the
# "before") and its 100 arithmetic records.
#
# Resumable: every finished evaluation and the mined failures are kept,
# training continues with --resume auto; rerun the same command. A run
# often moves to a new machine, so the mined failures and the base
# evaluation, committed under docs/results/countdown-qwen2.5-coder-1.5b/
# (finished or not: mining resumes from its state, the evaluation from
# its finished chunks), are where a new run directory starts; so is the
# trained adapter, once committed.
#   bash experiments/countdown-qwen2.5-coder-1.5b/run.sh [OUT]
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
OUT=${1:-$root/runs/countdown-qwen2.5-coder-1.5b}
R=${R:-$root/target/release/r3}
TASK=countdown
MODEL=$("$R" fetch qwen2.5-coder-1.5b)
ATTEMPT_TOKENS=64
REFLECTION_TOKENS=128
PROMPTS=""
TRAIN=$here/train.toml
source "$root/experiments/lib.sh"

start
"$R" data countdown --count 1100 --numbers 3..=4 --seed 2026 \
    --out "$OUT/countdown.jsonl" --overwrite
sed -n '1,250p' "$OUT/countdown.jsonl" >"$OUT/heldout.jsonl"
sed -n '251,850p' "$OUT/countdown.jsonl" >"$OUT/train.jsonl"

# The other tasks' records, exactly those the BFCL run evaluated (taken
# from its committed transcripts), and its base model's evaluations.
bfcl=$root/docs/results/bfcl-qwen2.5-coder-1.5b
records() { python3 -c 'import json, sys
for line in open(sys.argv[1]):
    print(json.dumps(json.loads(line)["record"]))' "$1"; }
records "$bfcl/eval-base/transcripts.jsonl" >"$OUT/forget-bfcl.jsonl"
records "$bfcl/forget-base/transcripts.jsonl" >"$OUT/forget-arithmetic.jsonl"
reuse forget-base "$bfcl/forget-base"
reuse forget-bfcl-base "$bfcl/eval-base"

results=$root/docs/results/countdown-qwen2.5-coder-1.5b
reuse_failures "$results/mined"
mine "$OUT/train.jsonl" 16
reuse eval-base "$results/eval-base"
evaluate eval-base "$MODEL" "$OUT/heldout.jsonl"
# Training took sessions of a 2-core CPU (2026-12-05 to 06); its result,
# checkpoint-30's adapter in bf16, is committed. A run directory without
# the training evaluates that adapter instead of training for hours again
# (TRAIN_AGAIN=1 trains).
adapter=$results/adapter
if [[ ${TRAIN_AGAIN:-0} != 1 && -f $adapter/adapter_config.json && ! -d $OUT/train ]]; then
    checkpoint=$adapter
    log "train: the committed adapter ($adapter)"
    # Its evaluations, committed as they finish, are those of checkpoint
    # 30 in f32, of which the adapter is the bf16 copy.
    for name in eval-trained forget-trained forget-bfcl-trained; do
        reuse "$name" "$results/$name"
    done
else
    checkpoint=$(train)
fi
evaluate eval-trained "$checkpoint" "$OUT/heldout.jsonl"
evaluate forget-trained "$checkpoint" "$OUT/forget-arithmetic.jsonl" answer 16 64
evaluate forget-bfcl-trained "$checkpoint" "$OUT/forget-bfcl.jsonl" bfcl 256 192
table
"$R" report --compare "$OUT/forget-bfcl-base" "$OUT/forget-bfcl-trained" >>"$OUT/results.md"
