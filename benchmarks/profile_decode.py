"""Profile 10 decode steps of the default model at cache 4+1020 with int4 weights, 1 thread (BENCHMARKS.md)."""
import torch
from streaming_llm.models.loading import load_model
from streaming_llm.core.engine import StreamingLLM
from streaming_llm.core.config import StreamingConfig
from streaming_llm.models.quantize import quantize_linears
torch.set_num_threads(1)
m, tok = load_model("smollm2-135m-instruct"); quantize_linears(m, "int4")
e = StreamingLLM(m, tok, StreamingConfig(sinks=4, window=1020))
e.feed(torch.randint(0, 40000, (1030,)), logits="none")
for _ in range(5): e.feed([5], logits="last")
from torch.profiler import profile, ProfilerActivity
with profile(activities=[ProfilerActivity.CPU]) as p:
    for _ in range(10): e.feed([5], logits="last")
print(p.key_averages().table(sort_by="self_cpu_time_total", row_limit=25))
