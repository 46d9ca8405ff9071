"""A scripted chat that tells the real `streaming-llm chat` a fact, talks about other things until the
fact is several windows out of the cache, then asks for it: with `--recall-blocks K` and without.

Drives the interactive command through a pseudo-terminal (pexpect), as a person would: waits for
the `>>> ` prompt, sends a line, waits for the status line that follows each reply. The chat also
writes its own per-turn transcript (`--transcript`), which gives the tokens seen at each turn, so
the report says how many tokens (and windows) lay between the fact and the question. The filler
turns are `long_chat.user_messages` (the long-chat benchmark's generated messages).

    PYTHONPATH=src python benchmarks/recall_chat.py                         # every fact, recall 4x32 and control
    PYTHONPATH=src python benchmarks/recall_chat.py --facts locker --fillers 6
    PYTHONPATH=src python benchmarks/recall_chat.py --recall-blocks 16 --recall-score both --recall-every 4

Writes to --out (default docs/results/recall_chat/): per (fact, mode) the terminal output
`<fact>_<mode>.txt` and the chat's transcript `<fact>_<mode>.jsonl`; `summary.json` and
`summary.md` (one row per run: found or not, the answer, tokens between fact and question). The
last stdout line is the summary as JSON. It judges an answer by whether it contains the fact's
key string (case-insensitive), nothing finer.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from pathlib import Path

from streaming_llm.core.config import RECALL_SCORES
from streaming_llm.models import DEFAULT_MODEL

HERE = Path(__file__).resolve().parent
DEFAULT_OUT = HERE.parent / "docs" / "results" / "recall_chat"
DEFAULT_WINDOW = 252
DEFAULT_FILLERS = 8
DEFAULT_MAX_NEW_TOKENS = 48
TURN_TIMEOUT_S = 600  # one reply on a busy 2-core machine

# name -> (the turn that tells the fact, the question, the key string a correct answer contains)
FACTS = {
    "locker": ("Please remember this for later: my locker code is 4817.", "What is my locker code?", "4817"),
    "sister": ("Something about me: my sister's name is Margarethe.", "What is my sister's name?", "Margarethe"),
    "dog": ("By the way, I have a dog and his name is Biscuit.", "What is the name of my dog?", "Biscuit"),
    "town": ("I grew up in a small town called Valdoria.", "What is the name of the town I grew up in?", "Valdoria"),
    "name": ("Hi! My name is Oskar, nice to meet you.", "What is my name?", "Oskar"),
    "colour": ("My favourite colour is turquoise.", "What is my favourite colour?", "turquoise"),
    # a five-digit key, the kind of fact the pass-key evaluation shows the model retrieves best
    "passkey": ("Here is a pass key, remember it: 71432. I will ask you for it later.",
                "I gave you a pass key earlier. What is the pass key?", "71432"),
    "passkey-repeat": ("Here is a pass key, remember it: 71432. I will ask you for it later.",
                       "Repeat, word for word, the first message I sent you.", "71432"),
    # the same facts, asked with a cue to the earlier turn
    "locker-cue": ("Please remember this for later: my locker code is 4817.",
                   "Earlier in our chat I told you my locker code. What is my locker code?", "4817"),
    "sister-cue": ("Something about me: my sister's name is Margarethe.",
                   "At the start of our chat I told you my sister's name. What is my sister's name?", "Margarethe"),
}
MODES = ("recall", "control", "in-window")  # recall: --recall-blocks; control: plain streaming, same window;
# in-window: plain streaming with a window that holds the whole conversation (can the model answer at all?)
IN_WINDOW = 4092


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=DEFAULT_MODEL)
    p.add_argument("--window", type=int, default=DEFAULT_WINDOW)
    p.add_argument("--recall-blocks", type=int, default=4)
    p.add_argument("--block-size", type=int, default=32)
    p.add_argument("--recall-score", choices=RECALL_SCORES, default=None, help="passed to the chat (default: its own)")
    p.add_argument("--recall-every", type=int, default=None, help="passed to the chat (default: its own)")
    p.add_argument("--fillers", type=int, default=DEFAULT_FILLERS, help="turns of other talk between fact and question")
    p.add_argument("--max-new-tokens", type=int, default=DEFAULT_MAX_NEW_TOKENS)
    p.add_argument("--facts", default=",".join(FACTS), help=f"comma list of {', '.join(FACTS)}")
    p.add_argument("--modes", default="recall,control,in-window",
                   help="recall (with --recall-blocks), control (plain streaming, same window), in-window (plain "
                   f"streaming, window {IN_WINDOW}: the fact never leaves it)")
    p.add_argument("--threads", type=int, default=None, help="STREAMING_LLM_THREADS for the chat (default: its policy)")
    p.add_argument("--out", default=str(DEFAULT_OUT))
    p.add_argument("--rejudge", action="store_true", help="no chat: judge the transcripts already in --out again")
    args = p.parse_args(argv)
    args.facts = [f.strip() for f in args.facts.split(",") if f.strip()]
    args.modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    bad = [f for f in args.facts if f not in FACTS] + [m for m in args.modes if m not in MODES]
    if bad or not args.facts or not args.modes:
        p.error(f"unknown or empty --facts/--modes: {bad or 'empty'} (facts: {', '.join(FACTS)}; modes: {', '.join(MODES)})")
    if args.fillers < 0 or args.window < 1 or args.recall_blocks < 1 or args.block_size < 1:
        p.error("--fillers must be >= 0, --window, --recall-blocks and --block-size >= 1")
    return args


def fillers(model: str, n: int) -> list[str]:
    sys.path.insert(0, str(HERE))
    from long_chat import user_messages
    from streaming_llm.eval.data import load_tokenizer

    return user_messages(load_tokenizer(model), n, seed=0)


def chat_argv(args, mode: str, transcript: Path) -> list[str]:
    window = IN_WINDOW if mode == "in-window" else args.window
    argv = ["-m", "streaming_llm", "chat", "--model", args.model, "--window", str(window), "--temperature", "0",
            "--max-new-tokens", str(args.max_new_tokens), "--transcript", str(transcript)]
    if mode == "recall":
        argv += ["--recall-blocks", str(args.recall_blocks), "--block-size", str(args.block_size)]
        for flag, value in (("--recall-score", args.recall_score), ("--recall-every", args.recall_every)):
            if value is not None:
                argv += [flag, str(value)]
    return argv


def run_chat(args, fact: str, mode: str, turns: list[str], out: Path) -> dict:
    """One conversation through the real command; the chat's transcript rows, one per turn."""
    import pexpect

    transcript, log_path = out / f"{fact}_{mode}.jsonl", out / f"{fact}_{mode}.txt"
    transcript.unlink(missing_ok=True)
    env = {**os.environ, "TERM": "dumb", "NO_COLOR": "1"}
    if args.threads:
        env["STREAMING_LLM_THREADS"] = str(args.threads)
    argv = chat_argv(args, mode, transcript)
    with open(log_path, "w", encoding="utf-8") as log:
        log.write("$ streaming-llm " + " ".join(argv[2:]) + "\n")
        child = pexpect.spawn(sys.executable, argv, env=env, encoding="utf-8", codec_errors="replace",
                              timeout=TURN_TIMEOUT_S)
        child.logfile_read = log  # what the terminal shows: replies, status lines, the echoed input
        child.expect_exact(">>> ")
        for text in turns:
            child.sendline(text)
            child.expect(r"\[tokens seen [\d,]+ \|[^\]]*\]")  # the status line after the reply
            child.expect_exact(">>> ")
        child.sendeof()
        child.expect(pexpect.EOF)
        child.close()
    if child.exitstatus != 0:
        raise SystemExit(f"recall_chat: chat exited with {child.exitstatus} ({fact}, {mode}); see {log_path}")
    return [json.loads(line) for line in transcript.read_text(encoding="utf-8").splitlines() if line.strip()]


