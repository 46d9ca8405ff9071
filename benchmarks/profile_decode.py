"""Profile 10 decode steps of the default model at cache 4+1020 with int4 weights (BENCHMARKS.md).

Prints the p50 of 40 unprofiled steps, the profiler's table by self CPU time, and the op events per
step (nested ones included: what dispatch costs). `--kv float32` profiles the float32 ring (the
engine before the bfloat16 one); `--threads` sets torch's threads (default 1); `--batch B` copies
the stream into B rows of a `StreamBatch` and profiles its batched step (every row's cache full);
`--quant auto` takes the calibrated formats instead of int4.

    PYTHONPATH=src python benchmarks/profile_decode.py --threads 1 --kv bfloat16
    PYTHONPATH=src python benchmarks/profile_decode.py --threads 2 --cache 256 --batch 8 --quant auto
"""
import argparse
import statistics
import time

import torch
from torch.profiler import ProfilerActivity, profile

from streaming_llm.core.batch import StreamBatch
from streaming_llm.core.config import StreamingConfig
from streaming_llm.core.engine import StreamingLLM
from streaming_llm.models.loading import load_model
from streaming_llm.models.quantize import quantize_linears

p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
p.add_argument("--threads", type=int, default=1)
p.add_argument("--kv", choices=("auto", "float32", "bfloat16"), default="auto")
p.add_argument("--cache", type=int, default=1024)
p.add_argument("--batch", type=int, default=1)
p.add_argument("--quant", choices=("int4", "auto"), default="int4")
args = p.parse_args()
torch.set_num_threads(args.threads)
m, tok = load_model("smollm2-135m-instruct")
quantize_linears(m, args.quant)
e = StreamingLLM(m, tok, StreamingConfig(sinks=4, window=args.cache - 4), kv_dtype=None if args.kv == "float32" else args.kv)
e.feed(torch.randint(0, 40000, (args.cache + 6,)), logits="none")
step = lambda: e.feed([5], logits="last")  # noqa: E731
if args.batch > 1:
    batch = StreamBatch(e, slots=args.batch)
    rows = [batch.add_from(e) for _ in range(args.batch)]
    step = lambda: batch.feed(rows, torch.full((len(rows), 1), 5))  # noqa: E731
ts = []
for _ in range(45):
    t0 = time.perf_counter()
    step()
    ts.append((time.perf_counter() - t0) * 1000)
print(f"kv {e.kv_dtype or m.dtype}, threads {args.threads}, cache {args.cache}, batch {args.batch}, {args.quant}: "
      f"p50 {statistics.median(ts[5:]):.2f} ms/step")
with profile(activities=[ProfilerActivity.CPU]) as prof:
    for _ in range(10):
        step()
ka = prof.key_averages()
print(ka.table(sort_by="self_cpu_time_total", row_limit=25))
print(f"op events per step: {sum(k.count for k in ka) / 10:.0f}; self CPU in ops per step: "
      f"{sum(k.self_cpu_time_total for k in ka) / 10 / 1000:.2f} ms")
