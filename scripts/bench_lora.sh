#!/usr/bin/env bash
# LoRA and packed K-quants, measured side by side in one session (issue 12):
# full fine-tuning against LoRA on the default model; LoRA steps on the Qwen
# models (frozen, packed Q4_K_M base); decoding with packed weights
# against the same model expanded to f32. One JSON object per line on
# stdout (each carries the machine). Qwen models come from
# `r3 fetch`; pass which: bash scripts/bench_lora.sh 0.5b 1.5b
# With PYTHON set to an interpreter that has torch, transformers and gguf,
# transformers decodes the same GGUF beside r3 (scripts/bench_transformers.py).
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release -q -p r3-cli
r3=target/release/r3
train="--batch 4 --group 8 --max-reflection-tokens 128 --max-retry-tokens 128"
$r3 bench train $train --steps 2
$r3 bench train $train --steps 2 --use-peft
# LoRA's activations fit without checkpointing (3.3 GB here): its best
# setting, against full fine-tuning's best (with it), is issue 26's ratio.
$r3 bench train $train --steps 2 --use-peft --no-gradient-checkpointing
for size in "$@"; do
  model=$($r3 fetch "qwen2.5-coder-$size")
  for batch in 1 8; do
    $r3 bench generate --model "$model" --batch "$batch" --prompt-tokens 128 --new-tokens 64
    $r3 bench generate --model "$model" --batch "$batch" --prompt-tokens 128 --new-tokens 64 --f32
    if [[ -n ${PYTHON:-} ]]; then
      "$PYTHON" scripts/bench_transformers.py --gguf "$model" --batch "$batch" --prompt-tokens 128 --new-tokens 64 2>/dev/null
    fi
  done
  $r3 bench train --model "$model" $train --steps 1 --use-peft
done
