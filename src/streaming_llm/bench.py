"""`streaming-llm bench`: per-token decode latency and memory against cache size, per method.

For each (method, cache size) a fresh subprocess loads the model, prefills the context in chunks
(timed apart, reported as prefill tok/s), then decodes greedily one token per forward with
`feed([tok], logits="last")`, timing each step with perf_counter after `--warmup` steps:
- streaming: sinks + (size - sinks) window, measured at a FULL cache (eviction on every step);
- window: the same without sinks (paper's window baseline; same cost as streaming);
- dense: the engine with transformers' DynamicCache, cropped back (untimed) before each step so
  every measured step attends over exactly `size` tokens, as streaming does;
- recompute: every token recomputed over the last `size` tokens (slow: `--recompute-steps`);
- hf: plain transformers, float32, `attn_implementation="eager"`, its default DynamicCache,
  forward loop with `logits_to_keep=1` (what `generate` runs, minus its per-step overhead).
Memory: peak RSS of the measurement (high-water mark reset after loading), its increase over
the loaded-model RSS, and CUDA peak memory on GPUs. `--floor` adds the hardware floor (bytes of
weights + KV read per token / measured bandwidth); `--profile` prints a torch.profiler table of
decode steps; `--long-stream N` streams N tokens and checks that latency and RSS stay flat.
Prints a table, the ratios, writes `--json` and `--plot` (plots read the JSON only, see
`bench_plot.py`), and a one-line JSON summary last. This module measures; it does not tune.
"""

from __future__ import annotations

import gc
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from .errors import UserError

DEFAULT_MODEL = "smollm2-135m-instruct"
METHODS = ("streaming", "window", "dense", "recompute", "hf")
DEFAULT_METHODS = "streaming,dense,recompute,hf"
DEFAULT_CACHE_SIZES = "256,512,1024,2048,4096"
DEFAULT_DTYPE = "float32"
HF_DTYPE = "float32"  # the baseline is plain transformers: always float32, eager attention
DEFAULT_SINKS = 4
DEFAULT_STEPS = 200
DEFAULT_WARMUP = 20
DEFAULT_RECOMPUTE_STEPS = 5
DEFAULT_CHUNK = 256
DEFAULT_LONG_EVERY = 1000
DEFAULT_LONG_WINDOW = 10_000
DEFAULT_PROFILE_ROWS = 25
SEED = 0


def add_arguments(p) -> None:
    p.add_argument("--model", default=DEFAULT_MODEL, help="alias, local folder, .gguf file or hub id")
    p.add_argument("--dtype", default=DEFAULT_DTYPE, help="engine weights dtype (hf always runs float32)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--methods", default=DEFAULT_METHODS, help=f"comma list of {', '.join(METHODS)}")
    p.add_argument("--cache-sizes", default=DEFAULT_CACHE_SIZES, help="comma list of cached tokens")
    p.add_argument("--sinks", type=int, default=DEFAULT_SINKS, help="sinks of streaming (window = size - sinks)")
    p.add_argument("--steps", type=int, default=DEFAULT_STEPS, help="timed decode steps per configuration")
    p.add_argument("--warmup", type=int, default=DEFAULT_WARMUP, help="untimed decode steps first")
    p.add_argument("--recompute-steps", type=int, default=DEFAULT_RECOMPUTE_STEPS, help="timed steps for recompute")
    p.add_argument("--chunk-size", type=int, default=DEFAULT_CHUNK, help="prefill chunk (tokens per forward)")
    p.add_argument("--json", default=None, help="write results here")
    p.add_argument("--plot", default=None, help="draw the latency/memory plot (PNG) here")
    p.add_argument("--plot-from", default=None, help="only draw the plot of an existing results JSON")
    p.add_argument("--floor", action="store_true", help="measure memory bandwidth; report the hardware floor")
    p.add_argument("--profile", action="store_true", help="print a torch.profiler table of decode steps")
    p.add_argument("--profile-steps", type=int, default=1, help="decode steps profiled (after timing)")
    p.add_argument("--long-stream", type=int, default=None, metavar="N", help="stream N decoded tokens instead")
    p.add_argument("--every", type=int, default=DEFAULT_LONG_EVERY, help="long stream: record every K tokens")
    p.add_argument("--long-window", type=int, default=DEFAULT_LONG_WINDOW, help="long stream: tokens compared")
    p.add_argument("--in-process", action="store_true", help="measure in this process (debugging only)")


