"""Recall of evicted tokens (issue 15): the engine against the literal rule, selection against
brute force, the memory's bounds, config and flags. Tiny random models, a few seconds each."""

from __future__ import annotations

import copy
import os

import pytest
import torch

from reference import RecallReference, _rotate
from streaming_llm.core.config import StreamingConfig
from streaming_llm.core.engine import StreamingLLM
from streaming_llm.core.rope import find_rotary_module
from streaming_llm.errors import UserError
from tiny_models import tiny_model

S, W, B, K = 3, 12, 4, 2
SELECTS = ["layer", "head"]  # StreamingConfig.recall_select: one choice per layer, or per KV head


def ids_for(n, seed=1, vocab=96):
    return torch.randint(0, vocab, (n,), generator=torch.Generator().manual_seed(seed))


def engine(model, **kw):
    start = kw.pop("start_position", 0)
    return StreamingLLM(model, None, StreamingConfig(**kw), start_position=start)


def traced(e):
    """Turn on the engine's per-forward record of the chosen blocks (layer -> list)."""
    traces = {}
    for i, mem in enumerate(e.cache.memories):
        if mem is not None:
            mem.trace = traces[i] = []
    return traces


def heads_differ(traces) -> bool:
    """Whether some forward's per-head choices differ between the KV heads (per-head selection is
    not vacuous on that stream)."""
    return any(ids and isinstance(ids[0], tuple) and len(set(ids)) > 1 for t in traces.values() for _, _, ids in t)


def close(a, b, atol):
    assert a.shape == b.shape
    err = (a - b).abs().max().item()
    assert err < atol, f"max abs diff {err}"


@pytest.mark.parametrize("chunk", [1, 5, 64])
def test_recall_off_is_bit_identical_to_streaming(chunk):
    model = tiny_model("llama")
    ids = ids_for(90)
    plain = engine(model, sinks=S, window=W, chunk_size=chunk).feed(ids)
    off = engine(model, sinks=S, window=W, chunk_size=chunk, recall_blocks=0, block_size=B).feed(ids)
    assert torch.equal(plain, off)
    assert all(m is None for m in engine(model, sinks=S, window=W).cache.memories)


@pytest.mark.parametrize("select", SELECTS)
@pytest.mark.parametrize("arch", ["llama", "gemma3", "qwen3"])
@pytest.mark.parametrize("chunk", [1, 7])
def test_recall_matches_the_literal_rule(arch, chunk, select):
    model = tiny_model(arch)
    ids = ids_for(110)
    e = engine(model, sinks=S, window=W, chunk_size=chunk, recall_blocks=K, block_size=B, recall_select=select)
    traces = traced(e)
    out = e.feed(ids)
    mems = [m for m in e.cache.memories if m is not None]
    assert mems and all(m.n_blocks > K for m in mems)  # well past the first eviction, more blocks than K
    if arch == "gemma3":  # sliding layers get no memory
        assert [m is not None for m in e.cache.memories] == [False, True, False]
    chosen = {ids for trace in traces.values() for _, _, ids in trace}
    assert len(chosen) > 2  # the selection really changes along the stream
    if select == "head" and arch != "gemma3":  # (the tiny gemma3 has one KV head)
        assert heads_differ(traces)
    assert all(m.recalled_tokens == K * B for m in mems)  # per head too: each head recalls K blocks
    ref = RecallReference(model, S, W, B, find_rotary_module(model), traces).feed(ids)
    close(out, ref, atol=1e-4)
    # and the recall changes the logits (not a vacuous rule)
    plain = engine(model, sinks=S, window=W, chunk_size=chunk).feed(ids)
    assert (plain[-30:] - out[-30:]).abs().max() > 1e-3


