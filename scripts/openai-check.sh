#!/usr/bin/env bash
# The official openai Python client against r3 serve (run by CI): a tiny
# random model and a LoRA adapter for it, the server on a free port, then
# scripts/openai_check.py.
#   bash scripts/openai-check.sh [R3_BINARY]
set -euo pipefail
cd "$(dirname "$0")/.."
R=${1:-target/debug/r3}
work=$(mktemp -d)
trap 'kill "$server" 2>/dev/null || true; rm -rf "$work"' EXIT
"$R" init --shape configs/tiny-smollm2-vocab.json --out "$work/tiny" >/dev/null
# An adapter: one LoRA step on the tiny model's own failures.
"$R" data arithmetic --count 4 --seed 1 --out "$work/data.jsonl" >/dev/null
"$R" mine --model "$work/tiny" --task answer --data "$work/data.jsonl" --samples 1 \
    --max-new-tokens 4 --out "$work/failures.jsonl" 2>/dev/null
"$R" train --use-peft --lora-r 4 --set "model=\"$work/tiny\"" --set 'task="answer"' \
    --set "failures=\"$work/failures.jsonl\"" --set "output_dir=\"$work/run\"" \
    --set max_steps=1 --set failures_per_step=2 --set num_generations=2 \
    --set max_completion_length=4 --set retry_max_tokens=4 2>/dev/null
"$R" serve --model "$work/tiny" --port 0 >"$work/serve.out" 2>/dev/null &
server=$!
for _ in $(seq 100); do grep -q serving "$work/serve.out" && break; sleep 0.1; done
url=$(grep -o 'http://[^ ]*' "$work/serve.out")
python3 scripts/openai_check.py "$url" "$work/run/checkpoint-1"