def judge(rows: list[dict], key: str, window: int) -> dict:
    fact_turn, question = rows[0], rows[-1]
    told_at = fact_turn["total_tokens_seen"] - fact_turn["generated_tokens"]  # end of the fact's prompt
    asked_at = question["total_tokens_seen"] - question["generated_tokens"]  # end of the question's prompt
    answer = question["assistant"].strip()
    echoed = [r["turn"] for r in rows[1:-1] if key.lower() in r["assistant"].lower()]
    return {"found": key.lower() in answer.lower(), "answer": answer,
            "echoed_in_turns": echoed,  # replies that repeated the key: it then stayed in the window
            "tokens_between": asked_at - told_at,
            "windows_between": round((asked_at - told_at) / window, 2), "tokens_seen": question["total_tokens_seen"],
            "evicted_at_question": question.get("evicted")}


def markdown(rows: list[dict]) -> str:
    lines = ["| fact | mode | found | tokens between fact and question (windows) | key repeated by a reply in between "
             "| answer |", "|---|---|---|---|---|---|"]
    for r in rows:
        answer = re.sub(r"\s+", " ", r["answer"]).replace("|", "\\|")
        lines.append(f"| {r['fact']} | {r['mode']} | {'yes' if r['found'] else 'no'} | {r['tokens_between']} "
                     f"({r['windows_between']}) | {'turns ' + ', '.join(map(str, r['echoed_in_turns'])) if r['echoed_in_turns'] else 'no'} "
                     f"| {answer} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    talk = [] if args.rejudge else fillers(args.model, args.fillers)
    results = []
    for fact in args.facts:
        tell, ask, key = FACTS[fact]
        for mode in args.modes:
            print(f"recall_chat: {fact}, {mode} ...", file=sys.stderr, flush=True)
            if args.rejudge:
                path = out / f"{fact}_{mode}.jsonl"
                if not path.is_file():
                    continue
                rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
            else:
                rows = run_chat(args, fact, mode, [tell, *talk, ask], out)
            r = {"fact": fact, "mode": mode, "key": key, **judge(rows, key, args.window)}
            print(f"  {fact:<8} {mode:<8} {'found' if r['found'] else 'missed':<7} {r['tokens_between']:>5} tokens "
                  f"({r['windows_between']} windows) later: {r['answer'][:80]!r}", flush=True)
            results.append(r)
    settings = {k: v for k, v in vars(args).items() if k != "out"}
    (out / "summary.json").write_text(json.dumps({"settings": settings, "results": results}, indent=1) + "\n")
    (out / "summary.md").write_text(markdown(results) + "\n")
    print(markdown(results))
    found = {m: sum(r["found"] for r in results if r["mode"] == m) for m in args.modes}
    print(json.dumps({"found": found, "of": len(args.facts), "window": args.window, "fillers": args.fillers,
                      "recall": f"{args.recall_blocks}x{args.block_size}", "out": str(out)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
