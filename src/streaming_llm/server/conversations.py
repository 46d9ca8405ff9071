"""What a server session holds: one engine stream plus its transcript, in two kinds.

- `TextConversation` ("text", for /v1/completions): a raw token stream; each request's prompt is
  appended to the stream and continued. Its transcript is the list of (prompt, completion) turns.
- `ChatConversation` ("chat", for /v1/chat/completions): a `session.ChatSession` (chat template,
  incremental prefill of only the new messages).

Both expose the same small surface to the session manager: `reply(payload, max_new_tokens,
sampling, fresh, logprobs) -> (conversation, rebuilt, Iterator[Token])` (runs on the model thread;
`fresh()` makes an empty conversation for a rebuild; the transcript is updated when the iterator
is exhausted or closed), `cut_last_reply(text)` (after a stop sequence: the caller has put the
stream back where the turn started; the turn's prompt and `text` are fed again and the transcript
holds `text`), `transcript()`, `state()` / `restore(state, transcript)`, `replay(transcript)`,
`tokens_seen` and `engine`. `pack_state` / `unpack_state` turn a state into bytes for the store
and back. Nothing here knows about HTTP, locks or threads.
"""

from __future__ import annotations

import io
from typing import Iterator

import torch

from ..core.config import StreamingConfig
from ..core.engine import StreamingLLM, Token
from ..errors import UserError
from ..core.sampling import SamplingParams
from ..models.special_tokens import stop_ids, stream_ids

KINDS = ("chat", "text")


_SAME_SIZE_INT = {2: torch.int16, 4: torch.int32, 8: torch.int64}


def _trim(x: torch.Tensor):
    """A KV buffer (..., N, D) whose trailing slots are all zero (a cache not yet full) is stored
    without them; `_untrim` restores it exactly. Snapshots of short sessions stay small."""
    if x.dim() < 3 or x.shape[-2] < 2:
        return x
    bits = _SAME_SIZE_INT.get(x.dtype.itemsize)  # the raw bits: 5x faster than x != 0 on bfloat16
    if bits is not None:  # (a -0.0 counts as held: harmless)
        used = x.view(bits).abs().amax(dim=(*range(x.dim() - 2), x.dim() - 1)).nonzero()
    else:
        used = (x != 0).flatten(0, -3).any(0).any(-1).nonzero()  # (k, 1) slots holding anything
    rows = int(used[-1]) + 1 if used.numel() else 0
    if rows > x.shape[-2] * 3 // 4:
        return x
    return {"__trimmed__": x[..., :rows, :].clone(), "rows": x.shape[-2]}


def _untrim(d: dict) -> torch.Tensor:
    x = d["__trimmed__"]
    pad = torch.zeros(*x.shape[:-2], d["rows"] - x.shape[-2], x.shape[-1], dtype=x.dtype)
    return torch.cat([x, pad], dim=-2)