# ---- argument checks (all before anything is loaded) --------------------------------------------
def parse_methods(text: str) -> list[str]:
    methods = [m.strip().lower() for m in str(text).split(",") if m.strip()]
    if not methods:
        raise UserError("--methods is empty; choose from " + ", ".join(METHODS))
    for m in methods:
        if m not in METHODS:
            raise UserError(f"unknown method {m!r} in --methods; choose from {', '.join(METHODS)}")
    return list(dict.fromkeys(methods))


def parse_sizes(text: str, sinks: int) -> list[int]:
    sizes = []
    for part in str(text).split(","):
        part = part.strip()
        if not part:
            continue
        try:
            size = int(part)
        except ValueError:
            raise UserError(f"--cache-sizes: {part!r} is not an integer (expected e.g. 256,1024)") from None
        if size <= sinks:
            raise UserError(f"--cache-sizes: {size} must be greater than --sinks ({sinks}) to leave a window")
        sizes.append(size)
    if not sizes:
        raise UserError("--cache-sizes is empty (expected e.g. 256,1024)")
    return sorted(set(sizes))


def _check_positive(args, names: list[str], minimum: int = 1) -> None:
    for name in names:
        value = getattr(args, name)
        if value is not None and value < minimum:
            raise UserError(f"--{name.replace('_', '-')} must be >= {minimum} (got {value})")


# ---- measurement (runs inside the worker process) -----------------------------------------------
def _sync(device: str) -> None:
    import torch

    if str(device).startswith("cuda"):
        torch.cuda.synchronize(device)


class _EngineDecoder:
    """streaming / window / dense / recompute through the engine's `feed`."""

    def __init__(self, model, method: str, size: int, sinks: int, chunk: int):
        from .config import StreamingConfig
        from .engine import StreamingLLM

        sinks = 0 if method == "window" else sinks
        config = StreamingConfig(method=method, sinks=sinks, window=size - sinks, chunk_size=chunk)
        self.engine = StreamingLLM(model, None, config)
        self.method, self.size, self.sinks = method, size, sinks
        # dense keeps size-1 tokens before a step (streaming holds `size` with the new token)
        self.prefill_len = size - 1 if method == "dense" else size

    @property
    def cache(self):
        return self.engine.cache

    def prefill(self, ids) -> None:
        self.engine.feed(ids, logits="none")

    def before_step(self) -> None:
        if self.method == "dense":
            _crop(self.engine.cache, self.size - 1)

    def step(self, tok: int) -> int:
        return int(self.engine.feed([tok], logits="last").argmax())

    def state(self) -> dict:
        e = self.engine
        return {"cache_tokens": e.cache_tokens, "tokens_seen": e.tokens_seen, "evicted": max(e.evicted, 0)}


class _HFDecoder:
    """Plain transformers: eager attention, default DynamicCache, no engine involved."""

    def __init__(self, model, size: int, chunk: int):
        import inspect

        from transformers.cache_utils import DynamicCache

        model.set_attn_implementation("eager")
        self.model, self.size, self.chunk = model, size, chunk
        self.cache = DynamicCache(config=model.config)
        self.cache_kw = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
        self.device = next(model.parameters()).device
        self.prefill_len, self.seen = size - 1, 0

    def _forward(self, ids):
        import torch

        with torch.no_grad():  # as `generate` runs
            out = self.model(input_ids=ids.to(self.device)[None, :], use_cache=True, logits_to_keep=1,
                             **{self.cache_kw: self.cache})
        self.seen += ids.numel()
        return out.logits[0, -1]

    def prefill(self, ids) -> None:
        for lo in range(0, ids.numel(), self.chunk):
            self._forward(ids[lo : lo + self.chunk])

    def before_step(self) -> None:
        _crop(self.cache, self.size - 1)

    def step(self, tok: int) -> int:
        import torch

        return int(self._forward(torch.tensor([tok])).argmax())

    def state(self) -> dict:
        return {"cache_tokens": self.cache.get_seq_length(), "tokens_seen": self.seen, "evicted": 0}


