"""Scratch measurement, not product code: the engine's batched decode step with torch's SDPA and with
a native decode attention (decode_attention.c here: C, OpenMP in torch's own libgomp pool, one
(row, KV head) per task with fixed loops, so a row's bits do not depend on the other rows), patched
in for single-query unmasked calls. Rows at the load test's stages (100, 125, ... tokens), B = 1
and 8, both variants alternated three times in one process; prints p50 ms per step and 8 / 1.

    gcc -O3 -march=native -fopenmp -fno-math-errno -shared -fPIC decode_attention.c -o da.so -lm
    PYTHONPATH=src python docs/results/server_load/ceiling/native_attention/engine_try.py

It patches `attention.rowwise_decode_attention`, which the engine had when this ran (commit
d488bfa) and no longer has: it measures that commit, run on a checkout of it.
"""
from pathlib import Path
import ctypes, sys, time, statistics, torch, torch.nn.functional as F
import streaming_llm.core.attention as A
from streaming_llm.core.batch import StreamBatch
from streaming_llm.core.config import StreamingConfig
from streaming_llm.core.engine import StreamingLLM
from streaming_llm.models.loading import load_model
from streaming_llm.models.quantize import quantize_linears
torch.set_num_threads(2)
lib = ctypes.CDLL(str(Path(__file__).with_name("da.so"))); fn = lib.decode_attention
P, L, I, Fl = ctypes.c_void_p, ctypes.c_long, ctypes.c_int, ctypes.c_float
fn.argtypes = [P, L, L, P, P, L, L, L, P, I, I, I, I, Fl, P]
def native(q, keys, values, lengths, scale):
    B, Hq, _, D = q.shape; Hkv = keys.shape[1]
    out = torch.empty(B, Hq, 1, D)
    lens = torch.as_tensor(lengths, dtype=torch.long)
    fn(q.data_ptr(), q.stride(0), q.stride(1), keys.data_ptr(), values.data_ptr(), keys.stride(0), keys.stride(1), keys.stride(2),
       lens.data_ptr(), B, Hq, Hkv, D, scale, out.data_ptr())
    return out
orig_rw = A.rowwise_decode_attention
orig_sdpa = F.scaled_dot_product_attention
def rw_native(q, plan, scale):
    return native(q, plan.keys, plan.values, plan.row_lengths, scale)
mode = {"on": False}
def sdpa_patch(q, k, v, attn_mask=None, scale=None, enable_gqa=False, is_causal=False, **kw):
    if mode["on"] and q.shape[2] == 1 and attn_mask is None and not is_causal and q.dtype == torch.float32 and k.stride(-1) == 1:
        return native(q, k, v, [k.shape[2]] * q.shape[0], scale)
    return orig_sdpa(q, k, v, attn_mask=attn_mask, scale=scale, enable_gqa=enable_gqa, is_causal=is_causal, **kw)
A.F.scaled_dot_product_attention = sdpa_patch
m, tok = load_model("smollm2-135m-instruct"); m = quantize_linears(m, "auto")
cfg = StreamingConfig(sinks=4, window=1020)
batches = {}
for B in (1, 8):
    gen = torch.Generator().manual_seed(0)
    batch = StreamBatch(StreamingLLM(m, tok, cfg), slots=B); rows = []
    for i in range(B):
        e = StreamingLLM(m, tok, cfg); e.feed(torch.randint(0, 40000, (100 + 25*i,), generator=gen), logits="none"); rows.append(batch.add_from(e))
    batches[B] = (batch, rows)
res = {}
for rnd in range(3):
    for name in ("sdpa", "native"):
        on = name == "native"; mode["on"] = on
        A.rowwise_decode_attention = rw_native if on else orig_rw
        for B, (batch, rows) in batches.items():
            ids = torch.full((B, 1), 5); ts = []
            for i in range(30):
                t0 = time.perf_counter(); batch.feed(rows, ids); ts.append((time.perf_counter() - t0) * 1000)
            res.setdefault((name, B), []).extend(ts[5:])
for name in ("sdpa", "native"):
    a, b = statistics.median(res[(name, 1)]), statistics.median(res[(name, 8)])
    print(name, "B=1 %.1f ms  B=8 %.1f ms  ratio %.2f" % (a, b, b / a))
