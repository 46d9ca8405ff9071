"""`streaming-llm chat`: an endless multi-turn chat in the terminal, or scripted from a file.

Interactive: replies stream token by token, a status line follows each one (tokens seen, cache
fill, evicted, prefill and generation speed), `/help` lists the commands. Ctrl-C during a reply
stops that reply and keeps the conversation; Ctrl-C or Ctrl-D at the prompt exits.

Scripted: `--script turns.txt` sends one user message per non-empty line and runs the whole
conversation; `--transcript out.jsonl` writes one JSON object per turn (flushed as it goes):
{"turn", "user", "assistant", "prompt_tokens", "generated_tokens", "total_tokens_seen",
"cache_tokens", "ms_per_token", ...}. With a transcript, progress goes to stderr and a summary
(last line: JSON) to stdout; without one, the conversation is printed.

This module does terminal and file I/O only; the conversation logic is `session.ChatSession`.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path

from ..core.sampling import DEFAULT_REPETITION_PENALTY, DEFAULT_TEMPERATURE, DEFAULT_TOP_K, DEFAULT_TOP_P
from ..errors import UserError

DEFAULT_WINDOW = 2044  # 4 sinks + 2044 = 2048 cached tokens: a quarter of SmolLM2's 8192 context
DEFAULT_MAX_NEW_TOKENS = 256
PROMPT = ">>> "

HELP = """\
Type a message and press Enter. Commands:
  /help           show this help
  /reset          start a new conversation (same system prompt)
  /stats          show the stream's statistics
  /system TEXT    start a new conversation with system prompt TEXT (/system alone shows it)
  /save FILE      save the conversation and the streaming state to FILE
  /load FILE      resume a conversation saved with /save, exactly where it stopped
  /quit           leave (Ctrl-D or Ctrl-C at the prompt too)
Ctrl-C during a reply stops the reply. Start a message with // to send a literal '/'."""

# C0 controls (but tab and newline) and DEL would be interpreted by the terminal: show them as U+FFFD.
_UNPRINTABLE = {c: "\ufffd" for c in [*range(0, 9), *range(11, 32), 127]}


def add_arguments(p) -> None:
    from ..cliargs import add_model_arguments

    add_model_arguments(p, quant_default="auto")  # int4 for the default (Q4 GGUF) model: fast CPU decoding
    p.set_defaults(window=DEFAULT_WINDOW)
    for action in p._actions:  # the shared flag, with this verb's default spelled out
        if action.dest == "window":
            action.help = f"most recent tokens kept (default {DEFAULT_WINDOW}: with 4 sinks, 2048 cached tokens)"
    g = p.add_argument_group("chat")
    g.add_argument("--system", default=None, help="system prompt (default: the chat template's own, if any)")
    g.add_argument("--temperature", type=float, default=DEFAULT_TEMPERATURE, help="0 for greedy decoding")
    g.add_argument("--top-p", type=float, default=DEFAULT_TOP_P)
    g.add_argument("--top-k", type=int, default=DEFAULT_TOP_K, help="0: off")
    g.add_argument("--repetition-penalty", type=float, default=DEFAULT_REPETITION_PENALTY, help="1.0: off")
    g.add_argument("--max-new-tokens", type=int, default=DEFAULT_MAX_NEW_TOKENS, help="per reply")
    g.add_argument("--seed", type=int, default=None, help="makes sampling reproducible")
    g.add_argument("--script", default=None, metavar="FILE", help="run one user message per line of FILE, then exit")
    g.add_argument("--transcript", default=None, metavar="FILE", help="write one JSON line per turn to FILE")
    g.add_argument("--no-progress", action="store_true", help="no progress bar in scripted mode")


def sampling_from_args(args):
    from ..core.sampling import SamplingParams

    return SamplingParams(
        temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
        repetition_penalty=args.repetition_penalty, seed=args.seed,
    )


def read_script(path: str) -> list[str]:
    """The user messages of a script: its non-empty lines (bytes that are not UTF-8 become U+FFFD)."""
    p = Path(path).expanduser()
    if not p.exists():
        raise UserError(f"script file not found: {path}")
    if not p.is_file():
        raise UserError(f"--script must be a file: {path}")
    try:
        text = p.read_bytes().decode("utf-8", errors="replace")
    except OSError as e:
        raise UserError(f"cannot read script {path}: {e.strerror}") from None
    lines = [line.strip() for line in text.splitlines()]
    lines = [line for line in lines if line]
    if not lines:
        raise UserError(f"script {path} has no messages (one user message per line)")
    return lines


def open_transcript(path: str | None):
    if path is None:
        return None
    try:
        return open(Path(path).expanduser(), "w", encoding="utf-8")
    except OSError as e:
        raise UserError(f"cannot write transcript {path}: {e.strerror or e}") from None