def _crop(cache, keep: int) -> None:
    extra = cache.get_seq_length() - keep
    if extra > 0:
        cache.crop(-extra)


def _pct(samples: list[float], q: float) -> float:
    s = sorted(samples)
    return s[min(len(s) - 1, max(0, round(q * (len(s) - 1))))]


def _load(spec: dict):
    import torch

    from .loading import load_model

    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    torch.manual_seed(SEED)
    dtype = HF_DTYPE if spec["method"] == "hf" else spec["dtype"]
    t0 = time.perf_counter()
    model, _ = load_model(spec["model"], dtype=dtype, device=spec["device"])
    with torch.no_grad():  # page in memory-mapped weights now, so RSS increases measure the cache
        for t in list(model.parameters()) + list(model.buffers()):
            if t.numel():
                t.sum()
    return model, dtype, time.perf_counter() - t0


def _decoder(model, spec: dict):
    if spec["method"] == "hf":
        return _HFDecoder(model, spec["cache_size"], spec["chunk_size"])
    return _EngineDecoder(model, spec["method"], spec["cache_size"], spec["sinks"], spec["chunk_size"])


def _prompt(model, n: int):
    import torch

    vocab = model.config.get_text_config(decoder=True).vocab_size
    return torch.randint(0, vocab, (max(n, 1),), generator=torch.Generator().manual_seed(SEED))


def measure(spec: dict) -> dict:
    """One (method, cache size): load, prefill, warm up, time `steps` decode steps."""
    import torch

    from . import hardware

    model, dtype, load_s = _load(spec)
    device = spec["device"]
    cuda = str(device).startswith("cuda")
    gc.collect()
    base_rss = hardware.rss_mb()
    reset_ok = hardware.reset_peak_rss()
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
        base_gpu = torch.cuda.memory_allocated(device) / 2**20
    dec = _decoder(model, spec)
    ids = _prompt(model, dec.prefill_len)
    _sync(device)
    t0 = time.perf_counter()
    dec.prefill(ids)  # recompute only stores the ids: its prefill runs no forward
    _sync(device)
    prefill_s = time.perf_counter() - t0
    steps = spec["recompute_steps"] if spec["method"] == "recompute" else spec["steps"]
    warmup = min(spec["warmup"], 1) if spec["method"] == "recompute" else spec["warmup"]
    tok, samples = int(ids[-1]), []
    gc.collect()
    for i in range(warmup + steps):
        dec.before_step()
        _sync(device)
        t0 = time.perf_counter()
        tok = dec.step(tok)  # int(): waits for the device too
        dt = (time.perf_counter() - t0) * 1000
        if i >= warmup:
            samples.append(dt)
    peak = hardware.peak_rss_mb()
    w = hardware.weight_bytes(model)
    kv = hardware.kv_bytes(dec.cache)
    p50 = statistics.median(samples)
    row = {
        "method": spec["method"],
        "cache_size": spec["cache_size"],
        "ms_per_token_p50": round(p50, 4),
        "ms_per_token_p90": round(_pct(samples, 0.9), 4),
        "ms_per_token_mean": round(statistics.fmean(samples), 4),
        "ms_per_token_min": round(min(samples), 4),
        "ms_per_token_max": round(max(samples), 4),
        "tokens_per_s": round(1000 / p50, 2),
        "steps": steps,
        "warmup": warmup,
        "peak_rss_mb": round(peak, 1),
        "baseline_rss_mb": round(base_rss, 1),
        "rss_increase_mb": round(peak - base_rss, 1),
        "process_peak_rss_mb": round(hardware.process_peak_rss_mb(), 1),
        "peak_rss_reset": reset_ok,
        "prefill_tokens": int(ids.numel()),
        "prefill_s": round(prefill_s, 4),
        "prefill_tok_per_s": None if spec["method"] == "recompute" else round(ids.numel() / prefill_s, 1),
        **dec.state(),
        "sinks": 0 if spec["method"] in ("window", "hf", "dense") else spec["sinks"],
        "kv_cache_mb": round(kv / 2**20, 3),
        "weight_mb": round(w["weight_bytes"] / 2**20, 3),
        "weight_dtypes": w["weight_dtypes"],
        "bytes_per_token": None if spec["method"] == "recompute" else w["weight_bytes"] + kv,
        "dtype": dtype,
        "threads": torch.get_num_threads(),
        "device": str(device),
        "load_s": round(load_s, 2),
        "load_avg_1m": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None,
        "samples_ms": [round(s, 3) for s in samples],
    }
    if cuda:
        row["gpu_peak_mb"] = round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
        row["gpu_increase_mb"] = round(row["gpu_peak_mb"] - base_gpu, 1)
    if spec.get("profile"):
        row["profile_table"], row["profile_ops"] = _profile(dec, tok, spec)
    return row


