"""What moving a stream into and out of a batch row costs (the server's attach and detach), the
default model at 4+1020 with `--quant auto`'s ring: the buffer-to-buffer copies the scheduler
uses (`StreamBatch.add_from` / `copy_out`) against the snapshot path they replaced
(`add(engine.state_dict())` / `load_state_dict(batch.state(row))`), for a stream of `--tokens`
tokens each, and a new stream's first `copy_out` with and without `make_room` first.

Each entry is the median and the max of `--repeats` tries (the first allocation of a fresh buffer is part of
what is measured, so no warm-up beyond one forward of the batch). Prints a table, the CPU, and a
one-line JSON summary last. It measures; nothing is chosen from it.

    PYTHONPATH=src python benchmarks/row_copies.py --threads 2
"""

from __future__ import annotations

import argparse
import json
import statistics
import time


def ms(f) -> float:
    t0 = time.perf_counter()
    f()
    return 1e3 * (time.perf_counter() - t0)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--tokens", default="100,1500", help="stream lengths to move (comma-separated)")
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args(argv)

    import torch

    from streaming_llm.bench.hardware import cpu_model as cpu_name
    from streaming_llm.core.batch import StreamBatch
    from streaming_llm.core.config import StreamingConfig
    from streaming_llm.core.engine import StreamingLLM
    from streaming_llm.models.loading import load_model
    from streaming_llm.models.quantize import quantize_linears

    torch.set_num_threads(args.threads)
    model, tok = load_model("smollm2-135m-instruct")
    quantize_linears(model, "auto")
    config = StreamingConfig(sinks=4, window=1020)
    new = lambda: StreamingLLM(model, tok, config)  # noqa: E731
    batch = StreamBatch(new(), 16)
    warm = batch.add()
    batch.feed([warm], torch.randint(0, 1000, (1, 8)), logits="none")  # allocates the batch's buffers
    batch.remove(warm)
    rows = []
    for n in [int(x) for x in args.tokens.split(",")]:
        got = {k: [] for k in ("add_from", "copy_out", "add(state_dict)", "load(state)")}
        for _ in range(args.repeats):
            e = new()
            e.feed(torch.randint(0, 1000, (n,)), logits="none")
            row = None

            def add_from():
                nonlocal row
                row = batch.add_from(e)

            got["add_from"].append(ms(add_from))
            got["copy_out"].append(ms(lambda: batch.copy_out(row, e)))
            batch.remove(row)
            row = None

            def add_state():
                nonlocal row
                row = batch.add(e.state_dict())

            got["add(state_dict)"].append(ms(add_state))
            got["load(state)"].append(ms(lambda: e.load_state_dict(batch.state(row))))
            batch.remove(row)
        rows.append({"tokens": n, **{k: round(statistics.median(v), 2) for k, v in got.items()},
                     "max": {k: round(max(v), 2) for k, v in got.items()}})
    fresh = {"copy_out": [], "make_room then copy_out": []}
    for _ in range(args.repeats):
        for key in fresh:
            e = new()  # a stream that starts in a row: its own cache has no buffers yet
            row = batch.add_from(e)
            batch.feed([row], torch.randint(0, 1000, (1, 32)), logits="none")
            if key == "copy_out":
                fresh[key].append(ms(lambda: batch.copy_out(row, e)))
            else:
                batch.make_room(e)  # what the scheduler does on the turn thread
                fresh[key].append(ms(lambda: batch.copy_out(row, e)))
            batch.remove(row)
    fresh = {k: [round(statistics.median(v), 2), round(max(v), 2)] for k, v in fresh.items()}
    keys = ("add_from", "copy_out", "add(state_dict)", "load(state)")
    print(f"{'tokens':>7} " + " ".join(f"{k:>16}" for k in keys) + f"   (ms, median / max of {args.repeats})")
    for r in rows:
        print(f"{r['tokens']:>7} " + " ".join(f"{r[k]:>7} / {r['max'][k]:<6}" for k in keys))
    (a, am), (b, bm) = fresh["copy_out"], fresh["make_room then copy_out"]
    print(f"a new stream's first copy_out: {a} / {am} ms; after make_room (on another thread in the server): {b} / {bm} ms")
    print(f"cpu: {cpu_name()}, threads {args.threads}")
    print(json.dumps({"cpu": cpu_name(), "threads": args.threads, "rows": rows, "new_stream": fresh}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
