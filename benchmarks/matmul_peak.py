"""fp32 matmul throughput at the shapes of one 256- or 512-token chunk of SmolLM2-135M (decoder
linears, output head), 1 and 2 threads: the compute ceiling of chunked evaluation (docs/results.md)."""
import time, torch
shapes = [(576, 576), (576, 192), (576, 192), (576, 576), (576, 1536), (576, 1536), (1536, 576)]
for threads in (1, 2):
    torch.set_num_threads(threads)
    for m in (256, 512):
        xs = [torch.randn(m, k) for k, _ in shapes]; ws = [torch.randn(k, n) for k, n in shapes]
        head = torch.randn(576, 49152); xh = torch.randn(m, 576)
        def step():
            for x, w in zip(xs, ws): x @ w
        for _ in range(5): step()
        t = time.perf_counter(); reps = 30
        for _ in range(reps): step()
        dt = time.perf_counter() - t
        fl = reps * sum(2 * m * k * n for k, n in shapes)
        t = time.perf_counter(); xh @ head; xh @ head; dth = (time.perf_counter() - t) / 2
        print(f"threads {threads} M={m}: decoder linears {fl/dt/1e9:.1f} GFLOP/s, head {2*m*576*49152/dth/1e9:.1f} GFLOP/s")
