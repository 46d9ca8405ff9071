"""Scratch: the native decode attention for 8 rows at the load test's stages (104-279 keys, 9 query and 3 KV
heads of 64), one layer's buffers called again and again (hot in cache) against 30 layers' buffers in
turn (as a forward reads them); 2 threads. Prints us per call."""
import sys
import time

import torch

sys.path.insert(0, "src")
from streaming_llm.models import native  # noqa: E402

torch.set_num_threads(2)
B, Hq, Hkv, N, D = 8, 9, 3, 1025, 64
q = torch.randn(B, Hq, 1, D)
k, v = torch.randn(B, Hkv, N, D), torch.randn(B, Hkv, N, D)
lengths = [104 + 25 * i for i in range(B)]
for _ in range(20):
    native.decode(q, k, v, lengths, 0.125)
t0 = time.perf_counter()
for _ in range(500):
    native.decode(q, k, v, lengths, 0.125)
hot = (time.perf_counter() - t0) / 500 * 1e6
ks = [torch.randn(B, Hkv, N, D) for _ in range(30)]
vs = [torch.randn(B, Hkv, N, D) for _ in range(30)]
t0 = time.perf_counter()
for _ in range(20):
    for i in range(30):
        native.decode(q, ks[i], vs[i], lengths, 0.125)
cold = (time.perf_counter() - t0) / 600 * 1e6
print(f"8 rows, 104-279 keys: hot {hot:.1f} us per call, 30 layers in turn {cold:.1f} us per call")
