#!/usr/bin/env bash
# Decode and prefill speed at each vector level this CPU runs, r3 beside
# transformers in the same run, so that an AVX-512 machine also reports what
# an AVX2-only laptop gets. One JSON line per measurement.
#
#   R3=target/release/r3 PYTHON=python3 bash scripts/bench_cpu_levels.sh
#
# Levels: r3 gets R3_CPU=<level>; torch gets ATEN_CPU_CAPABILITY (and MKL
# and oneDNN their ISA caps). gemm, which r3 uses for large products,
# chooses its kernels itself: R3_AVX2=<binary> names an r3 built with
# `--no-default-features` (gemm without AVX-512) for the avx2 and portable
# levels, making those rows a faithful AVX2-only machine.
set -euo pipefail
cd "$(dirname "$0")/.."
R3=${R3:-target/release/r3}
R3_AVX2=${R3_AVX2:-$R3}
PYTHON=${PYTHON:-python3}
GGUF=${GGUF:-${R3_CACHE_DIR:-$HOME/.cache/r3}/SmolLM2-135M-Instruct.Q4_1.gguf}
BATCHES=${BATCHES:-1 8 32}
PROMPT=${PROMPT:-123}
flags=" $(grep -m1 '^flags' /proc/cpuinfo | cut -d: -f2) "
has() { [[ "$flags" == *" $1 "* ]]; }
levels=()
has avx512f && levels+=(avx512)
has avx2 && has fma && has f16c && levels+=(avx2)
for level in "${levels[@]}"; do
  case $level in
    avx512) bin=$R3; torch_env=(ATEN_CPU_CAPABILITY=avx512) ;;
    avx2) bin=$R3_AVX2
          torch_env=(ATEN_CPU_CAPABILITY=avx2 MKL_ENABLE_INSTRUCTIONS=AVX2 DNNL_MAX_CPU_ISA=AVX2) ;;
  esac
  for batch in $BATCHES; do
    R3_CPU=$level "$bin" bench generate --model "$GGUF" --batch "$batch" --prompt-tokens "$PROMPT"
    env "${torch_env[@]}" "$PYTHON" scripts/bench_transformers.py --gguf "$GGUF" --batch "$batch" \
      --prompt-tokens "$PROMPT"
  done
done
