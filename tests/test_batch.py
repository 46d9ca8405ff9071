"""Many streams in one forward: every row equals the same stream run alone (and the paper's
literal reference), at every stage of a stream, with rows joining and leaving; no hidden state."""

from __future__ import annotations

import threading

import pytest
import torch

from reference import PaperReference
from streaming_llm.core.batch import StreamBatch
from streaming_llm.core.config import StreamingConfig
from streaming_llm.core.engine import StreamingLLM
from streaming_llm.core.rope import find_rotary_module
from streaming_llm.errors import UserError
from tiny_models import ARCHS, tiny_model

ATOL = 1e-4
S, W = 3, 8


def ids_for(n, seed, vocab=96):
    return torch.randint(0, vocab, (n,), generator=torch.Generator().manual_seed(seed))


def close(a, b, atol=ATOL):
    assert a.shape == b.shape, (a.shape, b.shape)
    err = (a - b).abs().max().item()
    assert err <= atol, f"max abs diff {err}"


def engine(model, **kw):
    return StreamingLLM(model, None, StreamingConfig(**{"sinks": S, "window": W, **kw}))


def run_schedule(batch, streams, schedule):
    """Feed `streams[row]` through `batch` by `schedule`: a list of (rows, n_tokens) steps. Returns
    each row's logits for every token it was fed, in order."""
    pos = {r: 0 for r in streams}
    got = {r: [] for r in streams}
    for rows, n in schedule:
        ids = torch.stack([streams[r][pos[r] : pos[r] + n] for r in rows])
        out = batch.feed(rows, ids, logits="all")
        for i, r in enumerate(rows):
            got[r].append(out[i])
            pos[r] += n
    return {r: torch.cat(v) for r, v in got.items()}


# Rows at different stages in the same forwards: row 0 deep in eviction, row 1 just past the first
# eviction, row 2 still filling its sinks when decoding starts; chunks and single tokens mixed.
SCHEDULE = [((0,), 20), ((0, 1), 4), ((1, 2), 2), ((0, 1, 2), 5), *[((0, 1, 2), 1)] * 6, ((2, 0), 3),
            ((1,), 1), ((0, 1, 2), 1), ((0, 2), 7), *[((0, 1, 2), 1)] * 3]


@pytest.mark.parametrize("arch", ARCHS)
def test_each_row_equals_the_literal_reference_of_its_stream(arch):
    model = tiny_model(arch)
    lengths = {r: sum(n for rows, n in SCHEDULE if r in rows) for r in range(3)}
    streams = {r: ids_for(lengths[r], seed=10 + r) for r in range(3)}
    batch = StreamBatch(engine(model, chunk_size=4), slots=3)
    for _ in range(3):
        batch.add()
    got = run_schedule(batch, streams, SCHEDULE)
    for r, ids in streams.items():
        ref = PaperReference(model, sinks=S, window=W, rotary_module=find_rotary_module(model)).feed(ids)
        close(got[r], ref)
        assert batch.tokens_seen(r) == len(ids) and batch.cache_tokens(r) == min(len(ids), S + W)


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_rows_rebase_independently_and_match_the_stream_alone(arch):
    model = tiny_model(arch)
    sched = [((0,), 17), *[((0, 1), 5)] * 10, *[((0, 1), 1)] * 20, ((1,), 24), ((0, 1), 3)]
    streams = {r: ids_for(sum(n for rows, n in sched if r in rows), seed=r) for r in range(2)}
    batch = StreamBatch(engine(model, chunk_size=5), slots=2)
    batch.add(), batch.add()
    batch.cache.position_limit = 30  # force rebases, at different moments per row
    got = run_schedule(batch, streams, sched)
    for r, ids in streams.items():
        alone = engine(model, chunk_size=5).feed(ids)
        close(got[r], alone)
    assert max(batch.cache.pos_shift) < 0  # both rows were rebased