@pytest.mark.parametrize("score, records", [("mean", ["means"]), ("both", ["maxs", "mins", "means"])])
@pytest.mark.parametrize("select", SELECTS)
@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_recall_by_mean_key_matches_the_literal_rule_and_chooses_otherwise(arch, select, score, records):
    """`recall_score="mean"` and `"both"`: the attention and positions are the rule's (the
    reference takes the engine's choices), the summaries are the mean keys alone (both: the
    bound's and the mean keys), and the choice differs from the bound's on the same stream (not a
    renamed bound)."""
    model = tiny_model(arch)
    ids = ids_for(110)
    kw = dict(sinks=S, window=W, chunk_size=7, recall_blocks=K, block_size=B, recall_select=select)
    e = engine(model, recall_score=score, **kw)
    traces = traced(e)
    out = e.feed(ids)
    layer = next(i for i, m in enumerate(e.cache.memories) if m is not None)
    mem = e.cache.memories[layer]
    summary = mem.summary()
    assert list(summary) == records and summary["means"].shape == (mem.stored, model.config.num_key_value_heads, 16)
    ref = RecallReference(model, S, W, B, find_rotary_module(model), traces).feed(ids)
    close(out, ref, atol=1e-4)
    bound = engine(model, **kw)
    bound_traces = traced(bound)
    bound.feed(ids)
    assert [t[2] for t in traces[layer]] != [t[2] for t in bound_traces[layer]]


@pytest.mark.parametrize("select", SELECTS)
def test_recall_is_exact_across_rebases_and_uneven_feeds(select):
    model = tiny_model("llama")
    ids = ids_for(160)
    e = engine(model, sinks=S, window=W, chunk_size=6, recall_blocks=K, block_size=B, start_position=1000,
               recall_select=select)
    e.cache.position_limit = 1050  # a rebase every few chunks, blocks stored in several frames
    traces = traced(e)
    out = torch.cat([e.feed(ids[a:b]) for a, b in [(0, 1), (1, 40), (40, 41), (41, 42), (42, 160)]])
    assert len(set(e.cache.memories[0].frames.tolist())) > 1
    assert select == "layer" or heads_differ(traces)
    ref = RecallReference(model, S, W, B, find_rotary_module(model), traces).feed(ids)
    close(out, ref, atol=1e-4)


@pytest.mark.parametrize("select", SELECTS)
def test_generate_with_recall_matches_the_rule_and_off_by_one(select):
    model = tiny_model("llama")
    model.config.softmax_off_by_one = True
    e = engine(model, sinks=2, window=8, chunk_size=16, recall_blocks=3, block_size=3, recall_select=select)
    traces = traced(e)
    prompt = ids_for(40)
    from streaming_llm.core.sampling import SamplingParams

    toks = [t.id for t in e.generate(prompt, max_new_tokens=30, sampling=SamplingParams(temperature=0))]
    stream = torch.cat([prompt, torch.tensor(toks)])
    assert select == "layer" or heads_differ(traces)
    ref = RecallReference(model, 2, 8, 3, find_rotary_module(model), traces).feed(stream[:-1])
    assert ref[39:].argmax(-1).tolist() == toks


def _naive_order(mem, query, pos_shift, inv_freq, score):
    """Every held block, best first (ties: the older first), by the documented score `score`
    ("bound" or "mean"), from every stored key of every held block: keys and query both rotated
    to stream indices (storage position minus their frame's shift). The bound (or q . the block's
    mean key) is summed over every head (one ranking), or, for a per-head memory, per KV head over
    its own query heads (one ranking per KV head)."""
    hkv = mem.store.shape[2]
    q = _rotate(query[0].double(), torch.full((query.shape[2],), -pos_shift), inv_freq)  # (Hq, C, D)
    qf = q.reshape(hkv, -1, q.shape[-1])
    scores = []  # per block: (H,) score of each KV head's own queries
    for b in mem.eligible():
        keys, frame = mem.block_keys(b)  # (H, block, D)
        keys = _rotate(keys.double(), torch.full((keys.shape[1],), -frame), inv_freq)
        if score == "mean":
            scores.append(((qf * keys.mean(1)[:, None]).sum((1, 2)), b))
            continue
        lo, hi = keys.amin(1), keys.amax(1)  # (H, D)
        scores.append((torch.maximum(qf * lo[:, None], qf * hi[:, None]).sum((1, 2)), b))
    order = lambda pick: tuple(b for _, b in sorted((-pick(s).item(), b) for s, b in scores))  # noqa: E731
    if mem.per_head:
        return tuple(order(lambda s, h=h: s[h]) for h in range(hkv))
    return order(lambda s: s.sum())


