# Shared steps of an R3 experiment: evaluate the base model, mine failures,
# train reflections, evaluate the trained model, write the table. Sourced by
# each experiment's run.sh, which sets the variables below and prepares data.
#
#   R        the r3 binary (copied into the run directory first, so that
#            rebuilding r3 during a long run cannot change it mid-way)
#   OUT      the run directory
#   TASK     r3's --task
#   MODEL    --model argument ("" for the default model)
#   ATTEMPT_TOKENS, REFLECTION_TOKENS  token budgets of eval and mine
#   PROMPTS  a prompts TOML for every step, or ""
#   TRAIN    the training config (TOML)
#   BASE_MODEL  the name `r3 fetch` knows the base by (artifacts only)
#
# bash reads a script as it runs it: change a running experiment's
# run.sh only by replacing the file (git checkout, mv), never in place,
# or the run goes on from its old offset in the new text.
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

# reuse NAME DIR: a committed evaluation (DIR) as this run's NAME, unless
# the run has its own: an evaluation takes hours on a 2-core CPU, and a
# run often moves to a new machine.
reuse() {
    if [[ -f $2/summary.json && ! -d $OUT/$1 ]]; then
        cp -r "$2" "$OUT/$1"
        log "$1: the committed evaluation ($2)"
    elif [[ -d $2/partial && ! -d $OUT/$1 ]]; then
        # Unfinished: its finished chunks, from which `r3 eval` resumes.
        cp -r "$2" "$OUT/$1"
        log "$1: the committed chunks of an unfinished evaluation ($2)"
    fi
}

# reuse_failures DIR: committed mined failures with their state (finished
# or not: mining resumes from the state), unless the run has its own or
# MINE=1 asks to mine afresh.
reuse_failures() {
    if [[ ${MINE:-0} != 1 && -f $1/failures.jsonl && ! -f $OUT/failures.jsonl ]]; then
        cp "$1/failures.jsonl" "$1/failures.jsonl.state" "$OUT/"
        log "mine: the committed failures ($1)"
    fi
}

start() {
    mkdir -p "$OUT"
    cp "$R" "$OUT/r3"
    R=$OUT/r3
    touch "$OUT/times.tsv"
    log "machine: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2) $(nproc) cores"
}

# artifacts DEST NAME...: a finished run's artifacts into DEST for
# committing: each named evaluation's summary.json and transcripts.jsonl
# (the tables recompute from them), the final adapter in PEFT format (bf16,
# without the optimizer state), the training config, the run's charts and
# report, the comparison tables, and a few example transcripts.
artifacts() {
    local dest=$1 name table
    shift
    if [[ ! -f $OUT/results.md ]]; then
        echo "finish the run first ($OUT/results.md is missing)" >&2
        return 1
    fi
    mkdir -p "$dest"
    for name in "$@"; do
        if [[ -f $OUT/$name/summary.json ]]; then
            mkdir -p "$dest/$name"
            cp "$OUT/$name/summary.json" "$OUT/$name/transcripts.jsonl" "$dest/$name/"
        fi
    done
    # A run that evaluated a committed adapter has no training of its own:
    # the committed one stays.
    if [[ -d $OUT/train ]]; then
        rm -rf "$dest/adapter"
        "$R" export-adapter --adapter "$OUT/train/$(cat "$OUT/train/last")" \
            --out "$dest/adapter" --base-model "$BASE_MODEL"
        cp "$TRAIN" "$dest/train.toml"
        "$R" report "$OUT/train" >/dev/null
        cp "$OUT/train/training.png" "$OUT/train/report.md" "$OUT/train/metrics.jsonl" "$dest/"
    fi
    # Further trainings beside the run's: the ablation (ablation.sh), the
    # continuation (longer.sh), whose adapter is committed too.
    local extra suffix
    for extra in train-retry train-60; do
        if [[ -d $OUT/$extra ]]; then
            suffix=${extra#train-}
            "$R" report "$OUT/$extra" >/dev/null
            cp "$OUT/$extra/metrics.jsonl" "$dest/metrics-$suffix.jsonl"
            cp "$OUT/$extra/training.png" "$dest/training-$suffix.png"
        fi
    done
    if [[ -d $OUT/train-60 ]]; then
        rm -rf "$dest/adapter-60"
        "$R" export-adapter --adapter "$OUT/train-60/$(cat "$OUT/train-60/last")" \
            --out "$dest/adapter-60" --base-model "$BASE_MODEL"
    fi
    # The tables name the evaluations by their run directory: keep the
    # names, not this machine's paths.
    for table in results results-retry results-60; do
        if [[ -f $OUT/$table.md ]]; then sed "s|$OUT/||g" "$OUT/$table.md" >"$dest/$table.md"; fi
    done
    # Examples: retries the trained model's reflection turned right, records
    # it gets right on the first try where the base model did not, and
    # failures neither try fixed (up to three, three and two).
    python3 - "$dest/eval-base/transcripts.jsonl" "$dest/eval-trained/transcripts.jsonl" \
        >"$dest/examples.jsonl" <<'PY'
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
PY
    du -sh "$dest"/* | sort -h
}
