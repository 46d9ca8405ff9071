"""Scratch: the native decode attention at the load test's 8-row stage (lengths 100-275, 9 query / 3 KV heads, D 64), 2 threads
(TH=1: one), hot (one layer 30 times) and cycling 30 layers; saves one output to argv[1] to compare bits across builds."""
import sys, time, torch, statistics
sys.path.insert(0, "src")
from streaming_llm.models import native
torch.set_num_threads(int(__import__("os").environ.get("TH","2"))); torch.manual_seed(0)
B, Hq, Hkv, D, S = 8, 9, 3, 64, 1024
lengths = [100 + 25 * i for i in range(B)]
layers = [(torch.randn(B, Hkv, S, D), torch.randn(B, Hkv, S, D)) for _ in range(30)]
q = torch.randn(B, Hq, 1, D)
def run(ls, reps):
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        for k, v in ls: native.decode(q, k, v, lengths, 0.125)
        ts.append((time.perf_counter() - t0) / len(ls) * 1e6)
    return statistics.median(ts)
for _ in range(2):
    print(f"B={B}: hot (one layer x30) {run([layers[0]]*30, 20):.1f} us/call; cycling 30 layers {run(layers, 20):.1f} us/call")
B1 = [(k[:1].contiguous(), v[:1].contiguous()) for k, v in layers]
q1 = q[:1].contiguous(); l1 = lengths[:1]
ts=[]
for _ in range(20):
    t0=time.perf_counter()
    for k,v in B1: native.decode(q1,k,v,l1,0.125)
    ts.append((time.perf_counter()-t0)/30*1e6)
print(f"B=1 (100 keys) cycling: {statistics.median(ts):.1f} us/call")
out = native.decode(q, layers[3][0], layers[3][1], lengths, 0.125)
torch.save(out, sys.argv[1] if len(sys.argv) > 1 else "/tmp/qk/attn_out.pt")
