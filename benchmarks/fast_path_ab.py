"""Decode p50 of the int4 fast path with and without this round's pieces, interleaved in one process.

Variants of the default model, all int4 decoder + int8 head (`--quant int4`):
  base   float32 KV ring, no wide path (the engine before issue 17's bfloat16 round)
  kv     bfloat16 KV ring (`kv_dtype`, what `auto` now picks for quantized models)
  fast   bfloat16 KV ring + the bfloat16 wide path for inputs of `--wide-rows` rows or more
  fp16   float32 KV ring + the float16 (FBGEMM) wide path for inputs of `--wide-rows` rows or more
  auto   what `--quant auto` gives on this machine (its calibrated wide paths; the ring `auto` picks)
For each cache size and batch size, one stream is prefilled (chunked) once per variant and copied
into every row of a `StreamBatch` (batch 1: the single-stream engine), so every row decodes with a
full cache (every step evicts); then the variants take turns, step by step, for `--steps` steps
after `--warmup` (machine drift hits all alike). Prints p50/p90 ms per step, tokens/s over all rows
and each variant's ratio to base; the last stdout line is JSON (`--json` writes it too).

It does NOT choose anything: it measures. `streaming-llm bench --quant auto` is the product path.

    PYTHONPATH=src python benchmarks/fast_path_ab.py --threads 2 --cache-sizes 256,1024,4096 --batch-sizes 1,8
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

VARIANTS = {"base": (None, None), "kv": ("bfloat16", None), "fast": ("bfloat16", "bf16"), "fp16": (None, "fp16"),
            "auto": ("auto", "auto")}  # (ring, wide copy)


def ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--cache-sizes", default="1024")
    p.add_argument("--batch-sizes", default="1,8")
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--wide-rows", type=int, default=4, help="rows from which `fast` and `fp16` use their wide copy")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    try:
        caches, batches = ints(args.cache_sizes), ints(args.batch_sizes)
    except ValueError:
        caches = batches = []
    variants = [v for v in args.variants.split(",") if v]
    if not caches or not batches or min(caches) < 8 or min(batches) < 1 or any(v not in VARIANTS for v in variants) \
            or args.steps < 1 or args.wide_rows < 1:
        print(f"error: need comma lists of cache sizes >= 8 and batch sizes >= 1, variants among {list(VARIANTS)}, "
              "--steps >= 1, --wide-rows >= 1", file=sys.stderr)
        return 2

    from streaming_llm.models.threads import apply as apply_threads

    apply_threads(args.threads)
    import copy

    import torch
    from tqdm import tqdm

    from streaming_llm.core.batch import StreamBatch
    from streaming_llm.core.config import StreamingConfig
    from streaming_llm.core.engine import StreamingLLM
    from streaming_llm.models.loading import load_model
    from streaming_llm.models.quantize import quantize_linears

    base, tok = load_model(args.model)
    models = {}
    for v in variants:
        wide = args.wide_rows if VARIANTS[v][1] else None
        if v == "auto":
            models[v] = quantize_linears(copy.deepcopy(base), "auto")
            print(f"auto: {models[v].config.streaming_llm_quant_calibration}", file=sys.stderr)
        else:
            models[v] = quantize_linears(copy.deepcopy(base), "int4", wide_rows=wide,
                                         wide_kind=VARIANTS[v][1] or "bf16")
    del base
    vocab = models[variants[0]].config.get_text_config(decoder=True).vocab_size
    gen = torch.Generator().manual_seed(0)
    rows_out = []
    configs = [(c, b) for c in caches for b in batches]
    for cache, batch in tqdm(configs, desc="configurations", file=sys.stderr):
        config = StreamingConfig(sinks=4, window=cache - 4)
        prompt = torch.randint(0, vocab, (cache + 8,), generator=gen)
        feeders = {}
        for v in variants:
            eng = StreamingLLM(models[v], tok, config, kv_dtype=VARIANTS[v][0])
            eng.feed(prompt, logits="none")
            if batch == 1:
                feeders[v] = lambda t, e=eng: e.feed([t], logits="last")
            else:
                sb = StreamBatch(eng, slots=batch)
                for _ in range(batch):
                    sb.add(eng.state_dict())
                rows = list(range(batch))
                feeders[v] = lambda t, sb=sb, rows=rows: sb.feed(rows, torch.full((len(rows), 1), t))
        times = {v: [] for v in variants}
        for i in range(args.warmup + args.steps):
            t = int(torch.randint(0, vocab, (1,), generator=gen))
            for v in variants:
                t0 = time.perf_counter()
                feeders[v](t)
                if i >= args.warmup:
                    times[v].append((time.perf_counter() - t0) * 1000)
        for v in variants:
            p50 = statistics.median(times[v])
            p90 = sorted(times[v])[int(0.9 * (len(times[v]) - 1))]
            rows_out.append({"variant": v, "cache_size": cache, "batch_size": batch, "p50_ms": round(p50, 3),
                             "p90_ms": round(p90, 3), "tok_s": round(1000 * batch / p50, 2)})
        del feeders
    base_p50 = {(r["cache_size"], r["batch_size"]): r["p50_ms"] for r in rows_out if r["variant"] == variants[0]}
    print(f"{'variant':<6} {'cache':>6} {'batch':>5} {'p50 ms':>9} {'p90 ms':>9} {'tok/s':>8} {'/ ' + variants[0]:>8}")
    for r in rows_out:
        r["over_first"] = round(r["p50_ms"] / base_p50[(r["cache_size"], r["batch_size"])], 3)
        print(f"{r['variant']:<6} {r['cache_size']:>6} {r['batch_size']:>5} {r['p50_ms']:>9.2f} {r['p90_ms']:>9.2f} "
              f"{r['tok_s']:>8.1f} {r['over_first']:>8.3f}")
    from streaming_llm.bench.hardware import cpu_model

    summary = {"model": args.model, "cpu": cpu_model(), "threads": torch.get_num_threads(), "wide_rows": args.wide_rows,
               "steps": args.steps, "load_avg": round(__import__("os").getloadavg()[0], 2), "results": rows_out}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(summary, f, indent=1)
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