# Mixed forwards (core/mixed.py): each step is one forward of parts (rows, tokens per row), rows
# fed different numbers of tokens: decoding rows beside a chunk, two chunks of different lengths,
# non-contiguous and reversed rows, a row still filling its sinks, one joining with its first chunk.
MIXED = [[((0,), 12)], [((0,), 8)], [((0,), 1), ((1,), 4)], [((0, 1), 1), ((2,), 2)], [((2,), 5), ((1, 0), 1)],
         *[[((0, 1, 2), 1)]] * 3, [((1, 2), 1), ((0,), 7)], [((0, 2), 1), ((3,), 6), ((1,), 3)],
         *[[((0, 1, 2, 3), 1)]] * 4, [((3,), 1), ((0, 2), 3)], [((2, 0, 3, 1), 1)], [((1,), 11), ((0, 2, 3), 1)]]


@pytest.mark.parametrize("arch", ARCHS)
def test_a_mixed_forward_gives_each_row_its_stream_alone(arch):
    model = tiny_model(arch)
    lengths = {r: sum(n for step in MIXED for rows, n in step if r in rows) for r in range(4)}
    streams = {r: ids_for(lengths[r], seed=20 + r) for r in range(4)}
    batch = StreamBatch(engine(model, chunk_size=12), slots=4)
    for _ in range(4):
        batch.add()
    batch.cache.position_limit = 24  # rebases happen inside mixed forwards too
    pos, got = {r: 0 for r in streams}, {r: [] for r in streams}
    for step in MIXED:
        parts = [(rows, torch.stack([streams[r][pos[r] : pos[r] + n] for r in rows]), "all") for rows, n in step]
        for (rows, n), out in zip(step, batch.feed_mixed(parts)):
            for i, r in enumerate(rows):
                got[r].append(out[i])
                pos[r] += n
    for r, ids in streams.items():
        ref = PaperReference(model, sinks=S, window=W, rotary_module=find_rotary_module(model)).feed(ids)
        close(torch.cat(got[r]), ref)
        assert batch.tokens_seen(r) == len(ids)
    assert min(batch.cache.pos_shift) < 0  # some row was rebased


def test_a_mixed_forward_returns_the_logits_each_part_asks_for_and_refuses_bad_parts():
    model = tiny_model("llama")
    batch = StreamBatch(engine(model, chunk_size=8), slots=3)
    rows = [batch.add() for _ in range(3)]
    alone = [engine(model, chunk_size=8) for _ in rows]
    prompts = [ids_for(9 + r, seed=r) for r in rows]
    for r in rows[:2]:
        batch.feed([r], prompts[r][None], logits="none")
        alone[r].feed(prompts[r], logits="none")
    dec = ids_for(2, seed=5)
    last, chunk = batch.feed_mixed([((0, 1), dec[:, None], "last"), ((2,), prompts[2][None, :8], "last")])
    assert last.shape == (2, model.config.vocab_size) and chunk.shape == (1, model.config.vocab_size)
    for r in (0, 1):
        close(last[r], alone[r].feed([int(dec[r])], logits="last"))
    close(chunk[0], alone[2].feed(prompts[2][:8], logits="last"))
    every, none = batch.feed_mixed([((2,), prompts[2][None, 8:], "all"), ((1, 0), dec[:, None], "none")])
    assert none is None and every.shape == (1, 3, model.config.vocab_size)
    close(every[0], alone[2].feed(prompts[2][8:], logits="all"))
    with pytest.raises(UserError, match="appears twice"):
        batch.feed_mixed([((0,), dec[:1, None], "last"), ((0,), dec[:1, None], "last")])
    with pytest.raises(UserError, match="shape"):
        batch.feed_mixed([((2,), ids_for(9, seed=3)[None], "last")])  # more than a chunk
    with pytest.raises(UserError, match="shape"):
        batch.feed_mixed([((), torch.zeros(0, 1), "none")])  # a part of no rows
    with pytest.raises(UserError, match="logits must be"):
        batch.feed_mixed([((2,), dec[None, :1], "first")])
    assert batch.tokens_seen(2) == 11  # refused feeds changed nothing


