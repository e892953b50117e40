"""The work of `r3 bench generate` and of a GRPO step's training half under
PyTorch/transformers on the same GPU, for scripts/gpu-check.sh. Builds the
model from an HF config.json with random weights (no download), in f32 or
bf16 as r3 runs it: bf16 weights for generation, f32 master weights with
bf16 autocast for training (TRL's bf16 = true). Prints one JSON line per
measurement.

    python3 scripts/bench_torch_gpu.py generate --shape configs/Qwen2.5-1.5B.json --batch 64
    python3 scripts/bench_torch_gpu.py train --shape configs/Qwen2.5-1.5B.json --rows 64 \
        --context-tokens 128 --trained-tokens 256

`--device cpu` runs the same code without a GPU (to check the script on a
small shape; its numbers are not the comparison).
"""

import argparse
import json
import time

import torch
from transformers import AutoConfig, AutoModelForCausalLM


DEVICE = "cuda"


def build(shape, dtype):
    config = AutoConfig.from_pretrained(shape)
    torch.manual_seed(0)
    # Built on the device: random init of 1.5B weights on the host's CPU
    # would take longer than the measurement.
    with torch.device(DEVICE):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model, config


def synchronize():
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def timed(fn):
    synchronize()
    start = time.perf_counter()
    out = fn()
    synchronize()
    return out, time.perf_counter() - start


def machine():
    name = torch.cuda.get_device_name(0) if DEVICE == "cuda" else "cpu"
    return {"device": name, "torch": torch.__version__}


def peak_memory():
    return torch.cuda.max_memory_allocated() if DEVICE == "cuda" else None


def generate(a, dtype):
    model, config = build(a.shape, dtype)
    model.eval()
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, config.vocab_size, (a.batch, a.prompt_tokens), generator=g).to(DEVICE)
    mask = torch.ones_like(ids)
    common = dict(attention_mask=mask, do_sample=a.temperature > 0, pad_token_id=0)
    if a.temperature > 0:
        common["temperature"] = a.temperature
    with torch.no_grad():
        # Warm-up: kernels, cuBLAS handles, the allocator.
        model.generate(ids, max_new_tokens=2, min_new_tokens=2, **common)
        _, prefill_s = timed(lambda: model(ids, attention_mask=mask))
        _, total_s = timed(
            lambda: model.generate(
                ids, max_new_tokens=a.new_tokens, min_new_tokens=a.new_tokens, **common
            )
        )
    decode_s = max(total_s - prefill_s, 1e-9)
    print(json.dumps({
        "bench": "generate", "framework": "transformers", "machine": machine(),
        "shape": a.shape, "dtype": str(dtype), "batch": a.batch,
        "prompt_tokens": a.prompt_tokens, "new_tokens": a.new_tokens,
        "prefill_seconds": prefill_s,
        "prefill_tokens_per_s": a.batch * a.prompt_tokens / prefill_s,
        "decode_seconds": decode_s,
        "decode_tokens_per_s": a.batch * a.new_tokens / decode_s,
        "peak_gpu_bytes": peak_memory(),
    }), flush=True)


def train(a, dtype):
    """One TRL-style step on the token counts of an r3 GRPO step: forward
    over context + trained tokens, the loss on the trained tokens only,
    backward, AdamW (gradient checkpointing on, as r3's default)."""
    # TRL's bf16 = true: f32 master weights, bf16 compute under autocast.
    model, config = build(a.shape, torch.float32)
    model.train()
    model.gradient_checkpointing_enable()
    optimizer = torch.optim.AdamW(model.parameters(), lr=5e-7)
    g = torch.Generator().manual_seed(0)
    length = a.context_tokens + a.trained_tokens
    ids = torch.randint(0, config.vocab_size, (a.rows, length), generator=g).to(DEVICE)
    labels = ids.clone()
    labels[:, : a.context_tokens] = -100

    def step():
        for chunk in range(0, a.rows, a.micro_batch):
            with torch.autocast(DEVICE, dtype=dtype, enabled=dtype != torch.float32):
                out = model(ids[chunk:chunk + a.micro_batch], labels=labels[chunk:chunk + a.micro_batch])
            out.loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step()  # warm-up: optimizer state, kernels
    _, seconds = timed(step)
    print(json.dumps({
        "bench": "train", "framework": "torch", "machine": machine(),
        "shape": a.shape, "dtype": str(dtype), "rows": a.rows,
        "context_tokens": a.context_tokens, "trained_tokens": a.trained_tokens,
        "micro_batch": a.micro_batch,
        "seconds_forward_backward_optimizer": seconds,
        "trained_tokens_per_s": a.rows * a.trained_tokens / seconds,
        "peak_gpu_bytes": peak_memory(),
    }), flush=True)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("what", choices=["generate", "train"])
    p.add_argument("--shape", required=True)
    p.add_argument("--dtype", choices=["f32", "bf16"], default="f32")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--prompt-tokens", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--rows", type=int, default=64)
    p.add_argument("--context-tokens", type=int, default=128)
    p.add_argument("--trained-tokens", type=int, default=256)
    p.add_argument("--micro-batch", type=int, default=8)
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    a = p.parse_args()
    global DEVICE
    DEVICE = a.device
    dtype = {"f32": torch.float32, "bf16": torch.bfloat16}[a.dtype]
    torch.backends.cuda.matmul.allow_tf32 = False
    {"generate": generate, "train": train}[a.what](a, dtype)


if __name__ == "__main__":
    main()