def _profile(dec, tok: int, spec: dict) -> tuple[str, int]:
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if str(spec["device"]).startswith("cuda") else [])
    with profile(activities=acts) as prof:
        for _ in range(spec["profile_steps"]):
            dec.before_step()
            tok = dec.step(tok)
    averages = prof.key_averages()
    table = averages.table(sort_by="self_cpu_time_total", row_limit=spec.get("profile_rows", DEFAULT_PROFILE_ROWS))
    return table, sum(e.count for e in averages) // max(spec["profile_steps"], 1)


def measure_long(spec: dict) -> dict:
    """Stream `long_stream` decoded tokens at one cache size; record latency and RSS every K."""
    from . import hardware

    model, dtype, _ = _load(spec)
    device, every = spec["device"], spec["every"]
    dec = _decoder(model, spec)
    ids = _prompt(model, dec.prefill_len)
    dec.prefill(ids)
    tok, samples, checkpoints, block = int(ids[-1]), [], [], []
    start = time.perf_counter()
    for i in range(spec["long_stream"]):
        dec.before_step()
        _sync(device)
        t0 = time.perf_counter()
        tok = dec.step(tok)
        block.append((time.perf_counter() - t0) * 1000)
        if len(block) == every or i == spec["long_stream"] - 1:
            samples.extend(block)
            checkpoints.append({
                "tokens_decoded": i + 1, **dec.state(),
                "p50_ms": round(statistics.median(block), 4), "p90_ms": round(_pct(block, 0.9), 4),
                "max_ms": round(max(block), 3), "rss_mb": round(hardware.rss_mb(), 1),
                "elapsed_s": round(time.perf_counter() - start, 1),
            })
            print(f"bench long-stream: {i + 1}/{spec['long_stream']} tokens, p50 {checkpoints[-1]['p50_ms']:.2f} ms, "
                  f"RSS {checkpoints[-1]['rss_mb']:.0f} MB", file=sys.stderr, flush=True)
            block = []
    skip = min(spec["warmup"], len(samples) // 4)
    win = max(1, min(spec["long_window"], (len(samples) - skip) // 2))
    first, last = statistics.median(samples[skip : skip + win]), statistics.median(samples[-win:])
    rss0 = checkpoints[0]["rss_mb"]
    rss_max = max(c["rss_mb"] for c in checkpoints)
    return {
        "method": spec["method"], "cache_size": spec["cache_size"], "dtype": dtype, "device": str(device),
        "tokens_decoded": len(samples), "prefill_tokens": int(ids.numel()), "window_tokens": win,
        "p50_first_ms": round(first, 4), "p50_last_ms": round(last, 4), "p50_last_over_first": round(last / first, 4),
        "latency_flat": last / first <= 1.10,
        "rss_first_mb": rss0, "rss_max_mb": rss_max, "rss_end_mb": checkpoints[-1]["rss_mb"],
        "rss_growth_pct": round((rss_max - rss0) / rss0 * 100, 3), "memory_flat": (rss_max - rss0) / rss0 < 0.05,
        "process_peak_rss_mb": round(hardware.process_peak_rss_mb(), 1),
        "checkpoints": checkpoints,
    }


def worker_main() -> None:
    """Entry point of a measurement subprocess: spec JSON in argv[1], result JSON last on stdout."""
    spec = json.loads(sys.argv[1])
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # this process only: one bar per configuration is noise
    try:
        result = measure_long(spec) if spec.get("long_stream") else measure(spec)
    except UserError as e:
        print(json.dumps({"error": str(e)}))
        sys.exit(2)
    print(json.dumps(result))


def _run_worker(spec: dict, in_process: bool) -> dict:
    if in_process:
        return measure_long(spec) if spec.get("long_stream") else measure(spec)
    src = str(Path(__file__).resolve().parents[1])
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([src, os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep))
    code = "from streaming_llm.bench import worker_main; worker_main()"
    proc = subprocess.run([sys.executable, "-c", code, json.dumps(spec)], stdout=subprocess.PIPE, text=True, env=env)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    result = json.loads(lines[-1]) if lines else {}
    if "error" in result:
        raise UserError(result["error"])
    if proc.returncode != 0 or not result:
        raise RuntimeError(f"bench worker for {spec['method']} @ {spec['cache_size']} failed (exit {proc.returncode})")
    return result


# ---- the verb ------------------------------------------------------------------------------------
def compute_ratios(results: list[dict]) -> dict:
    """Per cache size, from p50s: streaming vs recompute speed-up, streaming/dense cost, hf/streaming."""
    by = {(r["method"], r["cache_size"]): r["ms_per_token_p50"] for r in results}
    out = {}
    for size in sorted({r["cache_size"] for r in results}):
        s, d, rc, hf = (by.get((m, size)) for m in ("streaming", "dense", "recompute", "hf"))
        entry = {}
        if s and rc:
            entry["streaming_vs_recompute_speedup"] = round(rc / s, 2)
        if s and d:
            entry["streaming_over_dense"] = round(s / d, 3)
        if s and hf:
            entry["hf_over_streaming"] = round(hf / s, 3)
        if entry:
            out[str(size)] = entry
    return out


def _fmt(x, spec: str) -> str:
    return "-" if x is None else format(x, spec)


def print_table(results: list[dict], ratios: dict, floor: bool) -> None:
    head = f"{'method':<10} {'cache':>6} {'p50 ms':>9} {'p90 ms':>9} {'tok/s':>8} {'peak RSS MB':>12} {'+RSS MB':>8} {'prefill tok/s':>14}"
    print(head + (f" {'floor ms':>9} {'x floor':>8}" if floor else ""))
    for r in results:
        line = (f"{r['method']:<10} {r['cache_size']:>6} {r['ms_per_token_p50']:>9.2f} {r['ms_per_token_p90']:>9.2f} "
                f"{r['tokens_per_s']:>8.1f} {r['peak_rss_mb']:>12.0f} {r['rss_increase_mb']:>8.1f} "
                f"{_fmt(r['prefill_tok_per_s'], '>14.0f')}")
        if floor:
            line += f" {_fmt(r.get('floor_ms'), '>9.2f')} {_fmt(r.get('x_floor'), '>8.2f')}"
        print(line)
    for size, e in ratios.items():
        parts = []
        if "streaming_vs_recompute_speedup" in e:
            parts.append(f"streaming vs recompute speed-up {e['streaming_vs_recompute_speedup']:.1f}x")
        if "streaming_over_dense" in e:
            parts.append(f"streaming/dense cost {e['streaming_over_dense']:.3f} (target <= 1.15)")
        if "hf_over_streaming" in e:
            parts.append(f"hf/streaming {e['hf_over_streaming']:.2f}x (target >= 2)")
        print(f"cache {size}: " + "; ".join(parts))


def _spec(args, method: str, size: int) -> dict:
    return {
        "model": args.model, "dtype": args.dtype, "device": args.device, "threads": args.threads,
        "method": method, "cache_size": size, "sinks": args.sinks, "steps": args.steps, "warmup": args.warmup,
        "recompute_steps": args.recompute_steps, "chunk_size": args.chunk_size, "profile": args.profile,
        "profile_steps": args.profile_steps, "long_stream": args.long_stream, "every": args.every,
        "long_window": args.long_window,
    }


def _machine(args) -> dict:
    import torch

    from . import hardware

    if args.threads:
        torch.set_num_threads(args.threads)
    return {**hardware.machine_info(args.device), "dtype": args.dtype, "hf_dtype": HF_DTYPE, "model": args.model}


def _write(path: str | None, data: dict) -> None:
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(data, indent=1) + "\n")


def run(args) -> int:
    from . import bench_plot

    if args.plot_from:
        out = bench_plot.plot_file(args.plot_from, args.plot)
        print(json.dumps({"plot": out, "from": args.plot_from}))
        return 0
    methods = parse_methods(args.methods)
    sizes = parse_sizes(args.cache_sizes, args.sinks)
    _check_positive(args, ["steps", "recompute_steps", "chunk_size", "threads", "profile_steps", "every", "long_window"])
    _check_positive(args, ["warmup", "sinks"], minimum=0)
    if args.long_stream is not None:
        return run_long(args, methods, sizes)
    machine = _machine(args)
    if args.floor:
        from .hardware import memory_bandwidth

        machine["bandwidth"] = memory_bandwidth(device=args.device)
        print(f"memory bandwidth: read {machine['bandwidth']['read_gb_s']} GB/s, "
              f"copy {machine['bandwidth']['copy_gb_s']} GB/s", file=sys.stderr)
    results = []
    for size in sizes:  # all methods of one size close together in time: ratios see the same noise
        for method in methods:
            print(f"bench: {method} @ cache {size} ...", file=sys.stderr, flush=True)
            row = _run_worker(_spec(args, method, size), args.in_process)
            if args.floor and row["bytes_per_token"]:
                row["floor_ms"] = round(row["bytes_per_token"] / (machine["bandwidth"]["read_gb_s"] * 1e9) * 1000, 4)
                row["x_floor"] = round(row["ms_per_token_p50"] / row["floor_ms"], 2)
            if "profile_table" in row:
                print(f"\nprofile: {method} @ cache {size}, {args.profile_steps} decode step(s), "
                      f"{row['profile_ops']} op calls per step\n{row['profile_table']}")
            results.append(row)
    ratios = compute_ratios(results)
    print_table(results, ratios, args.floor)
    data = {"results": results, "machine": machine, "ratios": ratios,
            "settings": {k: v for k, v in vars(args).items() if not k.startswith("_") and k != "command"}}
    _write(args.json, data)
    plot = bench_plot.plot_data(data, args.plot) if args.plot else None
    summary = {"model": args.model, "dtype": args.dtype, "threads": machine["torch_threads"],
               "p50_ms": {f"{r['method']}@{r['cache_size']}": r["ms_per_token_p50"] for r in results},
               "ratios": ratios, "json": args.json, "plot": plot}
    print(json.dumps(summary))
    return 0


def run_long(args, methods: list[str], sizes: list[int]) -> int:
    from . import bench_plot

    if args.long_stream < 2:
        raise UserError(f"--long-stream must be at least 2 tokens (got {args.long_stream})")
    method, size = methods[0], sizes[0]
    if len(methods) > 1 or len(sizes) > 1:
        print(f"bench long-stream: using the first method and size only ({method} @ {size})", file=sys.stderr)
    machine = _machine(args)
    long = _run_worker(_spec(args, method, size), args.in_process)
    print(f"{method} @ cache {size}: {long['tokens_decoded']} tokens decoded; p50 first {long['window_tokens']} "
          f"{long['p50_first_ms']:.2f} ms, last {long['p50_last_ms']:.2f} ms, ratio {long['p50_last_over_first']:.3f} "
          f"(target <= 1.10); RSS {long['rss_first_mb']:.0f} -> max {long['rss_max_mb']:.0f} MB, "
          f"growth {long['rss_growth_pct']:.2f}% (target < 5%)")
    data = {"long_stream": long, "machine": machine,
            "settings": {k: v for k, v in vars(args).items() if not k.startswith("_") and k != "command"}}
    _write(args.json, data)
    plot = bench_plot.plot_data(data, args.plot) if args.plot else None
    summary = {k: v for k, v in long.items() if k != "checkpoints"}
    print(json.dumps({**summary, "json": args.json, "plot": plot}))
    return 0
