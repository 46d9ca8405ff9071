"""One long chat through the server with the official `openai` client, outlasting the model's
context, with a server kill (SIGKILL) and restart in the middle.

Starts `streaming-llm serve` on a loopback port with a temporary --data-dir, then holds a single
streaming conversation (the whole history sent each request, OpenAI style, named by session_id)
whose user turns are long paragraphs, until the session's stream has seen `--target-tokens`
tokens. When half-way, the server is killed with SIGKILL and started again on the same data
directory; the conversation goes on from the last completed turn. Prints one line per turn, then
a one-line JSON summary. Checks: the cache never holds more than sinks+window tokens, no turn is
lost to the kill, and after the restart only the new turn is prefilled.

    python benchmarks/long_session.py --model smollm2-135m-instruct --target-tokens 9000

Persistence per turn (snapshots proportional to the turn): each row has the turn's stored bytes
(`snapshot_bytes`, `snapshot_kind` delta | full), `persist_ms` and the tokens it added; the
summary compares a delta to the full snapshot and persist_ms early vs late in the session. A
long session of short turns, its first turn filling the cache:

    python benchmarks/long_session.py --first-sentences 70 --sentences 2 --max-tokens 12 \
        --max-turns 200 --target-tokens 1000000 --kill-after-turn 100 --serve-arg=--threads=1
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import openai

SENTENCES = [
    "The lighthouse keeper wrote the weather into his log every morning at six.",
    "Ships passed in the fog, and their horns answered each other across the bay.",
    "In winter the supply boat came only twice a month, if the sea allowed it.",
    "He kept a cat named Pilot, who slept on the warm lamp housing at night.",
    "Once a storm broke three windows, and he patched them with sailcloth and tar.",
    "Children from the village rowed out in summer to hear his stories about wrecks.",
]


def paragraph(turn: int, sentences: int) -> str:
    body = " ".join(SENTENCES[(turn + i) % len(SENTENCES)] for i in range(sentences))
    return f"Part {turn + 1} of my notes: {body} Reply with one short sentence."


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(model, port, data_dir, extra) -> subprocess.Popen:
    src = str(Path(__file__).resolve().parents[1] / "src")
    env = {**os.environ, "PYTHONPATH": src + os.pathsep + os.environ.get("PYTHONPATH", "")}
    cmd = [sys.executable, "-m", "streaming_llm.cli", "serve", "--model", model, "--host", "127.0.0.1",
           "--port", str(port), "--data-dir", data_dir, "--log-level", "warning", *extra]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline:
        if proc.poll() is not None:
            sys.exit(f"long_session: the server exited with {proc.returncode}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return proc
        except httpx.TransportError:
            time.sleep(0.2)
    proc.kill()
    sys.exit("long_session: the server did not start")


def _p(xs, q):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))] if xs else None


def persistence(rows) -> dict:
    """Stored bytes and persist time: deltas against full snapshots, early against late turns."""
    full = [r for r in rows if r["snapshot_kind"] == "full"]
    deltas = [r for r in rows if r["snapshot_kind"] == "delta" and r["cache"] == r["capacity"]]
    largest_full = max((r["snapshot_bytes"] for r in full), default=0)
    out = {"full_turns": len(full), "delta_turns": len(deltas), "full_bytes_max": largest_full}
    if deltas and largest_full:
        # a delta's size as a fraction of a full snapshot, against the fraction of the cache its turn wrote
        over = [r["snapshot_bytes"] / largest_full - r["added"] / r["capacity"] for r in deltas]
        out.update(delta_bytes_p50=_p([r["snapshot_bytes"] for r in deltas], 0.5),
                   delta_bytes_max=max(r["snapshot_bytes"] for r in deltas),
                   added_tokens_p50=_p([r["added"] for r in deltas], 0.5),
                   delta_fraction_p50=round(_p([r["snapshot_bytes"] / largest_full for r in deltas], 0.5), 4),
                   delta_excess_over_added_fraction_max=round(max(over), 4),
                   delta_excess_bytes_max=round(max(over) * largest_full))
    ms = [r["persist_ms"] for r in rows[1:]]
    q = max(1, len(ms) // 4)
    out.update(persist_ms_p50=_p(ms, 0.5), persist_ms_p95=_p(ms, 0.95), persist_ms_max=max(ms, default=None),
               persist_ms_delta_p50=_p([r["persist_ms"] for r in deltas], 0.5),
               persist_ms_full_p50=_p([r["persist_ms"] for r in full[1:]], 0.5),
               persist_ms_first_quarter_p50=_p(ms[:q], 0.5), persist_ms_last_quarter_p50=_p(ms[-q:], 0.5))
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--target-tokens", type=int, default=9000, help="stop once the stream has seen this many tokens")
    p.add_argument("--sentences", type=int, default=40, help="sentences per user turn (~16 tokens each)")
    p.add_argument("--first-sentences", type=int, default=None, help="sentences of the first turn (default: --sentences)")
    p.add_argument("--max-tokens", type=int, default=24)
    p.add_argument("--kill-after-turn", type=int, default=None,
                   help="the SIGKILL and restart after this turn (default: when half of --target-tokens is seen)")
    p.add_argument("--max-turns", type=int, default=200, help="a hard bound on requests")
    p.add_argument("--serve-arg", action="append", default=[], help="extra flag for serve, e.g. --serve-arg=--threads=1")
    args = p.parse_args(argv)
    port, data_dir = free_port(), tempfile.mkdtemp(prefix="long-session-")
    proc = start(args.model, port, data_dir, args.serve_arg)
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0, timeout=600)
    model = client.models.list().data[0].id
    messages, rows, restarted_at, t_start = [], [], None, time.perf_counter()
    try:
        for turn in range(args.max_turns):
            n_sent = args.sentences if turn or args.first_sentences is None else args.first_sentences
            messages.append({"role": "user", "content": paragraph(turn, n_sent)})
            t0, ttft, text, info = time.perf_counter(), None, [], None
            stream = client.chat.completions.create(model=model, messages=messages, max_tokens=args.max_tokens, temperature=0,
                                                    stream=True, extra_body={"session_id": "long"})
            for chunk in stream:
                if chunk.choices and chunk.choices[0].delta.content:
                    ttft = ttft or time.perf_counter() - t0
                    text.append(chunk.choices[0].delta.content)
                info = (chunk.model_extra or {}).get("session") or info
            messages.append({"role": "assistant", "content": "".join(text)})
            row = {"turn": info["turns"], "tokens_seen": info["tokens_seen"], "cache": info["cache_tokens"],
                   "capacity": info["capacity"], "prefilled": info["prefilled_tokens"], "loaded_from": info["loaded_from"],
                   "rebuilt": info["rebuilt"], "ttft_s": round(ttft or 0, 2), "total_s": round(time.perf_counter() - t0, 2),
                   "snapshot_mb": round(info["snapshot_bytes"] / 1e6, 2), "snapshot_bytes": info["snapshot_bytes"],
                   "snapshot_kind": info.get("snapshot_kind"), "persist_ms": info["persist_ms"],
                   "added": info["tokens_seen"] - (rows[-1]["tokens_seen"] if rows else 0),
                   "reply": messages[-1]["content"][:60]}
            rows.append(row)
            print(json.dumps(row), flush=True)
            assert row["turn"] == turn + 1 and not row["rebuilt"] and row["cache"] <= row["capacity"], row
            if row["tokens_seen"] >= args.target_tokens:
                break
            half = row["tokens_seen"] >= args.target_tokens // 2 if args.kill_after_turn is None else row["turn"] == args.kill_after_turn
            if restarted_at is None and half:
                proc.send_signal(signal.SIGKILL)
                proc.wait(30)
                print(f"-- killed the server (SIGKILL) after turn {row['turn']}; restarting on {data_dir}", flush=True)
                proc = start(args.model, port, data_dir, args.serve_arg)
                restarted_at = row["turn"]
    finally:
        proc.terminate()
        proc.wait(30)
    after = next((r for r in rows if restarted_at is not None and r["turn"] == restarted_at + 1), None)
    summary = {
        "model": model, "turns": len(rows), "tokens_seen": rows[-1]["tokens_seen"], "capacity": rows[-1]["capacity"],
        "max_cache": max(r["cache"] for r in rows), "restarted_after_turn": restarted_at,
        "first_turn_after_restart": after, "wall_s": round(time.perf_counter() - t_start, 1),
        "mean_prefilled_per_turn": round(sum(r["prefilled"] for r in rows) / len(rows), 1),
        **persistence(rows),
    }
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
