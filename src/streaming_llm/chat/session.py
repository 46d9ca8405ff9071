"""ChatSession: a multi-turn chat kept on one endless StreamingLLM stream.

The terminal chat (`chat.py`) and the HTTP server both build on this class. A session holds an
engine (one stream: model + KV cache) and the message list, and keeps the two in step:

- Each turn renders the conversation with the tokenizer's chat template and feeds ONLY the text
  that is not in the stream yet (the rendered conversation minus what was already fed). If the
  template is not prefix-stable, it falls back to rendering just the new messages.
- A reply streams `engine.Token`s; it stops on the template's end-of-turn token, which is fed like
  every generated token. A reply that ends any other way (length, or the caller stopped iterating)
  is closed by feeding the end-of-turn token, so the stream stays a faithful transcript.
- `save`/`load` write and read the transcript plus the engine's streaming state: a loaded session
  continues exactly where the saved one stopped.

What it does NOT do: print, read input, handle signals, or know about HTTP. Callers interrupt a
reply by simply not asking for more tokens (see `ChatSession.generate`).

Typical use::

    session = ChatSession(engine, system="You are terse.")
    for tok in session.reply("Hi!", max_new_tokens=64, sampling=SamplingParams(temperature=0)):
        print(tok.text, end="", flush=True)
    print(session.stats().line())

Server use (a client re-sends the whole conversation each request)::

    if session.matches_prefix(messages):
        session.extend(messages[len(session.messages):])
    else:
        session.reset()
        session.extend(messages)
    for tok in session.generate(max_new_tokens, sampling): ...
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Iterable, Iterator, Sequence

from ..errors import UserError
from ..models import special_tokens

SAVE_FORMAT = "streaming-llm-chat-session"
SAVE_VERSION = 1
_MARK = "\u2063MARK\u2063"  # a content string no template touches (the non-prefix-stable fallback)


@dataclass
class TurnStats:
    """What one assistant turn cost."""

    prompt_tokens: int = 0  # tokens prefilled for this turn (the new text only)
    generated_tokens: int = 0  # tokens sampled, the end-of-turn token included if the model emitted it
    prefill_s: float = 0.0
    generate_s: float = 0.0  # wall time from the end of prefill to the last token
    finish_reason: str = ""  # "stop" | "length" | "interrupted"

    @property
    def ms_per_token(self) -> float:
        return 1000 * self.generate_s / self.generated_tokens if self.generated_tokens else 0.0

    @property
    def prefill_tok_s(self) -> float:
        return self.prompt_tokens / self.prefill_s if self.prefill_s > 0 else 0.0

    @property
    def gen_tok_s(self) -> float:
        return self.generated_tokens / self.generate_s if self.generate_s > 0 else 0.0


@dataclass
class SessionStats:
    """A snapshot of the stream: `line()` is the compact status line chat prints after a reply."""

    turns: int
    messages: int
    tokens_seen: int  # every token ever fed to the stream
    cache_tokens: int  # tokens the cache holds now
    capacity: int | None  # most tokens it will ever hold (None: dense, unbounded)
    evicted: int
    method: str
    last_prompt_tokens: int
    last_generated_tokens: int
    prefill_tok_s: float  # of the last turn
    gen_tok_s: float  # of the last turn
    ms_per_token: float  # of the last turn
    recall_tokens: int | None = None  # evicted tokens the recall memory holds (None: recall off)
    recalled_tokens: int | None = None  # of them, what the last forward attended to (first global layer)

    def line(self) -> str:
        cap = f"{self.capacity:,}" if self.capacity is not None else "unbounded"
        recall = ("" if self.recall_tokens is None else
                  f"recall memory {self.recall_tokens:,} ({self.recalled_tokens:,} recalled) | ")
        return (
            f"tokens seen {self.tokens_seen:,} | cache {self.cache_tokens:,}/{cap} | {recall}evicted {self.evicted:,} | "
            f"prefill {self.prefill_tok_s:,.0f} tok/s | gen {self.gen_tok_s:,.1f} tok/s"
        )

    def to_dict(self) -> dict:
        return asdict(self)


def _check_messages(messages: Iterable[dict]) -> list[dict]:
    out = []
    for m in messages:
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise UserError(f"a message must be a dict with string 'role' and 'content' (got {m!r})")
        out.append({"role": m["role"], "content": m["content"]})
    return out


class ChatSession:
    """A conversation on one stream. Not thread-safe: one caller at a time (the engine's rule).

    Attributes: `engine` (a `StreamingLLM`; may be replaced by `load`), `messages` (list of
    {"role", "content"} dicts, the system message first if any), `turns` (list of `TurnStats`).
    """

    def __init__(self, engine, system: str | None = None):
        self.engine = engine
        self.tokenizer = engine.tokenizer
        if self.tokenizer is None or not getattr(self.tokenizer, "chat_template", None):
            raise UserError("this model's tokenizer has no chat template; chat needs an instruct/chat model")
        # what ends a turn: the one rule in models.special_tokens
        self.stop_ids = special_tokens.stop_ids(engine.model, self.tokenizer)
        self.eot_id, self.eot_text, self.eot_separator = special_tokens.turn_end(self.tokenizer, self.stop_ids)
        self._active: Iterator | None = None
        self.reset(system)

    # ---- template plumbing -------------------------------------------------------------------
    def render(self, messages: Sequence[dict], add_generation_prompt: bool) -> str:
        """The conversation as the chat template writes it."""
        try:
            return self.tokenizer.apply_chat_template(
                list(messages), tokenize=False, add_generation_prompt=add_generation_prompt
            )
        except Exception as e:  # jinja errors, e.g. a template that insists on alternating roles
            raise UserError(f"the chat template rejected the conversation: {e}") from e

    def encode(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def _pending_text(self) -> str:
        """The text to feed before the next reply: everything rendered that is not in the stream."""
        full = self.render(self.messages, add_generation_prompt=True)
        if full.startswith(self._fed_text):
            return full[len(self._fed_text) :]
        # Not prefix-stable (e.g. the template rewrites earlier turns): render the new messages only.
        old, new = self.messages[: self._fed_messages], self.messages[self._fed_messages :]
        sep = self.eot_separator if self._fed_text.endswith(self.eot_text) else ""
        prev = self.render(old, add_generation_prompt=False) if old else ""
        if old and full.startswith(prev):
            return sep + full[len(prev) :]
        # Last resort: the new messages on their own, without the default system prompt some templates add.
        dummy = [{"role": "system", "content": _MARK}]
        head = self.render(dummy, add_generation_prompt=False)
        alone = self.render(dummy + new, add_generation_prompt=True)
        return sep + (alone[len(head) :] if alone.startswith(head) else self.render(new, add_generation_prompt=True))

    # ---- conversation ------------------------------------------------------------------------
    def reset(self, system: str | None = None) -> None:
        """Start a new conversation on a fresh stream, with `system` as its system message (if any)."""
        self._close_active()
        self.engine.reset()
        self.messages: list[dict] = [{"role": "system", "content": system}] if system else []
        self.turns: list[TurnStats] = []
        self._fed_text = ""  # the rendered text the stream holds, as a string
        self._fed_messages = 0  # how many of `messages` the stream holds

    @property
    def system(self) -> str | None:
        return self.messages[0]["content"] if self.messages and self.messages[0]["role"] == "system" else None

    def matches_prefix(self, messages: Sequence[dict]) -> bool:
        """True if this session's messages are the start of `messages` (so only the rest is new)."""
        mine = self.messages
        if len(messages) < len(mine):
            return False
        return all(a["role"] == b.get("role") and a["content"] == b.get("content") for a, b in zip(mine, messages))

    def extend(self, messages: Iterable[dict]) -> None:
        """Append messages without generating. They are prefilled by the next `generate`/`reply`,
        together with the assistant prompt, and only they are: the stream already holds the rest."""
        self._close_active()
        self.messages.extend(_check_messages(messages))

    def reply(self, user_text: str, max_new_tokens: int = 256, sampling=None) -> Iterator:
        """Add a user message and stream the assistant's reply as `engine.Token`s."""
        self.extend([{"role": "user", "content": user_text}])
        return self.generate(max_new_tokens, sampling)

    def generate(self, max_new_tokens: int = 256, sampling=None, logprobs: int | None = None) -> Iterator:
        """Stream an assistant reply to the conversation so far.

        Nothing runs until the first token is requested. Stopping early is safe: stop iterating
        (and, to settle it at once, call `.close()` on the iterator, or just make the next call on
        the session, which settles it). The partial reply becomes the assistant message and the
        end-of-turn token is fed. With `sampling.seed` set, turn n samples with seed + n, so a
        whole conversation is reproducible and a reloaded session continues it identically.
        `logprobs`: see `StreamingLLM.generate`."""
        self._close_active()
        if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise UserError(f"max_new_tokens must be an integer >= 1 (got {max_new_tokens!r})")
        if sampling is not None and sampling.seed is not None:
            sampling = replace(sampling, seed=sampling.seed + len(self.turns))
        it = self._generate(max_new_tokens, sampling, logprobs)
        self._active = it
        return it

    def _generate(self, max_new_tokens: int, sampling, logprobs=None) -> Iterator:
        text = self._pending_text()
        ids = self.encode(text)
        if not self._fed_text:  # the stream's start: BOS exactly once if the model's rule wants one
            ids = special_tokens.chat_stream_start(self.tokenizer, ids)
        self._turn_start = (self._fed_text, text, list(ids))  # for cut_last_reply
        turn = TurnStats(prompt_tokens=len(ids))
        produced: list[int] = []
        t0 = time.perf_counter()
        t_prefilled = None
        inner = self.engine.generate(ids, max_new_tokens=max_new_tokens, sampling=sampling, stop_ids=self.stop_ids,
                                     logprobs=logprobs)
        try:
            for tok in inner:
                if t_prefilled is None:  # the first token's forward and sampling belong to generation
                    t_prefilled = time.perf_counter() - tok.ms / 1000
                    turn.prefill_s = t_prefilled - t0
                    self._fed_text += text
                    self._fed_messages = len(self.messages)
                produced.append(tok.id)
                turn.generate_s = time.perf_counter() - t_prefilled
                turn.finish_reason = tok.finish_reason or "interrupted"
                yield tok
        except GeneratorExit:
            inner.close()
            if t_prefilled is not None:
                self._end_turn(turn, produced)
            raise
        self._end_turn(turn, produced)

    def _end_turn(self, turn: TurnStats, produced: list[int]) -> None:
        self._active = None
        turn.generated_tokens = len(produced)
        stopped = turn.finish_reason == "stop"
        content_ids = produced[:-1] if stopped else produced
        self._fed_text += self.tokenizer.decode(produced, skip_special_tokens=False)
        if not (stopped and produced[-1] == self.eot_id):
            # length, interrupted or another stop token: close the turn as the template does
            self.engine.feed([self.eot_id], logits="none")
            self._fed_text += self.eot_text
        content = self.tokenizer.decode(content_ids, skip_special_tokens=True)
        self.messages.append({"role": "assistant", "content": content})
        self._fed_messages = len(self.messages)
        self.turns.append(turn)

    def cut_last_reply(self, content: str) -> None:
        """Make the last (settled) reply `content`, e.g. the reply cut before a stop sequence.
        The caller has first put the engine's stream back where that turn started (a snapshot
        taken before the turn's first token, or a batch row dropped without copying it back);
        this feeds the turn's prompt, `content`'s tokens and the end-of-turn token, so the stream
        again holds exactly the conversation: what a reply of `content` ending in end-of-turn
        would have left."""
        self._close_active()
        fed_before, prompt_text, prompt_ids = self._turn_start
        self.engine.feed(prompt_ids + self.encode(content) + [self.eot_id], logits="none")
        self._fed_text = fed_before + prompt_text + content + self.eot_text
        self.messages[-1] = {"role": "assistant", "content": content}
        self._fed_messages = len(self.messages)

    def _close_active(self) -> None:
        """Settle a reply the caller stopped iterating: keeps the partial reply, feeds end-of-turn."""
        it, self._active = self._active, None
        if it is not None:
            it.close()

    # ---- reporting ---------------------------------------------------------------------------
    def stats(self) -> SessionStats:
        self._close_active()
        e = self.engine
        last = self.turns[-1] if self.turns else TurnStats()
        memory = next((m for m in getattr(e.cache, "memories", ()) if m is not None), None)
        return SessionStats(
            turns=len(self.turns),
            messages=len(self.messages),
            tokens_seen=e.tokens_seen,
            cache_tokens=e.cache_tokens,
            capacity=e.capacity,
            evicted=e.evicted,
            method=e.config.method,
            last_prompt_tokens=last.prompt_tokens,
            last_generated_tokens=last.generated_tokens,
            prefill_tok_s=last.prefill_tok_s,
            gen_tok_s=last.gen_tok_s,
            ms_per_token=last.ms_per_token,
            recall_tokens=None if memory is None else memory.stored_tokens,
            recalled_tokens=None if memory is None else memory.recalled_tokens,
        )

    # ---- persistence -------------------------------------------------------------------------
    def _model_fingerprint(self) -> dict:
        cfg = self.engine.model.config.get_text_config(decoder=True)
        keys = ("model_type", "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads")
        return {k: getattr(cfg, k, None) for k in keys}

    def state_dict(self, copy: bool = True) -> dict:
        """Everything needed to continue this conversation exactly, as plain containers and
        tensors (torch.save-able, loadable with weights_only=True): format tag, model fingerprint,
        streaming config, messages, turn stats, what the stream holds, the engine's state
        (copy=False: `StreamingLLM.state_dict`)."""
        self._close_active()
        return {
            "format": SAVE_FORMAT,
            "version": SAVE_VERSION,
            "model": self._model_fingerprint(),
            "config": self.engine.config.to_dict(),
            "messages": [dict(m) for m in self.messages],
            "turns": [asdict(t) for t in self.turns],
            "fed_text": self._fed_text,
            "fed_messages": self._fed_messages,
            "engine": self.engine.state_dict(copy),
        }

    def load_state_dict(self, state: dict) -> None:
        """Replace this session with a saved one (see `state_dict`). If it was saved with other
        streaming settings (sinks, window, method...), the engine is rebuilt on the same model with
        those settings. The model must be the same one (checked by its shape)."""
        from ..core.config import StreamingConfig

        self._close_active()
        if not isinstance(state, dict) or state.get("format") != SAVE_FORMAT:
            raise UserError("not a saved chat session")
        if state.get("version") != SAVE_VERSION:
            raise UserError(f"session format version {state.get('version')}; this build reads {SAVE_VERSION}")
        if state["model"] != self._model_fingerprint():
            raise UserError(f"saved with another model ({state['model']}); load it with that model")
        if not self.engine.config.matches(state["config"]):
            from ..core.engine import StreamingLLM

            e = self.engine
            self.engine = StreamingLLM(e.model, e.tokenizer, StreamingConfig.from_dict(state["config"]), e.start_position)
        self.engine.load_state_dict(state["engine"])
        self.messages = [dict(m) for m in state["messages"]]
        self.turns = [TurnStats(**t) for t in state["turns"]]
        self._fed_text = state["fed_text"]
        self._fed_messages = state["fed_messages"]

    def save(self, path: str | Path) -> Path:
        """Write `state_dict()` with torch.save (atomically): `load` continues exactly."""
        import torch

        path = Path(path).expanduser()
        state = self.state_dict()
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(path.name + ".tmp")
            torch.save(state, tmp)
            tmp.replace(path)
        except OSError as e:
            raise UserError(f"cannot save the session to {path}: {e.strerror or e}") from None
        return path

    def load(self, path: str | Path) -> None:
        """Replace this session with one saved by `save` (see `load_state_dict`)."""
        import torch

        self._close_active()
        path = Path(path).expanduser()
        if not path.is_file():
            raise UserError(f"no saved session at {path}")
        try:
            state = torch.load(path, map_location=self.engine.device, weights_only=True)
        except Exception as e:
            raise UserError(f"{path} is not a saved chat session ({str(e).splitlines()[0]})") from None
        try:
            self.load_state_dict(state)
        except UserError as e:
            raise UserError(f"{path}: {e}") from None
