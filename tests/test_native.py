"""The native decode attention (models/native.py, models/decode_attention.c): what torch's SDPA computes,
each row's bits independent of the other rows and of the thread count, the cases it declines, and
the engine falling back to SDPA where the kernel is not available."""

from __future__ import annotations

import os
import shutil

import pytest
import torch
import torch.nn.functional as F

from streaming_llm.models import native
from streaming_llm.core.batch import StreamBatch
from streaming_llm.core.config import StreamingConfig
from streaming_llm.core.engine import StreamingLLM
from tiny_models import tiny_model

needs_cc = pytest.mark.skipif(shutil.which(os.environ.get("CC", "cc")) is None,
                              reason="no C compiler (cc): the native decode attention cannot be built here")


def sdpa_rows(q, k, v, lengths, scale):
    return torch.cat([F.scaled_dot_product_attention(q[i:i + 1], k[i:i + 1, :, :n], v[i:i + 1, :, :n], scale=scale,
                                                     enable_gqa=True) for i, n in enumerate(lengths)])


def case(b, hq, hkv, d, n, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, 1, hq, d, generator=g).transpose(1, 2)  # the layout a model's projection gives
    return q, torch.randn(b, hkv, n, d, generator=g), torch.randn(b, hkv, n, d, generator=g)


@needs_cc
def test_the_kernel_is_built_and_used_here():
    assert native.status().startswith("native ("), native.status()


@needs_cc
@pytest.mark.parametrize("b,hq,hkv,d,n,lengths", [
    (1, 9, 3, 64, 1024, [1024]), (3, 9, 3, 64, 300, [1, 150, 300]), (4, 4, 4, 16, 50, [7, 50, 33, 2]),
    (2, 8, 2, 80, 70, [70, 69]), (2, 16, 1, 32, 5000, [4999, 5000]), (1, 4, 2, 128, 33, [33]),
])
def test_it_computes_what_sdpa_computes(b, hq, hkv, d, n, lengths):
    q, k, v = case(b, hq, hkv, d, n)
    got = native.decode(q, k, v, lengths, d ** -0.5)
    assert got is not None and got.shape == (b, hq, 1, d)
    torch.testing.assert_close(got, sdpa_rows(q, k, v, lengths, d ** -0.5), atol=2e-6, rtol=1e-5)


@needs_cc
def test_a_rows_bits_do_not_depend_on_the_other_rows_or_the_threads():
    q, k, v = case(6, 9, 3, 64, 400, seed=1)
    lengths = [400, 13, 257, 1, 399, 128]
    threads = torch.get_num_threads()
    together = native.decode(q, k, v, lengths, 0.125)
    try:
        torch.set_num_threads(1)
        one_thread = native.decode(q, k, v, lengths, 0.125)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(together, one_thread)
    for i, n in enumerate(lengths):
        alone = native.decode(q[i:i + 1].contiguous(), k[i:i + 1, :, :n].contiguous(), v[i:i + 1, :, :n].contiguous(),
                              [n], 0.125)
        assert torch.equal(together[i:i + 1], alone)


@needs_cc
def test_it_declines_what_it_does_not_do():
    q, k, v = case(2, 9, 3, 64, 40)
    assert native.decode(q.bfloat16(), k.bfloat16(), v.bfloat16(), [40, 40], 0.125) is None  # bfloat16 ring
    assert native.decode(torch.randn(2, 9, 3, 64), k, v, [40, 40], 0.125) is None  # a chunk of 3 queries
    assert native.decode(q, k, v, [41, 40], 0.125) is None and native.decode(q, k, v, [0, 40], 0.125) is None
    assert native.decode(q, k, v[:, :, :, :32], [40, 40], 0.125) is None  # keys and values differ in shape
    assert native.decode(*case(1, 34, 2, 64, 8)[:3], [8], 0.125) is None  # 17 query heads per KV head
    assert native.decode(*case(1, 2, 2, 512, 8)[:3], [8], 0.125) is None  # head dimension past the C limit
    assert native.decode(*case(1, 2, 2, 24, 8)[:3], [8], 0.125) is None  # nor a multiple of 16
    with torch.enable_grad():
        assert native.decode(q.clone().requires_grad_(), k, v, [40, 40], 0.125) is None


def test_without_a_compiler_it_says_so_and_streams_fall_back_to_sdpa_exactly(monkeypatch):
    monkeypatch.setenv("CC", "/nonexistent/cc")
    native._library.cache_clear()
    try:
        assert native.status().startswith("torch SDPA (no C compiler")
        q, k, v = case(2, 9, 3, 64, 40)
        assert native.decode(q, k, v, [40, 40], 0.125) is None
        # the engine still decodes, and a row in a batch still equals its stream alone (to float32
        # rounding: this tiny model's float32 linears round differently for 1 and 2 rows; the bits are
        # tests/test_real_batch.py's, on the quantized default model)
        model = tiny_model("llama")
        config = StreamingConfig(sinks=2, window=10)
        batch = StreamBatch(StreamingLLM(model, None, config), slots=2)
        rows, alone = [batch.add(), batch.add()], [StreamingLLM(model, None, config) for _ in range(2)]
        gen = torch.Generator().manual_seed(3)
        for r, n in zip(rows, (5, 17)):
            prompt = torch.randint(0, 96, (n,), generator=gen)
            batch.feed([r], prompt[None])
            alone[r].feed(prompt)
        for step in torch.randint(0, 96, (8, 2), generator=gen):
            out = batch.feed(rows, step[:, None])
            for r in rows:
                torch.testing.assert_close(out[r], alone[r].feed([int(step[r])], logits="last"), atol=1e-4, rtol=0)
    finally:
        native._library.cache_clear()


def test_native_off_by_environment(monkeypatch):
    monkeypatch.setenv(native.ENV, "0")
    native._library.cache_clear()
    try:
        assert native.status() == f"torch SDPA ({native.ENV}=0)"
    finally:
        native._library.cache_clear()


@needs_cc
def test_a_damaged_build_in_the_cache_is_built_again(tmp_path):
    import subprocess
    import sys

    env = {**os.environ, "STREAMING_LLM_CACHE": str(tmp_path), native.ENV: "1"}
    code = "from streaming_llm.models import native; print(native.status())"
    first = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    (built,) = (tmp_path / "native").glob("*.so")
    built.write_bytes(b"not a shared library")
    again = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    assert first.startswith("native (") and again == first and built.stat().st_size > 1000