def _naive_choice(mem, query, pos_shift, inv_freq):
    """The K blocks `mem`'s score chooses, in stream order, from `_naive_order`: its top K, or with
    `score="both"` the bound's ranking and the mean key's taken in turn, 1st, 1st, 2nd, 2nd, ...
    (each block once) until K."""
    top = lambda order: tuple(sorted(order[: mem.k]))  # noqa: E731
    if mem.score == "both":
        ranks = [_naive_order(mem, query, pos_shift, inv_freq, s) for s in ("bound", "mean")]
        top = lambda a, b: tuple(sorted(list(dict.fromkeys(x for pair in zip(a, b) for x in pair))[: mem.k]))  # noqa: E731
    else:
        ranks = [_naive_order(mem, query, pos_shift, inv_freq, mem.score)]
    return tuple(map(top, *ranks)) if mem.per_head else top(*ranks)


@pytest.mark.parametrize("select", SELECTS)
def test_recall_every_reuses_a_decoded_tokens_choice_and_still_matches_the_rule(select, monkeypatch):
    """recall_every=4: a decoded token reuses the choice made up to 3 tokens before it (fewer
    scans), the logits still equal the literal rule with the blocks the trace records, a chunk
    always chooses, and a state saved between two choices continues identically."""
    from streaming_llm.core.recall import RecallMemory

    calls = []
    real = RecallMemory.select
    monkeypatch.setattr(RecallMemory, "select", lambda self, q, shift: calls.append(1) or real(self, q, shift))
    model = tiny_model("llama")
    ids = ids_for(120)
    kw = dict(sinks=S, window=W, chunk_size=9, recall_blocks=K, block_size=B, recall_select=select, recall_every=4)
    e = engine(model, **kw)
    traces = traced(e)
    out = torch.cat([e.feed(ids[:40]), *(e.feed(ids[i : i + 1]) for i in range(40, 120))])  # a chunk, then decode
    ref = RecallReference(model, S, W, B, find_rotary_module(model), traces).feed(ids)
    close(out, ref, atol=1e-4)
    mems = [m for m in e.cache.memories if m is not None]
    decoded_with_memory = sum(1 for trace in traces.values() for first, n, ids_ in trace if n == 1 and ids_)
    assert 0 < len(calls) < 0.5 * decoded_with_memory + 10 * len(mems)  # about one scan per 4 decode steps
    for trace in traces.values():  # between two choices the blocks do not change
        decoded = [(first, ids_) for first, n, ids_ in trace if n == 1 and ids_]
        changes = sum(a[1] != b[1] for a, b in zip(decoded, decoded[1:]))
        assert 0 < changes <= len(decoded) // 4 + 1
    assert torch.equal(engine(model, **{**kw, "recall_every": 1}).feed(ids[:40]), out[:40])  # chunks: no reuse
    a, b = engine(model, **kw), engine(model, **kw)
    a.feed(ids[:40])
    for i in range(40, 62):
        a.feed(ids[i : i + 1])
    assert any(m is not None and m.chosen_at is not None and m.chosen_at < 61 for m in a.cache.memories)
    b.load_state_dict(a.state_dict())  # mid-way between two choices
    for i in range(62, 75):
        assert torch.equal(b.feed(ids[i : i + 1]), a.feed(ids[i : i + 1]))
    with pytest.raises(UserError, match="recall-every"):
        StreamingConfig(recall_every=0)


