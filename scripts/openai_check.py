"""The official `openai` client against `r3 serve` (scripts/openai-check.sh
starts the server): completions with token ids and log-probs, chat, a
streamed chat, and a LoRA adapter loaded at run time. Exits non-zero, with
the reason, on the first thing that is not as an OpenAI-compatible server
(with vLLM's extensions) returns it.

    python3 scripts/openai_check.py BASE_URL ADAPTER_DIR
"""
import json
import sys
import urllib.request

import openai

base, adapter = sys.argv[1], sys.argv[2]
client = openai.OpenAI(base_url=f"{base}/v1", api_key="unused")

models = client.models.list()
name = models.data[0].id

done = client.completions.create(
    model=name, prompt=[1, 2, 3], max_tokens=5, temperature=0, logprobs=0,
    extra_body={"return_token_ids": True},
)
choice = done.choices[0]
ids = choice.model_extra["token_ids"]
assert 1 <= len(ids) <= 5, ids
assert len(choice.logprobs.token_logprobs) == len(ids), choice.logprobs
assert all(lp <= 0 for lp in choice.logprobs.token_logprobs), choice.logprobs

# Echo, as lm-evaluation-harness scores a continuation.
scored = client.completions.create(
    model=name, prompt=[1, 2, 3, 4], max_tokens=0, echo=True, logprobs=1, temperature=0,
)
lp = scored.choices[0].logprobs
assert len(lp.token_logprobs) == 4 and lp.token_logprobs[0] is None, lp
assert all(x <= 0 for x in lp.token_logprobs[1:]), lp

chat = client.chat.completions.create(
    model=name, messages=[{"role": "user", "content": "hi"}], max_tokens=6, temperature=0,
    logprobs=True, top_logprobs=2,
)
whole = chat.choices[0].message.content
assert isinstance(whole, str), chat
for item in chat.choices[0].logprobs.content:
    assert len(item.top_logprobs) == 2, item
    assert item.top_logprobs[0].logprob == item.logprob, item

pieces = list(client.chat.completions.create(
    model=name, messages=[{"role": "user", "content": "hi"}], max_tokens=6, temperature=0,
    stream=True, logprobs=True, top_logprobs=2,
))
streamed = "".join(c.choices[0].delta.content or "" for c in pieces)
assert streamed == whole, (streamed, whole)
streamed_logprobs = [
    item.logprob for c in pieces if c.choices[0].logprobs for item in c.choices[0].logprobs.content
]
assert streamed_logprobs == [item.logprob for item in chat.choices[0].logprobs.content], pieces

request = urllib.request.Request(
    f"{base}/v1/load_lora_adapter",
    data=json.dumps({"lora_name": "step-1", "lora_path": adapter}).encode(),
    headers={"Content-Type": "application/json"},
)
urllib.request.urlopen(request).read()
assert [m.id for m in client.models.list().data] == [name, "step-1"]
adapted = client.chat.completions.create(
    model="step-1", messages=[{"role": "user", "content": "hi"}], max_tokens=6, temperature=0,
)
assert isinstance(adapted.choices[0].message.content, str), adapted

try:
    client.completions.create(model=name, prompt="x", max_tokens=-1)
    raise AssertionError("a negative max_tokens was accepted")
except openai.BadRequestError as e:
    assert "max_tokens" in str(e), e

print(f"openai {openai.__version__}: completions (ids, log-probs, echo), chat (with top log-probs), streamed chat (with log-probs), "
      f"an adapter and a bad request all as expected")
