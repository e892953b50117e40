#!/usr/bin/env bash
# The GPU proof of r3's CUDA build, in two halves.
#
#   bash scripts/gpu-check.sh prepare   # here, without a GPU: builds dist/cuda/, packs dist/gpu/
#   bash scripts/gpu-check.sh           # on the GPU machine, with dist/gpu/ copied over
#   bash scripts/gpu-check.sh checks    # only the device checks and tests (or: bench)
#
# `prepare` builds the stripped CUDA binary, the generation tests and the
# token-in/token-out tests (scripts/build-cuda.sh) and a tiny random model
# with the default model's tokenizer and chat template (`r3 init`, bf16
# weights), which the token-in/token-out tests run on and which lends its
# tokenizer to the random-init shapes: the GPU machine has no Rust
# toolchain and cannot download weights. It packs them into dist/gpu/,
# the executables xz-compressed (CUDA's kernel images shrink about six
# times: r3 24 → 4 MiB), and checks that the working tree and dist/gpu fit
# the device tool's 64 MiB. The run unpacks dist/gpu/ into dist/cuda/.
#
# The run (well under 8 minutes on one H200) prints one JSON line per result:
#  - device checks, CPU against GPU in f32 (`r3 device-check`) on the tiny
#    model and on a random-init Qwen2.5-1.5B shape: logits, greedy tokens,
#    sampled rollouts, one training step's update, and the GPU's bf16
#    logits against the CPU's f32 ones;
#  - the generation tests (crates/generate/tests/generate.rs) and the
#    token-in/token-out tests (crates/loop/tests/token_in_token_out.rs, on
#    the tiny model) on the GPU;
#  - `r3 mine` and `r3 train` on the GPU, with exact resume
#    (scripts/resume-check.sh);
#  - benchmarks on the 1.5B shape in bf16 (the issue's goals), each beside
#    PyTorch on the same GPU:
#    `r3 bench generate` at batch 64 and 256 against transformers' generate,
#    and `r3 bench train` (B = 8, G = 8, 256-token reflections and retries)
#    against one TRL-style step on the same token counts; last, the same
#    step with LoRA (`--use-peft`: a bf16 frozen base, f32 adapters).
# It ends with a non-zero status if any step failed; every step still runs,
# each under its own time limit, and all of them within R3_GPU_CHECK_SECONDS
# (default 520, inside the device tool's 10-minute call): a step with too
# little time left is reported as skipped. Under the device tool the log is
# also written to $OUT/gpu-check.log, which comes back even if the call is
# cut short.
set -uo pipefail
cd "$(dirname "$0")/.."
dist=dist/cuda
pack=dist/gpu
shape=configs/Qwen2.5-1.5B.json

# xz through Python's lzma: the GPU machine has Python, maybe not xz.
xz_copy() {
  python3 -c 'import lzma, shutil, sys
opener = lzma.open if sys.argv[1].endswith(".xz") else open
with opener(sys.argv[1], "rb") as src:
    out = sys.argv[2]
    with (lzma.open(out, "wb", preset=6) if out.endswith(".xz") else open(out, "wb")) as dst:
        shutil.copyfileobj(src, dst, 1 << 20)' "$1" "$2"
}

