"""Load test of OpenAI-compatible completion servers: C concurrent clients,
each sending R requests one after another; reports generated tokens/s
and each request's latency (p50, p99) per server and concurrency, as a
Markdown table and JSON lines.

    python3 scripts/load_test.py --server r3=http://127.0.0.1:8000 \
        --server llama.cpp=http://127.0.0.1:8001 --clients 1 8 32

Servers are measured one after another, never at once, with the same
prompts and settings. Standard library only.
"""

import argparse
import json
import os
import statistics
import threading
import time
import urllib.request

PROMPTS = [
    "Write a Python function that returns the n-th Fibonacci number.",
    "Explain in two sentences why the sky is blue.",
    "List three uses of a hash map.",
    "What is 17 times 23? Show the steps.",
    "Translate 'good morning' into French, German and Spanish.",
    "Give a haiku about compilers.",
    "Summarise what a KV cache does in a transformer.",
    "Name the planets of the solar system in order.",
]


def complete(url, model, prompt, max_tokens, seed):
    body = {
        "prompt": prompt,
        "max_tokens": max_tokens,
        "temperature": 0.8,
        "seed": seed,
    }
    if model:
        body["model"] = model
    request = urllib.request.Request(
        f"{url}/v1/completions",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
    )
    started = time.perf_counter()
    with urllib.request.urlopen(request, timeout=3600) as reply:
        answer = json.load(reply)
    return time.perf_counter() - started, answer["usage"]["completion_tokens"]


def run(url, model, clients, per_client, max_tokens):
    latencies, tokens, errors = [], [], []
    lock = threading.Lock()

    def client(c):
        for r in range(per_client):
            prompt = PROMPTS[(c + r) % len(PROMPTS)]
            try:
                seconds, n = complete(url, model, prompt, max_tokens, 1000 * c + r)
            except Exception as e:  # counted and reported, never hidden
                with lock:
                    errors.append(str(e))
                continue
            with lock:
                latencies.append(seconds)
                tokens.append(n)

    threads = [threading.Thread(target=client, args=(c,)) for c in range(clients)]
    started = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - started
    latencies.sort()
    p99 = latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))] if latencies else None
    return {
        "clients": clients,
        "requests": len(latencies),
        "errors": len(errors),
        "completion_tokens": sum(tokens),
        "seconds": round(wall, 2),
        "tokens_per_s": round(sum(tokens) / wall, 1),
        "latency_p50_s": round(statistics.median(latencies), 2) if latencies else None,
        "latency_p99_s": round(p99, 2) if p99 is not None else None,
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--server", action="append", required=True,
                        help="NAME=URL (repeatable)")
    parser.add_argument("--model", default="", help="the model field to send")
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--requests-per-client", type=int, default=2)
    parser.add_argument("--max-tokens", type=int, default=64)
    args = parser.parse_args()
    cpu = "unknown"
    if os.path.exists("/proc/cpuinfo"):
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    print(f"machine: {cpu}, {os.cpu_count()} CPUs; max_tokens {args.max_tokens}, "
          f"{args.requests_per_client} requests per client")
    rows = []
    for spec in args.server:
        name, url = spec.split("=", 1)
        complete(url, args.model, PROMPTS[0], 4, 0)  # warm-up
        for clients in args.clients:
            result = {"server": name, **run(url, args.model, clients,
                                            args.requests_per_client, args.max_tokens)}
            print(json.dumps(result), flush=True)
            rows.append(result)
    print()
    print("| server | clients | requests | tokens/s | p50 latency (s) | p99 latency (s) | errors |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['server']} | {r['clients']} | {r['requests']} | {r['tokens_per_s']} | "
              f"{r['latency_p50_s']} | {r['latency_p99_s']} | {r['errors']} |")


if __name__ == "__main__":
    main()
