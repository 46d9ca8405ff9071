"""The server's continuous-batching scheduler on raw engines: replies generated on many threads at
once through one batch equal each engine alone; streams leaving from the middle are compacted."""

from __future__ import annotations

import threading

import pytest
import torch

from streaming_llm.core.config import StreamingConfig
from streaming_llm.core.engine import StreamingLLM
from streaming_llm.core.sampling import SamplingParams
from streaming_llm.models.quantize import quantize_linears
from streaming_llm.server.scheduler import Scheduler
from tiny_models import tiny_model

CONFIG = StreamingConfig(sinks=2, window=10, chunk_size=4)


def prompt(seed, n):
    return torch.randint(0, 96, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def reply(engine, seed, n):
    return [t.id for t in engine.generate(prompt(seed, 7 + seed), max_new_tokens=n, sampling=SamplingParams(temperature=0))]


def run_concurrently(sched: Scheduler, run, keys, timeout: float) -> tuple[dict, list]:
    """run(key) for every key, each on a thread of its own; then stop `sched`. Returns (the
    scheduler's stats, the exceptions the threads raised)."""
    errors = []

    def guarded(key):
        try:
            run(key)
        except Exception as exc:  # noqa: BLE001 - handed to the caller
            errors.append(exc)

    threads = [threading.Thread(target=guarded, args=(k,)) for k in keys]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout)
    stats = dict(sched.stats)
    sched.stop()
    return stats, errors


def test_concurrent_replies_through_the_scheduler_equal_each_alone_and_rows_compact():
    model = tiny_model("llama")
    lengths = {0: 30, 1: 6, 2: 25, 3: 12}  # rows 1 and 3 end early: the others move down
    alone = {s: reply(StreamingLLM(model, None, CONFIG), s, n) for s, n in lengths.items()}
    sched = Scheduler(StreamingLLM(model, None, CONFIG), slots=4, gather_ms=20)
    got = {}
    engines = {s: StreamingLLM(model, None, CONFIG) for s in lengths}
    for s in lengths:  # rows 0..3 in this order: the short replies leave holes at rows 1 and 3
        sched.attach(engines[s])

    def run(seed):
        e = engines[seed]
        got[seed] = reply(e, seed, lengths[seed])
        sched.detach(e)
        assert e.feeder is None and e.tokens_seen == 7 + seed + lengths[seed]

    stats, errors = run_concurrently(sched, run, lengths, 120)
    assert not errors, errors
    assert got == alone
    assert stats["max_batch_size"] >= 2 and stats["decode_tokens"] > stats["decode_steps"]
    assert stats["row_moves"] >= 1  # a stream left from the middle and the rows were compacted
    assert sched.batch.active == []


def test_move_keeps_the_stream_exact():
    from streaming_llm.core.batch import StreamBatch

    model = tiny_model("qwen2")
    ids = torch.tensor(prompt(5, 40))
    ref = StreamingLLM(model, None, CONFIG).feed(ids)
    batch = StreamBatch(StreamingLLM(model, None, CONFIG), slots=3)
    a, b = batch.add(), batch.add()
    first = batch.feed([b], ids[:25][None], logits="all")[0]
    batch.remove(a)
    batch.move(b, a)
    rest = batch.feed([a], ids[25:][None], logits="all")[0]
    assert (torch.cat([first, rest]) - ref).abs().max() < 1e-5 and batch.active == [0]


@pytest.mark.parametrize("ride", [False, True])
@pytest.mark.parametrize("wide", [False, True])
def test_a_prompt_arriving_while_a_row_decodes_rides_in_its_forward_or_follows_it_and_both_stay_exact(wide, ride):
    """By default the chunk runs in a forward of its own after the decode step; with ride_chunks it
    rides in the decode step (float32), or, where that would change a kernel (int8 with a wide copy
    from 2 tokens per stream), still runs apart: exact every way."""
    model = tiny_model("llama")
    if wide:
        quantize_linears(model, "int8", wide_rows=2)
    sched = Scheduler(StreamingLLM(model, None, CONFIG), slots=3, **({"ride_chunks": True} if ride else {}))
    a, b = StreamingLLM(model, None, CONFIG), StreamingLLM(model, None, CONFIG)
    ref_a, ref_b = StreamingLLM(model, None, CONFIG), StreamingLLM(model, None, CONFIG)
    row_a, row_b = sched.attach(a), sched.attach(b)
    pa, pb = torch.tensor(prompt(1, 9)), torch.tensor(prompt(2, 11))
    assert torch.allclose(row_a.feed(pa, "last"), ref_a.feed(pa, logits="last"), atol=1e-5)
    held, release = threading.Event(), threading.Event()

    def hold():  # keeps the model thread busy until both requests below are queued
        held.set()
        release.wait(30)

    blocker = threading.Thread(target=sched.call, args=(hold,))
    blocker.start()
    assert held.wait(30)
    fa, fb = sched.submit(row_a, torch.tensor([5]), "last"), sched.submit(row_b, pb, "all")
    release.set()
    got_a, got_b = fa.result(60), fb.result(60)
    blocker.join(30)
    stats = dict(sched.stats)
    sched.stop()
    assert stats["mixed_steps"] == (1 if ride and not wide else 0)  # b's first chunk (of 3) rode in a's decode step
    assert stats["prefill_chunks"] == 3 + 3 and stats["decode_tokens"] == 1  # a's prompt, then b's
    assert torch.allclose(got_a, ref_a.feed([5], logits="last"), atol=1e-5)
    assert torch.allclose(got_b, ref_b.feed(pb, logits="all"), atol=1e-5)


def test_prompts_waiting_together_share_a_forward_and_each_stays_exact():
    """Prompts pending at once (a burst of new sessions) go in one forward, each at the chunk
    boundaries it has alone; each reply equals its engine alone, bit for bit."""
    import time

    model = tiny_model("llama")
    config = StreamingConfig(sinks=2, window=10, chunk_size=16)
    seeds = (0, 1, 2, 3)
    alone = {s: reply(StreamingLLM(model, None, config), s, 8) for s in seeds}
    sched = Scheduler(StreamingLLM(model, None, config), slots=4, gather_ms=20)
    engines = {s: StreamingLLM(model, None, config) for s in seeds}
    for s in seeds:
        sched.attach(engines[s])
    got, blocked = {}, threading.Event()
    blocker = threading.Thread(target=lambda: sched.call(lambda: (blocked.set(), time.sleep(0.5))))
    blocker.start()
    blocked.wait(5)  # the model thread is busy: every prompt below is pending when it is free

    def run(seed):
        got[seed] = reply(engines[seed], seed, 8)

    stats, errors = run_concurrently(sched, run, seeds, timeout=60)
    blocker.join()
    assert not errors
    assert got == alone
    assert stats["prefill_shared"] >= 2  # 7..10-token prompts, 16 tokens a forward: two or more shared one