def test_full_cache_decode_of_many_rows_equals_each_alone():
    """The decode fast path (every row full, one fused kernel, per-row sink rotations)."""
    model = tiny_model("qwen2")
    batch = StreamBatch(engine(model), slots=4)
    rows = [batch.add() for _ in range(4)]
    prompts = [ids_for(12 + 7 * r, seed=r) for r in rows]
    alone = [engine(model) for _ in rows]
    for r in rows:
        batch.feed([r], prompts[r][None])
        alone[r].feed(prompts[r])
    toks = ids_for(4 * 10, seed=99).reshape(10, 4)
    for step in toks:
        out = batch.feed(rows, step[:, None])
        for r in rows:
            close(out[r], alone[r].feed([int(step[r])], logits="last"))


def test_non_contiguous_rows_and_slot_reuse_leave_other_rows_untouched():
    model = tiny_model("llama")
    batch = StreamBatch(engine(model, chunk_size=3), slots=4)
    rows = [batch.add() for _ in range(4)]
    streams = {r: ids_for(40, seed=r) for r in rows}
    ref = {r: engine(model, chunk_size=3).feed(streams[r]) for r in rows}
    got = {r: [] for r in rows}
    for lo in range(0, 20, 4):  # rows 0 and 2 together (not contiguous), then 3 and 1 (reversed)
        for pair in ((0, 2), (3, 1)):
            out = batch.feed(pair, torch.stack([streams[r][lo : lo + 4] for r in pair]), logits="all")
            for i, r in enumerate(pair):
                got[r].append(out[i])
    ptrs = [(layer.keys.data_ptr(), layer.values.data_ptr()) for layer in batch.cache.layers]
    batch.remove(2)  # row 2 leaves; a new stream takes its row
    new = batch.add()
    assert new == 2 and batch.tokens_seen(2) == 0
    fresh = ids_for(25, seed=7)
    close(batch.feed([2], fresh[None], logits="all")[0], engine(model, chunk_size=3).feed(fresh))
    for lo in range(20, 40, 5):
        out = batch.feed([0, 1, 3], torch.stack([streams[r][lo : lo + 5] for r in (0, 1, 3)]), logits="all")
        for i, r in enumerate((0, 1, 3)):
            got[r].append(out[i])
    for r in (0, 1, 3):
        close(torch.cat(got[r]), ref[r])
    assert [(layer.keys.data_ptr(), layer.values.data_ptr()) for layer in batch.cache.layers] == ptrs


def test_a_batched_decode_builds_its_masks_and_indices_once_for_every_layer():
    """Rows at different stages decode together (also in a non-contiguous, reversed order): each
    row equals its stream alone, and the step's mask, ring indices and sink rotations are built
    once and shared by all the layers (`StreamingCache.shared`), not once per layer."""
    model = tiny_model("llama")
    batch = StreamBatch(engine(model), slots=3)
    rows = [batch.add() for _ in range(3)]
    streams = {r: ids_for(30, seed=10 + r) for r in rows}
    schedule = [((0,), 15), ((2,), 2), ((1,), 5), *[((2, 0), 1)] * 4, *[((0, 1, 2), 1)] * 3]
    got = run_schedule(batch, streams, schedule)
    for r in rows:
        close(got[r], engine(model).feed(streams[r][: got[r].shape[0]]))
    assert len(batch.cache.layers) > 1
    kinds = [key[0] for key in batch.cache._shared]  # the last forward's: rows 1 and 2 not yet full
    assert sorted(kinds) == ["mask", "ring", "sinkview"], kinds


def test_a_stream_moves_between_an_engine_and_a_batch_row_exactly():
    model = tiny_model("llama")
    ids = ids_for(60, seed=3)
    ref = engine(model).feed(ids)
    e = engine(model)
    e.feed(ids[:25])
    batch = StreamBatch(engine(model), slots=3)
    batch.add()
    row = batch.add(e.state_dict())  # into a batch slot mid-stream
    part = batch.feed([row], ids[25:45][None], logits="all")[0]
    back = engine(model)
    back.load_state_dict(batch.state(row))  # and out again
    close(part, ref[25:45])
    close(back.feed(ids[45:]), ref[45:])


