"""Batched streams on the real default model: every row's logits equal the same stream alone, fed
in the same chunks, with rows at different stages. The bound is twice the path's own noise, the
difference between the same stream fed in chunks and token by token (float32: ~1.6e-4, logits reach
~35 here; int4, whose activations are bfloat16: ~0.5), and at least 1e-4. `int4+fp16`: the float16
wide path from 2 tokens per stream, so the chunked prefill goes through FBGEMM's float16 weights
while decode steps (one token per stream, alone or batched) stay on the int4 kernel.

The greedy tests below hold the server's promise to the letter: on the int4 model, batched rows,
mixed forwards and replies through the scheduler give each stream's tokens alone."""

from __future__ import annotations

import pytest
import torch

from streaming_llm.core.batch import StreamBatch
from streaming_llm.core.config import StreamingConfig
from streaming_llm.core.engine import StreamingLLM
from streaming_llm.models.loading import load_model
from streaming_llm.models.quantize import fp16_gemm_available, quantize_linears

pytestmark = pytest.mark.real_model


@pytest.mark.parametrize("quant", ["none", "int4", "int4+fp16"])
def test_default_model_batched_rows_equal_each_stream_alone(quant):
    if quant == "int4+fp16" and not fp16_gemm_available():
        pytest.skip("this torch build has no FBGEMM float16 linear")
    model, tokenizer = load_model("smollm2-135m-instruct")
    if quant == "int4+fp16":
        quantize_linears(model, "int4", wide_rows=2, wide_kind="fp16")
    elif quant != "none":
        quantize_linears(model, quant)
    config = StreamingConfig(sinks=4, window=28, chunk_size=16)
    g = torch.Generator().manual_seed(0)
    streams = [torch.randint(0, 49152, (n,), generator=g) for n in (70, 40, 10)]
    batch = StreamBatch(StreamingLLM(model, tokenizer, config), slots=3)
    rows = [batch.add() for _ in streams]
    got = [[batch.feed([r], s[:-8][None], logits="all")[0]] for r, s in zip(rows, streams)]  # prefill, one by one
    for k in range(8, 0, -1):  # then decode all rows together: deep in eviction, just evicting, before it
        out = batch.feed(rows, torch.stack([s[-k] for s in streams])[:, None], logits="all")
        for r in rows:
            got[r].append(out[r])
    for r, s in zip(rows, streams):  # alone, fed the same way (chunk boundaries change float rounding)
        e = StreamingLLM(model, tokenizer, config)
        alone = torch.cat([e.feed(s[:-8])] + [e.feed(s[-k:][:1]) for k in range(8, 0, -1)])
        err = (torch.cat(got[r]) - alone).abs().max().item()
        # The bound is the path's own float noise, measured here on the same stream (it depends on
        # the CPU's matmul kernels: 1.4e-4 in float32 on an AVX2 host, where 1e-4 was set on AVX512).
        by_token = StreamingLLM(model, tokenizer, config.with_(chunk_size=1)).feed(s)
        noise = (by_token - StreamingLLM(model, tokenizer, config).feed(s)).abs().max().item()
        assert err <= max(2 * noise, 1e-4), f"row {r} ({quant}): max |diff| {err}, chunking alone moves {noise}"


QUESTIONS = ["How does a lighthouse keeper record the weather?", "Write a short poem about rivers.",
             "What is the capital of France?", "Give three tips for learning to cook.",
             "Describe the water cycle for a child.", "Why do cats purr?",
             "How does a bicycle stay upright?", "Tell me about the moon landing."]


def greedy_alone(model, tokenizer, config, prompts, n):
    """Each prompt's n greedy tokens, decoded by an engine of its own."""
    replies = []
    for p in prompts:
        e = StreamingLLM(model, tokenizer, config)
        logits, reply = e.feed(p, logits="last"), []
        for _ in range(n):
            reply.append(int(logits.argmax()))  # (V,): the last token's logits
            logits = e.feed(torch.tensor(reply[-1:]), logits="last")
        replies.append(reply)
    return replies


def chat_prompts(tokenizer):
    return [torch.tensor(tokenizer.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True,
                                                       tokenize=True, return_dict=False)) for q in QUESTIONS]


@pytest.mark.parametrize("wide_kind", ["bf16", "fp16"])
def test_default_model_greedy_replies_are_the_same_text_in_a_batch_of_eight(wide_kind):
    """The server's promise on the real model with its fast path: the int4 kernels for one row and a
    wide copy of the weights from 2 rows (what `--quant auto` may pick), 8 chat prompts, 24 greedy
    tokens each, decoded alone and as the 8 rows of one batch: the same tokens."""
    if wide_kind == "fp16" and not fp16_gemm_available():
        pytest.skip("this torch build has no FBGEMM float16 linear")
    model, tokenizer = load_model("smollm2-135m-instruct")
    quantize_linears(model, "int4", wide_rows=2, wide_kind=wide_kind)
    prompts = chat_prompts(tokenizer)
    config = StreamingConfig(sinks=4, window=124)
    alone = greedy_alone(model, tokenizer, config, prompts, 24)
    batch = StreamBatch(StreamingLLM(model, tokenizer, config), slots=8)
    rows = [batch.add() for _ in prompts]
    last = [batch.feed([r], p[None], logits="last")[0] for r, p in zip(rows, prompts)]
    together = [[] for _ in rows]
    for _ in range(24):
        for r in rows:
            together[r].append(int(last[r].argmax()))
        out = batch.feed(rows, torch.tensor([[t[-1]] for t in together]), logits="last")
        last = [out[r] for r in rows]
    assert together == alone


