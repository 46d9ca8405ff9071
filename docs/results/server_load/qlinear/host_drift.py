"""Scratch: one stream's decode step, timed in 10-second windows for ~2.5 minutes of sustained load."""
import time, statistics, torch
from streaming_llm.core.engine import StreamingLLM
from streaming_llm.core.config import StreamingConfig
from streaming_llm.models.loading import load_model
from streaming_llm.models.quantize import quantize_linears
torch.set_num_threads(2)
model, tok = load_model("smollm2-135m-instruct")
model = quantize_linears(model, "auto")
e = StreamingLLM(model, tok, StreamingConfig(sinks=4, window=1020))
e.feed(torch.randint(0, 49152, (300,)), logits="none")
t_end = time.time() + 150
while time.time() < t_end:
    ts, w = [], time.time() + 10
    while time.time() < w:
        t = time.perf_counter(); e.feed([100], logits="last"); ts.append((time.perf_counter() - t) * 1e3)
    print(time.strftime("%H:%M:%S"), f"p50 {statistics.median(ts):.2f} ms over {len(ts)} steps, load {open('/proc/loadavg').read().split()[0]}", flush=True)
