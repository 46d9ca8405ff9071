"""`streaming-llm bench`: per-token decode latency and memory against cache size, per method.

For each (method, cache size) a fresh subprocess loads the model, prefills the context in chunks
(timed apart, reported as prefill tok/s), then decodes greedily one token per forward with
`feed([tok], logits="last")`, timing each step with perf_counter after `--warmup` steps:
- streaming: sinks + (size - sinks) window, measured at a FULL cache (eviction on every step);
- window: the same without sinks (paper's window baseline; same cost as streaming);
- recall: streaming (same sinks and window) with recall of evicted tokens, `--recall-blocks K
  --block-size B` (so it attends to K*B tokens more), labelled `streaming+recallKxB`; with
  `--recall-fill N[,M..]` (one row per fill) N tokens of `--recall-fill-text` (a corpus, default
  gutenberg, or random ids) are streamed through chunked prefill first, so the memory holds them;
- dense: the engine with transformers' DynamicCache, cropped back (untimed) before each step so
  every measured step attends over exactly `size` tokens, as streaming does;
- recompute: every token recomputed over the last `size` tokens (slow: `--recompute-steps`);
- hf: plain transformers, float32, `attn_implementation="eager"`, its default DynamicCache,
  forward loop with `logits_to_keep=1` (what `generate` runs, minus its per-step overhead);
- llamacpp: llama.cpp on the same GGUF through llama-cpp-python, `size` tokens attended per step
  (`llamacpp.py`); skipped with a one-line message when it is not installed or the model is no GGUF.
Threads: `--threads N`, else the loading layer's policy (`models/threads.py`), decided once here and
passed to every worker, llama.cpp included. `--busy N` runs an N-thread matmul loop beside the
measurements (started before the thread choice, stopped at the end): the busy-machine rows.
Memory: peak RSS of the measurement (high-water mark reset after loading), its increase over
the loaded-model RSS, and CUDA peak memory on GPUs. `--floor` adds the hardware floor (bytes of
weights + KV read per token / measured bandwidth); `--profile` prints a torch.profiler table of
decode steps; `--long-stream N` streams N tokens and checks that latency and RSS stay flat.
Prints a table, the ratios, writes `--json` and `--plot` (plots read the JSON only, see
`bench_report.py`), and a one-line JSON summary last. This module measures; it does not tune.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from .measure import HF_DTYPE, run_worker
from ..cliargs import add_load_arguments, add_recall_arguments
from ..errors import UserError

METHODS = ("streaming", "window", "dense", "recompute", "hf", "llamacpp", "recall")
DEFAULT_METHODS = "streaming,dense,recompute,hf,llamacpp"
DEFAULT_CACHE_SIZES = "256,512,1024,2048,4096"
DEFAULT_SINKS = 4
DEFAULT_STEPS = 200
DEFAULT_WARMUP = 20
DEFAULT_RECOMPUTE_STEPS = 5
DEFAULT_CHUNK = 256
DEFAULT_LONG_EVERY = 1000
DEFAULT_LONG_WINDOW = 10_000
DEFAULT_FILL_TEXT = "gutenberg"
BUSY_WARMUP_S = 2.0  # the matmul loop reaches full speed before anything is measured or chosen
BUSY_LOOP = "import sys, torch\ntorch.set_num_threads(int(sys.argv[1]))\na = torch.randn(1024, 1024)\nwhile True:\n    a @ a\n"


def add_arguments(p) -> None:
    add_load_arguments(p, quant_default="auto")  # the hf baseline always runs float32 without --quant
    p.add_argument("--threads", type=int, default=None,
                   help="threads of every method (default: one per free core at start, models/threads.py)")
    p.add_argument("--busy", type=int, default=0, metavar="N",
                   help="run an N-thread matmul loop beside the measurements (a busy machine)")
    p.add_argument("--methods", default=DEFAULT_METHODS, help=f"comma list of {', '.join(METHODS)}")
    p.add_argument("--cache-sizes", default=DEFAULT_CACHE_SIZES, help="comma list of cached tokens")
    p.add_argument("--batch-sizes", default="1", help="comma list of streams decoded in one forward (streaming and "
                   "window; batch 1 is the single-stream engine), e.g. 1,2,4,8,16")
    p.add_argument("--sinks", type=int, default=DEFAULT_SINKS, help="sinks of streaming (window = size - sinks)")
    p.add_argument("--steps", type=int, default=DEFAULT_STEPS, help="timed decode steps per configuration")
    p.add_argument("--warmup", type=int, default=DEFAULT_WARMUP, help="untimed decode steps first")
    p.add_argument("--recompute-steps", type=int, default=DEFAULT_RECOMPUTE_STEPS, help="timed steps for recompute")
    p.add_argument("--chunk-size", type=int, default=DEFAULT_CHUNK, help="prefill chunk (tokens per forward)")
    add_recall_arguments(p)  # for method recall: the shared flags, as chat, serve and ppl take them
    p.add_argument("--recall-fill", default="0", help="method recall: comma list of evicted tokens streamed into the "
                   "memory before the window is filled and timed, one row each, e.g. 0,25000,100000")
    p.add_argument("--recall-fill-text", default=DEFAULT_FILL_TEXT, help="where the fill tokens come from: a corpus "
                   "source as `ppl --corpus` takes it, or random (seeded random ids, as the prompt) (default: %(default)s)")
    p.add_argument("--json", default=None, help="write results here")
    p.add_argument("--plot", default=None, help="draw the latency/memory plot (PNG) here")
    p.add_argument("--plot-from", default=None, help="only draw the plot of an existing results JSON")
    p.add_argument("--markdown", action="store_true", help="also print the BENCHMARKS.md tables (with --plot-from too)")
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


def parse_batch_sizes(text: str, methods: list[str]) -> list[int]:
    try:
        sizes = sorted({int(p) for p in str(text).split(",") if p.strip()})
    except ValueError:
        raise UserError(f"--batch-sizes: {text!r} is not a comma list of integers (expected e.g. 1,2,4,8)") from None
    if not sizes or sizes[0] < 1:
        raise UserError(f"--batch-sizes needs integers >= 1 (got {text!r})")
    if sizes != [1] and any(m not in ("streaming", "window") for m in methods):
        raise UserError("--batch-sizes above 1 work with --methods streaming and window only (the other caches "
                        "are unbounded or have no batched path)")
    return sizes


def parse_fills(text: str) -> list[int]:
    try:
        fills = sorted({int(p) for p in str(text).split(",") if p.strip()})
    except ValueError:
        raise UserError(f"--recall-fill: {text!r} is not a comma list of integers (expected e.g. 0,25000,100000)") from None
    if not fills or fills[0] < 0:
        raise UserError(f"--recall-fill needs integers >= 0 (got {text!r})")
    return fills


def check_recall(args, methods: list[str], sizes: list[int]) -> None:
    """Method recall needs --recall-blocks >= 1; the recall flags without it are a mistake."""
    from ..core.config import StreamingConfig

    if "recall" not in methods:
        if args.recall_blocks:
            raise UserError("--recall-blocks is measured by method recall: add recall to --methods")
        return
    if args.recall_blocks < 1:
        raise UserError("method recall needs --recall-blocks K >= 1 (and --block-size B)")
    for size in sizes:  # the config's own checks, before anything is loaded
        StreamingConfig(sinks=args.sinks, window=size - args.sinks, chunk_size=args.chunk_size,
                        recall_blocks=args.recall_blocks, block_size=args.block_size,
                        recall_memory_tokens=args.recall_memory_tokens, recall_dtype=args.recall_dtype,
                        recall_every=args.recall_every)


def _check_positive(args, names: list[str], minimum: int = 1) -> None:
    for name in names:
        value = getattr(args, name)
        if value is not None and value < minimum:
            raise UserError(f"--{name.replace('_', '-')} must be >= {minimum} (got {value})")


# ---- the verb ------------------------------------------------------------------------------------
def compute_ratios(results: list[dict]) -> dict:
    """Per cache size, from p50s: streaming vs recompute speed-up, streaming/dense cost, hf/streaming;
    with several batch sizes, each one's aggregate tokens/s over batch 1's (same method and size)."""
    single = [r for r in results if r.get("batch_size", 1) == 1]
    by = {(r["method"], r["cache_size"]): r["ms_per_token_p50"] for r in single}
    tps = {(r["method"], r["cache_size"], r.get("batch_size", 1)): r["tokens_per_s"] for r in results if "tokens_per_s" in r}
    from .report import row_label

    out = {}
    for size in sorted({r["cache_size"] for r in results}):
        s, d, rc, hf, lc = (by.get((m, size)) for m in ("streaming", "dense", "recompute", "hf", "llamacpp"))
        entry = {}
        for r in single:
            if r["method"] == "recall" and r["cache_size"] == size and s:
                entry[f"{row_label(r)}_over_streaming"] = round(r["ms_per_token_p50"] / s, 3)
        for (m, sz, b), v in sorted(tps.items()):
            if sz == size and b > 1 and (m, sz, 1) in tps:
                entry[f"{m}_batch{b}_over_batch1_tokens_per_s"] = round(v / tps[(m, sz, 1)], 3)
        if s and rc:
            entry["streaming_vs_recompute_speedup"] = round(rc / s, 2)
        if s and d:
            entry["streaming_over_dense"] = round(s / d, 3)
        if s and hf:
            entry["hf_over_streaming"] = round(hf / s, 3)
        if s and lc:
            entry["streaming_over_llamacpp"] = round(s / lc, 3)
        if entry:
            out[str(size)] = entry
    return out


def _fmt(x, spec: str) -> str:
    return "-" if x is None else format(x, spec)


def print_table(results: list[dict], ratios: dict, floor: bool) -> None:
    from .report import row_label

    width = max([10] + [len(row_label(r)) for r in results])
    head = f"{'method':<{width}} {'cache':>6} {'batch':>5} {'p50 ms':>9} {'p90 ms':>9} {'tok/s':>8} {'peak RSS MB':>12} {'+RSS MB':>8} {'prefill tok/s':>14}"
    print(head + (f" {'floor ms':>9} {'x floor':>8}" if floor else ""))
    for r in results:
        line = (f"{row_label(r, batch=False):<{width}} {r['cache_size']:>6} {r.get('batch_size', 1):>5} {r['ms_per_token_p50']:>9.2f} {r['ms_per_token_p90']:>9.2f} "
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
        if "streaming_over_llamacpp" in e:
            parts.append(f"streaming/llama.cpp {e['streaming_over_llamacpp']:.3f} (target <= 0.85)")
        parts += [f"{k.replace('_over_batch1_tokens_per_s', '')} {v:.2f}x batch-1 tokens/s" for k, v in e.items()
                  if k.endswith("_over_batch1_tokens_per_s")]
        parts += [f"{k.replace('_over_streaming', '')}/streaming {v:.3f} (target <= 1.5)" for k, v in e.items()
                  if k.endswith("_over_streaming")]
        print(f"cache {size}: " + "; ".join(parts))


def _spec(args, method: str, size: int, batch: int = 1, fill: int = 0) -> dict:
    recall = ({"blocks": args.recall_blocks, "block_size": args.block_size, "memory_tokens": args.recall_memory_tokens,
               "dtype": args.recall_dtype, "every": args.recall_every, "fill": fill, "fill_text": args.recall_fill_text}
              if method == "recall" else None)
    return {"batch_size": batch, "recall": recall,
        "model": args.model, "dtype": args.dtype, "quant": args.quant, "device": args.device, "threads": args.threads,
        "method": method, "cache_size": size, "sinks": args.sinks, "steps": args.steps, "warmup": args.warmup,
        "recompute_steps": args.recompute_steps, "chunk_size": args.chunk_size, "profile": args.profile,
        "profile_steps": args.profile_steps, "long_stream": args.long_stream, "every": args.every,
        "long_window": args.long_window, **({"gguf": args._gguf} if method == "llamacpp" else {}),
    }


def _machine(args) -> dict:
    """Machine facts; decides the thread count of every worker (args.threads) on the way."""
    import torch

    from ..models import threads
    from . import hardware

    choice = threads.resolve(args.threads, for_children=True)  # the workers are fresh processes
    os.environ.update(choice.child_env())  # a PASSIVE wait policy reaches the workers (not this process)
    args.threads = choice.threads or torch.get_num_threads()
    return {**hardware.machine_info(args.device), "dtype": args.dtype, "quant": args.quant, "hf_dtype": HF_DTYPE,
            "model": args.model, **choice.as_dict(), "threads": args.threads, "torch_threads": args.threads,
            "busy_threads": args.busy}


def _available(args, methods: list[str]) -> list[str]:
    """The methods that can run here: llamacpp is dropped, with a one-line message, when it cannot."""
    args._gguf = None
    if "llamacpp" not in methods:
        return methods
    from . import llamacpp

    reason = llamacpp.skip_reason(args.model)
    if reason is None:
        args._gguf = str(llamacpp.gguf_for(args.model))
        return methods
    print(f"bench: skipping llamacpp: {reason}", file=sys.stderr, flush=True)
    left = [m for m in methods if m != "llamacpp"]
    if not left:
        raise UserError(f"nothing to measure: llamacpp skipped ({reason})")
    return left


@contextlib.contextmanager
def busy_machine(threads: int):
    """An N-thread float32 matmul loop in a child process for the duration (nothing if N is 0)."""
    if not threads:
        yield None
        return
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "OMP_NUM_THREADS")}
    proc = subprocess.Popen([sys.executable, "-c", BUSY_LOOP, str(threads)], env=env)
    try:
        time.sleep(BUSY_WARMUP_S)
        yield proc
    finally:
        proc.kill()
        proc.wait()


def _write(path: str | None, data: dict) -> None:
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(data, indent=1) + "\n")


def run(args) -> int:
    from . import report as bench_report

    if args.plot_from:
        if args.markdown:
            print(bench_report.markdown(bench_report.load_results(args.plot_from)))
        out = bench_report.plot_file(args.plot_from, args.plot)
        print(json.dumps({"plot": out, "from": args.plot_from}))
        return 0
    methods = parse_methods(args.methods)
    sizes = parse_sizes(args.cache_sizes, args.sinks)
    batches = parse_batch_sizes(args.batch_sizes, methods)
    _check_positive(args, ["steps", "recompute_steps", "chunk_size", "threads", "profile_steps", "every", "long_window"])
    _check_positive(args, ["warmup", "sinks", "busy"], minimum=0)
    check_recall(args, methods, sizes)
    args._fills = parse_fills(args.recall_fill)
    methods = _available(args, methods)
    with busy_machine(args.busy):
        if args.long_stream is not None:
            return run_long(args, methods, sizes)
        return _sweep(args, methods, sizes, batches)


def _sweep(args, methods: list[str], sizes: list[int], batches: list[int]) -> int:
    from . import report as bench_report

    machine = _machine(args)
    if args.floor:
        from .hardware import memory_bandwidth

        machine["bandwidth"] = memory_bandwidth(device=args.device)
        print(f"memory bandwidth: read {machine['bandwidth']['read_gb_s']} GB/s, "
              f"copy {machine['bandwidth']['copy_gb_s']} GB/s", file=sys.stderr)
    results = []
    for size in sizes:  # all methods of one size close together in time: ratios see the same noise
        runs = [(m, b, f) for m in methods for b in batches for f in (args._fills if m == "recall" else [0])]
        for method, batch, fill in runs:
            print(f"bench: {method} @ cache {size}, batch {batch}" + (f", fill {fill}" if fill else "") + " ...",
                  file=sys.stderr, flush=True)
            row = run_worker(_spec(args, method, size, batch, fill), args.in_process)
            if args.floor and row["bytes_per_token"]:
                row["floor_ms"] = round(row["bytes_per_token"] / (machine["bandwidth"]["read_gb_s"] * 1e9) * 1000, 4)
                row["x_floor"] = round(row["ms_per_token_p50"] / row["floor_ms"], 2)
            if "profile_table" in row:
                print(f"\nprofile: {method} @ cache {size}, {args.profile_steps} decode step(s), "
                      f"{row['profile_ops']} profiler op events per step (nested ones included)\n{row['profile_table']}")
            results.append(row)
            data = {"results": results, "machine": machine, "ratios": compute_ratios(results),
                    "settings": {k: v for k, v in vars(args).items() if not k.startswith("_") and k != "command"}}
            _write(args.json, data)  # after every configuration: a crash late in a sweep loses nothing
    ratios = data["ratios"]
    print_table(results, ratios, args.floor)
    if args.markdown:
        print(bench_report.markdown(data))
    plot = bench_report.plot_data(data, args.plot) if args.plot else None
    summary = {"model": args.model, "dtype": args.dtype, "quant": args.quant, "threads": machine["torch_threads"],
               "p50_ms": {f"{bench_report.row_label(r, batch=False)}@{r['cache_size']}"
                          + (f"x{r['batch_size']}" if r.get("batch_size", 1) > 1 else ""): r["ms_per_token_p50"] for r in results},
               "ratios": ratios, "json": args.json, "plot": plot}
    print(json.dumps(summary))
    return 0


def run_long(args, methods: list[str], sizes: list[int]) -> int:
    from . import report as bench_report

    if args.long_stream < 2:
        raise UserError(f"--long-stream must be at least 2 tokens (got {args.long_stream})")
    method, size = methods[0], sizes[0]
    if len(methods) > 1 or len(sizes) > 1:
        print(f"bench long-stream: using the first method and size only ({method} @ {size})", file=sys.stderr)
    machine = _machine(args)
    long = run_worker(_spec(args, method, size), args.in_process)
    print(f"{method} @ cache {size}: {long['tokens_decoded']} tokens decoded; p50 first {long['window_tokens']} "
          f"{long['p50_first_ms']:.2f} ms, last {long['p50_last_ms']:.2f} ms, ratio {long['p50_last_over_first']:.3f} "
          f"(target <= 1.10); RSS {long['rss_first_mb']:.0f} -> max {long['rss_max_mb']:.0f} MB, "
          f"growth {long['rss_growth_pct']:.2f}% (target < 5%)")
    data = {"long_stream": long, "machine": machine,
            "settings": {k: v for k, v in vars(args).items() if not k.startswith("_") and k != "command"}}
    _write(args.json, data)
    if args.markdown:
        print(bench_report.markdown(data))
    plot = bench_report.plot_data(data, args.plot) if args.plot else None
    summary = {k: v for k, v in long.items() if k != "checkpoints"}
    print(json.dumps({**summary, "json": args.json, "plot": plot}))
    return 0
