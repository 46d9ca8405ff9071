"""Exactness of the streaming engine against the paper's literal reference and plain transformers."""

from __future__ import annotations

import pytest
import torch

from reference import PaperReference
from streaming_llm.core.cache import MAPPED_BYTES, StreamingCache, zeros_like_device
from streaming_llm.core.config import StreamingConfig
from streaming_llm.core.engine import StreamingLLM
from streaming_llm.errors import UnsupportedModelError, UserError
from streaming_llm.core.rope import find_rotary_module
from tiny_models import ARCHS, tiny_model

ATOL = 1e-5


def ids_for(n, seed=1, vocab=96):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (n,), generator=g)


def engine(model, **kw):
    start = kw.pop("start_position", 0)
    return StreamingLLM(model, None, StreamingConfig(**kw), start_position=start)


def close(a, b, atol=ATOL):
    assert a.shape == b.shape
    err = (a - b).abs().max().item()
    assert err < atol, f"max abs diff {err}"


@pytest.mark.parametrize("arch", ARCHS)
def test_streaming_matches_literal_paper_reference(arch):
    model = tiny_model(arch)
    ids = ids_for(40)
    ref = PaperReference(model, sinks=3, window=8, rotary_module=find_rotary_module(model)).feed(ids)
    for chunk in (1, 5, 40):
        out = engine(model, sinks=3, window=8, chunk_size=chunk).feed(ids)
        close(out, ref)


@pytest.mark.parametrize("arch", ["llama", "gemma3", "gpt_neox"])
def test_window_matches_reference_without_sinks(arch):
    model = tiny_model(arch)
    ids = ids_for(30)
    ref = PaperReference(model, sinks=0, window=7, rotary_module=find_rotary_module(model)).feed(ids)
    close(engine(model, method="window", sinks=4, window=7, chunk_size=4).feed(ids), ref)


def test_reference_is_sensitive_to_sinks():
    """Guard against a vacuous oracle: evicting the sinks must change the logits."""
    model = tiny_model("llama")
    ids = ids_for(40)
    with_sinks = engine(model, sinks=3, window=8).feed(ids)
    without = engine(model, method="window", window=11).feed(ids)
    absolute = engine(model, sinks=3, window=8, positions="absolute").feed(ids)
    assert (with_sinks[-10:] - without[-10:]).abs().max() > 1e-2
    assert (with_sinks[-10:] - absolute[-10:]).abs().max() > 1e-3


@pytest.mark.parametrize("arch", ARCHS)
def test_dense_and_huge_window_match_plain_transformers(arch):
    model = tiny_model(arch)
    ids = ids_for(50)
    with torch.no_grad():
        plain = model(ids[None]).logits[0]
    close(engine(model, method="dense", chunk_size=7).feed(ids), plain)
    close(engine(model, sinks=4, window=500, chunk_size=9).feed(ids), plain)


@pytest.mark.parametrize("arch", ["llama", "qwen3", "phi3"])
def test_absolute_positions_match_plain_masked_forward(arch):
    model = tiny_model(arch)
    n, s, w = 60, 4, 10
    ids = ids_for(n)
    i, j = torch.arange(n)[:, None], torch.arange(n)[None, :]
    keep = (j <= i) & ((j < s) | (j > i - w))
    mask = torch.zeros(n, n).masked_fill(~keep, float("-inf"))[None, None]
    old = model.config._attn_implementation
    model.set_attn_implementation("eager")
    with torch.no_grad():
        plain = model(ids[None], attention_mask=mask).logits[0]
    model.set_attn_implementation(old)
    close(engine(model, sinks=s, window=w, positions="absolute", chunk_size=8).feed(ids), plain)


@pytest.mark.parametrize("method", ["streaming", "window", "dense"])
def test_chunked_equals_token_by_token(method):
    model = tiny_model("qwen2")
    ids = ids_for(70)
    one = engine(model, method=method, sinks=2, window=9, chunk_size=1).feed(ids)
    for chunk in (3, 16, 70):
        close(engine(model, method=method, sinks=2, window=9, chunk_size=chunk).feed(ids), one)
    # and split across several feed() calls of uneven sizes
    e = engine(model, method=method, sinks=2, window=9, chunk_size=4)
    parts = [e.feed(ids[a:b]) for a, b in [(0, 1), (1, 13), (13, 14), (14, 70)]]
    close(torch.cat(parts), one)


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
@pytest.mark.parametrize("positions", ["cache", "absolute"])
def test_large_position_offset_does_not_drift(arch, positions):
    model = tiny_model(arch)
    ids = ids_for(120)
    base = engine(model, sinks=4, window=16, chunk_size=8, positions=positions).feed(ids)
    far = engine(model, sinks=4, window=16, chunk_size=8, positions=positions, start_position=5_000_000).feed(ids)
    close(far, base, atol=1e-4)


def test_rebasing_keeps_positions_small_and_results_exact():
    model = tiny_model("llama")
    ids = ids_for(400)
    e = engine(model, sinks=4, window=8, chunk_size=5)
    e.cache.position_limit = 40  # force a rebase every few chunks
    out = e.feed(ids)
    ref = engine(model, sinks=4, window=8, chunk_size=5).feed(ids)
    close(out, ref, atol=1e-4)
    assert e.cache.tokens_seen + e.cache.pos_shift[0] <= 40


