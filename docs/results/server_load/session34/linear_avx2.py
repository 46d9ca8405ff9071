"""QuantLinear on the default model's layer shapes: the native AVX2 path against torch's packed kernels
(STREAMING_LLM_NATIVE=0 in a second process), 1, 8 and 33 rows, 2 threads, median of 5 x 40 calls.
Usage: python linear_avx2.py        (runs both and prints them side by side)"""
import os, statistics, subprocess, sys, time, json

SHAPES = [(576, 576), (192, 576), (1536, 576), (576, 1536), (49152, 576)]  # (out, in); the head is int8


def measure():
    import torch
    sys.path.insert(0, "src")
    from streaming_llm.models import native
    from streaming_llm.models.quantize import QuantLinear
    torch.set_num_threads(2)
    torch.manual_seed(0)
    out = {"kernel": native.linear_status()}
    for n, k in SHAPES:
        q = QuantLinear(torch.nn.Linear(k, n, bias=False), 8 if n == 49152 else 4)
        for m in (1, 8, 33):
            x = torch.randn(m, k)
            with torch.no_grad():
                for _ in range(5):
                    q(x)
                ts = []
                for _ in range(5):
                    t0 = time.perf_counter()
                    for _ in range(40):
                        q(x)
                    ts.append((time.perf_counter() - t0) / 40 * 1e6)
            out[f"{n}x{k} M{m}"] = statistics.median(ts)
    return out


if __name__ == "__main__":
    if sys.argv[1:] == ["--one"]:
        print(json.dumps(measure()))
        sys.exit()
    runs = {}
    for name, env in (("native", {}), ("torch", {"STREAMING_LLM_NATIVE": "0"})):
        r = subprocess.run([sys.executable, __file__, "--one"], env=dict(os.environ, **env), capture_output=True, text=True, check=True)
        runs[name] = json.loads(r.stdout.strip().splitlines()[-1])
    print("kernels:", runs["native"].pop("kernel"), "|", runs["torch"].pop("kernel"))
    print(f"{'shape':>18} {'native us':>10} {'torch us':>10} {'torch/native':>12}")
    for key in runs["native"]:
        a, b = runs["native"][key], runs["torch"][key]
        print(f"{key:>18} {a:10.1f} {b:10.1f} {b / a:12.2f}")
