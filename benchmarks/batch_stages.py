"""Decode step time of `StreamBatch`es whose rows are at different stages, as a server's are.

A served session's cache is not full for its first ~1,000 tokens, so the rows of a batched decode
step hold different numbers of tokens (the masked decode path, not the full-cache one that
`fast_path_ab.py` times). Row i is prefilled with `--first + i * --step-tokens` random tokens in a
4+`--window` cache (`--quant auto`, the product's path). `--batch 1,8` builds one batch per size
(its rows 0..B-1 prefilled alike) and times `--steps` decode steps of all its rows, after 10
warm-up steps, the sizes alternated `--rounds` times in one process; prints p50 and min ms per
step of each size, each size's p50 over the first size's, then one JSON line. `--profile` adds
the torch profiler's top ops per size (10 steps each): where a bigger batch's extra time goes.
To compare two versions of the code, run it on each, alternated (see docs/server_measurements.md).

    PYTHONPATH=src python benchmarks/batch_stages.py --batch 1,8 --steps 40 --rounds 2 --profile
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--batch", default="8", help="batch sizes, comma-separated (e.g. 1,8)")
    p.add_argument("--steps", type=int, default=80, help="timed steps per size and round")
    p.add_argument("--rounds", type=int, default=1, help="times the sizes are alternated")
    p.add_argument("--window", type=int, default=1020)
    p.add_argument("--first", type=int, default=200, help="tokens of row 0")
    p.add_argument("--step-tokens", type=int, default=25, help="each next row holds this many more")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--profile", action="store_true", help="print the profiler's top ops per size")
    args = p.parse_args(argv)
    sizes = [int(b) for b in args.batch.split(",")]
    import torch

    from streaming_llm.core.batch import StreamBatch
    from streaming_llm.core.config import StreamingConfig
    from streaming_llm.core.engine import StreamingLLM
    from streaming_llm.models.loading import load_model
    from streaming_llm.models.quantize import quantize_linears

    torch.set_num_threads(args.threads)
    model, tok = load_model(args.model)
    model = quantize_linears(model, "auto")
    config = StreamingConfig(sinks=4, window=args.window)
    vocab = model.config.get_text_config(decoder=True).vocab_size
    batches = {}
    for b in sizes:
        gen = torch.Generator().manual_seed(0)
        batch = StreamBatch(StreamingLLM(model, tok, config), slots=b)
        rows = []
        for i in range(b):
            engine = StreamingLLM(model, tok, config)
            engine.feed(torch.randint(0, vocab, (args.first + args.step_tokens * i,), generator=gen), logits="none")
            rows.append(batch.add_from(engine))
        batches[b] = (batch, rows)

    def step(b: int, i: int) -> float:
        batch, rows = batches[b]
        t0 = time.perf_counter()
        batch.feed(rows, torch.full((len(rows), 1), 100 + i))
        return (time.perf_counter() - t0) * 1000

    times = {b: [] for b in sizes}
    for _ in range(args.rounds):
        for b in sizes:
            for i in range(10 + args.steps):
                t = step(b, i)
                if i >= 10:
                    times[b].append(t)
    p50 = {b: statistics.median(times[b]) for b in sizes}
    for b in sizes:
        print(f"B={b} step p50 {p50[b]:.2f} ms  min {min(times[b]):.2f}  x first {p50[b] / p50[sizes[0]]:.2f}")
    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        for b in sizes:
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                for i in range(10):
                    step(b, i)
            ka = prof.key_averages()
            print(f"\n== B={b}: {sum(k.count for k in ka) / 10:.0f} op events and "
                  f"{sum(k.self_cpu_time_total for k in ka) / 10 / 1000:.2f} ms self CPU in ops per step")
            print(ka.table(sort_by="self_cpu_time_total", row_limit=8))
    summary = {"batch": sizes, "window": args.window, "steps": args.steps, "rounds": args.rounds,
               "threads": args.threads, "first": args.first, "step_tokens": args.step_tokens,
               "p50_ms": [round(p50[b], 2) for b in sizes], "min_ms": [round(min(times[b]), 2) for b in sizes],
               "x_first": [round(p50[b] / p50[sizes[0]], 2) for b in sizes]}
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
