"""`--quant auto` chosen by measurement on the machine at hand, once, and remembered.

Which weight format decodes fastest depends on the CPU: on one host the int4 kernels were 2x
faster than float32, on another barely faster. So the first load of a model with `--quant auto`
times a few decode steps of each format (int4, int8, none) on the actual model, interleaved
step by step so that machine drift hits all three alike, and picks the fastest of the formats
allowed for the model. The result is written to `<cache>/calibration/quant-<key>.json`, keyed by
CPU model, CPU flags, torch thread count, torch version and the model's shapes; later loads read
it (milliseconds); the key also names the kernel of the int4/int8 linears (`native.linear_status`:
the native AVX512-VNNI or AVX2 one, or torch's), whose timings differ. A result taken while other processes kept the CPUs busy is replaced by a new
measurement at the first load on a quiet machine. `STREAMING_LLM_RECALIBRATE=1` forces a new
measurement; `STREAMING_LLM_CALIBRATE=0` turns calibration off.

Allowed formats (quality, not speed): int4 only for models whose decoder weights already sit on a
4-bit grid (a Q4 GGUF: int4 reproduces them to bf16 rounding, +0.28% perplexity on the default
model with torch's kernels; +0.66% with the native one, whose inputs are int8 codes per group of
32), and `none` always. int8 is timed and recorded but never chosen by auto: it re-rounds those
weights (+1.10% perplexity, over the 1% budget). A model with no allowed format but `none`, a
device other than the CPU, or a failed measurement gets the rule auto had before calibration
existed (`quantize.resolve_mode`): int4 for 4-bit-grid weights, else none.

Many-row inputs (batched decode of several streams, chunked prefill and evaluation): the int4 and
int8 kernels' cost grows with the rows, while a matmul over a wider copy of the weights stays
almost flat: bfloat16 through oneDNN (AMX where the CPU has it) or float16 through FBGEMM (x86
builds of torch; the flat one on AVX2-only CPUs). So the same first load also times forwards of
2, 4, ... 256 tokens through a copy of the model in the chosen format, its linears switched
between the packed kernels and each wide copy (`wide_kinds`), interleaved, and records
`wide_rows` and `wide_kind`: for each copy, the fewest rows from which it is (10%) faster at
every larger count measured; of the copies that win somewhere, the one fastest at the most rows
measured is chosen (where the copies differ most in milliseconds), from its own start; None:
none ever wins. `quantize_linears` then gives every decoder linear that wide path
(`QuantLinear.wide_rows`; it costs a copy of the weights in memory, 2 bytes a weight).
Single-token decode is untouched by it.

The output head is timed on its own (`time_head`: one linear of 49152x576 on the default model,
too big for any cache, so timing it alone is what it costs in a forward), from 1 row up, and gets
its own `head_wide_rows` / `head_wide_kind` by the same rule: on the AVX2 EPYC the float16 head
beats the int8 kernel from one row on, so even single-token decode uses it there.

This module measures and caches; it does not quantize the model it is given (it times copies).
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

CACHE_VERSION = 6  # 2: entries record wide_rows; 3: wide_kind, each kind's timings, the head's own choice; 4: no bf16 copy where fp16 exists; 5: bf16 beside fp16 on AMX, 64 rows timed; 6: 128 and 256 rows (the native int4 kernel wins to 64 rows where torch's lost from 64)
_WIDE_KEYS = ("wide_rows", "wide_kind", "head_wide_rows", "head_wide_kind")
RECALIBRATE_ENV = "STREAMING_LLM_RECALIBRATE"
CALIBRATE_ENV = "STREAMING_LLM_CALIBRATE"
TIMED = ("int4", "int8", "none")
PREFILL = 64  # cached tokens during the timed steps: enough to be a decode step, small enough to be quick
WARMUP = 2
STEPS = 8
WIDE_ROWS = (2, 4, 8, 16, 32, 64, 128, 256)  # tokens per timed forward (single-token decode never takes the wide path)
WIDE_REPS = 2
WIDE_MARGIN = 0.9  # a wide copy must be at least 10% faster to be used
HEAD_ROWS = (1,) + WIDE_ROWS  # rows per timed call of the head alone
HEAD_REPS = 7
_SHAPE_KEYS = ("model_type", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
               "num_key_value_heads", "head_dim", "vocab_size", "tie_word_embeddings")


def _cache_root() -> Path:
    from .loading import cache_dir

    return cache_dir()


def cpu_identity() -> dict:
    """CPU model name and every flag /proc/cpuinfo lists (the kernels a build may use)."""
    import platform
    import re

    try:
        with open("/proc/cpuinfo") as f:
            text = f.read()
    except OSError:
        text = ""
    name = re.search(r"^model name\s*:\s*(.+)$", text, re.M)
    flags = re.search(r"^(?:flags|Features)\s*:\s*(.+)$", text, re.M)
    return {"cpu": name.group(1).strip() if name else platform.processor() or platform.machine(),
            "cpu_flags": sorted(set(flags.group(1).split())) if flags else []}


def allowed_modes(model) -> list[str]:
    """Formats auto may choose for this model, judged on its weights (see the module docstring)."""
    from .quantize import resolve_mode

    return ["int4", "none"] if resolve_mode(model, "auto") == "int4" else ["none"]


def machine_key(model) -> dict:
    """What a calibration depends on: the CPU, the thread count, torch, the kernel of the int4/int8
    linears (`native.linear_status`) and the native library's build (its file name hashes the
    sources: a changed kernel is timed again), the model's shapes."""
    import torch

    from . import native

    text = model.config.get_text_config(decoder=True)
    shapes = {k: getattr(text, k, None) for k in _SHAPE_KEYS}
    return {**cpu_identity(), "threads": torch.get_num_threads(), "torch": torch.__version__,
            "linear": native.linear_status(), "native": native.status(), "model": shapes, "version": CACHE_VERSION}


