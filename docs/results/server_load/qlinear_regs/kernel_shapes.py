"""Scratch: qlinear.c builds timed on the default model's layer shapes (random weights, hot in cache), 1, 8 and
33 rows, 2 threads, median of 5 x 40 calls through ctypes; argv: name=path.so ... (the first is the
baseline; DIFF marks a build whose output bits differ from it)."""
import ctypes, sys, time, torch, statistics
sys.path.insert(0, "src")
from streaming_llm.models.quantize import native_layout
torch.manual_seed(0)
libs = {name: ctypes.CDLL(path) for name, path in (a.split("=") for a in sys.argv[1:])}
P, L, I = ctypes.c_void_p, ctypes.c_long, ctypes.c_int
for lib in libs.values():
    lib.qlinear.restype = ctypes.c_int
    lib.qlinear.argtypes = [P, L, L, L, P, P, P, I, I, L, P, I, I]
SH = [(576,576),(192,576),(1536,576),(576,1536),(49152,576)]
threads = 2
def prep(n,k,bits):
    codes = torch.randint(0,16 if bits==4 else 256,(n,k))
    if bits==4:
        sc = torch.rand(n,k//32)*0.01+0.001; mi = -torch.rand(n,k//32)*0.1
    else:
        sc = torch.rand(n)*0.01+0.001; mi = -128*sc
    return native_layout(codes, sc, mi, bits)
res = {}
for M in (1,8,33):
  for (n,k) in SH:
    bits = 8 if n==49152 else 4
    w,s,l = prep(n,k,bits)
    x = torch.randn(M,k); y = torch.empty(M,n)
    args = lambda: (x.data_ptr(), M, k, k, w.data_ptr(), s.data_ptr(), l.data_ptr(), int(bits==4), bits, n, y.data_ptr(), threads, 0)
    outs = {}
    for name, lib in libs.items():
        f = lib.qlinear
        a = args()
        for _ in range(5): f(*a)
        ts=[]
        for rep in range(5):
            t0=time.perf_counter()
            for _ in range(40): f(*a)
            ts.append((time.perf_counter()-t0)/40*1e6)
        outs[name]=(statistics.median(ts), y.clone())
    base = next(iter(outs.values()))[1]
    print(f"M{M:3d} {n:5d}x{k:4d} " + "  ".join(f"{nm}:{t:8.1f}us{'' if torch.equal(o,base) else ' DIFF'}" for nm,(t,o) in outs.items()), flush=True)
