#!/usr/bin/env bash
# Copies a finished run's artifacts into docs/results/bfcl-qwen2.5-coder-1.5b/
# for committing: each evaluation's summary.json and transcripts.jsonl (the
# tables recompute from them), the final adapter in PEFT format (bf16,
# without the optimizer state), the training config, the run's charts and
# report, the comparison tables, and a few example transcripts (retries the
# reflection turned right, and failures it did not). Run after run.sh (and
# ablation.sh, whose evaluation is copied too when it has finished).
#   bash experiments/bfcl-qwen2.5-coder-1.5b/artifacts.sh [OUT]
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
OUT=${1:-$root/runs/bfcl-qwen2.5-coder-1.5b}
R=${R:-$root/target/release/r3}
DEST=${DEST:-$root/docs/results/bfcl-qwen2.5-coder-1.5b}

if [[ ! -f $OUT/results.md ]]; then
    echo "finish experiments/bfcl-qwen2.5-coder-1.5b/run.sh first ($OUT/results.md is missing)" >&2
    exit 1
fi
mkdir -p "$DEST"
for name in eval-base eval-trained forget-base forget-trained \
    forget-countdown-base forget-countdown-trained eval-trained-retry; do
    if [[ -f $OUT/$name/summary.json ]]; then
        mkdir -p "$DEST/$name"
        cp "$OUT/$name/summary.json" "$OUT/$name/transcripts.jsonl" "$DEST/$name/"
    fi
done
# A run that evaluated the committed adapter (run.sh on a machine without
# the training) has no training of its own: the committed one stays.
if [[ -d $OUT/train ]]; then
    rm -rf "$DEST/adapter"
    "$R" export-adapter --adapter "$OUT/train/$(cat "$OUT/train/last")" --out "$DEST/adapter" \
        --base-model qwen2.5-coder-1.5b
    cp "$here/train.toml" "$DEST/train.toml"
    "$R" report "$OUT/train" >/dev/null
    cp "$OUT/train/training.png" "$OUT/train/report.md" "$OUT/train/metrics.jsonl" "$DEST/"
fi
# The tables name the evaluations by their run directory: keep the names,
# not this machine's paths.
for table in results results-retry; do
    if [[ -f $OUT/$table.md ]]; then sed "s|$OUT/||g" "$OUT/$table.md" >"$DEST/$table.md"; fi
done
# Examples: retries the trained model's reflection turned right, records
# it gets right on the first try where the base model did not, and
# failures neither try fixed (up to three, three and two).
python3 - "$DEST/eval-base/transcripts.jsonl" "$DEST/eval-trained/transcripts.jsonl" \
    >"$DEST/examples.jsonl" <<'EOF'
import json, sys
base, trained = ([json.loads(line) for line in open(path)] for path in sys.argv[1:])
base_right = {r["line"] for r in base if r["attempt"]["verdict"]["success"]}
retried = [r for r in trained if r.get("retry")]
fixed = [r for r in retried if r["retry"]["verdict"]["success"]][:3]
gained = [r for r in trained
          if r["attempt"]["verdict"]["success"] and r["line"] not in base_right][:3]
missed = [r for r in retried if not r["retry"]["verdict"]["success"]][:2]
for r in fixed + gained + missed:
    print(json.dumps(r))
EOF
du -sh "$DEST"/* | sort -h
