"""Scratch: one prompt chunk of C tokens (the load test's prompts: 23-33 tokens) fed to a stream already holding
100 tokens, the default model at `--quant auto`, 2 threads: ms per chunk split into the native linears and the
rest (a wrapper around native.linear timed), 20 chunks each, C = 8, 16, 33, 64."""
import sys, time, torch, collections
sys.path.insert(0, "src")
from streaming_llm.models import native
from streaming_llm.core.config import StreamingConfig
from streaming_llm.core.engine import StreamingLLM
from streaming_llm.models.loading import load_model
from streaming_llm.models.quantize import quantize_linears
torch.set_num_threads(2)
T = collections.Counter()
f = native.linear
def timed(*a, **k):
    t0 = time.perf_counter(); r = f(*a, **k); T["linear"] += time.perf_counter() - t0; return r
native.linear = timed
model, tok = load_model("smollm2-135m-instruct"); model = quantize_linears(model, "auto")
vocab = model.config.get_text_config(decoder=True).vocab_size
gen = torch.Generator().manual_seed(0)
for c in (8, 16, 33, 64, 33):
    e = StreamingLLM(model, tok, StreamingConfig(sinks=4, window=1020))
    e.feed(torch.randint(0, vocab, (100,), generator=gen), logits="none")
    state = e.state_dict()
    ids = torch.randint(0, vocab, (c,), generator=gen)
    ts, lin = [], []
    for i in range(20):
        e.load_state_dict(state); T.clear()
        t0 = time.perf_counter(); e.feed(ids, logits="last"); ts.append(time.perf_counter() - t0); lin.append(T["linear"])
    ts, lin = sorted(ts)[5:15], sorted(lin)[5:15]  # the middle half
    tot, ln = sum(ts) / len(ts) * 1000, sum(lin) / len(lin) * 1000
    print(f"C={c:3d}: {tot:6.1f} ms per chunk ({tot / c:.2f} per token): linears {ln:6.1f}, rest {tot - ln:6.1f}", flush=True)