def test_default_model_greedy_replies_are_the_same_text_beside_a_prompt_in_the_same_forward():
    """The server's mixed forwards on the real model: 6 replies decode while a 7th prompt rides in
    their forwards in chunks of 8 tokens (`StreamBatch.feed_mixed`), int4 with `--quant auto`'s
    thresholds on the AMX Xeon (the bfloat16 copy from 32 tokens, the head's from 8), where
    `mixes_exactly` allows it; then all 7 decode together. The same tokens as each alone."""
    model, tokenizer = load_model("smollm2-135m-instruct")
    quantize_linears(model, "int4", wide_rows=32, wide_kind="bf16", head_wide=(8, "bf16"))
    prompts = chat_prompts(tokenizer)[:7]
    config = StreamingConfig(sinks=4, window=124, chunk_size=8)
    alone = greedy_alone(model, tokenizer, config, prompts, 24)
    batch = StreamBatch(StreamingLLM(model, tokenizer, config), slots=8)
    assert batch.mixes_exactly([(6, 1, "last"), (1, 8, "last")])  # 14 tokens, 7 head rows: no kernel changes
    assert not batch.mixes_exactly([(7, 1, "last"), (1, 8, "last")])  # 8 head rows: the head's copy would serve them
    assert not batch.mixes_exactly([(6, 1, "last"), (1, 26, "none")])  # 32 tokens: the decoder's copy would
    rows = [batch.add() for _ in prompts]
    last = {r: batch.feed([r], p[None], logits="last")[0] for r, p in zip(rows[:6], prompts[:6])}
    together, late, fed, mixed = [[] for _ in rows], rows[6], 0, 0
    while min(len(t) for t in together) < 24:
        decoding = [r for r in rows if r in last and len(together[r]) < 24]
        for r in decoding:
            together[r].append(int(last[r].argmax()))
        parts = [(decoding, torch.tensor([[together[r][-1]] for r in decoding]), "last")] if decoding else []
        if fed < len(prompts[6]):
            chunk = prompts[6][fed : fed + 8]
            parts.append(([late], chunk[None], "last"))
            fed += len(chunk)
            mixed += len(parts) == 2
        outs = batch.feed_mixed(parts)
        for r, out in zip(decoding, outs[0] if decoding else []):
            last[r] = out
        if parts[-1][0] == [late] and fed == len(prompts[6]):
            last[late] = outs[-1][0]
    assert mixed >= 3 and together == alone


@pytest.mark.parametrize("window", [124, 44])
def test_default_model_replies_through_the_scheduler_are_the_text_of_each_alone(window):
    """The server's model thread on the real model (int4, this host's `--quant auto` thresholds):
    8 greedy replies started a few tokens apart, so decode steps run 1-8 rows, prompts ride in
    them where `mixes_exactly` allows, rows leave and compact; each reply is its text alone. With a
    4+44 cache (prompts of 36-39 tokens) the rows fill up and start evicting at different steps,
    so full and filling rows decode side by side."""
    import time

    from streaming_llm.core.sampling import SamplingParams
    from streaming_llm.server.scheduler import Scheduler
    from test_scheduler import run_concurrently

    model, tokenizer = load_model("smollm2-135m-instruct")
    quantize_linears(model, "int4", wide_rows=32, wide_kind="bf16", head_wide=(8, "bf16"))
    prompts = chat_prompts(tokenizer)
    config = StreamingConfig(sinks=4, window=window, chunk_size=16)
    lengths = [24, 12, 20, 16, 24, 8, 18, 22]  # replies end at different times: rows leave from the middle
    greedy = SamplingParams(temperature=0)

    def reply(engine, i):
        return [t.id for t in engine.generate(prompts[i], max_new_tokens=lengths[i], sampling=greedy)]

    alone = [reply(StreamingLLM(model, tokenizer, config), i) for i in range(8)]
    sched = Scheduler(StreamingLLM(model, tokenizer, config), slots=8)
    got = {}

    def run(i):
        time.sleep(0.15 * i)  # later prompts arrive while earlier replies decode
        e = StreamingLLM(model, tokenizer, config)
        sched.attach(e)
        got[i] = reply(e, i)
        sched.detach(e)

    stats, errors = run_concurrently(sched, run, range(8), 300)
    assert not errors, errors
    assert [got[i] for i in range(8)] == alone
    assert stats["max_batch_size"] >= 4 and stats["decode_tokens"] > stats["decode_steps"]
