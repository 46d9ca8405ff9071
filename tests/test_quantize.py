"""Weight-only int8/int4 linears: exact on 4-bit-grid weights, close otherwise, usable by the engine."""

import pytest
import torch
from torch import nn

from streaming_llm.core.config import StreamingConfig
from streaming_llm.core.engine import StreamingLLM
from streaming_llm.models.quantize import GROUP, QuantLinear, fp16_gemm_available, quantize_linears
from tiny_models import tiny_model


def grid_linear(n=48, k=96, seed=0):
    """A Linear whose weights are Q4_1-style: per group of 32, scale * q + min with q in 0..15."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randint(0, 16, (n, k // GROUP, GROUP), generator=g).float()
    q[..., 0], q[..., 1] = 0, 15  # every group spans the full range, as GGUF Q4_1 blocks do
    scale = torch.rand(n, k // GROUP, 1, generator=g) * 0.1 + 0.01
    lo = torch.randn(n, k // GROUP, 1, generator=g) * 0.1
    lin = nn.Linear(k, n, bias=True)
    with torch.no_grad():
        lin.weight.copy_((q * scale + lo).view(n, k))
    return lin


def test_int4_reproduces_4bit_grid_weights_to_bf16_precision():
    """Weights already on a Q4_1 grid come back up to bf16 rounding; arbitrary weights do not."""
    eye = torch.eye(96)
    grid = grid_linear()
    err = (QuantLinear(grid, 4)(eye).t() - grid.bias[:, None] - grid.weight).abs().max()
    assert err < 2 ** -7 * grid.weight.abs().max()  # bf16 scales and bf16 outputs: two roundings
    rough = nn.Linear(96, 48)
    err_rough = (QuantLinear(rough, 4)(eye).t() - rough.bias[:, None] - rough.weight).abs().max()
    assert err_rough / rough.weight.abs().max() > 4 * err / grid.weight.abs().max()


def test_int8_is_close():
    lin = nn.Linear(64, 40)
    x = torch.randn(3, 64)
    ref = lin(x)
    assert (QuantLinear(lin, 8)(x) - ref).abs().max() < 0.01 * ref.abs().max()


def test_quantized_model_streams_and_stays_close():
    model = tiny_model("llama")
    ids = torch.randint(0, 96, (40,), generator=torch.Generator().manual_seed(3))
    ref = StreamingLLM(model, None, StreamingConfig(sinks=2, window=8)).feed(ids)
    q = quantize_linears(tiny_model("llama"), "int8")
    assert any(isinstance(m, QuantLinear) for m in q.modules())
    out = StreamingLLM(q, None, StreamingConfig(sinks=2, window=8, chunk_size=5)).feed(ids)
    assert (out - ref).abs().max() < 0.05 * ref.abs().max()


def test_auto_quantizes_only_models_whose_weights_are_already_4bit():
    from streaming_llm.models.quantize import resolve_mode

    model = tiny_model("llama")
    assert resolve_mode(model, "auto") == "none"
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.Linear) and m is not model.get_output_embeddings():
                m.weight.copy_(grid_linear(*m.weight.shape).weight)
    assert resolve_mode(model, "auto") == "int4"


# ---- --quant auto by measurement (models/calibrate.py) ---------------------------------------
def _grid_model():
    model = tiny_model("llama")
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.Linear) and m is not model.get_output_embeddings():
                m.weight.copy_(grid_linear(*m.weight.shape).weight)
    return model


def test_auto_calibration_is_measured_once_cached_and_forced_again(tmp_path, monkeypatch, capsys):
    from streaming_llm.models import calibrate

    monkeypatch.setenv("STREAMING_LLM_CACHE", str(tmp_path))
    monkeypatch.delenv(calibrate.RECALIBRATE_ENV, raising=False)
    monkeypatch.setattr(calibrate, "quiet", lambda threads: (True, 0.0))
    model = _grid_model()
    first = calibrate.calibrate(model)
    assert first["source"] == "measured" and set(first["timings_ms"]) == {"int4", "int8", "none"}
    assert (first["wide_rows"], first["wide_kind"]) == calibrate.choose_wide(first["wide_timings_ms"])
    assert first["choice"] in ("int4", "none") and first["allowed"] == ["int4", "none"]  # int8 is never chosen
    files = list((tmp_path / "calibration").glob("quant-*.json"))
    assert [str(f) for f in files] == [first["path"]]
    assert "timing int4, int8 and float32" in capsys.readouterr().err
    again = calibrate.calibrate(model)
    assert again["source"] == "cache" and again["timings_ms"] == first["timings_ms"]
    assert capsys.readouterr().err == ""  # nothing timed, nothing said
    monkeypatch.setenv(calibrate.RECALIBRATE_ENV, "1")
    assert calibrate.calibrate(model)["source"] == "measured"
    monkeypatch.delenv(calibrate.RECALIBRATE_ENV)
    # quantize_linears(auto) goes through the cache and records what it did
    q = quantize_linears(_grid_model(), "auto")
    info = q.config.streaming_llm_quant_calibration
    assert info["source"] == "cache" and getattr(q.config, "streaming_llm_quant", "none") == info["choice"]
    assert info["wide_kind"] == first["wide_kind"]  # the wide copy's kind travels with its row count
    assert (first["head_wide_rows"], first["head_wide_kind"]) == calibrate.choose_wide(first["head_timings_ms"])
    head = q.get_output_embeddings()
    if info["choice"] != "none":  # the tiny model may time fastest as it is
        assert info["head_wide_rows"] == head.wide_rows
        assert head.wide_rows is None or head.wide_kind == info["head_wide_kind"]


def test_calibration_taken_while_busy_is_redone_when_quiet(tmp_path, monkeypatch):
    from streaming_llm.models import calibrate

    monkeypatch.setenv("STREAMING_LLM_CACHE", str(tmp_path))
    monkeypatch.delenv(calibrate.RECALIBRATE_ENV, raising=False)
    model = _grid_model()
    monkeypatch.setattr(calibrate, "quiet", lambda threads: (False, 2.0))
    assert calibrate.calibrate(model)["source"] == "measured"
    assert calibrate.calibrate(model)["source"] == "cache"  # still busy: the busy result is reused
    monkeypatch.setattr(calibrate, "quiet", lambda threads: (True, 0.0))
    entry = calibrate.calibrate(model)
    assert entry["source"] == "measured" and entry["quiet"] is True
    assert calibrate.calibrate(model)["source"] == "cache"


def test_auto_without_calibration_keeps_the_rule(tmp_path, monkeypatch):
    from streaming_llm.models import calibrate

    monkeypatch.setenv("STREAMING_LLM_CACHE", str(tmp_path))
    assert calibrate.choose_auto(tiny_model("llama")) == "none"  # float weights: nothing but none is allowed
    assert not (tmp_path / "calibration").exists()
    monkeypatch.setenv(calibrate.CALIBRATE_ENV, "0")
    assert calibrate.choose_auto(_grid_model()) == "int4"  # turned off: the rule
    monkeypatch.delenv(calibrate.CALIBRATE_ENV)

    def broken(*a, **k):
        raise RuntimeError("no int4 kernel here")

    monkeypatch.setattr(calibrate, "time_modes", broken)
    assert calibrate.choose_auto(_grid_model()) == "int4"  # a failed measurement: the rule
    assert not list(tmp_path.glob("calibration/*.json"))


def test_time_wide_switches_the_decoder_linears_and_keeps_the_head_packed():
    """The bug fixed at review on 2026-12-03: the head got the wide path in every column."""
    from streaming_llm.models import calibrate

    model = _grid_model()
    copies, linears = calibrate.wide_copies(model, "int4", calibrate.wide_kinds())
    for kind, m in copies.items():
        head = m.get_output_embeddings()
        assert isinstance(head, QuantLinear) and head.wide is None and head not in linears[kind]
        decoder = [q for q in m.modules() if isinstance(q, QuantLinear) and q is not head]
        assert decoder and all(q.wide is not None and q.wide_kind == kind for q in decoder)
        assert len(linears[kind]) == len(decoder)


# ---- the ring dtype that pays on this CPU (models/kv_ring.py) --------------------------------
def test_kv_ring_picks_bfloat16_only_where_its_attention_is_faster():
    from streaming_llm.models import kv_ring

    assert kv_ring.pick({"bfloat16": {"1": 0.1, "8": 0.5}, "float32": {"1": 0.2, "8": 0.9}}) == "bfloat16"
    # the AMD EPYC with AVX512-BF16 and no AMX: bfloat16 4.5x slower at 8 rows
    assert kv_ring.pick({"bfloat16": {"1": 0.51, "8": 4.46}, "float32": {"1": 0.1, "8": 1.0}}) == "float32"
    t = kv_ring.time_rings(tiny_model("llama"), slots=64, reps=2, warmup=1)
    assert set(t) == {"bfloat16", "float32"} and all(set(v) == {"1", "8"} for v in t.values())
    assert all(ms > 0 for v in t.values() for ms in v.values())


def test_kv_ring_is_measured_once_cached_and_recorded_by_quantize(tmp_path, monkeypatch):
    from streaming_llm.models import calibrate, kv_ring

    monkeypatch.setenv("STREAMING_LLM_CACHE", str(tmp_path))
    monkeypatch.delenv(calibrate.RECALIBRATE_ENV, raising=False)
    monkeypatch.setattr(calibrate, "quiet", lambda threads: (True, 0.0))
    monkeypatch.setattr(kv_ring, "cpu_has_native_bfloat16", lambda: True)
    timed = []
    fake = {"bfloat16": {"1": 1.0, "8": 9.0}, "float32": {"1": 0.5, "8": 2.0}}
    monkeypatch.setattr(kv_ring, "time_rings", lambda model: timed.append(1) or fake)
    model = tiny_model("llama")
    first = kv_ring.choose(model)
    assert first["source"] == "measured" and first["choice"] == "float32" and first["timings_ms"] == fake
    assert [str(f) for f in (tmp_path / "calibration").glob("kv-*.json")] == [first["path"]]
    assert kv_ring.choose(model)["source"] == "cache" and len(timed) == 1
    monkeypatch.setenv(calibrate.RECALIBRATE_ENV, "1")
    assert kv_ring.choose(model)["source"] == "measured" and len(timed) == 2
    monkeypatch.delenv(calibrate.RECALIBRATE_ENV)
    q = quantize_linears(tiny_model("llama"), "int8")  # reads the cached choice
    assert q.config.streaming_llm_kv_ring == "float32" and q.config.streaming_llm_kv_ring_calibration["source"] == "cache"
    assert StreamingLLM(q, None, StreamingConfig(sinks=2, window=8)).kv_dtype is None  # what was measured
    monkeypatch.setenv(calibrate.CALIBRATE_ENV, "0")  # off: the flag rule, nothing timed
    assert kv_ring.choose(model) == {"choice": "bfloat16", "source": "rule"} and len(timed) == 2
    monkeypatch.delenv(calibrate.CALIBRATE_ENV)
    monkeypatch.setattr(kv_ring, "cpu_has_native_bfloat16", lambda: False)  # AVX2 only: float32, untimed
    assert kv_ring.choose(model) == {"choice": "float32", "source": "rule"} and len(timed) == 2


def test_calibration_key_depends_on_threads_and_shapes(tmp_path, monkeypatch):
    from streaming_llm.models import calibrate

    monkeypatch.setenv("STREAMING_LLM_CACHE", str(tmp_path))
    n = torch.get_num_threads()
    a = calibrate.cache_path(calibrate.machine_key(tiny_model("llama")))
    b = calibrate.cache_path(calibrate.machine_key(tiny_model("llama", num_hidden_layers=3)))
    try:
        torch.set_num_threads(1 if n > 1 else 2)
        c = calibrate.cache_path(calibrate.machine_key(tiny_model("llama")))
    finally:
        torch.set_num_threads(n)
    assert len({a, b, c}) == 3 and a.parent == tmp_path / "calibration"


# ---- bfloat16 linears and the wide path for many-row inputs -----------------------------------
def test_bf16_format_and_wide_path_are_close_and_switch_on_rows():
    lin = grid_linear()
    x = torch.randn(6, 96, generator=torch.Generator().manual_seed(1))
    ref = lin(x)
    bf16 = QuantLinear(lin, 16)(x)
    assert bf16.dtype == torch.float32 and (bf16 - ref).abs().max() < 0.01 * ref.abs().max()
    packed, wide = QuantLinear(lin, 4), QuantLinear(lin, 4, wide_rows=4)
    assert torch.equal(wide(x[:3]), packed(x[:3]))  # fewer rows than wide_rows: the int4 kernel
    assert torch.equal(wide(x), bf16)  # from 4 rows on: the bfloat16 copy
    assert torch.equal(wide(x[None]), bf16[None])  # any leading shape
    assert QuantLinear(lin, 16, wide_rows=4).wide is None  # nothing to widen
    with pytest.raises(ValueError, match="wide_kind"):
        QuantLinear(lin, 4, wide_rows=4, wide_kind="fp8")


@pytest.mark.skipif(not fp16_gemm_available(), reason="this torch build has no FBGEMM float16 linear")
def test_fp16_wide_path_is_float16_weights_on_bfloat16_rounded_inputs():
    lin = grid_linear()
    x = torch.randn(6, 96, generator=torch.Generator().manual_seed(1))
    packed, wide = QuantLinear(lin, 4), QuantLinear(lin, 4, wide_rows=4, wide_kind="fp16")
    assert torch.equal(wide(x[:3]), packed(x[:3]))  # fewer rows than wide_rows: the int4 kernel
    # from 4 rows on: float16 weights, float32 arithmetic, the input rounded as the kernels round it
    want = x.to(torch.bfloat16).float() @ lin.weight.detach().half().float().T + lin.bias.detach()
    assert torch.allclose(wide(x), want, atol=1e-4, rtol=1e-4)
    assert (wide(x) - packed(x)).abs().max() < 0.01 * want.abs().max()  # both are the same grid weights
    rows = torch.cat([wide(x[i:i + 4]) for i in (0, 2)])  # a row's numbers do not depend on its neighbours
    assert torch.allclose(rows[:4], wide(x)[:4], atol=1e-5) and torch.allclose(rows[4:], wide(x)[2:], atol=1e-5)
    assert "fp16 from 4 tokens per stream" in repr(wide)


def test_quantize_linears_bf16_and_wide_rows_stream_close():
    model = tiny_model("llama")
    ids = torch.randint(0, 96, (40,), generator=torch.Generator().manual_seed(3))
    ref = StreamingLLM(model, None, StreamingConfig(sinks=2, window=8)).feed(ids)
    cases = [("bf16", None, "bf16"), ("int8", 2, "bf16")] + [("int8", 2, "fp16")] * fp16_gemm_available()
    for mode, wide, kind in cases:
        q = quantize_linears(tiny_model("llama"), mode, wide_rows=wide, wide_kind=kind)
        assert q.config.streaming_llm_wide_rows == wide
        assert q.config.streaming_llm_wide_kind == (kind if wide else None)
        assert all(m.bits == (16 if mode == "bf16" else 8) for m in q.modules() if isinstance(m, QuantLinear))
        out = StreamingLLM(q, None, StreamingConfig(sinks=2, window=8, chunk_size=5)).feed(ids)
        assert (out - ref).abs().max() < 0.05 * ref.abs().max()


def test_wide_rows_is_the_start_of_the_run_where_bf16_wins():
    from streaming_llm.models.calibrate import choose_wide, time_wide, wide_kinds, wide_rows_from

    assert wide_rows_from({1: [1, 3], 2: [1, 2], 4: [2, 1], 8: [4, 1]}) == 4
    assert wide_rows_from({1: [1, 3], 4: [2, 1], 8: [1, 2]}) is None  # not faster at the largest count
    assert wide_rows_from({1: [1, 0.5], 2: [1, 2], 4: [2, 1]}) == 4  # a lone early win does not count
    # of the kinds that win from some count on, the fastest at the most rows, from its own start
    # (a tie there: the earlier start); JSON keys
    t = {"2": {"packed": 1, "bf16": 3, "fp16": 0.5}, "8": {"packed": 4, "bf16": 1, "fp16": 2}}
    assert choose_wide(t) == (8, "bf16")
    t["8"]["bf16"] = 2
    assert choose_wide(t) == (2, "fp16")
    t["8"]["bf16"] = 4  # no longer wins anywhere: not a candidate however fast it is at 2 rows
    t["2"]["bf16"] = 0.1
    assert choose_wide(t) == (2, "fp16")
    t["8"]["fp16"] = 4
    assert choose_wide(t) == (None, None) and choose_wide({}) == (None, None)
    timings = time_wide(_grid_model(), "int4", rows=(1, 8), reps=1)
    kinds = {"packed", *wide_kinds()}
    assert set(timings) == {1, 8} and all(set(v) == kinds and min(v.values()) > 0 for v in timings.values())


@pytest.mark.parametrize("fp16, amx, kinds", [(True, False, ["fp16"]), (True, True, ["fp16", "bf16"]),
                                               (False, False, ["bf16"]), (False, True, ["bf16"])])
def test_calibration_offers_bfloat16_beside_float16_only_on_amx(monkeypatch, fp16, amx, kinds):
    from streaming_llm.models import calibrate, quantize

    monkeypatch.setattr(quantize, "fp16_gemm_available", lambda: fp16)
    monkeypatch.setattr(quantize, "amx_available", lambda: amx)
    assert calibrate.wide_kinds() == kinds


def test_the_head_has_its_own_wide_path_timed_alone_from_one_row():
    from streaming_llm.models.calibrate import time_head, wide_kinds

    kind = wide_kinds()[-1]
    q = quantize_linears(_grid_model(), "int4", wide_rows=8, wide_kind="bf16", head_wide=(1, kind))
    head = q.get_output_embeddings()
    assert (head.wide_rows, head.wide_kind) == (1, kind) and head.bits == 8
    assert {(m.wide_rows, m.wide_kind) for m in q.modules() if isinstance(m, QuantLinear) and m is not head} == {(8, "bf16")}
    timings = time_head(_grid_model(), "int4", rows=(1, 4), reps=1)
    assert set(timings) == {1, 4} and all(set(v) == {"packed", *wide_kinds()} for v in timings.values())
    assert time_head(_grid_model(), "bf16", rows=(1,), reps=1) == {}  # nothing packed to compare with


def test_a_wide_copy_that_serves_every_input_is_counted_instead_of_the_packed_weights():
    from streaming_llm.bench.hardware import weight_bytes

    plain = weight_bytes(quantize_linears(_grid_model(), "int4"))["weight_bytes"]
    m = quantize_linears(_grid_model(), "int4", head_wide=(1, "bf16"))
    head = m.get_output_embeddings()
    packed = sum(t.numel() * t.element_size() for t in head.buffers())
    assert weight_bytes(m)["weight_bytes"] == plain - packed + 2 * head.in_features * head.out_features


def test_the_wide_copy_is_not_counted_as_weights_a_decode_step_reads():
    from streaming_llm.bench.hardware import weight_bytes

    plain = weight_bytes(quantize_linears(_grid_model(), "int4"))["weight_bytes"]
    assert weight_bytes(quantize_linears(_grid_model(), "int4", wide_rows=8))["weight_bytes"] == plain


def test_the_wide_copy_is_chosen_by_tokens_per_stream_so_a_batched_row_keeps_its_numerics():
    lin = grid_linear()
    x = torch.randn(8, 96, generator=torch.Generator().manual_seed(2))
    packed, wide = QuantLinear(lin, 4), QuantLinear(lin, 4, wide_rows=2)
    alone = torch.cat([wide(x[i : i + 1][None]) for i in range(8)])  # (1, 1, D) each: one stream's decode
    batched = wide(x[:, None])  # (8, 1, D): 8 streams decoding one token each
    assert torch.equal(batched, alone) and torch.equal(batched[:, 0], packed(x))  # the int4 kernel, bit for bit
    chunk = wide(x[None])  # (1, 8, D): one stream's chunk of 8 tokens takes the copy
    assert not torch.equal(chunk[0], packed(x)) and (chunk[0] - packed(x)).abs().max() < 0.02 * packed(x).abs().max()
