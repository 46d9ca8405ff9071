"""Scratch: QuantLinear's native call on the model's one-row 3-D input (1, 1, K), the forward as it was before
commit "QuantLinear: the native call in x's shape" (reshape, call, cast, view: `old` below, the code of 3a094fe
inlined) against the forward now, on the same modules, alternated 5 times in one process; min over the rounds of
the mean of 3000 calls; outputs compared bit for bit. Shapes of the default model's layers, int4, 2 threads."""
import sys, time
import torch
sys.path.insert(0, "src")
from streaming_llm.models import native
from streaming_llm.models.quantize import QuantLinear

torch.set_num_threads(2)


def old(q, x):
    x2 = x if x.dim() == 2 else x.reshape(-1, x.shape[-1])
    m, k = x2.shape
    lib = native._library()[0]
    x2 = x2 if x2.dtype == torch.float32 and x2.stride(-1) == 1 else x2.float().contiguous()
    y = torch.empty(m, q.out_features, dtype=torch.float32)
    lib.qlinear(x2.data_ptr(), m, k, x2.stride(0), q.qweight.data_ptr(), q.scales.data_ptr(), q.mins.data_ptr(), 1,
                4, q.out_features, y.data_ptr(), torch.get_num_threads(), 0)
    y = y.to(x.dtype)
    return y if x.dim() == 2 else y.view(*x.shape[:-1], q.out_features)


def clock(f, reps=3000):
    t0 = time.perf_counter()
    for _ in range(reps):
        f()
    return (time.perf_counter() - t0) / reps * 1e6


with torch.no_grad():
    for n, k in ((192, 576), (576, 576), (1536, 576), (576, 1536)):
        q = QuantLinear(torch.nn.Linear(k, n, bias=False), 4)
        x = torch.randn(1, 1, k)
        assert torch.equal(old(q, x), q(x)), "bits differ"
        best = {"old": 1e9, "new": 1e9}
        for _ in range(5):
            best["old"] = min(best["old"], clock(lambda: old(q, x)))
            best["new"] = min(best["new"], clock(lambda: q.forward(x)))
        print(f"{n:5d}x{k:4d}: old {best['old']:6.2f} us, new {best['new']:6.2f} us, saved {best['old'] - best['new']:5.2f} us"
              " (same bits)", flush=True)