if [ "${1:-}" = prepare ]; then
  set -e
  bash scripts/build-cuda.sh
  rm -rf "$dist/tiny"
  cargo run --release -q -p r3-cli -- init --shape configs/tiny-smollm2-vocab.json \
    --out "$dist/tiny" --dtype bf16
  R3_TEST_MODEL="$PWD/$dist/tiny" bash scripts/build-cuda.sh gpu-tests
  # The resume check the run makes on the GPU, here on the CPU.
  bash scripts/resume-check.sh target/release/r3 "$dist/tiny" cpu 2>/dev/null
  rm -rf "$pack"
  mkdir -p "$pack"
  for exe in r3 generate-tests loop-tests; do
    xz_copy "$dist/$exe" "$pack/$exe.xz"
  done
  cp -r "$dist/libcudart.so.13" "$dist/tiny" "$pack/"
  du -sh "$pack"/*
  tree=$(git ls-files -z | xargs -0 stat -c %s | awk '{s += $1} END {print s}')
  carried=$(du -sb "$pack" | cut -f1)
  total=$(( (tree + carried) / 1048576 ))
  echo "to carry: the working tree and $pack, $total MiB of at most 64"
  [ "$total" -lt 64 ] || { echo "error: over the device tool's 64 MiB" >&2; exit 1; }
  exit 0
fi

if [ -n "${OUT:-}" ] && [ -d "$OUT" ]; then
  exec > >(tee "$OUT/gpu-check.log") 2>&1
fi
budget=${R3_GPU_CHECK_SECONDS:-520}
# checks | bench | all: a second call can finish what a first one ran out
# of time for.
part=${1:-all}
case "$part" in
  checks | bench | all) ;;
  *) echo "usage: $0 [prepare | checks | bench | all]" >&2; exit 2 ;;
esac
# The binaries are stripped: a backtrace would be frames of <unknown>.
export RUST_BACKTRACE=0
if [ -d "$pack" ]; then
  mkdir -p "$dist"
  for packed in "$pack"/*.xz; do
    exe="$dist/$(basename "$packed" .xz)"
    xz_copy "$packed" "$exe" && chmod +x "$exe"
  done
  cp -r "$pack/libcudart.so.13" "$pack/tiny" "$dist/"
fi
[ -x "$dist/r3" ] || { echo "error: no $dist/r3 (nor $pack); run 'bash scripts/gpu-check.sh prepare' first" >&2; exit 2; }
# cuBLAS, cuRAND and NVRTC come from PyTorch's CUDA wheels, the driver
# from the machine; the CUDA runtime travels with the binary.
libs=$(python3 - <<'EOF'
import glob, os, site
dirs = set()
for root in site.getsitepackages():
    for lib in glob.glob(os.path.join(root, "nvidia", "**", "lib*.so*"), recursive=True):
        dirs.add(os.path.dirname(lib))
print(":".join(sorted(dirs)))
EOF
)
export LD_LIBRARY_PATH="$PWD/$dist:$libs:/usr/local/nvidia/lib64:/usr/local/cuda/lib64:${LD_LIBRARY_PATH:-}"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
# A library the binary cannot find is named once, here, with the path searched.
if ldd "$dist/r3" | grep "not found"; then
  echo "error: the libraries above are missing from LD_LIBRARY_PATH=$LD_LIBRARY_PATH" >&2
fi
r3="$dist/r3"
tiny="$dist/tiny"
failed=0
# One line per step (ok, FAILED or SKIPPED), repeated at the end.
summary=()
# A step's short name: the program, its subcommands, and the flags that
# tell steps apart.
describe() {
  local words=("$@") i name
  while [[ "${words[0]}" == env || "${words[0]}" == *=* ]]; do words=("${words[@]:1}"); done
  name="${words[0]##*/}"
  for ((i = 1; i < ${#words[@]}; i++)); do
    case "${words[i]}" in
      --random-init | --shape | --batch) name+=" ${words[i]} ${words[i + 1]##*/}" ;;
      --use-peft) name+=" ${words[i]}" ;;
      -*) ;;
      *) [[ "${words[i - 1]}" != -* ]] && name+=" ${words[i]##*/}" ;;
    esac
  done
  echo "$name"
}
# check SECONDS COMMAND...: runs it under the smaller of its limit and the
# time left.
check() {
  local left=$((budget - SECONDS)) limit=$1
  shift
  local name
  name=$(describe "$@")
  if [ "$left" -lt 15 ]; then
    echo "SKIPPED (out of time): $*"
    summary+=("SKIPPED  $name")
    failed=1
    return
  fi
  [ "$left" -lt "$limit" ] && limit=$left
  local start=$SECONDS status=ok
  timeout "$limit" "$@" || { echo "FAILED ($?): $*"; failed=1; status=FAILED; }
  echo "($((SECONDS - start)) s: $name)"
  summary+=("$(printf '%-8s %4d s  %s' "$status" $((SECONDS - start)) "$name")")
}
# The summary, then the exit status: non-zero if any step failed.
finish() {
  echo "== summary =="
  printf '%s\n' "${summary[@]}"
  exit "$failed"
}
# check, then one JSON line with the most GPU memory nvidia-smi saw in use
# while it ran (sampled every 100 ms; the benchmarks' own lines report the
# host's peak RSS).
peak() {
  local log smi
  log=$(mktemp)
  nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -lms 100 >"$log" &
  smi=$!
  check "$@"
  kill "$smi" 2>/dev/null
  wait "$smi" 2>/dev/null
  local top
  top=$(grep -E '^[0-9]+$' "$log" | sort -n | tail -1)
  echo "{\"peak_gpu_memory_mib\": ${top:-null}, \"of\": \"${*:2}\"}"
}

if [ "$part" != bench ]; then
  echo "== device checks (CPU against GPU, f32) =="
  check 120 "$r3" device-check --model "$tiny" --device cuda
  echo "== the generation and token-in/token-out tests, on the GPU =="
  check 120 env R3_TEST_DEVICE=cuda "$dist/generate-tests" --test-threads=1
  check 120 env R3_TEST_DEVICE=cuda R3_TEST_MODEL="$PWD/$tiny" "$dist/loop-tests" --test-threads=1
  echo "== r3 mine and r3 train on the GPU: three steps straight = two, a resume, one =="
  check 120 bash scripts/resume-check.sh "$r3" "$tiny" cuda
  check 300 "$r3" device-check --random-init "$shape" --model "$tiny" --device cuda \
    --batch 4 --new-tokens 8
fi
[ "$part" = checks ] && finish

echo "== benchmarks: 1.5B shape, bf16, r3 beside PyTorch =="
for batch in 64 256; do
  peak 120 "$r3" bench generate --random-init "$shape" --model "$tiny" --device cuda \
    --dtype bf16 --batch "$batch" --prompt-tokens 128 --new-tokens 128 --temperature 0
  peak 120 python3 scripts/bench_torch_gpu.py generate --shape "$shape" --dtype bf16 \
    --batch "$batch" --prompt-tokens 128 --new-tokens 128
done
step=(bench train --random-init "$shape" --model "$tiny" --device cuda --dtype bf16
  --batch 8 --group 8 --max-reflection-tokens 256 --max-retry-tokens 256 --steps 1
  --micro-batch-size 8)
peak 240 "$r3" "${step[@]}"
peak 120 python3 scripts/bench_torch_gpu.py train --shape "$shape" --dtype bf16 \
  --rows 64 --context-tokens 128 --trained-tokens 256 --micro-batch 8
peak 180 "$r3" "${step[@]}" --use-peft
finish
