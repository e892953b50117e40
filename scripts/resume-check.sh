#!/usr/bin/env bash
# Exact resume, end to end through `r3 train`, on any device:
#
#   bash scripts/resume-check.sh R3 MODEL DEVICE
#
# Mines failures of MODEL (a small random one: gpu-check.sh's tiny model)
# on arithmetic records, judged by a verifier that passes an answer when
# the sum of its bytes is even (deterministic mixed rewards from a model
# that knows nothing, so that groups train). Then trains three steps
# straight, and again as two steps and a `--resume auto` to the third,
# and compares the two final checkpoints: weights and AdamW moments must
# be byte-identical. Prints one JSON line; exits non-zero if they differ
# or no step after the resume trained. On a GPU this covers what
# device-check does not: checkpoints written from device tensors, moments
# moved back to the device, the data cursor and sampler streams resumed.
set -euo pipefail
[ $# -eq 3 ] || { echo "usage: $0 R3 MODEL DEVICE" >&2; exit 2; }
r3=$1 model=$2 device=$3
dir=$(mktemp -d)
trap 'rm -rf "$dir"' EXIT
cat >"$dir/verify.py" <<'EOF'
import json, sys
for line in sys.stdin:
    m = json.loads(line)
    print(json.dumps({"id": m["id"], "success": sum(m["answer"].encode()) % 2 == 0}), flush=True)
EOF
verifier="python3 $dir/verify.py"
"$r3" data arithmetic --count 16 --seed 2 --out "$dir/data.jsonl" >/dev/null
"$r3" mine --model "$model" --device "$device" --verifier "$verifier" --data "$dir/data.jsonl" \
  --samples 2 --max-new-tokens 6 --out "$dir/failures.jsonl" >/dev/null
# High temperatures: a random model's logits make 0.9 nearly greedy, and
# equal rollouts give equal rewards, which train nothing.
train() {
  "$r3" train --device "$device" --resume auto \
    --set "model=$model" --set "verifier=$verifier" --set "failures=$dir/failures.jsonl" \
    --set save_steps=1 --set failures_per_step=2 --set num_generations=4 \
    --set max_completion_length=8 --set retry_max_tokens=6 --set temperature=3.0 \
    --set retry_temperature=3.0 --set learning_rate=0.001 --set beta=0.01 "$@" >/dev/null
}
train --set "output_dir=$dir/whole" --set max_steps=3
train --set "output_dir=$dir/parts" --set max_steps=2
train --set "output_dir=$dir/parts" --set max_steps=3
python3 - "$dir" "$device" <<'EOF'
import filecmp, json, sys
dir, device = sys.argv[1], sys.argv[2]
files = ["model.safetensors", "optimizer.safetensors"]
same = {f: filecmp.cmp(f"{dir}/whole/checkpoint-3/{f}", f"{dir}/parts/checkpoint-3/{f}", shallow=False)
        for f in files}
steps = [json.loads(l) for l in open(f"{dir}/whole/metrics.jsonl")]
resumed = [json.loads(l) for l in open(f"{dir}/parts/metrics.jsonl")]
grad_norms = [round(m["grad_norm"], 4) for m in steps]
ok = all(same.values()) and steps[2]["grad_norm"] > 0
ok = ok and [m["grad_norm"] for m in resumed] == [m["grad_norm"] for m in steps]
print(json.dumps({"resume_check": "ok" if ok else "FAILED", "device": device,
                  "identical": same, "grad_norms": grad_norms,
                  "resumed_grad_norms": [round(m["grad_norm"], 4) for m in resumed]}))
sys.exit(0 if ok else 1)
EOF
