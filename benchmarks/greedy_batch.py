"""Do greedy replies stay the same text when their streams decode as one batch? (issue 14's promise)

The default model (or `--model`), 8 prompts (tests/test_real_batch.py's questions, through the
chat template where the model has one, else as plain text), `--tokens` greedy tokens each:
decoded by one engine per prompt, and as the 8 rows of one `StreamBatch` (each row prefilled in
its own forward, then every decode step one forward for all rows). Prints, per prompt, whether the
two replies are the same tokens, or the first token where they part, and the largest logit
difference over the replies' common part. `--quant` as on every command (`auto`: this machine's
calibration); `--kv float32` keeps the KV ring in float32 instead of `auto`'s bfloat16.

    PYTHONPATH=src python benchmarks/greedy_batch.py --quant auto --tokens 48
"""

from __future__ import annotations

import argparse

import torch

from streaming_llm.core.batch import StreamBatch
from streaming_llm.core.config import StreamingConfig
from streaming_llm.core.engine import StreamingLLM
from streaming_llm.models.loading import load_model
from streaming_llm.models.quantize import quantize_linears

QUESTIONS = ["How does a lighthouse keeper record the weather?", "Write a short poem about rivers.",
             "What is the capital of France?", "Give three tips for learning to cook.",
             "Describe the water cycle for a child.", "Why do cats purr?",
             "How does a bicycle stay upright?", "Tell me about the moon landing."]

p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
p.add_argument("--model", default="smollm2-135m-instruct")
p.add_argument("--quant", default="auto", choices=("auto", "none", "int4", "int8", "bf16"))
p.add_argument("--kv", default="auto", choices=("auto", "float32"))
p.add_argument("--tokens", type=int, default=48)
p.add_argument("--window", type=int, default=124, help="the cache is 4 + WINDOW (a small one: rows evict while they decode)")
p.add_argument("--threads", type=int, default=2)
args = p.parse_args()
torch.set_num_threads(args.threads)
model, tok = load_model(args.model)
quantize_linears(model, args.quant)
kv = None if args.kv == "float32" else "auto"
config = StreamingConfig(sinks=4, window=args.window)
if getattr(tok, "chat_template", None):
    prompts = [torch.tensor(tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True,
                                                    tokenize=True, return_dict=False)) for q in QUESTIONS]
else:
    prompts = [torch.tensor(tok(f"Question: {q}\nAnswer:")["input_ids"]) for q in QUESTIONS]
alone = []
for prompt in prompts:
    e = StreamingLLM(model, tok, config, kv_dtype=kv)
    logits, reply = e.feed(prompt, logits="last"), []
    for _ in range(args.tokens):
        reply.append((int(logits.argmax()), logits))
        logits = e.feed(torch.tensor([reply[-1][0]]), logits="last")
    alone.append(reply)
batch = StreamBatch(StreamingLLM(model, tok, config, kv_dtype=kv), slots=len(prompts))
rows = [batch.add() for _ in prompts]
last = [batch.feed([r], p[None], logits="last")[0] for r, p in zip(rows, prompts)]
together = [[] for _ in rows]
for _ in range(args.tokens):
    for r in rows:
        together[r].append((int(last[r].argmax()), last[r]))
    out = batch.feed(rows, torch.tensor([[t[-1][0]] for t in together]), logits="last")
    last = [out[r] for r in rows]
same = 0
for r in rows:
    part = next((i for i, (a, b) in enumerate(zip(together[r], alone[r])) if a[0] != b[0]), None)
    common = together[r][: part if part is not None else args.tokens]
    diff = max((a[1] - b[1]).abs().max().item() for a, b in zip(common, alone[r]))
    same += part is None
    print(f"prompt {r}: " + ("same tokens" if part is None else f"first different token: {part}")
          + f"; max |logit difference| over the common part {diff:.3g}")
print(f"{args.model}, quant {args.quant}, kv {args.kv}, {args.tokens} tokens: {same} of {len(prompts)} replies the same text")
