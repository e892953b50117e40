#!/usr/bin/env bash
# r3 serve beside llama.cpp's server (the llama-cpp-python package, when
# it is installed) on the same GGUF, one after the other: 1, 8 and 32
# concurrent clients, tokens/s and p50/p99 latency (scripts/load_test.py).
# Run it alone on the machine.
#   bash scripts/load-test.sh [GGUF] [R3]
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
R=${2:-$root/target/release/r3}
GGUF=${1:-$("$R" fetch smollm2-135m)}
threads=$(nproc)
pids=()
trap 'kill "${pids[@]}" 2>/dev/null || true' EXIT
wait_up() {
    for _ in $(seq 300); do
        curl -sf "$1/v1/models" >/dev/null && return 0
        sleep 1
    done
    echo "no server at $1" >&2
    return 1
}
"$R" serve --model "$GGUF" --port 8101 >/tmp/r3-serve-load.log 2>&1 &
pids+=($!)
servers=(--server "r3=http://127.0.0.1:8101")
wait_up http://127.0.0.1:8101
if python3 -c "import llama_cpp.server" 2>/dev/null; then
    python3 -m llama_cpp.server --model "$GGUF" --port 8102 --n_threads "$threads" \
        --n_ctx 2048 >/tmp/llama-cpp-load.log 2>&1 &
    pids+=($!)
    wait_up http://127.0.0.1:8102
    servers+=(--server "llama.cpp=http://127.0.0.1:8102")
    python3 -c "import llama_cpp; print('llama-cpp-python', llama_cpp.__version__)"
else
    echo "llama-cpp-python is not installed: r3 alone (pip install llama-cpp-python)"
fi
"$R" --version
python3 "$root/scripts/load_test.py" "${servers[@]}" --clients 1 8 32 \
    --requests-per-client 4 --max-tokens 128