@pytest.mark.parametrize("score", ["bound", "mean", "both"])
@pytest.mark.parametrize("select", SELECTS)
def test_selection_equals_brute_force_over_all_keys(select, score, monkeypatch):
    from streaming_llm.core import recall

    monkeypatch.setattr(recall, "SCAN_PIECE", 3)  # the scan reads the summary file in several pieces
    model = tiny_model("qwen3")
    e = engine(model, sinks=S, window=W, chunk_size=5, recall_blocks=3, block_size=B, recall_select=select,
               recall_score=score)
    e.cache.position_limit = 60  # blocks in several frames
    seen = []
    for k in range(6):
        e.feed(ids_for(23, seed=k))
        mem = next(m for m in e.cache.memories if m is not None)
        inv = mem.rope.inv_freq
        g = torch.Generator().manual_seed(k)
        for c in (1, 5):
            q = torch.randn(1, 4, c, 16, generator=g) * 3
            shift = e.cache.pos_shift[0]
            got = mem.select(q, shift)
            assert got == _naive_choice(mem, q, shift, inv)
            seen.append(got)
    assert len(set(seen)) > 3 and mem.stored > 3
    assert len(set(e.cache.memories[0].frames.tolist())) > 1
    if select == "head":
        assert all(len(got) == 2 and len({len(h) for h in got}) == 1 for got in seen)  # 2 KV heads, min(K, held) each
        assert any(len(got[0]) == 3 for got in seen)
        assert any(len(set(got)) > 1 for got in seen)


@pytest.mark.parametrize("chunk", [1, 7])
@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_per_head_selection_with_one_kv_head_is_the_layer_selection(arch, chunk):
    """With one KV head its own bound is the layer's bound: the same blocks, identical logits."""
    model = tiny_model(arch, **({"num_key_value_heads": 1} if arch == "llama" else {}))
    ids = ids_for(100)
    kw = dict(sinks=S, window=W, chunk_size=chunk, recall_blocks=K, block_size=B)
    a, b = engine(model, **kw), engine(model, recall_select="head", **kw)
    ta, tb = traced(a), traced(b)
    assert torch.equal(a.feed(ids), b.feed(ids))
    assert {i: [(f, n, c) for f, n, c in t] for i, t in ta.items()} == \
        {i: [(f, n, c[0] if c else c) for f, n, c in t] for i, t in tb.items()}


@pytest.mark.parametrize("select", SELECTS)
def test_engine_selection_uses_the_forwards_queries(monkeypatch, select):
    """What the attention chose is what select() gives for the forward's own query."""
    from streaming_llm.core import recall

    model = tiny_model("llama")
    e = engine(model, sinks=S, window=W, chunk_size=4, recall_blocks=K, block_size=B, recall_select=select)
    calls = []
    real = recall.choose

    def spy(layer, query):
        out = real(layer, query)
        calls.append((layer.memory.chosen, _naive_choice(layer.memory, query, layer.owner.pos_shift[0],
                                                          layer.rope.inv_freq) if layer.memory.stored else ()))
        return out

    monkeypatch.setattr(recall, "choose", spy)
    e.feed(ids_for(80))
    e.feed([3])
    assert calls and all(a == b for a, b in calls)
    assert any(a for a, _ in calls)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_memory_cap_drops_the_oldest_blocks_and_stays_bounded(dtype, tmp_path):
    model = tiny_model("llama")
    cap = 5 * B
    e = StreamingLLM(model, None, StreamingConfig(sinks=S, window=W, chunk_size=7, recall_blocks=K, block_size=B,
                                                  recall_memory_tokens=cap, recall_dtype=dtype),
                     recall_dir=str(tmp_path))
    e.feed(ids_for(60))
    mem = e.cache.memories[0]
    files = [(f.fd, f.numel()) for f in (mem.store, mem.summaries)]
    e.feed(ids_for(300, seed=2))
    assert mem.n_blocks > 3 * mem.slots and mem.stored == 5 and mem.stored_tokens == cap
    assert list(mem.eligible()) == list(range(mem.n_blocks - 5, mem.n_blocks))  # the newest five
    assert {k: v.shape for k, v in mem.summary().items()} == {"maxs": (5, 2, 16), "mins": (5, 2, 16)}
    assert mem.frames.shape == (5,)  # the one per-block array in RAM (8 bytes a block)
    # the same two files, no growth: 5 slots of keys and values, 5 of (max, min) float32
    assert [(f.fd, f.numel()) for f in (mem.store, mem.summaries)] == files == [
        (files[0][0], 5 * 2 * 2 * B * 16), (files[1][0], 5 * 2 * 2 * 16)]
    assert os.fstat(mem.store.fd).st_size == files[0][1] * mem.store.dtype.itemsize
    assert os.fstat(mem.summaries.fd).st_size == files[1][1] * 4 and mem.summaries.dtype == torch.float32
    assert mem.store.dtype == getattr(torch, dtype)
    assert all(b in mem.eligible() for _, _, ids in [(0, 0, mem.chosen)] for b in ids)
    assert os.listdir(tmp_path) == []  # the file is unlinked once created: nothing left behind
    with pytest.raises(KeyError):
        mem.block_keys(0)


