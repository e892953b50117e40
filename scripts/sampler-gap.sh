#!/usr/bin/env bash
# The sampler–trainer gap on a real model, in-process and through an
# engine (`r3 serve`): a few LoRA steps of the arithmetic experiment's
# recipe on the default model, each way, and the gap columns of their
# metrics.jsonl. Not a speed measurement: it may run beside other work.
#   bash scripts/sampler-gap.sh [OUT] [STEPS]
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
OUT=${1:-$root/runs/sampler-gap}
STEPS=${2:-4}
R=${R:-$root/target/release/r3}
here=$root/experiments/arithmetic-smollm2
mkdir -p "$OUT"
"$R" data arithmetic --count 64 --seed 202 --out "$OUT/train.jsonl" --overwrite
if [[ ! -s $OUT/failures.jsonl ]]; then
    "$R" mine --task answer --data "$OUT/train.jsonl" --samples 4 --temperature 1.0 \
        --max-new-tokens 16 --prompts "$here/prompts.toml" --out "$OUT/failures.jsonl"
fi
train() {
    local name=$1; shift
    rm -rf "${OUT:?}/$name"
    "$R" train --config "$here/train.toml" --use-peft --set "max_steps=$STEPS" \
        --set "failures=\"$OUT/failures.jsonl\"" --set "output_dir=\"$OUT/$name\"" \
        --set "prompts=\"$here/prompts.toml\"" --set learning_rate=1e-4 --set save_steps=0 \
        --set temperature=0.9 "$@" >"$OUT/$name.log" 2>&1
}
train in-process
port=$((20000 + RANDOM % 20000))
"$R" serve --port "$port" >"$OUT/serve.log" 2>&1 &
server=$!
trap 'kill $server 2>/dev/null' EXIT
for _ in $(seq 120); do
    curl -sf "http://127.0.0.1:$port/health" >/dev/null && break
    sleep 1
done
train engine --engine "http://127.0.0.1:$port"
for name in in-process engine; do
    python3 - "$OUT/$name/metrics.jsonl" "$name" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
rows = [r for r in rows if r["trained_tokens"] > 0]
tokens = sum(r["trained_tokens"] for r in rows)
mean = sum(r["logprob_gap_mean"] * r["trained_tokens"] for r in rows) / max(tokens, 1)
worst = max((r["logprob_gap_max"] for r in rows), default=0.0)
ratio = sum(r["importance_ratio_mean"] for r in rows) / max(len(rows), 1)
capped = max((r["importance_capped_fraction"] for r in rows), default=0.0)
print(f"{sys.argv[2]}: {len(rows)} trained steps, {tokens} tokens; "
      f"gap mean {mean:.2e}, max {worst:.2e}; mean ratio {ratio:.6f}; capped {capped}")
PY
done
