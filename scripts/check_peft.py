"""An r3 LoRA adapter, loaded by PEFT on its base in transformers: prints
the same JSON fields as `r3 logits` (input ids, last-position top-k), so
the two can be compared. Not part of CI (no torch there).

    pip install torch transformers peft gguf
    python scripts/check_peft.py --base ~/.cache/r3/SmolLM2-135M-Instruct.Q4_1.gguf \
        --adapter runs/train/checkpoint-2 --messages chat.json
    r3 logits --model runs/train/checkpoint-2 --messages chat.json --top-k 5
"""

import argparse
import json
import os

import peft
import torch
import transformers
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--base", required=True, help="the base model: a .gguf file or an HF directory")
    p.add_argument("--adapter", required=True, help="the PEFT adapter directory r3 wrote")
    p.add_argument("--messages", required=True)
    p.add_argument("--top-k", type=int, default=5)
    a = p.parse_args()
    if a.base.endswith(".gguf"):
        directory, name = os.path.split(os.path.abspath(a.base))
        kwargs = dict(gguf_file=name)
    else:
        directory, kwargs = a.base, {}
    tokenizer = AutoTokenizer.from_pretrained(directory, **kwargs)
    model = AutoModelForCausalLM.from_pretrained(directory, torch_dtype=torch.float32, **kwargs)
    model = PeftModel.from_pretrained(model, a.adapter).eval()
    # The chat template r3 trained with travels in the adapter directory.
    template = json.load(open(os.path.join(a.adapter, "tokenizer_config.json")))["chat_template"]
    messages = json.load(open(a.messages))
    text = tokenizer.apply_chat_template(messages, chat_template=template, tokenize=False, add_generation_prompt=True)
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False).input_ids
    with torch.no_grad():
        logits = model(ids).logits[0, -1]
    top = torch.topk(logits, a.top_k)
    print(json.dumps({
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__},
        "input_ids": ids[0].tolist(),
        "last_top_k": [[int(i), float(v)] for v, i in zip(top.values, top.indices)],
    }))


if __name__ == "__main__":
    main()