def test_bfloat16_store_stays_close_to_float32():
    model = tiny_model("llama")
    ids = ids_for(100)
    a = engine(model, sinks=S, window=W, chunk_size=8, recall_blocks=K, block_size=B).feed(ids)
    b = engine(model, sinks=S, window=W, chunk_size=8, recall_blocks=K, block_size=B, recall_dtype="bfloat16").feed(ids)
    assert (a - b).abs().max() < 0.5


@pytest.mark.parametrize("select, score", [("layer", "bound"), ("head", "bound"), ("layer", "mean"), ("head", "both")])
def test_state_dict_with_recall_continues_identically_and_reset_forgets(select, score):
    model = tiny_model("llama")
    ids = ids_for(140)
    kw = dict(sinks=S, window=W, chunk_size=7, recall_blocks=K, block_size=B, recall_memory_tokens=6 * B,
              recall_select=select, recall_score=score)
    a = engine(model, **kw)
    a.feed(ids[:90])
    state = a.state_dict()
    assert "recall" in state["cache"]["layers"][0]
    older = copy.deepcopy(state)  # as saved while the summaries lived in RAM: arrays of 16+ slots
    for layer in older["cache"]["layers"]:
        for name in ("mins", "maxs", "means", "frames"):
            x = layer.get("recall", {}).get(name)
            if x is not None:
                layer["recall"][name] = torch.cat([x, torch.zeros(16, *x.shape[1:], dtype=x.dtype)])
    b, c = engine(model, **kw), engine(model, **kw)
    b.load_state_dict(state)
    c.load_state_dict(older)
    want = a.feed(ids[90:])
    assert torch.equal(b.feed(ids[90:]), want) and torch.equal(c.feed(ids[90:]), want)
    a.reset()
    assert a.cache.memories[0].n_blocks == 0
    fresh = engine(model, **kw)
    assert torch.equal(a.feed(ids[:50]), fresh.feed(ids[:50]))


def test_batches_refuse_recall_clearly():
    from streaming_llm.core.batch import StreamBatch

    e = engine(tiny_model("llama"), sinks=S, window=W, recall_blocks=K, block_size=B)
    with pytest.raises(UserError, match="recall"):
        StreamBatch(e, 2)
    with pytest.raises(UserError, match="recall"):
        e.new_cache(batch_size=2)


@pytest.mark.parametrize("bad, words", [
    (dict(recall_blocks=-1), "--recall-blocks"),
    (dict(recall_blocks=2, block_size=0), "--block-size"),
    (dict(recall_blocks=2, block_size=8, recall_memory_tokens=4), "--recall-memory-tokens"),
    (dict(recall_blocks=2, recall_dtype="int8"), "recall dtype"),
    (dict(recall_blocks=2, method="window"), "--method streaming"),
    (dict(recall_blocks=2, method="dense"), "--method streaming"),
    (dict(recall_blocks=2, positions="absolute"), "--positions cache"),
    (dict(recall_blocks=2, recall_select="heads"), "--recall-select must be one of layer, head"),
    (dict(recall_select=None), "--recall-select"),
    (dict(recall_score="quest"), "--recall-score must be one of bound, mean, both"),
])
def test_bad_recall_config_values_are_user_errors(bad, words):
    with pytest.raises(UserError, match=words):
        StreamingConfig(**bad)


