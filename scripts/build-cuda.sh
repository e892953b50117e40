#!/usr/bin/env bash
# Builds r3 with CUDA (`--features cuda`, candle's CUDA backend) on a
# machine with no GPU and no CUDA install, and writes a stripped binary to
# copy to a GPU machine, with the CUDA runtime it links: dist/cuda/.
#
#   bash scripts/build-cuda.sh                  # dist/cuda/r3
#   bash scripts/build-cuda.sh gpu-tests        # dist/cuda/generate-tests and
#                                               # dist/cuda/loop-tests: the
#                                               # generation and token-in/
#                                               # token-out tests, which
#                                               # gpu-check.sh runs on the GPU
#   bash scripts/build-cuda.sh tests            # the whole test suite built
#                                               # with CUDA; the device test
#                                               # run here, where it skips
#
# - nvcc (with its crt headers and NVVM) and the CUDA headers come from
#   PyPI wheels, pinned at CUDA 13.0: a
#   driver cannot load PTX from a newer nvcc than its own CUDA version, and
#   the H200 machines run driver 580 (CUDA 13.0). R3_NVCC_VERSION changes it.
# - Kernels are built for compute capability 9.0 (Hopper); set
#   CUDA_COMPUTE_CAP (e.g. 80 for an A100) for another GPU.
# - candle links its CUDA libraries at build time (cudarc's dynamic-linking),
#   but the driver, cuBLAS, cuRAND and NVRTC are only needed at run time,
#   where the GPU machine has them (its driver and PyTorch's cu13 wheels).
#   So the link uses stub libraries with the real sonames, generated from
#   cudarc's own declarations of what it calls; the CUDA runtime is the real
#   one from its wheel. Every stub returns 100 (the driver's "no device"),
#   so that with the stubs on LD_LIBRARY_PATH the binary runs here on the
#   CPU and refuses `--device cuda` cleanly.
set -euo pipefail
cd "$(dirname "$0")/.."

nvcc_version="${R3_NVCC_VERSION:-13.0.88}"
cuda_series="${nvcc_version%.*}"       # 13.0
export CUDA_COMPUTE_CAP="${CUDA_COMPUTE_CAP:-90}"
toolkit="${R3_CUDA_TOOLKIT:-$HOME/.cache/r3/cuda-$nvcc_version}"
root="$toolkit/nvidia/cu${cuda_series%%.*}"

if [ ! -x "$root/bin/nvcc" ]; then
  echo "installing nvcc $nvcc_version and the CUDA $cuda_series headers into $toolkit"
  python3 -m pip install -q --no-deps --target "$toolkit" \
    "nvidia-cuda-nvcc==$nvcc_version" \
    "nvidia-cuda-crt==$nvcc_version" \
    "nvidia-nvvm==$nvcc_version" \
    "nvidia-cuda-runtime==$cuda_series.*" \
    "nvidia-cuda-cccl==$cuda_series.*"
fi
export PATH="$root/bin:$PATH" CUDA_ROOT="$root" CUDA_PATH="$root" CUDA_HOME="$root"
nvcc --version | tail -2

# Where cudarc's declarations live (the version candle-core pulls in).
cargo fetch -q
cudarc="$(cargo metadata --format-version 1 --features cuda -q \
  | python3 -c 'import json,sys; print(next(p["manifest_path"] for p in json.load(sys.stdin)["packages"] if p["name"] == "cudarc").rsplit("/", 1)[0])')"

stubs="$toolkit/stubs"
mkdir -p "$stubs"
# name  soname  cudarc module
while read -r name soname module; do
  grep -oE '^pub unsafe fn [A-Za-z0-9_]+' "$cudarc/src/$module/sys/mod.rs" \
    | awk '{print "int " $4 "(void) { return 100; }"}' | sort -u > "$stubs/$name.c"
  gcc -shared -fPIC -o "$stubs/lib$name.so" -Wl,-soname,"$soname" "$stubs/$name.c"
done <<'EOF'
cuda     libcuda.so.1        driver
cublas   libcublas.so.13     cublas
cublasLt libcublasLt.so.13   cublaslt
curand   libcurand.so.10     curand
nvrtc    libnvrtc.so.13      nvrtc
EOF
# The same stubs under their sonames, to start the binary here.
mkdir -p "$stubs/run"
for lib in "$stubs"/lib*.so; do
  soname=$(readelf -d "$lib" | sed -n 's/.*SONAME.*\[\(.*\)\]/\1/p')
  [ -n "$soname" ] && cp "$lib" "$stubs/run/$soname"
