"""What sharing sessions between replicas costs: two `streaming-llm serve` replicas on one Redis.

Starts `redis-server` on a loopback port (AOF with `appendfsync always`, the durable setting the
docs recommend) and two replicas with `--store redis://...`, then runs the same long-paragraph
conversation (the one of long_session.py) twice: once with every turn on replica A ("sticky"),
once alternating A, B, A, B ("alternate": every turn after the first reloads the session from
Redis). Prints one line per turn and a one-line JSON summary last. Loopback only; needs the
redis-server binary.

    python benchmarks/replicas.py --model smollm2-135m-instruct --turns 6 --serve-arg=--threads=1
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from long_session import free_port, paragraph  # noqa: E402


def start_redis(port: int, data: str) -> subprocess.Popen:
    exe = shutil.which("redis-server") or sys.exit("replicas: redis-server is not installed")
    proc = subprocess.Popen([exe, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "yes",
                             "--appendfsync", "always", "--dir", data], stdout=subprocess.DEVNULL)
    time.sleep(0.5)
    return proc


def start_replica(model: str, port: int, store: str, extra: list[str]) -> subprocess.Popen:
    src = str(Path(__file__).resolve().parents[1] / "src")
    env = {**os.environ, "PYTHONPATH": src + os.pathsep + os.environ.get("PYTHONPATH", "")}
    cmd = [sys.executable, "-m", "streaming_llm.cli", "serve", "--model", model, "--host", "127.0.0.1",
           "--port", str(port), "--store", store, "--log-level", "warning", *extra]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline:
        if proc.poll() is not None:
            sys.exit(f"replicas: a replica exited with {proc.returncode}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return proc
        except httpx.TransportError:
            time.sleep(0.2)
    sys.exit("replicas: a replica did not start")


def stream_turn(url: str, model: str, sid: str, messages: list[dict], max_tokens: int) -> dict:
    body = {"model": model, "messages": messages, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "session_id": sid}
    t0 = time.perf_counter()
    ttft, text, info = None, [], None
    with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=600) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if not line.startswith("data: {"):
                continue
            chunk = json.loads(line[6:])
            delta = chunk["choices"][0]["delta"].get("content") if chunk.get("choices") else None
            if delta:
                ttft = ttft or time.perf_counter() - t0
                text.append(delta)
            info = chunk.get("session") or info
    return {"text": "".join(text), "ttft_s": round(ttft or 0, 2), "total_s": round(time.perf_counter() - t0, 2),
            "info": info}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--turns", type=int, default=6)
    p.add_argument("--sentences", type=int, default=40)
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--serve-arg", action="append", default=[])
    args = p.parse_args()
    data = tempfile.mkdtemp(prefix="replicas-redis-")
    rport = free_port()
    redis = start_redis(rport, data)
    store = f"redis://127.0.0.1:{rport}/0"
    procs, urls = [], []
    try:
        for _ in range(2):
            port = free_port()
            procs.append(start_replica(args.model, port, store, args.serve_arg))
            urls.append(f"http://127.0.0.1:{port}")
        model = httpx.get(urls[0] + "/v1/models").json()["data"][0]["id"]
        replies, rows = {}, {}
        for mode in ("sticky", "alternate"):
            messages, replies[mode], rows[mode] = [], [], []
            for turn in range(args.turns):
                replica = 0 if mode == "sticky" else turn % 2
                messages.append({"role": "user", "content": paragraph(turn, args.sentences)})
                out = stream_turn(urls[replica], model, mode, messages, args.max_tokens)
                messages.append({"role": "assistant", "content": out["text"]})
                info = out["info"]
                row = {"mode": mode, "turn": turn + 1, "replica": "AB"[replica], "loaded_from": info["loaded_from"],
                       "prefilled": info["prefilled_tokens"], "cache": info["cache_tokens"], "ttft_s": out["ttft_s"],
                       "total_s": out["total_s"], "persist_ms": info["persist_ms"],
                       "snapshot_mb": round(info["snapshot_bytes"] / 1e6, 2)}
                print(json.dumps(row), flush=True)
                replies[mode].append(out["text"])
                rows[mode].append(row)
        later = {m: [r for r in rows[m] if r["turn"] > 1] for m in rows}
        summary = {"model": model, "turns": args.turns, "same_replies": replies["sticky"] == replies["alternate"],
                   **{f"{m}_ttft_s_mean_after_turn1": round(statistics.mean(r["ttft_s"] for r in later[m]), 2)
                      for m in later},
                   **{f"{m}_persist_ms_p50": statistics.median(r["persist_ms"] for r in rows[m]) for m in rows}}
        print(json.dumps(summary))
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            proc.wait(30)
        redis.terminate()
        redis.wait(10)
        shutil.rmtree(data, ignore_errors=True)


if __name__ == "__main__":
    main()
