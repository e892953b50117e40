"""The `r3 bench generate` workload under HF transformers, on the same CPU.

Loads the default model's GGUF (dequantized to float32, as r3 does), then
times prefill and sampled decoding of a synthetic prompt per row, every row
decoding exactly --new-tokens (EOS ignored). Prints one JSON object with the
same keys as `r3 bench generate`.

    pip install torch transformers gguf accelerate
    python scripts/bench_transformers.py --gguf ~/.cache/r3/SmolLM2-135M-Instruct.Q4_1.gguf --batch 32
"""

import argparse
import json
import os
import time

import torch
from transformers import AutoModelForCausalLM


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--gguf", required=True)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--prompt-tokens", type=int, default=123)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.9)
    p.add_argument("--threads", type=int, default=2)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    directory, name = os.path.split(os.path.abspath(a.gguf))
    model = AutoModelForCausalLM.from_pretrained(
        directory, gguf_file=name, torch_dtype=torch.float32
    ).eval()
    g = torch.Generator().manual_seed(0)
    vocab = model.config.vocab_size
    ids = torch.randint(0, vocab, (a.batch, a.prompt_tokens), generator=g)
    mask = torch.ones_like(ids)
    common = dict(
        attention_mask=mask,
        do_sample=True,
        temperature=a.temperature,
        top_p=1.0,
        top_k=0,
        pad_token_id=0,
    )
    with torch.inference_mode():
        model.generate(ids, max_new_tokens=2, min_new_tokens=2, **common)
        start = time.perf_counter()
        model.generate(ids, max_new_tokens=1, min_new_tokens=1, **common)
        prefill = time.perf_counter() - start
        start = time.perf_counter()
        model.generate(
            ids, max_new_tokens=a.new_tokens, min_new_tokens=a.new_tokens, **common
        )
        total = time.perf_counter() - start
    decode = total - prefill
    print(
        json.dumps(
            {
                "bench": "generate",
                "engine": f"transformers {__import__('transformers').__version__}",
                "batch": a.batch,
                "prompt_tokens": a.prompt_tokens,
                "new_tokens": a.new_tokens,
                "threads": a.threads,
                # The vector level torch's kernels run at (ATEN_CPU_CAPABILITY
                # lowers it, as R3_CPU does for r3).
                "cpu_capability": torch.backends.cpu.get_cpu_capability(),
                "prefill_tokens_per_s": a.batch * a.prompt_tokens / prefill,
                "decode_tokens_per_s": a.batch * (a.new_tokens - 1) / decode,
            }
        )
    )


if __name__ == "__main__":
    main()
