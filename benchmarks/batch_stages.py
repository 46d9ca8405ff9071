"""Decode step time of one `StreamBatch` whose rows are at different stages, as a server's are.

A served session's cache is not full for its first ~1,000 tokens, so the rows of a batched decode
step hold different numbers of tokens (the masked decode path, not the full-cache one that
`fast_path_ab.py` times). Row i is prefilled with `--first + i * --step-tokens` random tokens in a
4+`--window` cache (`--quant auto`, the product's path), then `--steps` decode steps of all rows
are timed after 10 warm-up steps. Prints p50 and min ms per step, then one JSON line. It measures
one version of the code: to compare two, run it on each, alternated (see docs/server_measurements.md).

    PYTHONPATH=src python benchmarks/batch_stages.py --batch 8 --steps 80
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
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--steps", type=int, default=80)
    p.add_argument("--window", type=int, default=1020)
    p.add_argument("--first", type=int, default=200, help="tokens of row 0")
    p.add_argument("--step-tokens", type=int, default=25, help="each next row holds this many more")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
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
    gen = torch.Generator().manual_seed(0)
    batch = StreamBatch(StreamingLLM(model, tok, config), slots=args.batch)
    rows = []
    for i in range(args.batch):
        engine = StreamingLLM(model, tok, config)
        engine.feed(torch.randint(0, vocab, (args.first + args.step_tokens * i,), generator=gen), logits="none")
        rows.append(batch.add_from(engine))
    times = []
    for i in range(10 + args.steps):
        t0 = time.perf_counter()
        batch.feed(rows, torch.full((len(rows), 1), 100 + i))
        times.append((time.perf_counter() - t0) * 1000)
    timed = times[10:]
    summary = {"batch": args.batch, "window": args.window, "steps": args.steps, "threads": args.threads,
               "p50_ms": round(statistics.median(timed), 2), "min_ms": round(min(timed), 2)}
    print(f"B={args.batch} step p50 {summary['p50_ms']:.2f} ms  min {summary['min_ms']:.2f}")
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
