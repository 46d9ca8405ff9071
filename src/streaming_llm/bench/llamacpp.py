"""llama.cpp as a peer in `streaming-llm bench` (method `llamacpp`), through llama-cpp-python.

The same GGUF file the engine converts (a built-in alias's GGUF, or a `.gguf` path), the same
thread count, the same number of cached tokens, timed like the engine's rows: `size - 1` random
token ids are prefilled in batches of `--chunk-size` (prefill tok/s), then each timed step decodes
one token at position `size - 1` (so it attends over exactly `size` tokens, as a full streaming
cache does) and takes the argmax of its logits; before each step the step's token is removed from
llama.cpp's KV cache again (untimed), as the engine's dense rows are cropped. Weights are read
into memory at load (`use_mmap=False`), so the RSS baseline holds them as the engine's does.
llama.cpp keeps its KV cache in float16 and runs its own CPU kernels for the GGUF's quantized
weights; flash attention is on unless `STREAMING_LLM_LLAMACPP_FLASH_ATTN=0`.

`available()` tells whether llama-cpp-python is installed, `gguf_for(model)` finds the GGUF (or
None), `skip_reason(model)` says in one line why the method cannot run, `measure_llamacpp(spec)`
runs inside a bench worker process. This module imports neither torch nor transformers in the
worker (two OpenMP runtimes in one process would compete); it does not build llama.cpp.
"""

from __future__ import annotations

import importlib.util
import os
import re
import statistics
import time
from pathlib import Path

INSTALL = ('CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX512=ON -DGGML_AVX512_VNNI=ON -DGGML_AVX512_BF16=ON '
           '-DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON" pip install --no-cache-dir llama-cpp-python')
FLASH_ENV = "STREAMING_LLM_LLAMACPP_FLASH_ATTN"
SEED = 0
_QUANT_NAME = re.compile(r"(I?Q\d(?:_[0-9A-Z]+)*|F16|BF16|F32)", re.I)


def available() -> bool:
    return importlib.util.find_spec("llama_cpp") is not None


def gguf_for(model: str) -> Path | None:
    """The GGUF file behind `--model` (a built-in alias or a .gguf path), or None."""
    from ..models.loading import ALIASES, resolve_alias

    if model.strip().lower() in ALIASES:
        return resolve_alias(model)
    path = Path(model).expanduser()
    return path if path.is_file() and path.suffix.lower() == ".gguf" else None


def skip_reason(model: str) -> str | None:
    """None if the method can run for this model, else a one-line reason (with the fix)."""
    if not available():
        return f"llama-cpp-python is not installed; install it with: {INSTALL}  (about 10 min; see BENCHMARKS.md)"
    try:
        if gguf_for(model) is None:
            return f"llama.cpp needs a GGUF model: a built-in alias or a .gguf file, not {model!r}"
    except Exception as e:  # the alias's package is missing: the engine's rows say so too
        return f"no GGUF file for {model!r} ({e})"
    return None


def _quant_name(path: Path) -> str:
    m = _QUANT_NAME.search(path.stem.split(".")[-1]) or _QUANT_NAME.search(path.stem)
    return m.group(1).upper() if m else "gguf"


def _kv_bytes(meta: dict, tokens: int) -> int:
    """Bytes of float16 keys and values for `tokens` cached tokens (all layers)."""
    arch = meta.get("general.architecture", "llama")

    def get(name, default=None):
        v = meta.get(f"{arch}.{name}", default)
        return int(v) if v is not None else None

    layers, heads = get("block_count", 0), get("attention.head_count", 1)
    kv_heads = get("attention.head_count_kv", heads)
    key_len = get("attention.key_length") or get("embedding_length", 0) // heads
    value_len = get("attention.value_length") or key_len
    return layers * tokens * kv_heads * (key_len + value_len) * 2


def _pct(samples: list[float], q: float) -> float:
    s = sorted(samples)
    return s[min(len(s) - 1, max(0, round(q * (len(s) - 1))))]