def turn_record(n: int, user: str, session) -> dict:
    """One transcript line: the contract fields first, then extras."""
    t, e = session.turns[-1], session.engine
    return {
        "turn": n,
        "user": user,
        "assistant": session.messages[-1]["content"],
        "prompt_tokens": t.prompt_tokens,
        "generated_tokens": t.generated_tokens,
        "total_tokens_seen": e.tokens_seen,
        "cache_tokens": e.cache_tokens,
        "ms_per_token": round(t.ms_per_token, 3),
        "prefill_ms": round(1000 * t.prefill_s, 3),
        "evicted": e.evicted,
        "finish_reason": t.finish_reason,
    }


class InterruptFlag:
    """While active, SIGINT sets a flag instead of raising: a reply is only ever stopped between
    tokens, never inside a model forward (which would leave the cache half-updated)."""

    def __init__(self):
        self.set = False
        self._old = None

    def __enter__(self):
        self.set = False
        self._old = signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum, frame):
        self.set = True

    def __exit__(self, *exc):
        signal.signal(signal.SIGINT, self._old)
        return False


def run(args) -> int:
    from ..cliargs import config_from_args

    # Everything the user can get wrong is checked before the (slow) model load.
    sampling = sampling_from_args(args)
    config = config_from_args(args)
    if args.max_new_tokens < 1:
        raise UserError(f"--max-new-tokens must be >= 1 (got {args.max_new_tokens})")
    script = read_script(args.script) if args.script else None
    transcript = open_transcript(args.transcript)
    try:
        session = _load_session(args, config)
        if script is not None:
            return run_script(session, script, args, sampling, transcript)
        return Repl(session, args, sampling, transcript).loop()
    finally:
        if transcript:
            transcript.close()


def _load_session(args, config):
    from ..cliargs import load_model_from_args

    interactive = args.script is None and sys.stdout.isatty()
    if interactive:
        print(f"loading {args.model}...", file=sys.stderr, flush=True)
    model, tokenizer = load_model_from_args(args)  # honours --quant; picks the thread policy before torch loads
    from ..core.engine import StreamingLLM
    from .session import ChatSession

    return ChatSession(StreamingLLM(model, tokenizer, config), system=args.system)


def _describe(session, model: str) -> str:
    c = session.engine.config
    if c.method == "dense":
        return f"{model} | dense (no eviction, cache grows)"
    if c.recall_blocks:
        return (f"{model} | {c.method}: {c.sinks} sinks + {c.recall_blocks}x{c.block_size} recalled + {c.window} window "
                f"= {c.cache_size} attended tokens (memory of up to {c.recall_memory_tokens} evicted tokens)")
    return f"{model} | {c.method}: {c.sinks} sinks + {c.window} window = {c.cache_size} cached tokens"


# ---- scripted mode ---------------------------------------------------------------------------
def run_script(session, messages: list[str], args, sampling, transcript) -> int:
    from tqdm import tqdm

    echo = transcript is None
    bar = tqdm(total=len(messages), desc="chat", unit="turn", file=sys.stderr, dynamic_ncols=True,
               disable=echo or args.no_progress)
    records, t0, stopped = [], time.perf_counter(), False
    max_cache = 0
    for n, text in enumerate(messages, 1):
        if echo:
            print(f"{PROMPT}{text}", flush=True)
        with InterruptFlag() as flag:
            it = session.reply(text, args.max_new_tokens, sampling)
            for tok in it:
                max_cache = max(max_cache, tok.cache_tokens)
                if echo:
                    _write(tok.text)
                if flag.set:
                    break
            it.close()
            stopped = flag.set
        max_cache = max(max_cache, session.engine.cache_tokens)
        rec = turn_record(n, text, session)
        records.append(rec)
        if transcript:
            transcript.write(json.dumps(rec, ensure_ascii=False) + "\n")
            transcript.flush()
        if echo:
            print("\n" + session.stats().line() + "\n", flush=True)
        bar.update(1)
        bar.set_postfix(tokens=rec["total_tokens_seen"], cache=rec["cache_tokens"], ms_tok=f"{rec['ms_per_token']:.0f}")
        if stopped:
            break
    bar.close()
    summary = script_summary(records, session, time.perf_counter() - t0, max_cache, args.model)
    if stopped:
        print("interrupted", file=sys.stderr)
    print(f"{summary['turns']} turns, {summary['total_tokens_seen']:,} tokens seen, cache max "
          f"{summary['max_cache_tokens']:,}/{summary['capacity'] or 'unbounded'}, {summary['ms_per_token']:.1f} ms/token "
          f"(first 10% of turns {summary['ms_per_token_first_10pct']:.1f}, last 10% {summary['ms_per_token_last_10pct']:.1f})")
    print(json.dumps(summary))
    return 130 if stopped else 0


def _mean_ms(records: list[dict]) -> float:
    gen = sum(r["generated_tokens"] for r in records)
    return sum(r["ms_per_token"] * r["generated_tokens"] for r in records) / gen if gen else 0.0