@pytest.mark.parametrize("arch", ARCHS)
def test_a_stream_copied_buffer_to_buffer_equals_its_snapshot_and_continues_exactly(arch):
    """`add_from` / `copy_out` (the server's attach and detach) copy only the slots a row uses;
    the result is bit-identical to loading the stream's snapshot, whatever the rows held before,
    at every stage: inside the sinks, ring not full, ring wrapped."""
    model = tiny_model(arch)

    def buffers(cache, r):
        return [b[r] for layer in cache.layers for b in (layer.keys, layer.values, layer.sink_keys)]

    for n in (2, S + 3, 5 * (S + W)):
        ids = ids_for(n + 12, seed=n)
        ref = engine(model).feed(ids)
        e = engine(model)
        e.feed(ids[:n])
        batch = StreamBatch(engine(model), slots=2)
        old = batch.add()
        batch.feed([old], ids_for(7 * (S + W), seed=99)[None], logits="none")  # a longer stream was here
        batch.remove(old)
        row = batch.add_from(e)
        want = StreamBatch(engine(model), slots=1)
        want.add(e.state_dict())
        for a, b in zip(buffers(batch.cache, row), buffers(want.cache, 0)):
            assert torch.equal(a, b)
        close(batch.feed([row], ids[n : n + 6][None], logits="all")[0], ref[n : n + 6])
        back = engine(model)
        back.feed(ids_for(9 * (S + W), seed=7))  # the engine's own cache held a longer stream
        batch.make_room(back, row)  # faults in nothing new here, changes nothing
        batch.copy_out(row, back)
        snap = engine(model)
        snap.load_state_dict(batch.state(row))
        for a, b in zip(buffers(back.stream.cache, 0), buffers(snap.stream.cache, 0)):
            assert torch.equal(a, b)
        assert back.tokens_seen == n + 6
        close(back.feed(ids[n + 6 :]), ref[n + 6 :])
        for early in (None, False, True):  # a stream that never fed anything: its cache is allocated on the way out
            fresh = engine(model)
            if early is not None:  # or before, off the model thread (the scheduler's detach), with the
                batch.make_room(fresh, row if early else None)  # row: its slots zero-filled ahead
                assert all(layer.is_initialized for layer in fresh.stream.cache.layers)
                assert not any(bool(b.any()) for b in buffers(fresh.stream.cache, 0))
            batch.copy_out(row, fresh)
            close(fresh.feed(ids[n + 6 :]), ref[n + 6 :])
    with pytest.raises(UserError, match="cannot share a batch"):
        batch.add_from(engine(model, window=W + 1))


def test_batch_refuses_unbounded_methods_and_bad_rows():
    model = tiny_model("llama")
    with pytest.raises(UserError, match="streaming or window"):
        StreamBatch(engine(model, method="dense"), slots=2)
    batch = StreamBatch(engine(model), slots=2)
    row = batch.add()
    with pytest.raises(UserError, match="hold no stream"):
        batch.feed([row, 1], torch.zeros(2, 1, dtype=torch.long))
    with pytest.raises(UserError, match="one row of ids per stream"):
        batch.feed([row], torch.zeros(2, 1, dtype=torch.long))
    batch.add()
    with pytest.raises(UserError, match="slots are in use"):
        batch.add()


def test_decode_step_for_a_batch_allocates_nothing_proportional_to_the_history():
    """The buffers are B x (sinks + window) per layer and stay the same tensors, however long."""
    model = tiny_model("llama")
    batch = StreamBatch(engine(model), slots=2)
    rows = [batch.add(), batch.add()]
    batch.feed(rows, ids_for(40, seed=1).reshape(2, 20))
    ptrs = [layer.keys.data_ptr() for layer in batch.cache.layers]
    for k in range(50):
        batch.feed(rows, ids_for(2, seed=k)[:, None])
    for layer, p in zip(batch.cache.layers, ptrs):
        assert layer.keys.data_ptr() == p and tuple(layer.keys.shape[:3]) == (2, 2, S + W)


@pytest.mark.parametrize("arch", ["llama", "gpt_neox"])
def test_two_engines_run_forwards_on_two_threads_at_once(arch):
    """No hidden state: two engines over the same model, fed concurrently from two threads (their
    forwards interleave layer by layer), give exactly what each gives alone."""
    model = tiny_model(arch)
    streams = [ids_for(120, seed=s) for s in (1, 2)]
    alone = [engine(model, chunk_size=1).feed(ids) for ids in streams]
    results, errors = [None, None], []
    barrier = threading.Barrier(2)

    def work(i):
        try:
            e = engine(model, chunk_size=1)
            barrier.wait()
            results[i] = torch.cat([e.feed(streams[i][k : k + 1]) for k in range(len(streams[i]))])
        except Exception as exc:  # noqa: BLE001 - surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    for got, ref in zip(results, alone):
        close(got, ref, atol=1e-6)


