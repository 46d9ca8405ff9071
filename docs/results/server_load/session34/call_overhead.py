"""Scratch: what one call of a small native linear costs at one row (the 192 x 576 k/v projections, int4), layer by
layer: the C function through ctypes alone (2 threads, 1 thread), native.linear (Python checks, the output tensor),
QuantLinear called on a 2-D and on a 3-D input (as the model calls it), and torch's float32 F.linear for scale;
median of 5 x 2000 calls, hot in cache, 2 threads."""
import statistics, sys, time
import torch
sys.path.insert(0, "src")
from streaming_llm.models import native
from streaming_llm.models.quantize import QuantLinear

torch.set_num_threads(2)
lib = native._library()[0]
q = QuantLinear(torch.nn.Linear(576, 192, bias=False), 4)
lin = torch.nn.Linear(576, 192, bias=False)
x, x3, y = torch.randn(1, 576), torch.randn(1, 1, 576), torch.empty(1, 192)


def t(name, f, reps=2000):
    for _ in range(200):
        f()
    ts = []
    for _ in range(5):
        t0 = time.perf_counter()
        for _ in range(reps):
            f()
        ts.append((time.perf_counter() - t0) / reps * 1e6)
    print(f"{name:44s} {statistics.median(ts):6.2f} us", flush=True)


args = lambda th: (x.data_ptr(), 1, 576, 576, q.qweight.data_ptr(), q.scales.data_ptr(), q.mins.data_ptr(), 1, 4, 192,
                   y.data_ptr(), th, 0)
a2, a1 = args(2), args(1)
with torch.no_grad():
    t("lib.qlinear via ctypes, 2 threads", lambda: lib.qlinear(*a2))
    t("lib.qlinear via ctypes, 1 thread", lambda: lib.qlinear(*a1))
    t("native.linear", lambda: native.linear(x, q.qweight, q.scales, q.mins, True, 4, 192))
    t("QuantLinear(x), x (1, 576)", lambda: q(x))
    t("QuantLinear(x), x (1, 1, 576)", lambda: q(x3))
    t("torch.nn.Linear float32, x (1, 1, 576)", lambda: lin(x3))
