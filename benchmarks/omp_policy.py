"""OpenMP wait policy: decode and prefill speed of the default chat setup with the policy unset
(libgomp's default: idle threads spin a while) and PASSIVE (idle threads sleep at once), on a
quiet machine and beside a competing process that keeps both cores busy with matmuls.

    PYTHONPATH=src python benchmarks/omp_policy.py [STEPS]

Each cell is one `streaming-llm bench` run (streaming, cache 4+1020, `--quant auto` as chat uses,
2 threads, STEPS timed decode steps, default 128) under that policy; bench measures in a fresh
process, and the policy is read once, when torch loads. Prints one line per cell: median ms per
decoded token, tok/s, prefill tok/s (1,024 tokens).
"""

import json
import os
import subprocess
import sys
import tempfile
import time

LOAD = "import torch\ntorch.set_num_threads(2)\na = torch.randn(1024, 1024)\nwhile True:\n    a @ a\n"


def env_with(policy: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    if policy != "unset":
        env["OMP_WAIT_POLICY"] = policy
    return env


def cell(policy: str, steps: int) -> str:
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "bench.json")
        run = subprocess.run(
            [sys.executable, "-m", "streaming_llm.cli", "bench", "--quant", "auto", "--threads", "2",
             "--methods", "streaming", "--cache-sizes", "1024", "--steps", str(steps), "--json", out],
            env=env_with(policy), capture_output=True, text=True,
        )
        if run.returncode != 0:
            return f"failed: {run.stderr.strip()[-300:]}"
        r = json.load(open(out))["results"][0]
    return (f"p50 {r['ms_per_token_p50']:.2f} ms/token, {1000 / r['ms_per_token_p50']:.1f} tok/s, "
            f"prefill {r['prefill_tok_per_s']:.0f} tok/s")


def main() -> None:
    steps = int(sys.argv[1]) if len(sys.argv) > 1 else 128
    print(f"load average at start: {os.getloadavg()[0]:.2f}; {steps} timed decode steps per cell")
    for machine in ("quiet", "beside a 2-thread matmul loop"):
        load = None
        if machine != "quiet":
            load = subprocess.Popen([sys.executable, "-c", LOAD], env=env_with("unset"))
            time.sleep(3)
        try:
            for policy in ("unset", "PASSIVE"):
                print(f"{machine:32s} OMP_WAIT_POLICY={policy:8s} {cell(policy, steps)}", flush=True)
        finally:
            if load is not None:
                load.kill()
                load.wait()


if __name__ == "__main__":
    main()
