"""Bounded load test of `streaming-llm serve`: N concurrent chat sessions x T turns, streaming.

`--sessions 1,4,8,16` runs each level in turn against the same server and prints one row per
level plus the aggregate tokens/s of each level over the first one (measured in one run).
`--rounds 3` runs that list three times in turn and adds each session count's median tok/s and
the medians' ratios (every round printed too; also printed when a count repeats in the list,
e.g. `--sessions 1,8,8,1` to balance a drift in time): on a host whose speed drifts within a
minute, one level each says more about the drift than about batching. `--pause-s 10` idles that
long before each level after the first: on a host that slows under sustained load (a 2-core cloud
VM measured 13.7 ms per token in its first 10 s of load, up to 21 after), every level then
starts from the same rested state.

Every session is a multi-turn conversation sent the OpenAI way (the whole history each request,
named with `session_id`, so the server prefills only the new turn). Requests are streamed to
measure time to first token (TTFT) and total latency. Bounded: exactly N*T requests at most,
a wall-clock cap (`--time-cap-s`) after which no request starts and running ones are cut off,
and loopback URLs only. Prints a table, then a one-line JSON summary (last line).

    # against a running server
    python benchmarks/load_test.py --url http://127.0.0.1:8000 --sessions 4 --turns 5 --max-tokens 32
    # or start one for the run (temporary --data-dir, stopped at the end)
    python benchmarks/load_test.py --serve smollm2-135m-instruct --sessions 4 --turns 5 --max-tokens 32

What it does NOT do: run against a remote host, retry, or pace requests (each session sends its
next turn as soon as the previous reply ends: closed-loop load).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from urllib.parse import urlparse

import httpx

DEFAULT_SESSIONS = 4
DEFAULT_TURNS = 5
DEFAULT_MAX_TOKENS = 32
DEFAULT_TIME_CAP_S = 300.0
QUESTIONS = [
    "Hi! Who are you?",
    "Name three colours of the rainbow.",
    "Why is the sky blue? One sentence.",
    "Give me a short tip for learning Python.",
    "What is 12 times 7?",
    "Tell me a very short joke.",
    "What did I ask you first?",
    "Summarise our conversation in one line.",
]
LONG_QUESTIONS = [  # answers that run long: for measuring decode throughput at a fixed reply length
    "Write a long story about a dragon who learns to bake bread.",
    "Explain in detail how a steam engine works, step by step.",
    "Describe a walk through a busy market, with every sound and smell.",
    "Write a long letter to a friend about your summer holidays.",
    "Tell the history of the bicycle in many paragraphs.",
    "Describe, in detail, how to plant and care for a vegetable garden.",
    "Write a long fairy tale about a clever fox and a proud crow.",
    "Explain at length why people enjoy music.",
]


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    v = sorted(values)
    k = (len(v) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(v) - 1)
    return v[lo] + (v[hi] - v[lo]) * (k - lo)


def check_loopback(url: str) -> None:
    host = urlparse(url).hostname or ""
    if host not in ("127.0.0.1", "localhost", "::1"):
        sys.exit(f"load_test: refusing to load {host!r}: loopback URLs only")


async def one_request(http, model, sid, messages, max_tokens, deadline) -> dict:
    body = {"model": model, "messages": messages, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}, "session_id": sid}
    t0 = time.perf_counter()
    ttft, text, usage, session, err, stamps = None, [], None, None, None, []
    try:
        async with asyncio.timeout(max(0.1, deadline - time.monotonic())):
            async with http.stream("POST", "/v1/chat/completions", json=body) as r:
                if r.status_code != 200:
                    return {"ok": False, "error": f"HTTP {r.status_code}: {(await r.aread())[:200]!r}"}
                async for line in r.aiter_lines():
                    if not line.startswith("data: ") or line == "data: [DONE]":
                        continue
                    event = json.loads(line[6:])
                    if "error" in event:
                        err = event["error"]["message"]
                        break
                    if event.get("usage"):
                        usage = event["usage"]
                    for choice in event.get("choices", []):
                        piece = choice["delta"].get("content")
                        if piece:
                            stamps.append(time.perf_counter())
                        if piece and ttft is None:
                            ttft = time.perf_counter() - t0
                        text.append(piece or "")
                    session = event.get("session") or session
    except TimeoutError:
        return {"ok": False, "error": "cut off by --time-cap-s"}
    except httpx.HTTPError as e:
        return {"ok": False, "error": f"{type(e).__name__}: {e}"}
    total = time.perf_counter() - t0
    if err or usage is None:
        return {"ok": False, "error": err or "stream ended without usage"}
    gaps = [b - a for a, b in zip(stamps, stamps[1:])]  # per-token latency as the client sees it
    return {"ok": True, "ttft": ttft if ttft is not None else total, "total": total, "text": "".join(text), "gaps": gaps,
            "completion_tokens": usage["completion_tokens"], "prompt_tokens": usage["prompt_tokens"], "session": session}


async def run_session(http, model, index, args, deadline, results, level=0):
    sid = f"load-{args.run_id}-{level}-{index}"
    questions = LONG_QUESTIONS if args.questions == "long" else QUESTIONS
    messages = []
    for turn in range(args.turns):
        if time.monotonic() >= deadline:
            results.append({"ok": False, "error": "not started: --time-cap-s reached"})
            continue
        messages.append({"role": "user", "content": questions[(index + turn) % len(questions)]})
        res = await one_request(http, model, sid, messages, args.max_tokens, deadline)
        res.update(session_index=index, turn=turn)
        results.append(res)
        if not res["ok"]:
            break  # the conversation cannot go on without its reply
        messages.append({"role": "assistant", "content": res["text"]})


def client(args, connections: int) -> httpx.AsyncClient:
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    return httpx.AsyncClient(base_url=args.url, headers=headers, timeout=httpx.Timeout(args.time_cap_s),
                             limits=httpx.Limits(max_connections=connections))


async def warm_up(args) -> None:
    """`--warmup` requests on a session of their own, one at a time; nothing of them is counted."""
    async with client(args, 2) as http:
        model = args.model or (await http.get("/v1/models")).json()["data"][0]["id"]
        for i in range(args.warmup):
            messages = [{"role": "user", "content": QUESTIONS[i % len(QUESTIONS)]}]
            res = await one_request(http, model, f"load-{args.run_id}-warmup", messages, args.max_tokens,
                                    time.monotonic() + args.time_cap_s)
            if not res["ok"]:
                sys.exit(f"load_test: the warm-up request failed: {res['error']}")


BATCH_COUNTERS = ("forwards", "decode_steps", "decode_tokens", "prefill_chunks", "prefill_tokens", "row_moves",
                  "mixed_steps", "decode_s", "prefill_s", "mixed_s", "calls_s", "gather_s", "gather_cutoffs", "prefill_shared")


def level_batch(before: dict, after: dict) -> dict | None:
    """The scheduler's counters over one level (the server's are cumulative), and rows per decode forward."""
    b0, b1 = before.get("batch") or {}, after.get("batch") or {}
    if not b1.get("enabled"):
        return None
    d = {k: round(b1.get(k, 0) - b0.get(k, 0), 3) for k in BATCH_COUNTERS}
    d["rows_per_decode_forward"] = round(d["decode_tokens"] / d["decode_steps"], 2) if d["decode_steps"] else None
    return d


async def run_load(args, sessions: int, level: int = 0) -> dict:
    async with client(args, sessions + 2) as http:
        model = args.model or (await http.get("/v1/models")).json()["data"][0]["id"]
        before = (await http.get("/health")).json()
        results: list[dict] = []
        t0, deadline = time.perf_counter(), time.monotonic() + args.time_cap_s
        await asyncio.gather(*(run_session(http, model, i, args, deadline, results, level) for i in range(sessions)))
        wall = time.perf_counter() - t0
        health = (await http.get("/health")).json()
    return {**summarize(results, wall, model, args, health, sessions), "level_batch": level_batch(before, health)}


def summarize(results, wall, model, args, health, sessions) -> dict:
    ok = [r for r in results if r["ok"]]
    ms = lambda v: None if v is None else round(1000 * v, 1)  # noqa: E731
    ttft = [r["ttft"] for r in ok]
    total = [r["total"] for r in ok]
    gen = [(r["total"] - r["ttft"]) / (r["completion_tokens"] - 1) for r in ok if r["completion_tokens"] > 1]
    gaps = [g for r in ok for g in r["gaps"]]
    later = [r["session"]["prefilled_tokens"] for r in ok if r["turn"] > 0 and r.get("session")]
    persist = [r["session"]["persist_ms"] for r in ok if r.get("session")]
    tokens = sum(r["completion_tokens"] for r in ok)
    return {
        "model": model, "sessions": sessions, "turns": args.turns, "max_tokens": args.max_tokens,
        "questions": args.questions, "load_avg_1m": round(os.getloadavg()[0], 2),
        "requests": len(results), "ok": len(ok), "failed": len(results) - len(ok),
        "errors": sorted({r["error"] for r in results if not r["ok"]})[:5],
        "wall_s": round(wall, 2), "requests_per_s": round(len(ok) / wall, 3), "completion_tokens": tokens,
        "completion_tokens_per_s": round(tokens / wall, 1),
        "completion_tokens_mean": round(tokens / len(ok), 1) if ok else None,
        "ttft_ms": {q: ms(percentile(ttft, p)) for q, p in (("p50", .5), ("p90", .9), ("p95", .95), ("p99", .99), ("max", 1.0))},
        "per_token_ms": {q: ms(percentile(gaps, p)) for q, p in (("p50", .5), ("p95", .95))},
        "total_ms": {q: ms(percentile(total, p)) for q, p in (("p50", .5), ("p90", .9), ("p99", .99), ("max", 1.0))},
        "inter_token_ms_mean": ms(sum(gen) / len(gen)) if gen else None,
        "prefilled_tokens_after_turn1_mean": round(sum(later) / len(later), 1) if later else None,
        "persist_ms": {q: ms(None if not persist else percentile(persist, p) / 1000) for q, p in (("p50", .5), ("max", 1.0))},
        "server": {k: health.get(k) for k in ("turns", "aborted", "evicted", "reloaded", "rebuilt", "batch")},
    }


def print_table(s: dict) -> None:
    print(f"model {s['model']}: {s['sessions']} sessions x {s['turns']} turns, max_tokens {s['max_tokens']}, streaming, greedy")
    print(f"requests {s['ok']}/{s['requests']} ok in {s['wall_s']} s: {s['requests_per_s']} req/s, "
          f"{s['completion_tokens_per_s']} completion tok/s aggregate ({s['completion_tokens_mean']} tokens per reply); "
          f"per-token latency p50 {s['per_token_ms']['p50']} ms, p95 {s['per_token_ms']['p95']} ms; "
          f"TTFT p95 {s['ttft_ms']['p95']} ms")
    print(f"{'latency (ms)':<14}{'p50':>9}{'p90':>9}{'p99':>9}{'max':>9}")
    for name in ("ttft_ms", "total_ms"):
        row = s[name]
        print(f"{name[:-3]:<14}" + "".join(f"{'-' if row[q] is None else row[q]:>9}" for q in ("p50", "p90", "p99", "max")))
    print(f"mean inter-token latency {s['inter_token_ms_mean']} ms; mean prefill after turn 1: "
          f"{s['prefilled_tokens_after_turn1_mean']} tokens; persisting a turn p50 {s['persist_ms']['p50']} ms, "
          f"max {s['persist_ms']['max']} ms")
    print(f"server counters {s['server']}")
    if s.get("level_batch"):
        print(f"this level's model thread {s['level_batch']}")
    for e in s["errors"]:
        print(f"error: {e}")


def rounds_table(summaries: list[dict], levels: list[int]) -> dict:
    """Per session count over its levels: every level's tok/s, the median, and the median over the
    first count's median; printed as a table."""
    out = {}
    for n in dict.fromkeys(levels):
        tps = [s["completion_tokens_per_s"] for s in summaries if s["sessions"] == n]
        out[n] = {"tokens_per_s": tps, "median": round(statistics.median(tps), 1)}
    first = out[levels[0]]["median"] or None
    print(f"{'sessions':>8} {'median tok/s':>13} {'x first':>8}  every round")
    for n, row in out.items():
        row["median_over_first"] = round(row["median"] / first, 2) if first else None
        print(f"{n:>8} {row['median']:>13} {row['median_over_first']:>8}  {', '.join(map(str, row['tokens_per_s']))}")
    return {str(n): row for n, row in out.items()}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def spawn_server(model: str, extra: list[str]) -> tuple[subprocess.Popen, str, str]:
    port, data_dir = free_port(), tempfile.mkdtemp(prefix="load-test-")
    src = str(Path(__file__).resolve().parents[1] / "src")
    env = {**os.environ, "PYTHONPATH": src + os.pathsep + os.environ.get("PYTHONPATH", "")}
    cmd = [sys.executable, "-m", "streaming_llm.cli", "serve", "--model", model, "--host", "127.0.0.1",
           "--port", str(port), "--data-dir", data_dir, "--log-level", "warning", *extra]
    print("starting:", " ".join(cmd[1:]), file=sys.stderr)
    proc = subprocess.Popen(cmd, env=env)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 300
    while time.time() < deadline:
        if proc.poll() is not None:
            sys.exit(f"load_test: the server exited with {proc.returncode}")
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return proc, url, data_dir
        except httpx.TransportError:
            time.sleep(0.2)
    proc.kill()
    sys.exit("load_test: the server did not start within 300 s")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--url", default="http://127.0.0.1:8000", help="a running server (loopback only)")
    p.add_argument("--serve", metavar="MODEL", default=None, help="start `streaming-llm serve --model MODEL` for the run")
    p.add_argument("--serve-arg", action="append", default=[], help="extra flag for --serve (repeatable), e.g. --serve-arg=--window=256")
    p.add_argument("--model", default=None, help="model id to send (default: the server's first)")
    p.add_argument("--api-key", default=os.environ.get("STREAMING_LLM_API_KEY"))
    p.add_argument("--sessions", default=str(DEFAULT_SESSIONS), help="concurrent sessions, or a comma list of levels run in turn")
    p.add_argument("--questions", default="short", choices=("short", "long"), help="long: prompts whose answers run long")
    p.add_argument("--turns", type=int, default=DEFAULT_TURNS, help="requests per session")
    p.add_argument("--max-tokens", type=int, default=DEFAULT_MAX_TOKENS)
    p.add_argument("--time-cap-s", type=float, default=DEFAULT_TIME_CAP_S, help="no request runs past this")
    p.add_argument("--rounds", type=int, default=1,
                   help="run the --sessions list this many times in turn on the one server, and print each session "
                   "count's median tok/s and the medians' ratios (a host whose speed drifts shows in the rounds)")
    p.add_argument("--pause-s", type=float, default=0.0,
                   help="idle seconds before each level after the first (a host that slows under sustained load "
                   "then starts every level alike; the pauses are not in any level's time)")
    p.add_argument("--out", default=None, help="also write the JSON summary here")
    p.add_argument("--warmup", type=int, default=1,
                   help="requests on a throwaway session before the first level, not counted (a new server's first "
                   "forwards allocate its buffers and initialise the kernels)")
    args = p.parse_args(argv)
    try:
        levels = [int(x) for x in args.sessions.split(",") if x.strip()]
    except ValueError:
        p.error(f"--sessions: {args.sessions!r} is not a comma list of integers")
    if not levels or not all(1 <= n <= 256 for n in levels):
        p.error("need 1 <= --sessions <= 256")
    if not (1 <= args.turns <= 1000 and args.max_tokens >= 1 and args.time_cap_s > 0 and 0 <= args.warmup <= 100
            and 1 <= args.rounds <= 20 and 0 <= args.pause_s <= 600):
        p.error("need 1 <= --turns <= 1000, --max-tokens >= 1, --time-cap-s > 0, 0 <= --warmup <= 100, 1 <= --rounds <= 20, "
                "0 <= --pause-s <= 600")
    args.run_id = f"{int(time.time())}-{os.getpid()}"
    proc = None
    if args.serve:
        proc, args.url, _ = spawn_server(args.serve, args.serve_arg)
    check_loopback(args.url)
    summaries = []
    try:
        if args.warmup:
            asyncio.run(warm_up(args))
        for i, n in enumerate(levels * args.rounds):  # each level its own sessions (ids carry the level's index)
            if i and args.pause_s:
                time.sleep(args.pause_s)
            summaries.append(asyncio.run(run_load(args, n, i)))
            print_table(summaries[-1])
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(30)
    base = summaries[0]["completion_tokens_per_s"] or None
    if len(summaries) > 1:
        print(f"{'sessions':>8} {'tok/s':>8} {'x first':>8} {'TTFT p50':>9} {'TTFT p95':>9} {'tok p50':>8} {'tok p95':>8}")
        for s in summaries:
            s["tokens_per_s_over_first"] = round(s["completion_tokens_per_s"] / base, 2) if base else None
            cells = (s["completion_tokens_per_s"], s["tokens_per_s_over_first"], s["ttft_ms"]["p50"], s["ttft_ms"]["p95"],
                     s["per_token_ms"]["p50"], s["per_token_ms"]["p95"])  # None (e.g. no gaps to time) prints "-"
            print(f"{s['sessions']:>8} " + " ".join(f"{'-' if v is None else v:>{w}}" for v, w in zip(cells, (8, 8, 9, 9, 8, 8))))
    medians = rounds_table(summaries, levels) if len(summaries) > len(set(levels)) else None  # a count ran twice
    from streaming_llm.bench.hardware import cpu_model

    result = summaries[0] if len(summaries) == 1 else {"levels": summaries, **({"medians": medians} if medians else {})}
    result = {"cpu": cpu_model(), **result}
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result))
    return 0 if all(s["failed"] == 0 for s in summaries) else 1


if __name__ == "__main__":
    sys.exit(main())
