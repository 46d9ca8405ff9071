"""Decode p50 of two source trees, measured alternately in one run: is the change slower?

Runs `streaming-llm bench ... --json` with PYTHONPATH set to each tree's `src`, alternating A, B,
A, B for `--rounds` rounds (so machine drift hits both alike), and prints each round's p50 per
(method, cache size, batch size), the median per tree and the ratio B/A. Make a baseline tree with
`git worktree add /tmp/base <commit>`. The last stdout line is JSON.

    python benchmarks/ab_decode.py --a /tmp/base/src --b src --rounds 3 -- \\
        --methods streaming --cache-sizes 256,1024,4096 --threads 2 --quant auto

It does NOT build or check out anything, and asserts nothing: it measures.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path


def run_bench(src: str, bench_args: list[str]) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "b.json"
        env = {**os.environ, "PYTHONPATH": str(Path(src).resolve())}
        cmd = [sys.executable, "-m", "streaming_llm.cli", "bench", *bench_args, "--json", str(out)]
        subprocess.run(cmd, env=env, check=True, stdout=subprocess.DEVNULL)
        rows = json.loads(out.read_text())["results"]
    return {f"{r['method']}@{r['cache_size']}x{r.get('batch_size', 1)}": r["ms_per_token_p50"] for r in rows}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--a", required=True, help="baseline tree's src folder")
    p.add_argument("--b", required=True, help="changed tree's src folder")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("bench_args", nargs=argparse.REMAINDER, help="-- then flags for streaming-llm bench")
    args = p.parse_args(argv)
    bench_args = [a for a in args.bench_args if a != "--"]
    runs: dict[str, list[dict]] = {"a": [], "b": []}
    for k in range(args.rounds):
        for side in ("a", "b"):
            runs[side].append(run_bench(getattr(args, side), bench_args))
            print(f"round {k + 1} {side}: {runs[side][-1]}  (load {os.getloadavg()[0]:.2f})", flush=True)
    keys = sorted(runs["a"][0])
    summary = {}
    print(f"{'config':<28} {'A p50 ms':>9} {'B p50 ms':>9} {'B/A':>7}")
    for key in keys:
        a = statistics.median(r[key] for r in runs["a"])
        b = statistics.median(r[key] for r in runs["b"] if key in r)
        summary[key] = {"a_ms": round(a, 3), "b_ms": round(b, 3), "b_over_a": round(b / a, 3)}
        print(f"{key:<28} {a:>9.2f} {b:>9.2f} {b / a:>7.3f}")
    print(json.dumps({"a": args.a, "b": args.b, "rounds": args.rounds, "bench_args": bench_args, "results": summary}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
