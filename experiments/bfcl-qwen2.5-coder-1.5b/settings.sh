# The settings run.sh, ablation.sh and longer.sh share (sourced by them,
# with their arguments): the run directory [OUT], the model, the budgets,
# the training config; then experiments/lib.sh.
root=$(cd "$here/../.." && pwd)
OUT=${1:-$root/runs/bfcl-qwen2.5-coder-1.5b}
R=${R:-$root/target/release/r3}
TASK=bfcl
MODEL=$("$R" fetch qwen2.5-coder-1.5b)
ATTEMPT_TOKENS=256
REFLECTION_TOKENS=192
PROMPTS=""
TRAIN=$here/train.toml
source "$root/experiments/lib.sh"
