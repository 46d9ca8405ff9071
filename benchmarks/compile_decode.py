"""Does `torch.compile` (inductor, CPU, dynamic=False) speed up the int4 decode step? Measures it.

Loads the default model with int4 linears, fills a 4+1020 streaming cache, times 30 eager decode
steps, then compiles `--what` (mlp: each decoder layer's MLP; layer: each decoder layer's forward;
model: the whole forward), times the first two compiled steps (compile time) and 30 more, and
prints the graph-break reasons dynamo counted. The engine does not compile anything by default:
this script is the measurement behind that (BENCHMARKS.md, "Issue 17, this session").

    PYTHONPATH=src python benchmarks/compile_decode.py --what layer --threads 1
"""
import argparse
import statistics
import time

import torch

from streaming_llm.core.config import StreamingConfig
from streaming_llm.core.engine import StreamingLLM
from streaming_llm.models.loading import load_model
from streaming_llm.models.quantize import quantize_linears

p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
p.add_argument("--what", choices=("mlp", "layer", "model"), default="layer")
p.add_argument("--threads", type=int, default=1)
args = p.parse_args()
torch.set_num_threads(args.threads)
m, tok = load_model("smollm2-135m-instruct")
quantize_linears(m, "int4")
e = StreamingLLM(m, tok, StreamingConfig(sinks=4, window=1020))
e.feed(torch.randint(0, 40000, (1030,)), logits="none")


def p50(n=30):
    ts = []
    for _ in range(n):
        t0 = time.perf_counter()
        e.feed([5], logits="last")
        ts.append((time.perf_counter() - t0) * 1000)
    return statistics.median(ts)


print(f"eager p50 {p50():.2f} ms", flush=True)
if args.what == "model":
    m.forward = torch.compile(m.forward, dynamic=False)
else:
    for layer in m.model.layers:
        target = layer.mlp if args.what == "mlp" else layer
        target.forward = torch.compile(target.forward, dynamic=False)
for i in range(2):
    t0 = time.perf_counter()
    e.feed([5], logits="last")
    print(f"compiled step {i + 1}: {time.perf_counter() - t0:.2f} s", flush=True)
print(f"compiled ({args.what}) p50 {p50():.2f} ms", flush=True)
print("graph breaks:", torch._dynamo.utils.counters["graph_break"].most_common(5))