def script_summary(records, session, seconds, max_cache, model) -> dict:
    k = max(1, len(records) // 10)
    e = session.engine
    return {
        "model": model,
        **e.config.to_dict(),
        "turns": len(records),
        "total_tokens_seen": e.tokens_seen,
        "generated_tokens": sum(r["generated_tokens"] for r in records),
        "max_cache_tokens": max_cache,
        "capacity": e.capacity,
        "evicted": e.evicted,
        "ms_per_token": round(_mean_ms(records), 3),
        "ms_per_token_first_10pct": round(_mean_ms(records[:k]), 3),
        "ms_per_token_last_10pct": round(_mean_ms(records[-k:]), 3),
        "seconds": round(seconds, 3),
    }


# ---- interactive mode ------------------------------------------------------------------------
def _write(text: str) -> None:
    sys.stdout.write(text.translate(_UNPRINTABLE))
    sys.stdout.flush()


class Repl:
    """The interactive loop: reads lines, runs commands, streams replies."""

    def __init__(self, session, args, sampling, transcript=None):
        self.session, self.args, self.sampling, self.transcript = session, args, sampling, transcript
        self.turn = 0
        color = sys.stdout.isatty() and not os.environ.get("NO_COLOR") and os.environ.get("TERM") != "dumb"
        self.dim, self.undim = ("\033[2m", "\033[0m") if color else ("", "")

    def loop(self) -> int:
        # Undecodable input bytes become U+FFFD instead of raising (input() honours stdin's errors).
        for stream in (sys.stdin, sys.stdout):
            if hasattr(stream, "reconfigure"):
                stream.reconfigure(errors="replace")
        if sys.stdin.isatty():
            try:
                import readline  # noqa: F401  (line editing and history for input())
            except ImportError:
                pass
        # Ctrl-C at the prompt must exit even when we were started with SIGINT ignored (a
        # background job of a non-interactive shell inherits SIG_IGN, and Python then never
        # installs its KeyboardInterrupt handler).
        signal.signal(signal.SIGINT, signal.default_int_handler)
        print(_describe(self.session, self.args.model))
        print("Type /help for commands, Ctrl-D to quit.", flush=True)
        while True:
            try:
                line = input(PROMPT)
            except (EOFError, KeyboardInterrupt):
                print(flush=True)
                return 0
            line = line.strip()
            if not line:
                continue
            if line.startswith("/") and not line.startswith("//"):
                try:
                    if self.command(line) == "quit":
                        return 0
                except UserError as e:
                    print(f"error: {e}", flush=True)
                continue
            self.respond(line[1:] if line.startswith("//") else line)

    def status(self) -> None:
        print(f"{self.dim}[{self.session.stats().line()}]{self.undim}", flush=True)

    def respond(self, text: str) -> None:
        with InterruptFlag() as flag:
            it = self.session.reply(text, self.args.max_new_tokens, self.sampling)
            for tok in it:
                _write(tok.text)
                if flag.set:
                    break
            it.close()  # settles an interrupted reply: keeps it, feeds the end-of-turn token
            interrupted = flag.set
        print(" [interrupted]" if interrupted else "", flush=True)
        self.turn += 1
        if self.transcript:
            self.transcript.write(json.dumps(turn_record(self.turn, text, self.session), ensure_ascii=False) + "\n")
            self.transcript.flush()
        self.status()

    def command(self, line: str) -> str | None:
        name, _, arg = line.partition(" ")
        name, arg = name.lower(), arg.strip()
        s = self.session
        if name in ("/quit", "/exit", "/q"):
            return "quit"
        if name in ("/help", "/?"):
            print(HELP)
        elif name == "/reset":
            s.reset(s.system)
            self.turn = 0
            print("(new conversation)")
        elif name == "/stats":
            st = s.stats()
            c = s.engine.config
            print(f"turns {st.turns} | messages {st.messages} | {c.method}, sinks {c.sinks}, window {c.window} | "
                  f"last turn: {st.last_prompt_tokens} prompt tokens, {st.last_generated_tokens} generated, "
                  f"{st.ms_per_token:.1f} ms/token")
            self.status()
        elif name == "/system":
            if not arg:
                print(f"system prompt: {s.system!r}" if s.system else "no system prompt (the template's default applies)")
            else:
                s.reset(arg)
                self.turn = 0
                print("(new conversation with this system prompt)")
        elif name == "/save":
            if not arg:
                raise UserError("usage: /save FILE")
            path = s.save(arg)
            print(f"saved {len(s.turns)} turns ({s.engine.tokens_seen:,} tokens seen) to {path}")
        elif name == "/load":
            if not arg:
                raise UserError("usage: /load FILE")
            before = s.engine.config
            s.load(arg)
            self.turn = len(s.turns)
            note = "" if s.engine.config == before else f" (its settings: {_describe(s, self.args.model)})"
            print(f"loaded {len(s.turns)} turns ({s.engine.tokens_seen:,} tokens seen) from {arg}{note}")
            self.status()
        else:
            print(f"unknown command: {name}")
            print(HELP)
        sys.stdout.flush()
        return None
