"""Thread policy under load: decode speed of the engine (and of llama.cpp, when installed) on a
quiet machine and beside a 2-thread matmul loop, for each thread policy, in one command.

    PYTHONPATH=src python benchmarks/thread_policy.py [--steps 128] [--rounds 1] [--json FILE]

Policies (each cell is one `streaming-llm bench --methods streaming,llamacpp --cache-sizes 1024
--quant auto` run in fresh processes, so OpenMP reads its environment anew):
- spin2:    --threads 2, OMP_WAIT_POLICY unset (libgomp's default: idle threads spin a while);
- passive2: --threads 2, OMP_WAIT_POLICY=PASSIVE (idle threads sleep at once);
- one:      --threads 1;
- auto-fewer:   no --threads, the policy of models/threads.py with STREAMING_LLM_BUSY_THREADS=fewer:
                quiet at start -> 2 threads, spin; busy -> one thread per free core;
- auto-passive: the same with =passive: busy -> 2 threads with OMP_WAIT_POLICY=PASSIVE.
Machines: quiet, then busy (`bench --busy 2`: bench starts the matmul loop itself, before the
thread choice, and stops it at the end). Rounds alternate the policy order, so drift hits all.
Prints one line per cell (p50 ms per token, prefill tok/s, the threads used), then per policy the
busy/quiet slowdown and the geometric mean of quiet and busy p50; the last line is JSON.
Nothing here is timed by this script itself: every number is bench's.
"""

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile

POLICIES = {
    "spin2": (["--threads", "2"], {}),
    "passive2": (["--threads", "2"], {"OMP_WAIT_POLICY": "PASSIVE"}),
    "one": (["--threads", "1"], {}),
    "auto-fewer": ([], {"STREAMING_LLM_BUSY_THREADS": "fewer"}),
    "auto-passive": ([], {"STREAMING_LLM_BUSY_THREADS": "passive"}),
}
MACHINES = {"quiet": [], "busy": ["--busy", "2"]}
CLEARED = ("OMP_WAIT_POLICY", "OMP_NUM_THREADS", "STREAMING_LLM_THREADS", "STREAMING_LLM_BUSY_THREADS", "GOMP_SPINCOUNT")


def cell(policy: str, machine: str, args) -> list[dict]:
    flags, extra_env = POLICIES[policy]
    env = {k: v for k, v in os.environ.items() if k not in CLEARED}
    env.update(extra_env)
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "bench.json")
        cmd = [sys.executable, "-m", "streaming_llm.cli", "bench", "--model", args.model, "--quant", "auto",
               "--methods", args.methods, "--cache-sizes", str(args.cache_size), "--steps", str(args.steps),
               "--json", out, *flags, *MACHINES[machine]]
        run = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if run.returncode != 0:
            print(f"{machine:6s} {policy:12s} failed: {run.stderr.strip()[-300:]}", flush=True)
            return []
        data = json.load(open(out))
    rows = []
    for r in data["results"]:
        rows.append({"policy": policy, "machine": machine, "method": r["method"], "p50_ms": r["ms_per_token_p50"],
                     "p90_ms": r["ms_per_token_p90"], "prefill_tok_per_s": r["prefill_tok_per_s"],
                     "threads": r["threads"], "load_avg_1m": r["load_avg_1m"],
                     "busy_cores_at_start": data["machine"].get("busy_cores_at_start"),
                     "omp_wait_policy": data["machine"].get("omp_wait_policy") or extra_env.get("OMP_WAIT_POLICY")})
        print(f"{machine:6s} {policy:12s} {r['method']:10s} threads {r['threads']}  p50 {r['ms_per_token_p50']:7.2f} "
              f"ms/token ({1000 / r['ms_per_token_p50']:5.1f} tok/s)  p90 {r['ms_per_token_p90']:7.2f}  "
              f"prefill {r['prefill_tok_per_s']:6.0f} tok/s  load {r['load_avg_1m']}", flush=True)
    return rows


def summarise(rows: list[dict]) -> dict:
    out = {}
    for method in dict.fromkeys(r["method"] for r in rows):
        for policy in POLICIES:
            p50 = {m: [r["p50_ms"] for r in rows if (r["method"], r["policy"], r["machine"]) == (method, policy, m)]
                   for m in MACHINES}
            if not all(p50.values()):
                continue
            quiet, busy = (sorted(v)[len(v) // 2] for v in (p50["quiet"], p50["busy"]))
            out[f"{method}/{policy}"] = {"quiet_p50_ms": quiet, "busy_p50_ms": busy, "busy_over_quiet": round(busy / quiet, 2),
                                         "geomean_ms": round(math.sqrt(quiet * busy), 2)}
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--methods", default="streaming,llamacpp", help="bench methods (llamacpp is skipped if absent)")
    p.add_argument("--cache-size", type=int, default=1024)
    p.add_argument("--steps", type=int, default=128)
    p.add_argument("--rounds", type=int, default=1)
    p.add_argument("--json", default=None)
    args = p.parse_args()
    print(f"load average at start: {os.getloadavg()[0]:.2f}; {args.steps} timed decode steps per cell, cache "
          f"{args.cache_size}, {args.rounds} round(s)", flush=True)
    rows = []
    for rnd in range(args.rounds):
        order = list(POLICIES) if rnd % 2 == 0 else list(reversed(POLICIES))
        for machine in MACHINES:
            for policy in order:
                rows.extend(cell(policy, machine, args))
    summary = summarise(rows)
    for key, s in summary.items():
        print(f"{key:25s} quiet {s['quiet_p50_ms']:7.2f}  busy {s['busy_p50_ms']:7.2f}  busy/quiet "
              f"{s['busy_over_quiet']:5.2f}x  geomean {s['geomean_ms']:7.2f} ms")
    result = {"rows": rows, "summary": summary, "settings": vars(args)}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    print(json.dumps({"summary": summary, "json": args.json}))


if __name__ == "__main__":
    main()