def test_cache_is_bounded_and_never_reallocated():
    model = tiny_model("llama")
    e = engine(model, sinks=4, window=12, chunk_size=6)
    e.feed(ids_for(30))
    ptrs = [(layer.keys.data_ptr(), layer.values.data_ptr()) for layer in e.cache.layers]
    for k in range(10):
        e.feed(ids_for(37, seed=k))
        e.feed([5])
    for layer, (kp, vp) in zip(e.cache.layers, ptrs):
        assert layer.keys.shape[2] == 16 and layer.values.shape[2] == 16
        assert (layer.keys.data_ptr(), layer.values.data_ptr()) == (kp, vp)
    assert e.cache_tokens == 16 and e.tokens_seen == 30 + 10 * 38
    assert e.evicted == e.tokens_seen - 16


def test_gemma3_sliding_layers_keep_their_trained_window():
    model = tiny_model("gemma3")
    e = engine(model, sinks=2, window=20)
    e.feed(ids_for(50))
    shapes = [(layer.sinks, layer.window) for layer in e.cache.layers]
    assert shapes == [(0, 6), (2, 20), (0, 6)]


def test_recompute_recomputes_each_token_over_the_last_window():
    model = tiny_model("llama")
    ids = ids_for(25)
    out = engine(model, method="recompute", sinks=2, window=6).feed(ids)
    with torch.no_grad():
        for t in (0, 5, 7, 8, 24):
            ctx = ids[max(0, t - 7) : t + 1]
            close(out[t], model(ctx[None]).logits[0, -1])


def test_state_dict_roundtrip_continues_identically():
    model = tiny_model("llama")
    ids = ids_for(80)
    a = engine(model, sinks=3, window=10, chunk_size=7)
    a.feed(ids[:50])
    state = a.state_dict()
    b = engine(model, sinks=3, window=10, chunk_size=7)
    b.load_state_dict(state)
    close(b.feed(ids[50:]), a.feed(ids[50:]), atol=1e-6)
    with pytest.raises(UserError):
        engine(model, sinks=4, window=10).load_state_dict(state)


def test_softmax_off_by_one_matches_reference():
    model = tiny_model("llama")
    model.config.softmax_off_by_one = True
    ids = ids_for(30)
    ref = PaperReference(model, sinks=2, window=6, rotary_module=find_rotary_module(model)).feed(ids)
    for chunk in (1, 6):
        close(engine(model, sinks=2, window=6, chunk_size=chunk).feed(ids), ref)


@pytest.mark.parametrize("arch", [a for a in ARCHS if a != "gpt_neox"])
def test_plain_generate_with_streaming_cache_matches_engine(arch):
    """The cache hands itself to the attention through the keyword arguments transformers passes
    to `Cache.update`: plain `model.generate(..., cache=engine.new_cache())` streams exactly."""
    model = tiny_model(arch)
    prompt = ids_for(12)
    e = engine(model, sinks=2, window=8)
    tokens = [t.id for t in e.generate(prompt, max_new_tokens=20, sampling=_greedy())]
    cache = engine(model, sinks=2, window=8).new_cache()
    out = model.generate(prompt[None], cache=cache, max_new_tokens=20, do_sample=False, min_new_tokens=20,
                         attention_mask=torch.ones(1, 12, dtype=torch.long), pad_token_id=0)
    assert out[0, 12:].tolist() == tokens
    assert isinstance(cache, StreamingCache) and cache.cache_tokens == 10


def test_plain_generate_without_the_cache_hand_off_fails_clearly():
    """GPT-NeoX's attention does not pass its keyword arguments to the cache: refused, not wrong."""
    model = tiny_model("gpt_neox")
    cache = engine(model, sinks=2, window=8).new_cache()
    with pytest.raises(RuntimeError, match="StreamingLLM.feed/generate"):
        model.generate(ids_for(12)[None], cache=cache, max_new_tokens=3, do_sample=False,
                       attention_mask=torch.ones(1, 12, dtype=torch.long), pad_token_id=0)


def _greedy():
    from streaming_llm.core.sampling import SamplingParams

    return SamplingParams(temperature=0)


def test_generate_is_deterministic_for_a_seed_and_feeds_every_token():
    from streaming_llm.core.sampling import SamplingParams

    model = tiny_model("llama")
    runs = []
    for _ in range(2):
        e = engine(model, sinks=2, window=8)
        toks = list(e.generate(ids_for(10), max_new_tokens=15, sampling=SamplingParams(temperature=1.0, seed=7)))
        runs.append([t.id for t in toks])
        assert e.tokens_seen == 10 + 15 and toks[-1].finish_reason == "length"
    assert runs[0] == runs[1]


def test_models_without_rope_are_refused_clearly():
    import transformers as tf

    gpt2 = tf.GPT2LMHeadModel(tf.GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=50))
    with pytest.raises(UnsupportedModelError, match="rotary"):
        StreamingLLM(gpt2, None, StreamingConfig())