def cache_path(key: dict, kind: str = "quant") -> Path:
    """`<cache>/calibration/<kind>-<hash of key>.json` (kind: quant here, kv in `kv_ring`)."""
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    return _cache_root() / "calibration" / f"{kind}-{digest}.json"


def _quantized_copy(model, mode: str):
    from .quantize import quantize_linears

    if mode == "none":
        return model  # timed as it is; nothing is changed
    return quantize_linears(copy.deepcopy(model), mode)


def time_modes(model, modes=TIMED, prefill: int = PREFILL, steps: int = STEPS, warmup: int = WARMUP) -> dict:
    """Median ms of one decode step per format, over `steps` steps after `warmup`, interleaved."""
    import inspect

    import torch
    from transformers.cache_utils import DynamicCache

    kw = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    vocab = model.config.get_text_config(decoder=True).vocab_size
    ids = torch.randint(0, vocab, (1, prefill + 1), generator=torch.Generator().manual_seed(0))
    runs = {}
    with torch.no_grad():
        for mode in modes:
            m = _quantized_copy(model, mode)
            cache = DynamicCache(config=m.config)
            m(input_ids=ids[:, :prefill], use_cache=True, logits_to_keep=1, **{kw: cache})
            runs[mode] = (m, cache, [])
        for i in range(warmup + steps):
            for mode, (m, cache, samples) in runs.items():
                extra = cache.get_seq_length() - prefill
                if extra > 0:
                    cache.crop(-extra)  # every step attends over the same cached tokens
                t0 = time.perf_counter()
                m(input_ids=ids[:, prefill:], use_cache=True, logits_to_keep=1, **{kw: cache}).logits.argmax()
                if i >= warmup:
                    samples.append((time.perf_counter() - t0) * 1000)
    return {mode: round(statistics.median(s), 3) for mode, (_, _, s) in runs.items()}


def time_wide(model, mode: str, rows=WIDE_ROWS, reps: int = WIDE_REPS, kinds=None) -> dict:
    """ms of one forward of `rows` tokens (every position's logits: the head sees as many rows as
    the decoder) through `mode` copies of the model, their linears switched between the packed
    kernel and each wide copy in `kinds` (default: every one this torch build has), interleaved:
    {rows: {"packed": ms, kind: ms, ...}}. The real weights, so each copy pays its real memory
    traffic. The head keeps its packed kernel here (`time_head` times it)."""
    import torch

    kinds = kinds or wide_kinds()
    copies, linears = wide_copies(model, mode, kinds)
    runs = [("packed", kinds[0], None)] + [(k, k, 1) for k in kinds]
    vocab = model.config.get_text_config(decoder=True).vocab_size
    ids = torch.randint(0, vocab, (1, max(rows)), generator=torch.Generator().manual_seed(0))
    out = {}
    with torch.no_grad():
        for n in rows:
            t = {name: [] for name, _, _ in runs}
            for _ in range(reps + 1):  # the first pass warms up
                for name, kind, wide in runs:
                    for q in linears[kind]:
                        q.wide_rows = wide
                    t0 = time.perf_counter()
                    copies[kind](input_ids=ids[:, :n], use_cache=False)
                    t[name].append((time.perf_counter() - t0) * 1000)
            out[n] = {name: round(statistics.median(x[1:]), 3) for name, x in t.items()}
    return out


