"""Control for the long-stream drift: decode latency of an engine that has streamed N tokens vs a
fresh one, interleaved step by step in one process (same machine state for both)."""
import sys, time, statistics, types, torch
torch.set_num_threads(2)
from streaming_llm.cliargs import load_model_from_args
from streaming_llm import StreamingLLM, StreamingConfig
N = int(sys.argv[1]) if len(sys.argv) > 1 else 50_000
model, tok = load_model_from_args(types.SimpleNamespace(model="smollm2-135m-instruct", dtype="float32", device="cpu", quant="auto"))
cfg = StreamingConfig(method="streaming", sinks=4, window=1020, chunk_size=512)
g = torch.Generator().manual_seed(0)
old, new = StreamingLLM(model, tok, cfg), StreamingLLM(model, tok, cfg)
t = time.perf_counter()
old.feed(torch.randint(0, 49152, (N,), generator=g), logits="none")
print(f"old engine fed {N} tokens in {time.perf_counter()-t:.0f}s", flush=True)
new.feed(torch.randint(0, 49152, (1024,), generator=g), logits="none")
times = {"old": [], "new": []}
nxt = {"old": 1, "new": 1}
with torch.inference_mode():
    for step in range(1200):
        for name, eng in (("old", old), ("new", new)):
            t = time.perf_counter()
            logits = eng.feed([nxt[name]], logits="last")
            times[name].append((time.perf_counter() - t) * 1000)
            nxt[name] = int(logits.argmax())
for name in times:
    x = times[name][200:]
    print(f"{name}: tokens seen {(old if name=='old' else new).tokens_seen}, p50 {statistics.median(x):.2f} ms, "
          f"p90 {sorted(x)[int(0.9*len(x))]:.2f} ms")