def test_cache_size_counts_the_recalled_tokens():
    assert StreamingConfig(sinks=4, window=100, recall_blocks=3, block_size=16).cache_size == 4 + 48 + 100
    assert StreamingConfig(sinks=4, window=100).cache_size == 104


@pytest.mark.parametrize("verb", ["chat", "serve", "ppl"])
def test_recall_flags_parse_into_the_config(verb):
    from streaming_llm.cli import build_parser
    from streaming_llm.cliargs import config_from_args

    parser = build_parser()
    extra = ["--text", "x.txt"] if verb == "ppl" else []
    args = parser.parse_args([verb, *extra, "--recall-blocks", "4", "--block-size", "16", "--recall-memory-tokens", "4096",
                              "--recall-dtype", "bfloat16", "--recall-select", "head", "--recall-score", "mean"])
    c = config_from_args(args)
    assert (c.recall_blocks, c.block_size, c.recall_memory_tokens, c.recall_dtype, c.recall_select, c.recall_score) == (
        4, 16, 4096, "bfloat16", "head", "mean")
    default = config_from_args(parser.parse_args([verb, *extra]))
    base = StreamingConfig()
    assert (default.recall_blocks, default.block_size, default.recall_memory_tokens, default.recall_dtype,
            default.recall_select, default.recall_score) == (
        0, base.block_size, base.recall_memory_tokens, base.recall_dtype, "layer", "bound")
    with pytest.raises(SystemExit):  # argparse refuses other values
        parser.parse_args([verb, *extra, "--recall-select", "heads"])
    with pytest.raises(SystemExit):
        parser.parse_args([verb, *extra, "--recall-score", "max"])


def test_server_snapshot_of_a_recall_session_continues_identically():
    """The server's snapshot format (pack_state/unpack_state, trimmed zero slots) keeps the memory."""
    from streaming_llm.server.conversations import pack_state, unpack_state

    model = tiny_model("llama")
    ids = ids_for(120)
    kw = dict(sinks=S, window=W, chunk_size=9, recall_blocks=K, block_size=B, recall_memory_tokens=40 * B)
    a = engine(model, **kw)
    a.feed(ids[:80])
    b = engine(model, **kw)
    b.load_state_dict(unpack_state(pack_state(a.state_dict()), torch.float32, "cpu"))
    assert torch.equal(b.feed(ids[80:]), a.feed(ids[80:]))


def test_health_names_the_recall_settings():
    from streaming_llm.server.app import _recall_info

    assert _recall_info(StreamingConfig()) == {"enabled": False}
    info = _recall_info(StreamingConfig(recall_blocks=4, block_size=16, recall_select="head", recall_every=4,
                                        recall_score="mean"))
    assert (info["recall_blocks"], info["block_size"], info["select"], info["every"], info["score"]) == (
        4, 16, "head", 4, "mean")
    assert info["persisted_with_session"] is True and info["batched"] is False


def test_a_stream_saved_before_the_newer_config_fields_still_loads():
    """A state saved before `recall_select`/`recall_every`/`recall_score` existed has no such keys: it was saved
    with their defaults and loads (engine and batch); a field this build does not know is refused."""
    from streaming_llm.core.batch import StreamBatch

    model = tiny_model("llama")
    ids = ids_for(40)
    a = engine(model, sinks=S, window=W)
    a.feed(ids[:30])
    state = a.state_dict()
    for key in ("recall_select", "recall_every", "recall_score"):
        del state["config"][key]
    b = engine(model, sinks=S, window=W)
    b.load_state_dict(state)
    assert torch.equal(b.feed(ids[30:]), a.feed(ids[30:]))
    StreamBatch(engine(model, sinks=S, window=W), slots=2).add(state)
    assert not StreamingConfig(sinks=S, window=W).matches({**state["config"], "from_a_newer_build": 1})
    with pytest.raises(UserError, match="does not know"):
        StreamingConfig.from_dict({**state["config"], "from_a_newer_build": 1})
    with pytest.raises(UserError, match="saved stream used"):
        engine(model, sinks=S, window=W + 1).load_state_dict(state)
