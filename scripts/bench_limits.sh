#!/usr/bin/env bash
# Each generation phase as a fraction of this machine's limits (r3 bench
# measures the GEMM peak and the memory read rate first): decode at batch
# 1 against the read rate, prefill and batch-32 decode against the GEMM
# peak, on the default model and the two Qwen2.5-Coder GGUFs. One JSON
# object per line, then a Markdown table. Run it alone on the machine.
#   bash scripts/bench_limits.sh [R3] > limits.jsonl
set -euo pipefail
table=$(cat <<'PY'
import json, sys
print("| model | batch | prefill tok/s | prefill / GEMM peak | decode tok/s | decode / read rate | decode / GEMM peak | GEMM GFLOP/s | read GB/s |")
print("|---|---|---|---|---|---|---|---|---|")
for line in sys.stdin:
    d = json.loads(line)
    m = d["machine"]
    cells = [d["name"], d["batch"], f'{d["prefill_tokens_per_s"]:.0f}', f'{d["prefill_fraction_of_limit"]:.2f}',
             f'{d["decode_tokens_per_s"]:.1f}', f'{d["decode_bandwidth_fraction"]:.2f}',
             f'{d["decode_compute_fraction"]:.2f}', f'{m["gemm_gflops"]:.0f}', f'{m["read_gb_per_s"]:.1f}']
    print("| " + " | ".join(str(c) for c in cells) + " |")
PY
)
root=$(cd "$(dirname "$0")/.." && pwd)
R=${1:-$root/target/release/r3}
for model in smollm2-135m qwen2.5-coder-0.5b qwen2.5-coder-1.5b; do
    path=$("$R" fetch "$model")
    for batch in 1 32; do
        "$R" bench generate --model "$path" --batch "$batch" --prompt-tokens 128 \
            --new-tokens 64 2>/dev/null | sed "s|^{|{\"name\":\"$model\",|"
    done
done | tee /dev/stderr | python3 -c "$table"
