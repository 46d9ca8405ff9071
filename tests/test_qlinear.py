"""The native quantized linear (models/qlinear.c through models/native.py, packed by
models/quantize.py): the arithmetic its header states, the fast path (AVX512-VNNI or AVX2) giving the plain-C
path's bits, each row's bits independent of the other rows and of the thread count, QuantLinear
using it where it runs and torch's packed kernels where it declines."""

from __future__ import annotations

import os
import shutil

import pytest
import torch

from streaming_llm.models import native
from streaming_llm.models.quantize import QuantLinear, native_layout, pack_native

needs_cc = pytest.mark.skipif(shutil.which(os.environ.get("CC", "cc")) is None,
                              reason="no C compiler (cc): the native kernels cannot be built here")
needs_fast = pytest.mark.skipif(not native.linear_available(),
                                reason=f"the native linear does not run here: {native.linear_status()}")


def int4_case(n, k, seed=0):
    """(codes (N, K) 0..15, scale (N, K/32), mins (N, K/32)) of a random weight, as QuantLinear makes them."""
    w = torch.randn(n, k, generator=torch.Generator().manual_seed(seed)) * 0.05
    g = w.view(n, k // 32, 32)
    lo, hi = g.amin(-1), g.amax(-1)
    scale = (hi - lo) / 15
    codes = torch.round((g - lo[..., None]) / scale[..., None]).clamp(0, 15).to(torch.int32).view(n, k)
    return codes, scale, lo


def int8_case(n, k, seed=0):
    w = torch.randn(n, k, generator=torch.Generator().manual_seed(seed)) * 0.05
    scale = w.abs().amax(1) / 127
    q = torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int32)
    return q + 128, scale, -128 * scale


def reference(x, codes, scale, mins, bits):
    """The header's arithmetic in float64: int8 codes of x per group of 32, exact integer sums,
    then a * s * sum + mins * b per group (scales and minimums as float16 holds them)."""
    m, k = x.shape
    g = k // 32
    xg = x.view(m, g, 32)
    mx = xg.abs().amax(-1)
    inv = torch.where(mx > 0, 127 / mx, torch.zeros_like(mx))
    xq = torch.round(xg * inv[..., None]).double()  # (M, G, 32); float32 product, rounded half to even
    a = (mx / 127).double()
    b = a * xq.sum(-1)
    s, lo = scale.half().double(), mins.half().double()
    if bits == 8:
        s, lo = s[:, None].expand(-1, g), lo[:, None].expand(-1, g)
    isum = torch.einsum("mgi,ngi->mng", xq, codes.view(-1, g, 32).double())  # (M, N, G), exact
    return (isum * s[None] * a[:, None, :] + lo[None] * b[:, None, :]).sum(-1)


@needs_cc
@pytest.mark.parametrize("bits", [4, 8])
def test_the_plain_c_path_computes_the_stated_arithmetic(bits):
    codes, scale, mins = (int4_case if bits == 4 else int8_case)(48, 96)
    packed = native_layout(codes, scale, mins, bits)
    x = torch.randn(5, 96, generator=torch.Generator().manual_seed(1))
    y = native.linear(x, *packed, bits == 4, bits, 48, portable=True)
    torch.testing.assert_close(y.double(), reference(x, codes, scale, mins, bits), rtol=1e-5, atol=1e-6)


@needs_fast
@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("m", [1, 2, 3, 4, 5, 6, 7, 8, 13, 40])  # every block size the fast paths unroll (AVX512: 1-8 rows, AVX2: 1-4)
def test_the_fast_path_gives_the_plain_c_paths_bits(bits, m):
    codes, scale, mins = (int4_case if bits == 4 else int8_case)(64, 160, seed=m)
    packed = native_layout(codes, scale, mins, bits)
    x = torch.randn(m, 160, generator=torch.Generator().manual_seed(m)) * 3
    fast = native.linear(x, *packed, bits == 4, bits, 64)
    assert torch.equal(fast, native.linear(x, *packed, bits == 4, bits, 64, portable=True))


