"""Whether a quantized model's streaming cache should store its keys and values in bfloat16 on
this CPU: measured once per machine and model shape, and remembered.

A bfloat16 ring halves the bytes a decode step reads, but whether the attention over it is faster
depends on the CPU's bfloat16 kernels, not just on the flag that says it has some. On an Intel
Xeon with AMX, torch's CPU flash-attention kernel ran a decode layer in 161 us over a bfloat16
ring against 355 us over a float32 one; on an AMD EPYC with AVX512-BF16 but no AMX the same
kernel is 4-5x SLOWER in bfloat16 (8 rows over 1024 slots: 4.5 ms against 1.0 ms for float32,
even counting a cast of the ring to float32 first), and a whole batch-8 decode step took 152
against 52 ms (BENCHMARKS.md). So `choose(model)` times the decode attention call itself
(`torch.nn.functional.scaled_dot_product_attention`, what `core.attention.planned_attention`
runs for a decode step) at the model's head shapes, for 1 and 8 rows over `SLOTS` cached
tokens, both ring dtypes interleaved, and picks bfloat16 only where it is faster in total. The
result goes to `<cache>/calibration/kv-<key>.json` (the key of `calibrate.machine_key`).
`STREAMING_LLM_RECALIBRATE=1` measures again; with `STREAMING_LLM_CALIBRATE=0`, or on a CPU
with no native bfloat16 arithmetic at all, the rule is used instead: bfloat16 where the CPU has
AVX512-BF16 or AMX (`cpu_has_native_bfloat16`).

It decides and caches; it does not build a cache or change the model (`quantize_linears`
records the choice on the model's config; `core.engine.resolve_kv_dtype` reads it).
"""

from __future__ import annotations

import os
import statistics
import time

import torch
import torch.nn.functional as F

from . import calibrate

CHOICES = ("bfloat16", "float32")
SLOTS = 1024  # cached tokens in the timed call: the default cache, 4+1020
ROWS = (1, 8)  # one stream, and a batch of streams in one forward
REPS = 7
WARMUP = 2


def cpu_has_native_bfloat16() -> bool:
    """Whether this CPU computes bfloat16 dot products in hardware (AVX512-BF16 or AMX). Without
    them torch converts every bfloat16 element to float32 first: a bfloat16 ring then costs more
    time than the bytes it saves (AMD EPYC, AVX2 only, 2 threads, cache 1024: 78.5 against 54.9 ms
    per step at batch 1, 297 against 152 at batch 8; `benchmarks/fast_path_ab.py`, BENCHMARKS.md).
    Having them is necessary, not sufficient (the module docstring): `choose` measures."""
    probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")  # private torch.cpu probes
    return any(bool(getattr(torch.cpu, name, lambda: False)()) for name in probes)


def rule() -> str:
    """The choice without a measurement."""
    return "bfloat16" if cpu_has_native_bfloat16() else "float32"


def _shapes(model) -> tuple[int, int, int]:
    text = model.config.get_text_config(decoder=True)
    hq = text.num_attention_heads
    hkv = getattr(text, "num_key_value_heads", None) or hq
    d = getattr(text, "head_dim", None) or text.hidden_size // hq
    return hq, hkv, d


def time_rings(model, slots: int = SLOTS, rows=ROWS, reps: int = REPS, warmup: int = WARMUP) -> dict:
    """Median ms of one decode attention call per ring dtype and row count: {dtype: {rows: ms}}.
    The query comes in float32 (the model's dtype); over a bfloat16 ring it is cast to bfloat16
    and the output back, as `planned_attention` does."""
    hq, hkv, d = _shapes(model)
    g = torch.Generator().manual_seed(0)
    calls = {}
    for dtype in CHOICES:
        for b in rows:
            q = torch.randn(b, hq, 1, d, generator=g)
            k = torch.randn(b, hkv, slots, d, generator=g).to(getattr(torch, dtype))
            v = torch.randn(b, hkv, slots, d, generator=g).to(k.dtype)
            mask = torch.ones(b, 1, 1, slots, dtype=torch.bool)
            mask[..., slots - 8:] = False  # a decode step's mask hides a few slots
            calls[(dtype, b)] = (q, k, v, mask, [])
    with torch.no_grad():
        for i in range(warmup + reps):
            for (dtype, _), (q, k, v, mask, samples) in calls.items():
                t0 = time.perf_counter()
                F.scaled_dot_product_attention(q.to(k.dtype), k, v, attn_mask=mask, enable_gqa=hq != hkv).float()
                if i >= warmup:
                    samples.append((time.perf_counter() - t0) * 1000)
    out: dict = {dtype: {} for dtype in CHOICES}
    for (dtype, b), (*_, samples) in calls.items():
        out[dtype][str(b)] = round(statistics.median(samples), 4)
    return out


def pick(timings: dict) -> str:
    """bfloat16 where its calls take less time in total than float32's, else float32."""
    total = {dtype: sum(timings[dtype].values()) for dtype in CHOICES}
    return "bfloat16" if total["bfloat16"] < total["float32"] else "float32"


def choose(model, recalibrate: bool | None = None) -> dict:
    """{"choice": "bfloat16" | "float32", "source": "rule" | "cache" | "measured", ...} for this
    model's ring on this machine (see the module docstring)."""
    if os.environ.get(calibrate.CALIBRATE_ENV, "").strip() == "0" or not cpu_has_native_bfloat16():
        return {"choice": rule(), "source": "rule"}
    if recalibrate is None:
        recalibrate = os.environ.get(calibrate.RECALIBRATE_ENV, "").strip() not in ("", "0")
    key = {**calibrate.machine_key(model), "slots": SLOTS, "rows": list(ROWS)}
    path = calibrate.cache_path(key, "kv")
    entry = None if recalibrate else calibrate.read_entry(path)
    if entry is not None and entry.get("choice") in CHOICES and (entry.get("quiet", True)
                                                                  or not calibrate.quiet(key["threads"])[0]):
        return {**entry, "source": "cache", "path": str(path)}
    quiet, busy = calibrate.quiet(key["threads"])
    try:
        timings = time_rings(model)
    except Exception as e:  # noqa: BLE001 - a kernel missing in this build: the rule still holds
        return {"choice": rule(), "source": "rule", "error": f"{type(e).__name__}: {e}"}
    entry = {"version": calibrate.CACHE_VERSION, "key": key, "timings_ms": timings, "choice": pick(timings),
             "quiet": quiet, "busy_cores": busy, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    written = calibrate.write_entry(path, entry, prefix=".kv-")
    return {**entry, "source": "measured", "path": str(path) if written else None}
