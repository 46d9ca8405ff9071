"""Decode p50 of one stream on the thread that loaded the model, on a second thread, and on a
second thread after the loading thread has exited: what a process pays when two of its threads
each run torch's OpenMP parallel regions (libgomp throttles every team's spin-wait once the
process holds more OpenMP threads than CPUs). Why the server loads its model on a passing thread
and runs its helper threads single-threaded (`models/threads.py`).

    PYTHONPATH=src python benchmarks/omp_teams.py [--model M] [--cache 1024] [--steps 40]

Prints one line per case and a JSON summary last."""

from __future__ import annotations

import argparse
import json
import statistics
import threading
import time

import torch


def p50_ms(fn, steps: int, warmup: int = 5) -> float:
    times = []
    for _ in range(steps + warmup):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return round(statistics.median(times[warmup:]) * 1e3, 2)


def on_thread(fn):
    out = {}
    th = threading.Thread(target=lambda: out.update(r=fn()))
    th.start()
    th.join()
    return out["r"]


def main() -> None:
    from streaming_llm.cliargs import load_model_from_args
    from streaming_llm.core.config import StreamingConfig
    from streaming_llm.core.engine import StreamingLLM
    from streaming_llm.models import threads

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--cache", type=int, default=1024)
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--threads", type=int, default=2)
    a = p.parse_args()
    load_args = argparse.Namespace(model=a.model, dtype="float32", device="cpu", quant="auto", threads=a.threads)
    one = torch.tensor([[123]])

    def engine():
        model, tok = load_model_from_args(load_args)
        eng = StreamingLLM(model, tok, StreamingConfig(sinks=4, window=a.cache - 4))
        eng.feed(torch.randint(100, 20000, (1, a.cache + 100)))  # a full cache: every step evicts
        return eng

    res = {}
    eng = threads.run_in_passing_thread(engine)
    res["second thread, loading thread exited"] = on_thread(lambda: p50_ms(lambda: eng.feed(one), a.steps))
    res["loading thread (main) again"] = p50_ms(lambda: eng.feed(one), a.steps)  # main now has a team too
    res["second thread, main holds a team"] = on_thread(lambda: p50_ms(lambda: eng.feed(one), a.steps))
    for k, v in res.items():
        print(f"{k:40s} {v:8.2f} ms")
    from streaming_llm.bench.hardware import cpu_model

    print(json.dumps({"model": a.model, "cpu": cpu_model(), "cache": a.cache, "threads": a.threads, "p50_ms": res}))


if __name__ == "__main__":
    main()
