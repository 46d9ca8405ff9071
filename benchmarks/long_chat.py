"""A long chat (hundreds of turns, several times the model's trained context) on one stream.

Runs a deterministic, generated conversation through `ChatSession` (the code path of
`streaming-llm chat --script`) and checks StreamingLLM's promise: the cache never holds more than
sinks+window tokens, the per-token cost of the last 10% of turns is within 20% of the first 10%,
and memory stays flat once the cache is full. `--method dense` and `--method window` run the same
conversation as the baselines (usually on fewer turns): dense grows and slows and degrades past the
trained context, window collapses once the first tokens are evicted.

    PYTHONPATH=src python benchmarks/long_chat.py                       # 300+ turns, streaming
    PYTHONPATH=src python benchmarks/long_chat.py --method dense --turns 100
    PYTHONPATH=src python benchmarks/long_chat.py --method window --turns 60

Writes to --out (default docs/results/long_chat/): `turns.txt` (the script, usable with
`streaming-llm chat --script`), `<method>_transcript.jsonl` (the chat transcript format plus rss_mb
and cpu_ms_per_token), `<method>_summary.json` and `<method>_summary.md`. The last stdout line is
the summary as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import random
import sys
import time
from pathlib import Path

from streaming_llm.models import DEFAULT_MODEL
DEFAULT_TURNS = 300
DEFAULT_MAX_NEW_TOKENS = 40
DEFAULT_OUT = Path(__file__).resolve().parents[1] / "docs" / "results" / "long_chat"
USER_TOKENS = (40, 60)  # each generated user message has this many tokens

PLACES = ["Lisbon", "Kyoto", "the Scottish Highlands", "Patagonia", "Vienna", "a small village in Provence",
          "Reykjavik", "Cape Town", "the Amalfi coast", "Vancouver", "Marrakesh", "Hanoi"]
HOBBIES = ["baking sourdough bread", "learning the guitar", "growing tomatoes on a balcony", "running a first 10k",
           "painting with watercolours", "learning to play chess", "birdwatching", "building a small bookshelf",
           "writing short stories", "learning Spanish", "keeping a houseplant alive", "making pottery"]
SUBJECTS = ["how rainbows form", "why the sky is blue", "how vaccines train the immune system", "what a black hole is",
            "how bees make honey", "why leaves change colour in autumn", "how a compass works",
            "what causes the seasons", "how bread rises", "why the moon has phases", "how airplanes stay up",
            "what photosynthesis does"]
FEELINGS = ["a bit tired after a long week", "excited about the weekend", "nervous about a job interview",
            "curious about something I read", "bored on a rainy afternoon", "proud that I finished a project"]
ASKS = [
    "I'm planning a trip to {place} next month. Could you suggest three things to do there and tell me what I should pack?",
    "I have been {hobby} for a few weeks now. What are the most common beginner mistakes, and how can I avoid them?",
    "Can you explain {subject} in simple words, as if you were talking to a curious twelve-year-old?",
    "My friend and I disagree about {subject}. Could you give me a short, clear explanation we can both agree on?",
    "I want to start {hobby}, but I only have about twenty minutes a day. How would you plan the first week?",
    "What would a relaxed two-day itinerary for {place} look like for someone who loves food and long walks?",
    "Could you write a short, friendly note to a neighbour who helped me while I was {hobby}?",
    "Give me three fun facts about {subject} that I could share at dinner with my family tonight.",
]
OPENERS = ["Hello again!", "Thanks for the last answer.", "Quick question.", "Okay, something different now.",
           "I'm {feeling} today.", "Good morning!", "Here is another one for you.", "That was helpful, thank you."]
CLOSERS = ["Please keep the answer short.", "A few sentences are enough.", "Bullet points are fine.",
           "No need for a long answer.", "Thanks a lot in advance!", "Keep it simple, please."]


def user_messages(tokenizer, n: int, seed: int = 0) -> list[str]:
    """`n` varied user messages of USER_TOKENS tokens each, the same for a given seed."""
    rng = random.Random(seed)
    lo, hi = USER_TOKENS
    out = []
    while len(out) < n:
        fill = dict(place=rng.choice(PLACES), hobby=rng.choice(HOBBIES), subject=rng.choice(SUBJECTS),
                    feeling=rng.choice(FEELINGS))
        parts = [rng.choice(OPENERS), rng.choice(ASKS), rng.choice(CLOSERS)]
        text = " ".join(p.format(**fill) for p in parts)
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        if len(ids) < lo:
            text += " " + rng.choice(ASKS).format(**fill)
            ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        if len(ids) > hi:  # (tokenizers with few merges, e.g. test models) cut at a token boundary
            text = tokenizer.decode(ids[: rng.randint(lo, hi)]).strip()
        out.append(text)
    return out


class PromptScorer:
    """Instrument `engine.feed` to score each turn's prefill: the prompt that `generate` feeds with
    logits="last" is fed with logits="all" instead (the same forward passes), and the mean NLL of its
    tokens (each given everything before it in the stream) is kept in `last`. This is the paper's
    perplexity, measured on the user turns of the chat: flat for streaming, up for dense past the
    trained context, up for window once the first tokens are evicted."""

    def __init__(self, engine):
        import torch

        self.torch, self.orig, self.last = torch, engine.feed, None
        engine.feed = self

    def __call__(self, ids, logits="all"):
        ids = self.torch.as_tensor(ids, dtype=self.torch.long).reshape(-1)
        if logits != "last" or ids.numel() < 2:  # decode steps pass through
            return self.orig(ids, logits)
        out = self.orig(ids, logits="all")  # (T, V): out[i] predicts ids[i + 1]
        nll = self.torch.nn.functional.cross_entropy(out[:-1], ids[1:])
        self.last = (float(nll), ids.numel() - 1)
        return out[-1]


SEGMENTS = [0, 2048, 8192, 16384, 24576, None]  # tokens seen at the start of a turn


def nll_by_segment(rows: list[dict]) -> dict:
    out = {}
    for lo, hi in zip(SEGMENTS, SEGMENTS[1:]):
        sel = [r for r in rows if r.get("prompt_nll") is not None
               and lo <= r["total_tokens_seen"] - r["generated_tokens"] - r["prompt_tokens"] and (hi is None or
               r["total_tokens_seen"] - r["generated_tokens"] - r["prompt_tokens"] < hi)]
        n = sum(r["prompt_nll_tokens"] for r in sel)
        if n:
            key = f"{lo // 1024}K-{hi // 1024}K" if hi else f"{lo // 1024}K+"
            out[key] = {"turns": len(sel), "tokens": n,
                        "nll": round(sum(r["prompt_nll"] * r["prompt_nll_tokens"] for r in sel) / n, 4)}
    return out


def rss_mb() -> tuple[float, float]:
    """(current RSS, peak RSS) of this process in MiB, from /proc (Linux)."""
    cur = peak = 0.0
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                cur = int(line.split()[1]) / 1024
            elif line.startswith("VmHWM:"):
                peak = int(line.split()[1]) / 1024
    return cur, peak


def _git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                             cwd=Path(__file__).resolve().parent, timeout=10)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def mean_ms(rows: list[dict], key: str) -> float:
    gen = sum(r["generated_tokens"] for r in rows)
    return sum(r[key] * r["generated_tokens"] for r in rows) / gen if gen else 0.0


def summarize(rows: list[dict], session, args, trained: int | None, seconds: float, fill_turn: int | None) -> dict:
    k = max(1, len(rows) // 10)
    first, last = rows[:k], rows[-k:]
    e = session.engine
    after = [r for r in rows if fill_turn is not None and r["turn"] >= fill_turn]
    s = {
        "model": args.model,
        **e.config.to_dict(),
        "threads": args.threads,
        "quant": args.quant,
        "max_new_tokens": args.max_new_tokens,
        "temperature": args.temperature,
        "top_p": args.top_p,
        "seed": args.seed,
        "turns": len(rows),
        "total_tokens_seen": e.tokens_seen,
        "trained_context": trained,
        "times_trained_context": round(e.tokens_seen / trained, 2) if trained else None,
        "capacity": e.capacity,
        "max_cache_tokens": max(r["max_cache_tokens_in_turn"] for r in rows),
        "evicted": e.evicted,
        "generated_tokens": sum(r["generated_tokens"] for r in rows),
        "replies_stopped_by_model": sum(r["finish_reason"] == "stop" for r in rows),
        "ms_per_token_first_10pct": round(mean_ms(first, "ms_per_token"), 2),
        "ms_per_token_last_10pct": round(mean_ms(last, "ms_per_token"), 2),
        "cpu_ms_per_token_first_10pct": round(mean_ms(first, "cpu_ms_per_token"), 2),
        "cpu_ms_per_token_last_10pct": round(mean_ms(last, "cpu_ms_per_token"), 2),
        "cache_full_at_turn": fill_turn,
        "rss_mb_at_cache_full": after[0]["rss_mb"] if after else None,
        "rss_mb_max_after_cache_full": max(r["rss_mb"] for r in after) if after else None,
        "peak_rss_mb_at_cache_full": after[0]["peak_rss_mb"] if after else None,
        "peak_rss_mb_end": rows[-1]["peak_rss_mb"],
        "rss_mb_first_turn": rows[0]["rss_mb"],
        "rss_mb_last_turn": rows[-1]["rss_mb"],
        "distinct_replies": len({r["assistant"] for r in rows}),
        "prompt_nll_by_tokens_seen": nll_by_segment(rows),
        "seconds": round(seconds, 1),
        "loadavg_end": [round(x, 2) for x in os.getloadavg()],
        "cpus": os.cpu_count(),
        "commit": args.commit,
    }
    s["last_vs_first_ms_per_token"] = round(s["ms_per_token_last_10pct"] / s["ms_per_token_first_10pct"] - 1, 4)
    s["last_vs_first_cpu_ms_per_token"] = round(
        s["cpu_ms_per_token_last_10pct"] / s["cpu_ms_per_token_first_10pct"] - 1, 4)
    if e.capacity is not None:
        s["checks"] = {
            "cache_never_above_sinks_plus_window": s["max_cache_tokens"] <= e.capacity,
            "passed_3x_trained_context": bool(trained) and e.tokens_seen > 3 * trained,
            "at_least_300_turns": len(rows) >= 300,
            "last_10pct_within_20pct_of_first": s["last_vs_first_ms_per_token"] <= 0.20,
            "rss_flat_after_cache_full_(<=5%)": bool(after) and s["rss_mb_max_after_cache_full"] <= 1.05 * s["rss_mb_at_cache_full"],
        }
    return s


def markdown(s: dict, rows: list[dict], command: str) -> str:
    cap = s["capacity"] if s["capacity"] is not None else "unbounded"
    lines = [
        f"# Long chat: {s['method']} ({s['model']})",
        "",
        f"Command: `{command}`",
        "",
        f"- {s['turns']} turns, {s['total_tokens_seen']:,} tokens seen "
        f"({s['times_trained_context']}x the trained context of {s['trained_context']:,}), "
        f"{s['generated_tokens']:,} generated, {s['replies_stopped_by_model']} replies ended by the model",
        f"- cache: max {s['max_cache_tokens']:,} / {cap}; {s['evicted']:,} tokens evicted; "
        + (f"full from turn {s['cache_full_at_turn']}" if s["cache_full_at_turn"] else "never full"),
        f"- ms per generated token (wall): first 10% of turns {s['ms_per_token_first_10pct']}, last 10% "
        f"{s['ms_per_token_last_10pct']} ({100 * s['last_vs_first_ms_per_token']:+.1f}%)",
        f"- CPU ms per generated token: first 10% {s['cpu_ms_per_token_first_10pct']}, last 10% "
        f"{s['cpu_ms_per_token_last_10pct']} ({100 * s['last_vs_first_cpu_ms_per_token']:+.1f}%)",
        f"- RSS: {s['rss_mb_first_turn']:.0f} MiB after turn 1, "
        + (f"{s['rss_mb_at_cache_full']:.0f} MiB when the cache filled, max {s['rss_mb_max_after_cache_full']:.0f} MiB "
           "after that, " if s["cache_full_at_turn"] else "")
        + f"{s['rss_mb_last_turn']:.0f} MiB at the end (peak {s['peak_rss_mb_end']:.0f} MiB)",
        f"- wall time {s['seconds'] / 60:.1f} min, {s['threads']} torch thread(s) on {s['cpus']} shared CPUs "
        f"(load average at the end {s['loadavg_end'][0]}), commit {s['commit']}",
    ]
    if s["prompt_nll_by_tokens_seen"]:
        lines.append("- NLL of the user turns by tokens seen: " + ", ".join(
            f"{k}: {v['nll']:.3f} ({v['turns']} turns)" for k, v in s["prompt_nll_by_tokens_seen"].items()))
    lines.append(f"- {s['distinct_replies']} distinct replies in {s['turns']} turns")
    if "checks" in s:
        lines += ["", "Checks: " + ", ".join(f"{k}: {'PASS' if v else 'FAIL'}" for k, v in s["checks"].items())]
    lines += ["", "Sample replies:", ""]
    picks = sorted({0, len(rows) // 4, len(rows) // 2, 3 * len(rows) // 4, len(rows) - 1})
    for i in picks:
        r = rows[i]
        reply = r["assistant"].replace("\n", " ").strip()
        lines.append(f"- turn {r['turn']} ({r['total_tokens_seen']:,} tokens seen): {reply[:300]!r}")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=DEFAULT_MODEL)
    p.add_argument("--method", default="streaming", choices=["streaming", "window", "dense"])
    p.add_argument("--sinks", type=int, default=4)
    p.add_argument("--window", type=int, default=2044)
    p.add_argument("--turns", type=int, default=DEFAULT_TURNS, help="at least this many turns")
    p.add_argument("--min-times-context", type=float, default=3.0,
                   help="keep going past --turns until this many times the trained context is seen (0: off)")
    p.add_argument("--max-new-tokens", type=int, default=DEFAULT_MAX_NEW_TOKENS)
    p.add_argument("--temperature", type=float, default=0.7,
                   help="the chat's default; 0 is greedy, with which a 135M model soon repeats earlier replies verbatim")
    p.add_argument("--top-p", type=float, default=0.9)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quant", default="none", choices=["auto", "none", "int8", "int4"],
                   help="weight quantization as in `chat --quant` (the recorded runs used none: float32)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (1 is steadiest on a shared CPU)")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    p.add_argument("--score-prompts", action="store_true",
                   help="also record each user turn's NLL under the stream (the paper's perplexity, on the chat)")
    args = p.parse_args(argv)

    import torch

    from streaming_llm.chat.repl import turn_record
    from streaming_llm.core.config import StreamingConfig
    from streaming_llm.core.engine import StreamingLLM
    from streaming_llm.cliargs import load_model_from_args
    from streaming_llm.core.sampling import SamplingParams
    from streaming_llm.chat.session import ChatSession

    torch.set_num_threads(args.threads)
    args.commit = _git_commit()  # of the code that runs (taken now: the tree may change during a long run)
    args.dtype, args.device = "float32", "cpu"
    model, tokenizer = load_model_from_args(args)
    trained = getattr(model.config.get_text_config(decoder=True), "max_position_embeddings", None)
    config = StreamingConfig(method=args.method, sinks=args.sinks, window=args.window)
    session = ChatSession(StreamingLLM(model, tokenizer, config))
    scorer = PromptScorer(session.engine) if args.score_prompts else None
    sampling = SamplingParams(temperature=args.temperature, top_p=args.top_p, seed=args.seed)
    min_tokens = int(args.min_times_context * trained) if trained and args.min_times_context else 0

    args.out.mkdir(parents=True, exist_ok=True)
    pool = user_messages(tokenizer, max(args.turns, 50) * 2, seed=args.seed)
    transcript = open(args.out / f"{args.method}_transcript.jsonl", "w", encoding="utf-8")
    rows, fill_turn, t0 = [], None, time.perf_counter()
    turn = 0
    while turn < args.turns or (session.engine.tokens_seen <= min_tokens and turn < len(pool)):
        text = pool[turn]
        turn += 1
        max_cache, cpu_first = 0, None
        n = 0
        if scorer:
            scorer.last = None
        for tok in session.reply(text, args.max_new_tokens, sampling):
            n += 1
            max_cache = max(max_cache, tok.cache_tokens)
            if cpu_first is None:  # prefill + first token done; CPU time per token from here on
                cpu_first = time.process_time() - tok.ms / 1000
        cpu_gen = time.process_time() - cpu_first
        max_cache = max(max_cache, session.engine.cache_tokens)
        cur, peak = rss_mb()
        row = turn_record(turn, text, session)
        row.update(cpu_ms_per_token=round(1000 * cpu_gen / n, 3), max_cache_tokens_in_turn=max_cache,
                   rss_mb=round(cur, 1), peak_rss_mb=round(peak, 1))
        if scorer and scorer.last:
            row.update(prompt_nll=round(scorer.last[0], 4), prompt_nll_tokens=scorer.last[1])
        rows.append(row)
        if fill_turn is None and session.engine.capacity is not None and max_cache >= session.engine.capacity:
            fill_turn = turn
        transcript.write(json.dumps(row, ensure_ascii=False) + "\n")
        transcript.flush()
        print(f"turn {turn}: {row['total_tokens_seen']} seen, cache {row['cache_tokens']}, "
              f"{row['ms_per_token']:.1f} ms/tok, rss {cur:.0f} MiB", file=sys.stderr, flush=True)
    transcript.close()
    (args.out / "turns.txt").write_text("\n".join(pool[:turn]) + "\n", encoding="utf-8")

    summary = summarize(rows, session, args, trained, time.perf_counter() - t0, fill_turn)
    command = "PYTHONPATH=src python benchmarks/long_chat.py " + " ".join(argv if argv is not None else sys.argv[1:])
    (args.out / f"{args.method}_summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    (args.out / f"{args.method}_summary.md").write_text(markdown(summary, rows, command.strip()))
    print(markdown(summary, rows, command.strip()))
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