def pack_state(state: dict, dtype: torch.dtype | None = None) -> bytes:
    """torch.save bytes of a state dict: tensors on CPU, floating ones cast to `dtype` (if given)
    and trimmed of trailing all-zero cache slots. A cache layer's keys and values are cut at the
    slots its `seen` counter says it filled (sinks and ring fill in order and the rest stays zero,
    `core/cache.py`), so the rest is not even read (an anonymous map's untouched pages stay
    unmapped); other tensors are scanned (`_trim`)."""

    def conv(x, used=None):
        if isinstance(x, torch.Tensor):
            x = x.detach().cpu()
            if not x.is_floating_point():
                return x
            if used is not None and x.dim() >= 3 and used < x.shape[-2]:
                part = x[..., :used, :]
                part = part.to(dtype) if dtype is not None and dtype != x.dtype else part.clone()  # not a view
                return {"__trimmed__": part, "rows": x.shape[-2]}
            return _trim(x.to(dtype) if dtype is not None else x)
        if isinstance(x, dict):
            filled = x.get("seen") if "keys" in x and type(x.get("seen")) is int else None
            return {k: conv(v, filled if k in ("keys", "values") else None) for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            return type(x)(conv(v) for v in x)
        return x

    buf = io.BytesIO()
    torch.save(conv(state), buf)
    return buf.getvalue()


def unpack_state(data: bytes, dtype: torch.dtype, device) -> dict:
    """Inverse of `pack_state`: floating tensors back to the model's dtype and device."""

    def conv(x):
        if isinstance(x, dict) and "__trimmed__" in x:
            x = _untrim(x)
        if isinstance(x, torch.Tensor):
            return x.to(device=device, dtype=dtype) if x.is_floating_point() else x.to(device)
        if isinstance(x, dict):
            return {k: conv(v) for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            return type(x)(conv(v) for v in x)
        return x

    return conv(torch.load(io.BytesIO(data), map_location="cpu", weights_only=True))


class TextConversation:
    """A raw stream: each prompt is appended to everything the stream has seen, then continued."""

    kind = "text"

    def __init__(self, model, tokenizer, config: StreamingConfig):
        self.engine = StreamingLLM(model, tokenizer, config)
        self.tokenizer = tokenizer
        self.stop = stop_ids(model, tokenizer)
        self.turns: list[dict] = []
        self.last_prompt_tokens = 0

    @property
    def tokens_seen(self) -> int:
        return self.engine.tokens_seen

    def transcript(self) -> list[dict]:
        return list(self.turns)

    def reply(self, prompt: str, max_new_tokens: int, sampling: SamplingParams, fresh=None, logprobs=None):
        """-> (self, rebuilt=False, token iterator): the prompt is appended to the stream."""
        if not prompt:
            raise UserError("prompt must not be empty")
        # a new stream starts as the model's BOS rule says; later prompts continue it
        ids = stream_ids(self.tokenizer, prompt, start=self.engine.tokens_seen == 0)
        self.last_prompt_tokens = len(ids)
        self._turn_start = (prompt, ids, len(self.turns))
        return self, False, self._run(prompt, ids, max_new_tokens, sampling, logprobs)

    def _run(self, prompt, ids, max_new_tokens, sampling, logprobs) -> Iterator[Token]:
        pieces = []
        for tok in self.engine.generate(ids, max_new_tokens, sampling, stop_ids=self.stop, logprobs=logprobs):
            pieces.append(tok.text)
            yield tok
        self.turns.append({"prompt": prompt, "completion": "".join(pieces)})

    def cut_last_reply(self, completion: str) -> None:
        """The last turn's completion becomes `completion` (see the module docstring)."""
        prompt, ids, before = self._turn_start
        self.engine.feed(ids + stream_ids(self.tokenizer, completion, start=False), logits="none")
        self.turns[before:] = [{"prompt": prompt, "completion": completion}]  # recorded or not (closed early)

    def state(self, copy: bool = True) -> dict:
        return {"engine": self.engine.state_dict(copy)}

    def restore(self, state: dict, transcript: list[dict]) -> None:
        self.engine.load_state_dict(state["engine"])
        self.turns = list(transcript)

    def replay(self, transcript: list[dict]) -> None:
        """Rebuild the stream from the transcript (when no usable snapshot exists)."""
        self.engine.reset()
        self.turns = []
        text = "".join(t["prompt"] + t["completion"] for t in transcript)
        if text:
            self.engine.feed(stream_ids(self.tokenizer, text), logits="none")
        self.turns = list(transcript)



class ChatConversation:
    """A `ChatSession` seen through the server's conversation surface.

    Payload: {"messages": [...], "append": bool}. Not appending, the messages are the whole
    conversation (OpenAI style): if the session's messages are their prefix only the rest is fed,
    otherwise the session is reset and rebuilt from them. Appending, they follow what the session
    holds (for endless sessions whose full history the client does not resend)."""

    kind = "chat"

    def __init__(self, model, tokenizer, config: StreamingConfig):
        from ..chat.session import ChatSession

        self.session = ChatSession(StreamingLLM(model, tokenizer, config))

    @property
    def engine(self) -> StreamingLLM:
        return self.session.engine

    @property
    def tokens_seen(self) -> int:
        return self.session.engine.tokens_seen

    @property
    def last_prompt_tokens(self) -> int:
        return self.session.turns[-1].prompt_tokens if self.session.turns else 0

    def transcript(self) -> list[dict]:
        return [dict(m) for m in self.session.messages]

    def reply(self, payload: dict, max_new_tokens: int, sampling: SamplingParams, fresh=None, logprobs=None):
        s, messages, rebuilt = self.session, payload["messages"], False
        if payload.get("append"):
            s.extend(messages)
        elif s.matches_prefix(messages):
            s.extend(messages[len(s.messages) :])
        else:
            s.reset()
            s.extend(messages)
            rebuilt = True
        return self, rebuilt, s.generate(max_new_tokens, sampling, logprobs)

    def cut_last_reply(self, content: str) -> None:
        self.session.cut_last_reply(content)

    # The store wants bytes: the session's own state_dict, packed by `pack_state`.
    def state(self, copy: bool = True) -> dict:
        return self.session.state_dict(copy)

    def restore(self, state: dict, transcript: list[dict]) -> None:
        """`ChatSession.load_state_dict`; raises `UserError` on a snapshot of another format (the
        session manager then replays the transcript)."""
        self.session.load_state_dict(state)
        if [dict(m) for m in transcript] != self.session.messages:
            raise UserError("snapshot and transcript disagree")

    def replay(self, transcript: list[dict]) -> None:
        """No usable snapshot: the whole transcript is prefilled with the next reply."""
        self.session.reset()
        self.session.extend(transcript)


def chat_factory(model, tokenizer, config: StreamingConfig):
    """() -> an empty chat conversation, or None if the tokenizer has no chat template."""
    if not getattr(tokenizer, "chat_template", None):
        return None
    return lambda: ChatConversation(model, tokenizer, config)
