"""Decode cost of recall against plain streaming, interleaved step by step in one process.

`streaming-llm bench` (BENCHMARKS.md, Table 7) times its rows one after another, so a VM whose
speed drifts within minutes moves their ratio. Here plain streaming and each recall setting decode
in turn, one step each, their order rotating from step to step, so drift hits all of them alike.
Each recall engine first streams `--fill` tokens of the Gutenberg corpus through chunked prefill
(its memory then holds about that many tokens); every engine then fills its 4+`--window` cache
and decodes `--steps` steps after 20 warm-up steps. `--quant auto`, as the product runs. Prints p50 per engine and its ratio to
streaming, and how much the process's anonymous RSS grew while that engine filled (Linux), then one
JSON line.

    PYTHONPATH=src python benchmarks/recall_ab.py --fill 100000 --recall 4x32e4,8x32e4

A spec is a `reproduce passkey --recall` spec: KxB, with optional h (`--recall-select head`), m
(`--recall-score mean`) or b (`--recall-score both`) and eN (`--recall-every N`). It measures; it
chooses nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--window", type=int, default=1020)
    p.add_argument("--fill", type=int, default=100000, help="corpus tokens streamed into each recall engine first")
    p.add_argument("--recall", default="4x32e4,8x32e4", help="comma-separated specs KxB[h][m][eN]")
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    import torch
    from tqdm import tqdm

    from streaming_llm.bench.hardware import cpu_flags, cpu_model, rss_parts_mb
    from streaming_llm.core.config import StreamingConfig
    from streaming_llm.core.engine import StreamingLLM
    from streaming_llm.errors import UserError
    from streaming_llm.eval.data import load_corpus
    from streaming_llm.eval.retrieval import Method, parse_recall
    from streaming_llm.models.loading import load_model
    from streaming_llm.models.quantize import quantize_linears

    configs = {"streaming": StreamingConfig(sinks=4, window=args.window)}
    for text in args.recall.split(","):  # the reproductions' recall specs, their parser and configs
        try:
            configs[text] = Method("recall", args.window, parse_recall(text)).config(StreamingConfig.chunk_size)
        except UserError as e:
            raise SystemExit(f"recall_ab: {e}") from None
    torch.set_num_threads(args.threads)
    model, tok = load_model(args.model)
    model = quantize_linears(model, "auto")
    ids = tok(load_corpus("gutenberg").text[: 8 * (args.fill + args.window + 64)])["input_ids"]
    if len(ids) < args.fill + args.window + 8:
        raise SystemExit(f"recall_ab: the corpus gave {len(ids)} tokens, fewer than --fill + --window")
    engines = {name: StreamingLLM(model, tok, config) for name, config in configs.items()}
    grew = {}  # anonymous RSS MB added while each engine filled (its memory's RAM, and allocator slack)
    for name, engine in engines.items():
        fill = 0 if name == "streaming" else args.fill
        body = ids[: fill + args.window + 8]
        before = rss_parts_mb().get("rss_anon_mb")
        for lo in tqdm(range(0, len(body), 4096), desc=f"fill {name}", file=sys.stderr):
            engine.feed(body[lo : lo + 4096], logits="none")
        after = rss_parts_mb().get("rss_anon_mb")
        grew[name] = None if before is None else round(after - before, 1)
    times = {name: [] for name in engines}
    names = list(engines)
    for i in range(20 + args.steps):
        t = ids[args.fill + args.window + 8 + i]
        for name in names[i % len(names):] + names[: i % len(names)]:
            engine = engines[name]
            t0 = time.perf_counter()
            engine.feed([t], logits="last")
            if i >= 20:
                times[name].append((time.perf_counter() - t0) * 1000)
    base = statistics.median(times["streaming"])
    rows = []
    for name, engine in engines.items():
        p50 = statistics.median(times[name])
        held = sum(m.stored_tokens for m in engine.cache.memories if m is not None) // max(
            1, sum(m is not None for m in engine.cache.memories))
        rows.append({"engine": name, "tokens_in_memory": held, "p50_ms": round(p50, 2),
                     "p90_ms": round(sorted(times[name])[int(0.9 * (len(times[name]) - 1))], 2),
                     "over_streaming": round(p50 / base, 3), "fill_anon_rss_mb": grew[name]})
        print(f"{name:<10} memory {held:>7} tokens  p50 {p50:7.2f} ms  p90 {rows[-1]['p90_ms']:7.2f}  "
              f"/ streaming {rows[-1]['over_streaming']:.3f}  anon RSS +{grew[name]} MB while it filled")
    print(json.dumps({"model": args.model, "cpu": cpu_model(), "amx": "amx_bf16" in cpu_flags(), "window": args.window,
                      "fill": args.fill, "steps": args.steps, "threads": args.threads,
                      "load_avg": round(os.getloadavg()[0], 2), "rows": rows}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
