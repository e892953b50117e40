#!/usr/bin/env bash
# The Countdown pilot at 1.5B (issue 23: with no gain on BFCL, try the
# other task with a recipe that fits it). The first pilot
# (experiments/bfcl-qwen2.5-coder-1.5b/pilot.sh) found 0/60 greedy, first
# and second try, answer only, on 3-4 numbers up to 100: nothing for GRPO
# at greedy decoding. R3 needs failures the model *sometimes* solves, which
# only sampling shows (the paper mines up to 64 first attempts a query). So:
#   1. mine 60 puzzles (3-4 numbers up to 100, the paper's Countdown) with
#      16 samples each at T = 0.9, answer only, 64-token attempts, and
#      count the puzzles solved by some but not all samples;
#   2. the same on 60 puzzles of 3 numbers (an easier variant, labelled as
#      such if it is the one that trains);
#   3. two training steps (B = 4, G = 8, sampled retries) on each set's
#      failures: the trainable fraction, from the groups with signal.
# Puzzles 1001-1060 of seed 2026: a run would hold out 1-250.
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
TRAIN=$here/train.toml
source "$root/experiments/lib.sh"
start

for numbers in 3..=4 3; do
    name=${numbers//..=/-}
    "$R" data countdown --count 2000 --numbers "$numbers" --seed 2026 \
        --out "$OUT/countdown-$name.jsonl" --overwrite
    sed -n '1001,1060p' "$OUT/countdown-$name.jsonl" >"$OUT/pilot-$name.jsonl"
    mine "$OUT/pilot-$name.jsonl" 16 "failures-$name"
    python3 - "$OUT/failures-$name.jsonl" "$name" <<'PY' | tee -a "$OUT/pilot.md"
import json, sys
rows = [json.loads(line) for line in open(sys.argv[1])]
never = sum(r["failures"] == r["samples"] for r in rows)
some = len(rows) - never
print(f"{sys.argv[2]} numbers: 60 puzzles x 16 samples: {60 - len(rows)} always solved, "
      f"{some} solved sometimes, {never} never; samples right "
      f"{sum(r['samples'] - r['failures'] for r in rows) + 16 * (60 - len(rows))}/960")
PY
    if ! python3 -c 'import json, sys; sys.exit(not any(json.loads(l)["failures"] < json.loads(l)["samples"] for l in open(sys.argv[1])))' \
        "$OUT/failures-$name.jsonl"; then
        log "$name numbers: no failure the model sometimes solves, nothing to train"
        continue
    fi
    if [[ ! -f $OUT/train-$name/last || $(cat "$OUT/train-$name/last") != checkpoint-2 ]]; then
        timed "train-$name" "$R" train --config "$TRAIN" --resume auto \
            --set "failures=\"$OUT/failures-$name.jsonl\"" \
            --set "output_dir=\"$OUT/train-$name\"" --set "model=\"$MODEL\"" \
            --set "max_steps=2"
    fi
    python3 - "$OUT/train-$name/metrics.jsonl" "$name" <<'PY' | tee -a "$OUT/pilot.md"
import json, sys
rows = [json.loads(line) for line in open(sys.argv[1])]
groups = sum(r["groups"] for r in rows)
signal = groups - sum(r["zero_signal_groups"] for r in rows)
right = sum(round(r["retry_success"] * r["groups"] * 8) for r in rows)
print(f"{sys.argv[2]} numbers: {len(rows)} steps, {signal} of {groups} groups with signal, "
      f"{right} of {8 * groups} sampled retries right")
PY
done
log "pilot done: $OUT/pilot.md"