@pytest.mark.parametrize("arch", ARCHS)
def test_bfloat16_kv_ring_stays_close_to_float32_in_every_path(arch):
    """kv_dtype=bfloat16 (the quantized fast path's ring): batched rows at mixed stages, rebases,
    chunks and single tokens, against the float32 ring within bfloat16 rounding; the ring is
    stored in bfloat16, the sinks' originals in float32."""
    model = tiny_model(arch)
    lengths = {r: sum(n for rows, n in SCHEDULE if r in rows) for r in range(3)}
    streams = {r: ids_for(lengths[r], seed=20 + r) for r in range(3)}
    got = {}
    for kv in (None, "bfloat16"):
        batch = StreamBatch(StreamingLLM(model, None, StreamingConfig(sinks=S, window=W, chunk_size=4), kv_dtype=kv),
                            slots=3)
        for _ in range(3):
            batch.add()
        batch.cache.position_limit = 30  # rebases rotate a bfloat16 ring too
        got[kv] = run_schedule(batch, streams, SCHEDULE)
        layer = batch.cache.layers[0]
        assert layer.keys.dtype == (torch.bfloat16 if kv else torch.float32) and layer.sink_keys.dtype == torch.float32
    for r in streams:
        ref = got[None][r]
        close(got["bfloat16"][r], ref, atol=0.03 * ref.abs().max().item())
    alone = StreamingLLM(model, None, StreamingConfig(sinks=S, window=W), kv_dtype="bfloat16")
    assert alone.kv_dtype == torch.bfloat16 and engine(model).kv_dtype is None  # float32 model: exact by default


def test_kv_dtype_auto_follows_quantization_and_rejects_unknown_names():
    from streaming_llm.models.quantize import quantize_linears

    from streaming_llm.core.engine import resolve_kv_dtype

    assert engine(tiny_model("llama")).kv_dtype is None
    quantized = quantize_linears(tiny_model("llama"), "int8")
    recorded = quantized.config.streaming_llm_kv_ring  # what models.kv_ring chose on this machine
    assert recorded in ("bfloat16", "float32")
    assert engine(quantized).kv_dtype == (torch.bfloat16 if recorded == "bfloat16" else None)
    for ring, want in (("bfloat16", torch.bfloat16), ("float32", None)):
        quantized.config.streaming_llm_kv_ring = ring
        assert resolve_kv_dtype(quantized, StreamingConfig(), "auto") == want
        assert resolve_kv_dtype(tiny_model("llama"), StreamingConfig(), "auto") is None
        assert resolve_kv_dtype(quantized, StreamingConfig(recall_blocks=2), "auto") is None
    assert engine(quantized, recall_blocks=2).kv_dtype is None
    with pytest.raises(UserError):
        StreamingLLM(tiny_model("llama"), None, StreamingConfig(), kv_dtype="int3")


def test_a_freed_row_keeps_nothing_of_its_stream():
    """Freeing or moving a row zeroes what the stream wrote (only those slots are touched), so a
    snapshot of the next stream in that row holds none of its keys."""
    model = tiny_model("llama")
    batch = StreamBatch(engine(model), slots=3)
    rows = [batch.add() for _ in range(3)]
    for r, n in zip(rows, (2, S + 3, 5 * (S + W))):  # inside the sinks, ring not full, ring wrapped
        batch.feed([r], ids_for(n, seed=r)[None], logits="none")
    batch.remove(0)
    batch.move(2, 0)  # row 2 leaves its slots behind
    batch.remove(1)
    for layer in batch.cache.layers:
        for buf in (layer.keys, layer.values, layer.sink_keys):
            assert buf[1].abs().sum() == 0 and buf[2].abs().sum() == 0
    assert batch.tokens_seen(0) == 5 * (S + W) and batch.cache.layers[0].keys[0].abs().sum() > 0