done
ln -sf "$root/lib/libcudart.so.13" "$stubs/libcudart.so"
export RUSTFLAGS="${RUSTFLAGS:-} -L native=$stubs -L native=$root/lib"

if [ "${1:-}" = tests ]; then
  # Every test compiles with CUDA; the device test (crates/cli/tests/gpu.rs,
  # ignored unless asked for) then reaches the stub driver and must fail for
  # want of a GPU. On a GPU machine with Rust and CUDA installed, run
  # `cargo test --features r3-cli/cuda -- --include-ignored` there.
  export LD_LIBRARY_PATH="$stubs/run:$root/lib:${LD_LIBRARY_PATH:-}"
  cargo test --features r3-cli/cuda --workspace --target-dir target/cuda --no-run
  if cargo test --features r3-cli/cuda -p r3-cli --target-dir target/cuda --test gpu \
    -- --ignored --nocapture >target/cuda/gpu-test.log 2>&1; then
    echo "the device test passed without a GPU" >&2
    exit 1
  fi
  grep -q "cannot open cuda:0" target/cuda/gpu-test.log
  exit 0
fi

# The binary must travel in 64 MiB. Without link-time optimisation it is
# 67 MiB, half of it candle's GGUF and MoE kernels, which r3 never calls (a
# GPU model is dequantized on load); fat LTO drops them (23 MiB), and
# abort-on-panic, for this binary only, trims the unwinding tables.
export CARGO_PROFILE_RELEASE_LTO=fat CARGO_PROFILE_RELEASE_PANIC=abort
mkdir -p dist/cuda
if [ "${1:-}" = gpu-tests ]; then
  # crates/generate/tests/generate.rs builds its tiny model itself; the
  # token-in/token-out tests (crates/loop/tests/token_in_token_out.rs) load
  # the model at R3_TEST_MODEL (gpu-check.sh carries a small random one).
  # With R3_TEST_DEVICE=cuda they run on the GPU; here, on the CPU.
  # (Tests unwind whatever the profile says: cargo ignores panic=abort.)
  while read -r package test out; do
    built=$(cargo test --release --features r3-model/cuda -p "$package" --test "$test" \
      --target-dir target/cuda --no-run --message-format json </dev/null \
      | python3 -c 'import json,sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["target"]["name"] == sys.argv[1]:
        print(m["executable"])' "$test")
    strip -o "dist/cuda/$out" "$built"
    size=$(stat -c %s "dist/cuda/$out")
    echo "wrote dist/cuda/$out ($(( (size + 524288) / 1048576 )) MiB)"
    LD_LIBRARY_PATH="$stubs/run:$PWD/dist/cuda" "dist/cuda/$out" --test-threads=1 -q </dev/null
  done <<'EOF'
r3-generate generate           generate-tests
r3-loop     token_in_token_out loop-tests
EOF
  exit 0
fi
cargo build --release --features cuda -p r3-cli --target-dir target/cuda
out=dist/cuda/r3
strip -o "$out" target/cuda/release/r3
cp "$root/lib/libcudart.so.13" dist/cuda/
size=$(stat -c %s "$out")
echo "wrote $out ($((size / 1048576)) MiB) and dist/cuda/libcudart.so.13"
readelf -d "$out" | grep NEEDED
if [ "$size" -gt $((64 * 1048576)) ]; then
  echo "error: $out is over 64 MiB" >&2
  exit 1
fi
# It starts, and without a GPU asks for one in vain (the stubs say "no device").
run() { LD_LIBRARY_PATH="$stubs/run:$PWD/dist/cuda" "$out" "$@"; }
run --version
refusal=$(run generate --device cuda --prompt hi 2>&1 || true)
if [[ "$refusal" == *CUDA_ERROR_NO_DEVICE* ]]; then
  echo "ok: without a GPU, --device cuda reports CUDA_ERROR_NO_DEVICE"
else
  echo "error: $out did not reach the CUDA driver" >&2
  exit 1
fi
