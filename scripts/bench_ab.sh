#!/usr/bin/env bash
# Two r3 binaries side by side on the same workloads, interleaved (A, B, A,
# B) so that a machine's drift hits both alike: to show that a change kept
# decoding and training speed. One JSON object per line, each tagged with
# its binary.
#   bash scripts/bench_ab.sh OLD_R3 NEW_R3 [--model PATH]
set -euo pipefail
a=$1 b=$2
shift 2
tag() { sed "s|^{|{\"binary\":\"$1\",|"; }
for round in 1 2; do
  for bin in "$a" "$b"; do
    for batch in 1 8; do
      "$bin" bench generate "$@" --batch "$batch" --prompt-tokens 128 --new-tokens 64 2>/dev/null | tag "$bin"
    done
  done
done
for peft in "" --use-peft; do
  for bin in "$a" "$b"; do
    "$bin" bench train "$@" --batch 2 --group 4 --max-reflection-tokens 64 --max-retry-tokens 32 --steps 1 $peft 2>/dev/null | tag "$bin"
  done
done