@needs_fast
@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("sign", [1, -1])
def test_the_largest_integer_sums_do_not_saturate(bits, sign):
    """The extremes of the header's bound: every code at its maximum (15; 255) and every input
    code at +-127 (AVX2 sums byte products in int16 pairs: 8 pair sums of 15 * 127 * 2 = 30,480
    per slot, below 2^15). A saturating path would differ from the plain C path and from the
    exact sum; with one row and with a block of several."""
    n, k = 32, 64
    codes = torch.full((n, k), 15 if bits == 4 else 255, dtype=torch.int32)
    scale = torch.full((n, k // 32), 0.01) if bits == 4 else torch.full((n,), 0.01)
    mins = torch.zeros_like(scale) if bits == 4 else -128 * scale
    packed = native_layout(codes, scale, mins, bits)
    for m in (1, 5):
        x = torch.full((m, k), float(sign))  # each group's codes: all +-127
        fast = native.linear(x, *packed, bits == 4, bits, n)
        assert torch.equal(fast, native.linear(x, *packed, bits == 4, bits, n, portable=True))
        torch.testing.assert_close(fast.double(), reference(x, codes, scale, mins, bits), rtol=1e-6, atol=1e-6)


@needs_fast
def test_a_rows_bits_do_not_depend_on_the_other_rows_or_the_threads():
    codes, scale, mins = int4_case(192, 576)
    packed = native_layout(codes, scale, mins, 4)
    x = torch.randn(11, 576, generator=torch.Generator().manual_seed(2))
    together = native.linear(x, *packed, True, 4, 192)
    for i in (0, 7, 10):
        assert torch.equal(native.linear(x[i:i + 1], *packed, True, 4, 192), together[i:i + 1])
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        assert torch.equal(native.linear(x, *packed, True, 4, 192), together)
    finally:
        torch.set_num_threads(threads)
    # a strided view of the rows (every other row) reads the same numbers
    assert torch.equal(native.linear(x[::2], *packed, True, 4, 192), together[::2])


@needs_fast
@pytest.mark.parametrize("bits", [4, 8])
def test_quant_linear_uses_it_and_stays_close_to_the_float_layer(bits):
    lin = torch.nn.Linear(576, 320, bias=True)
    q = QuantLinear(lin, bits)
    assert q.native and "native" in repr(q)
    x = torch.randn(2, 3, 576)
    with torch.no_grad():
        y, ref = q(x), lin(x)
    assert y.shape == ref.shape and y.dtype == torch.float32
    assert float((y - ref).norm() / ref.norm()) < (0.12 if bits == 4 else 0.02)
    # a decode row (1 token) equals the same token inside a chunk: each row is its own
    assert torch.equal(q(x[:, 1:2]), y[:, 1:2])
    assert q(x[:, :0]).shape == (2, 0, 320)  # no rows in, none out


@needs_fast
def test_shapes_and_scales_it_cannot_hold_keep_torchs_kernels():
    assert pack_native(*int4_case(40, 64), 4) is None  # 40 outputs: not whole tiles of 16
    codes, scale, mins = int4_case(32, 64)
    assert pack_native(codes, scale * 1e-4, mins, 4) is None  # scales below float16's normal range
    lin = torch.nn.Linear(64, 48, bias=False)
    with torch.no_grad():
        lin.weight.mul_(1e-4)  # group scales of about 1e-6
        q = QuantLinear(lin, 4)
        assert not q.native and "native" not in repr(q)
        x = torch.randn(4, 64)
        assert float((q(x) - lin(x)).norm() / lin(x).norm()) < 0.12


def test_status_names_the_linear_kernel():
    status = native.linear_status()
    assert status.startswith(("native (AVX512-VNNI)", "native (AVX2)", "torch packed kernels"))
    assert native.linear_available() == status.startswith("native")


def test_native_off_by_environment_turns_the_linear_off_too(monkeypatch):
    monkeypatch.setenv(native.ENV, "0")
    native._library.cache_clear()
    try:
        assert not native.linear_available()
        assert native.linear_status() == f"torch packed kernels ({native.ENV}=0)"
        assert not QuantLinear(torch.nn.Linear(64, 32), 4).native
    finally:
        native._library.cache_clear()