def wide_copies(model, mode: str, kinds) -> tuple[dict, dict]:
    """The copies `time_wide` switches: per kind, a `mode` copy of the model whose decoder linears
    have a `kind` wide copy and whose head has none (`time_head` times the head), and the list of
    the linears to switch."""
    from .quantize import QuantLinear, quantize_linears

    copies = {k: quantize_linears(copy.deepcopy(model), mode, wide_rows=1, wide_kind=k, head_wide=(None, k))
              for k in kinds}
    linears = {k: [q for q in m.modules() if isinstance(q, QuantLinear) and q.wide is not None]
               for k, m in copies.items()}
    return copies, linears


def wide_kinds() -> list[str]:
    """The wide copies calibration may choose: float16 where this torch build has FBGEMM's float16
    GEMM; bfloat16 where it has not, and beside float16 on a CPU with AMX. (2026-12-04, AMD EPYC
    with AVX512-BF16 and no AMX: with the bfloat16 copy chosen from 32 rows, a 37-token chat
    prompt prefilled through it made the default model's greedy reply to "What is the capital of
    France?" garbage, while the float16 copy and the packed kernels gave "The capital of France
    is Paris." Each linear alone was as close to float32 as the packed kernel; the cause is not
    found, so bfloat16 is not offered there. 2026-12-07, Intel Xeon with AMX: `auto` with the
    bfloat16 copy answers that prompt correctly, costs +0.06% perplexity over the packed kernels,
    and runs 32- and 64-token forwards 1.2x and 1.65x faster, where float16 is no faster than
    packed at 32 rows; BENCHMARKS.md, "bfloat16 beside float16 on AMX".)"""
    from .quantize import amx_available, fp16_gemm_available

    if not fp16_gemm_available():
        return ["bf16"]
    return ["fp16", "bf16"] if amx_available() else ["fp16"]


def time_head(model, mode: str, rows=HEAD_ROWS, reps: int = HEAD_REPS, kinds=None) -> dict:
    """ms of one call of the output head alone, `mode`'s packed kernel against each wide copy, on
    inputs of `rows` rows, interleaved: {rows: {"packed": ms, kind: ms, ...}}; {} if `mode` gives
    the head no wide copy."""
    import torch

    from .quantize import QuantLinear, format_bits

    head = model.get_output_embeddings()
    bits = format_bits(mode, True)
    if bits == 16:
        return {}
    heads = {"packed": QuantLinear(head, bits), **{k: QuantLinear(head, bits, 1, k) for k in kinds or wide_kinds()}}
    out = {}
    with torch.no_grad():
        for n in rows:
            x = torch.randn(n, head.in_features, generator=torch.Generator().manual_seed(n))
            t = {name: [] for name in heads}
            for _ in range(reps + 1):  # the first pass warms up
                for name, q in heads.items():
                    t0 = time.perf_counter()
                    q(x)
                    t[name].append((time.perf_counter() - t0) * 1000)
            out[n] = {name: round(statistics.median(v[1:]), 3) for name, v in t.items()}
    return out


def wide_rows_from(timings: dict) -> int | None:
    """The fewest rows from which the wide copy beats the packed kernel at every larger count
    ({rows: [ms packed, ms wide]})."""
    best = None
    for m_rows in sorted(timings, key=int, reverse=True):
        packed, wide = timings[m_rows]
        if wide > WIDE_MARGIN * packed:
            break
        best = int(m_rows)
    return best


def choose_wide(timings: dict) -> tuple[int | None, str | None]:
    """(wide_rows, wide_kind) from `time_wide`'s timings: of the copies that win from some row
    count on (`wide_rows_from`), the one fastest at the most rows measured, from where it wins;
    (None, None) where none wins. (On an AMX Xeon the float16 head wins from 8 rows by a hair
    and the bfloat16 one from 16, 3x faster at 64 rows: the latter is chosen.)"""
    if not timings:
        return None, None
    top = max(timings, key=int)
    kinds = [k for k in timings[top] if k != "packed"]
    starts = {k: wide_rows_from({n: [t["packed"], t[k]] for n, t in timings.items()}) for k in kinds}
    won = [k for k in kinds if starts[k] is not None]
    if not won:
        return None, None
    kind = min(won, key=lambda k: (timings[top][k], starts[k]))
    return starts[kind], kind


