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
cp "$OUT/results.md" "$DEST/results.md"
if [[ -f $OUT/results-retry.md ]]; then cp "$OUT/results-retry.md" "$DEST/"; fi
# Three retries the trained model's reflection turned right, two it did not.
python3 - "$DEST/eval-trained/transcripts.jsonl" >"$DEST/examples.jsonl" <<'EOF'
import json, sys
rows = [json.loads(line) for line in open(sys.argv[1])]
retried = [r for r in rows if r.get("retry")]
fixed = [r for r in retried if r["retry"]["verdict"]["success"]][:3]
missed = [r for r in retried if not r["retry"]["verdict"]["success"]][:2]
for r in fixed + missed:
    print(json.dumps(r))
EOF
du -sh "$DEST"/* | sort -h
