"""OpenMP wait policy: decode and prefill speed of the default chat setup with the policy unset
(libgomp's default: idle threads spin a while) and PASSIVE (idle threads sleep at once), on a
quiet machine and beside a competing process that keeps both cores busy with matmuls.

    python benchmarks/omp_policy.py [TOKENS]

Each cell is a fresh process (the policy is read once, when torch loads): it loads the model as
`chat` does (--quant auto), prefills 512 tokens, then decodes TOKENS (default 128) one per forward
with a full 4+1020 cache. Prints one line per cell: median ms per decoded token, tok/s, prefill tok/s.
"""

import os
import subprocess
import sys
import time

CELL = r"""
import statistics, sys, time, types, torch
from streaming_llm import StreamingConfig, StreamingLLM
from streaming_llm.cliargs import load_model_from_args
torch.set_num_threads(2)
model, tok = load_model_from_args(types.SimpleNamespace(model="smollm2-135m-instruct", dtype="float32",
                                                        device="cpu", quant="auto"))
eng = StreamingLLM(model, tok, StreamingConfig(sinks=4, window=1020, chunk_size=256))
g = torch.Generator().manual_seed(0)
eng.feed(torch.randint(0, 49152, (64,), generator=g), logits="none"); eng.reset()  # warm-up
t = time.perf_counter()
eng.feed(torch.randint(0, 49152, (512,), generator=g), logits="none")
prefill = 512 / (time.perf_counter() - t)
eng.feed(torch.randint(0, 49152, (1024,), generator=g), logits="none")  # fill the cache
ms, nxt = [], 1
for _ in range(int(sys.argv[1])):
    t = time.perf_counter()
    nxt = int(eng.feed([nxt], logits="last").argmax())
    ms.append((time.perf_counter() - t) * 1000)
p50 = statistics.median(ms)
print(f"p50 {p50:.2f} ms/token, {1000 / p50:.1f} tok/s, prefill {prefill:.0f} tok/s")
"""

LOAD = "import torch\ntorch.set_num_threads(2)\na = torch.randn(1024, 1024)\nwhile True:\n    a @ a\n"


def cell(policy: str, tokens: int) -> str:
    env = dict(os.environ)
    env.pop("OMP_WAIT_POLICY", None)
    if policy != "unset":
        env["OMP_WAIT_POLICY"] = policy
    out = subprocess.run([sys.executable, "-c", CELL, str(tokens)], env=env, capture_output=True, text=True)
    lines = out.stdout.strip().splitlines()
    return lines[-1] if out.returncode == 0 and lines else f"failed: {out.stderr.strip()[-300:]}"


def main() -> None:
    tokens = int(sys.argv[1]) if len(sys.argv) > 1 else 128
    print(f"load average at start: {os.getloadavg()[0]:.2f}; {tokens} decoded tokens per cell")
    for machine in ("quiet", "beside a 2-thread matmul loop"):
        load = None
        if machine != "quiet":
            env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
            load = subprocess.Popen([sys.executable, "-c", LOAD], env=env)
            time.sleep(3)
        try:
            for policy in ("unset", "PASSIVE"):
                print(f"{machine:32s} OMP_WAIT_POLICY={policy:8s} {cell(policy, tokens)}", flush=True)
        finally:
            if load is not None:
                load.kill()
                load.wait()


if __name__ == "__main__":
    main()