def quiet(threads: int) -> tuple[bool, float | None]:
    """Whether the machine has `threads` free cores now (other processes' load, sampled)."""
    from .threads import busy_cores

    busy = busy_cores()
    return (busy is None or (os.cpu_count() or 1) - busy >= threads - 0.5), busy


def read_entry(path: Path) -> dict | None:
    try:
        entry = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return entry if isinstance(entry, dict) and entry.get("version") == CACHE_VERSION and "timings_ms" in entry else None


def write_entry(path: Path, entry: dict, prefix: str = ".quant-") -> bool:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=prefix, suffix=".tmp")
        with os.fdopen(fd, "w") as f:
            json.dump(entry, f, indent=1)
        os.replace(tmp, path)  # atomic: a concurrent reader sees the old file or the new one
        return True
    except OSError:
        return False


def calibrate(model, recalibrate: bool | None = None) -> dict:
    """The calibration entry for this model on this machine: read from the cache, or measured
    and written there. Keys: choice, timings_ms, allowed, source ("cache" | "measured"), path."""
    if recalibrate is None:
        recalibrate = os.environ.get(RECALIBRATE_ENV, "").strip() not in ("", "0")
    allowed = allowed_modes(model)
    key = machine_key(model)
    path = cache_path(key)
    entry = None if recalibrate else read_entry(path)
    if entry is not None and not entry.get("quiet", True):
        if quiet(key["threads"])[0]:  # measured on a busy machine, and this one is quiet: measure again
            entry = None
    if entry is not None:
        timings = entry["timings_ms"]
        choice = min((m for m in allowed if m in timings), key=timings.get, default="none")
        same = choice == entry.get("choice")
        wide = {k: entry.get(k) if same else None for k in _WIDE_KEYS}
        return {**entry, **wide, "choice": choice, "allowed": allowed, "source": "cache",
                "path": str(path)}
    is_quiet, busy = quiet(key["threads"])
    print(f"streaming-llm: timing int4, int8 and float32 decode steps for --quant auto (once per machine, "
          f"~{STEPS + WARMUP} steps each)...", file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    timings = time_modes(model)
    choice = min(allowed, key=timings.get)
    wide = time_wide(model, choice) if choice in ("int4", "int8") else {}
    head = time_head(model, choice) if choice in ("int4", "int8") else {}
    wide_rows, wide_kind = choose_wide(wide)
    head_rows, head_kind = choose_wide(head)
    entry = {"version": CACHE_VERSION, "key": key, "timings_ms": timings, "choice": choice, "allowed": allowed,
             "wide_timings_ms": wide, "wide_rows": wide_rows, "wide_kind": wide_kind,
             "head_timings_ms": head, "head_wide_rows": head_rows, "head_wide_kind": head_kind,
             "prefill": PREFILL, "steps": STEPS, "warmup": WARMUP, "quiet": is_quiet, "busy_cores": busy,
             "seconds": round(time.perf_counter() - t0, 2), "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    written = write_entry(path, entry)
    return {**entry, "source": "measured", "path": str(path) if written else None}


def choose_auto(model) -> str:
    """What `--quant auto` means for this model here: the calibrated choice, or the rule without
    calibration (`resolve_mode`) where calibration is off, impossible or fails."""
    from .quantize import resolve_mode

    fallback = resolve_mode(model, "auto")
    if os.environ.get(CALIBRATE_ENV, "").strip() == "0" or fallback == "none":
        model.config.streaming_llm_quant_calibration = {"source": "rule", "choice": fallback}
        return fallback  # nothing but none is allowed: nothing to time
    try:
        entry = calibrate(model)
    except Exception as e:  # a kernel missing on this CPU/torch build: the rule still holds
        print(f"streaming-llm: --quant auto calibration failed ({type(e).__name__}: {e}); using {fallback}",
              file=sys.stderr)
        model.config.streaming_llm_quant_calibration = {"source": "rule", "choice": fallback, "error": str(e)}
        return fallback
    model.config.streaming_llm_quant_calibration = {k: entry.get(k) for k in ("source", "choice", "timings_ms",
                                                                          *_WIDE_KEYS, "path")}
    return entry["choice"]