def measure_llamacpp(spec: dict) -> dict:
    """One cache size through llama.cpp; a row with the same keys as the engine's."""
    import ctypes

    import llama_cpp
    import numpy as np

    from . import hardware

    gguf, size, threads = Path(spec["gguf"]), spec["cache_size"], spec["threads"] or os.cpu_count()
    flash = os.environ.get(FLASH_ENV, "1").strip() != "0"
    t0 = time.perf_counter()
    llm = llama_cpp.Llama(model_path=str(gguf), n_ctx=size, n_batch=spec["chunk_size"], n_ubatch=spec["chunk_size"],
                          n_threads=threads, n_threads_batch=threads, use_mmap=False, flash_attn=flash,
                          seed=SEED, verbose=False)
    load_s = time.perf_counter() - t0
    n_vocab = llm.n_vocab()
    ids = np.random.default_rng(SEED).integers(0, n_vocab, size - 1).tolist()
    llm.eval(ids[:1])  # one tiny forward first: llama.cpp allocates its compute buffers on first use
    llm.n_tokens = 0
    base_rss = hardware.rss_mb()
    reset_ok = hardware.reset_peak_rss()
    t0 = time.perf_counter()
    llm.eval(ids)  # in batches of n_batch
    prefill_s = time.perf_counter() - t0
    prefill_peak = hardware.peak_rss_mb()
    hardware.reset_peak_rss()
    ctx = llm._ctx  # the wrapper's context: KV removal and the last token's logits
    tok, samples = ids[-1], []
    for i in range(spec["warmup"] + spec["steps"]):
        ctx.kv_cache_seq_rm(-1, size - 1, -1)  # back to size - 1 cached tokens (untimed)
        llm.n_tokens = size - 1
        t0 = time.perf_counter()
        llm.eval([tok])
        logits = np.ctypeslib.as_array(ctypes.cast(ctx.get_logits_ith(-1), ctypes.POINTER(ctypes.c_float)),
                                       shape=(n_vocab,))
        tok = int(logits.argmax())
        dt = (time.perf_counter() - t0) * 1000
        if i >= spec["warmup"]:
            samples.append(dt)
    decode_peak = hardware.peak_rss_mb()
    peak = max(prefill_peak, decode_peak)
    weight = int(llama_cpp.llama_model_size(llm.model))
    kv = _kv_bytes(llm.metadata, size)
    p50 = statistics.median(samples)
    return {
        "method": "llamacpp", "cache_size": size,
        "ms_per_token_p50": round(p50, 4), "ms_per_token_p90": round(_pct(samples, 0.9), 4),
        "ms_per_token_mean": round(statistics.fmean(samples), 4), "ms_per_token_min": round(min(samples), 4),
        "ms_per_token_max": round(max(samples), 4), "tokens_per_s": round(1000 / p50, 2),
        "steps": spec["steps"], "warmup": spec["warmup"],
        "peak_rss_mb": round(peak, 1), "baseline_rss_mb": round(base_rss, 1), "rss_increase_mb": round(peak - base_rss, 1),
        "decode_peak_rss_mb": round(decode_peak, 1), "decode_rss_increase_mb": round(decode_peak - base_rss, 1),
        "process_peak_rss_mb": round(hardware.process_peak_rss_mb(), 1), "peak_rss_reset": reset_ok,
        "prefill_tokens": len(ids), "prefill_s": round(prefill_s, 4), "prefill_tok_per_s": round(len(ids) / prefill_s, 1),
        "cache_tokens": size, "tokens_seen": size - 1 + spec["warmup"] + spec["steps"], "evicted": 0, "sinks": 0,
        "kv_cache_mb": round(kv / 2**20, 3), "kv_dtype": "float16", "weight_mb": round(weight / 2**20, 3),
        "weight_dtypes": [_quant_name(gguf)], "bytes_per_token": weight + kv,
        "dtype": "gguf", "quant": _quant_name(gguf), "threads": threads, "device": "cpu",
        "flash_attn": flash, "llama_cpp_python": getattr(llama_cpp, "__version__", "?"), "gguf": str(gguf),
        "n_ctx": int(llm.n_ctx()), "load_s": round(load_s, 2),
        "load_avg_1m": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None,
        "samples_ms": [round(s, 3) for s in samples],
    }
