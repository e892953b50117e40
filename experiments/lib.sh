# Shared steps of an R3 experiment: evaluate the base model, mine failures,
# train reflections, evaluate the trained model, write the table. Sourced by
# each experiment's run.sh, which sets the variables below and prepares data.
#
#   R3       the r3 binary (copied into the run directory first, so that
#            rebuilding r3 during a long run cannot change it mid-way)
#   OUT      the run directory
#   TASK     r3's --task
#   MODEL    --model argument ("" for the default model)
#   ATTEMPT_TOKENS, REFLECTION_TOKENS  token budgets of eval and mine
#   PROMPTS  a prompts TOML for every step, or ""
#   TRAIN    the training config (TOML)
set -euo pipefail

log() { echo "[$(date +%H:%M:%S)] $*" | tee -a "$OUT/run.log" >&2; }

# Runs a step and records its wall time in OUT/times.tsv.
timed() {
    local name=$1; shift
    local start=$SECONDS
    log "$name: $*"
    "$@" >>"$OUT/$name.log" 2>&1
    printf '%s\t%d\n' "$name" $((SECONDS - start)) >>"$OUT/times.tsv"
}

model_flag() { if [[ -n $1 ]]; then echo "--model $1"; fi; }
prompts_flag() { if [[ -n ${PROMPTS:-} ]]; then echo "--prompts $PROMPTS"; fi; }

# evaluate NAME MODEL DATA [TASK ATTEMPT_TOKENS REFLECTION_TOKENS]: first
# and second try, greedy (the run's task and budgets unless given: the
# forgetting check evaluates another task). A finished evaluation is kept,
# so a rerun of the experiment picks up where it stopped.
evaluate() {
    local name=$1 model=$2 data=$3 task=${4:-$TASK}
    local attempt=${5:-$ATTEMPT_TOKENS} reflection=${6:-$REFLECTION_TOKENS}
    local prompts=""
    if [[ $task == "$TASK" ]]; then prompts=$(prompts_flag); fi
    if [[ -f $OUT/$name/summary.json ]]; then return; fi
    # shellcheck disable=SC2046,SC2086
    timed "$name" "$R" eval $(model_flag "$model") --task "$task" --data "$data" \
        --out "$OUT/$name" --max-new-tokens "$attempt" \
        --reflection-max-tokens "$reflection" $prompts
}

# mine DATA SAMPLES [NAME]: failures into OUT/NAME.jsonl (failures.jsonl).
mine() {
    local data=$1 samples=$2 name=${3:-failures}
    # shellcheck disable=SC2046
    timed "mine${3:+-$3}" "$R" mine $(model_flag "$MODEL") --task "$TASK" --data "$data" \
        --samples "$samples" --temperature 0.9 --out "$OUT/$name.jsonl" \
        --max-new-tokens "$ATTEMPT_TOKENS" $(prompts_flag)
}

train() {
    timed train "$R" train --config "$TRAIN" --resume auto \
        --set "failures=\"$OUT/failures.jsonl\"" --set "output_dir=\"$OUT/train\"" \
        --set "model=\"$MODEL\"" ${PROMPTS:+--set "prompts=\"$PROMPTS\""}
    echo "$OUT/train/$(cat "$OUT/train/last")"
}

# The paper's four columns with 95% intervals and the paired test.
table() {
    "$R" report --compare "$OUT/eval-base" "$OUT/eval-trained" >"$OUT/results.md"
    if [[ -d $OUT/forget-base ]]; then
        echo >>"$OUT/results.md"
        echo "Forgetting check (another task):" >>"$OUT/results.md"
        "$R" report --compare "$OUT/forget-base" "$OUT/forget-trained" >>"$OUT/results.md"
    fi
    # A run that evaluates a committed adapter has no training of its own.
    if [[ -d $OUT/train ]]; then "$R" report "$OUT/train" >"$OUT/train-report.md"; fi
    cat "$OUT/results.md"
}

start() {
    mkdir -p "$OUT"
    cp "$R" "$OUT/r3"
    R=$OUT/r3
    touch "$OUT/times.tsv"
    log "machine: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2) $(nproc) cores"
}
