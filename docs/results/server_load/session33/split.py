"""Scratch: the engine's batched decode step (rows at the load test's stages, as batch_stages.py) split into
the native linears, the native decode attention and the rest (wrappers around native.linear / native.decode
timed), B = 1, 8, 1, 8, 60 steps each."""
import sys, time, torch, statistics, collections
sys.path.insert(0, "src")
from streaming_llm.models import native
from streaming_llm.core.batch import StreamBatch
from streaming_llm.core.config import StreamingConfig
from streaming_llm.core.engine import StreamingLLM
from streaming_llm.models.loading import load_model
from streaming_llm.models.quantize import quantize_linears
torch.set_num_threads(2)
T = collections.Counter()
def wrap(name):
    f = getattr(native, name)
    def g(*a, **k):
        t0 = time.perf_counter(); r = f(*a, **k); T[name] += time.perf_counter() - t0; return r
    setattr(native, name, g)
wrap("linear"); wrap("decode")
model, tok = load_model("smollm2-135m-instruct"); model = quantize_linears(model, "auto")
config = StreamingConfig(sinks=4, window=1020)
vocab = model.config.get_text_config(decoder=True).vocab_size
for b in (1, 8, 1, 8):
    gen = torch.Generator().manual_seed(0)
    batch = StreamBatch(StreamingLLM(model, tok, config), slots=b); rows = []
    for i in range(b):
        e = StreamingLLM(model, tok, config)
        e.feed(torch.randint(0, vocab, (100 + 25 * i,), generator=gen), logits="none"); rows.append(batch.add_from(e))
    for i in range(10): batch.feed(rows, torch.full((b, 1), 100 + i))
    T.clear(); n = 60; t0 = time.perf_counter()
    for i in range(n): batch.feed(rows, torch.full((b, 1), 100 + i))
    tot = (time.perf_counter() - t0) / n * 1000
    print(f"B={b} step {tot:.2f} ms: linear {T['linear']/n*1000:.2f} decode-attn {T['decode']/n*1000:.2f} rest {tot - (T['linear']+T['decode'])/n*1000:.2f}")