@pytest.mark.parametrize("bad", [dict(window=0), dict(sinks=-1), dict(method="nope"), dict(positions="x")])
def test_bad_config_values_are_user_errors(bad):
    with pytest.raises(UserError):
        StreamingConfig(**bad)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_cuda_matches_cpu(arch):
    model = tiny_model(arch)
    ids = ids_for(60)
    cpu = engine(model, sinks=3, window=9, chunk_size=7).feed(ids)
    gpu_model = tiny_model(arch).cuda()
    for chunk in (1, 7):
        out = engine(gpu_model, sinks=3, window=9, chunk_size=chunk).feed(ids)
        assert out.device.type == "cuda"
        close(out.cpu(), cpu, atol=1e-4)


def test_fused_chunk_attention_equals_the_materialized_one(monkeypatch):
    """The CPU chunk path (flash kernel for the window + sinks merged through the log-sum-exp)
    equals one explicit softmax over [sinks | window], grouped-query heads and masked sinks included,
    and the engine really takes it for chunks past the sinks."""
    from streaming_llm.core import attention
    from streaming_llm.core.plan import AttentionPlan

    if attention._FLASH_CPU is None:
        pytest.skip("this torch has no CPU flash-attention op")
    g = torch.Generator().manual_seed(0)
    b, hq, hkv, c, n, s, d = 1, 6, 2, 12, 30, 3, 16
    q, q_sink = torch.randn(b, hq, c, d, generator=g), torch.randn(b, hq, c, d, generator=g)
    k, v = torch.randn(b, hkv, n, d, generator=g), torch.randn(b, hkv, n, d, generator=g)
    sk, sv = torch.randn(b, hkv, s, d, generator=g) * 3, torch.randn(b, hkv, s, d, generator=g)
    t, u = torch.arange(18, 18 + c)[:, None], torch.arange(n)[None, :]
    mask, sink_mask = (u <= t) & (u > t - 10), torch.arange(s)[None, :] <= t - 19  # some rows see no sink
    plan = AttentionPlan(k, v, mask, sink_keys=sk, sink_values=sv, sink_mask=sink_mask)
    fused = attention.fused_chunk_attention(q, q_sink, plan, 0.25)
    ref = attention.grouped_attention(q, k, v, mask, 0.25, q_sink=q_sink, sink_keys=sk, sink_values=sv,
                                      sink_mask=sink_mask)
    close(fused, ref, atol=1e-5)

    calls = []
    real = attention.fused_chunk_attention
    monkeypatch.setattr(attention, "fused_chunk_attention", lambda *a: calls.append(1) or real(*a))
    engine(tiny_model("qwen2"), sinks=2, window=9, chunk_size=5).feed(ids_for(20))
    assert calls


def test_before_the_first_eviction_streaming_is_plain_causal_attention(monkeypatch):
    """Until S+W tokens have been seen nothing is evicted and every position is the token's own:
    the engine must give dense attention's logits, through the causal path (no masked empty ring
    slots, no sink merging), for prefill chunks and single decoded tokens alike."""
    from streaming_llm.core import attention

    model = tiny_model("llama")
    ids = ids_for(11)
    dense = engine(model, method="dense").feed(ids)
    other_paths = []
    monkeypatch.setattr(attention, "grouped_attention", lambda *a, **k: other_paths.append("grouped"))
    monkeypatch.setattr(attention, "fused_chunk_attention", lambda *a, **k: other_paths.append("fused"))
    for chunk in (1, 4, 11):
        close(engine(model, sinks=3, window=8, chunk_size=chunk).feed(ids), dense)
    assert not other_paths


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cache_buffers_are_zero_writable_and_outlive_their_allocation(dtype):
    """Big CPU buffers are anonymous maps (pages zeroed when first written), small ones memset:
    both read as zeros, keep what is written after the allocation's locals are gone."""
    import gc

    like = torch.zeros(1)
    for shape in ((1, 3, 1024, 64), (1, 3, 4, 64)):
        big = torch.Size(shape).numel() * dtype.itemsize >= MAPPED_BYTES
        t = zeros_like_device(like, shape, dtype)
        gc.collect()
        assert t.shape == shape and t.dtype == dtype and not bool(t.any())
        t[0, 1, 2] = 7
        gc.collect()
        assert float(t.float().sum()) == 7 * shape[-1]
        assert big == (shape[2] == 1024)


@pytest.mark.skipif(not hasattr(__import__("os"), "fork"), reason="needs os.fork (POSIX)")
def test_a_mapped_cache_buffer_is_private_to_a_forked_process():
    import os

    t = zeros_like_device(torch.zeros(1), (1, 3, 1024, 64), torch.float32)
    t[0, 0, 0] = 1
    pid = os.fork()
    if pid == 0:  # the child writes its copy and leaves at once
        t[0, 0, 0] = 5
        t[0, 1, 7] = 5
        os._exit(0)
    assert os.waitpid(pid, 0)[1] == 0
    assert float(t.sum()) == 64 and float(t[0, 1, 7].abs().sum()) == 0
