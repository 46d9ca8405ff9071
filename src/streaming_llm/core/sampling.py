"""Next-token sampling and incremental detokenization.

`SamplingParams` holds the user's knobs (temperature 0 means greedy); `Sampler` turns one logits
vector into a token id, deterministically for a given seed; `TextDecoder` turns a growing list of
token ids into text pieces without splitting UTF-8 characters; `token_logprobs` reads a token's
log-probability off a logits vector. No model code here.

Constrained decoding hooks in here, so every path that samples (the engine's `generate`, batched
or not) gets it: `SamplingParams.constraint`, when set, is a factory whose `start()` gives one
generation's state; before each sample the `Sampler` calls `state.mask(logits)` (disallowed
tokens set to -inf, in place), and after it `state.accept(token)`. The grammar itself lives
elsewhere (`server/structured.py`); this module knows only that protocol.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from ..errors import UserError

if TYPE_CHECKING:
    import torch


# The one home of the sampling defaults (chat, server settings and flags import these).
DEFAULT_TEMPERATURE = 0.7
DEFAULT_TOP_P = 0.9
DEFAULT_TOP_K = 0  # 0: no top-k filter
DEFAULT_REPETITION_PENALTY = 1.0  # 1.0: off


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = DEFAULT_TEMPERATURE
    top_p: float = DEFAULT_TOP_P
    top_k: int = DEFAULT_TOP_K  # 0: no top-k filter
    repetition_penalty: float = DEFAULT_REPETITION_PENALTY  # 1.0: off (CTRL-style: divides positive logits of seen tokens)
    seed: int | None = None
    # a token constraint (grammar), see the module docstring; None: every token allowed
    constraint: object | None = field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        if self.temperature < 0:
            raise UserError(f"temperature must be >= 0 (got {self.temperature})")
        if not 0 < self.top_p <= 1:
            raise UserError(f"top_p must be in (0, 1] (got {self.top_p})")
        if self.top_k < 0:
            raise UserError(f"top_k must be >= 0 (got {self.top_k})")
        if self.repetition_penalty <= 0:
            raise UserError(f"repetition_penalty must be > 0 (got {self.repetition_penalty})")


class Sampler:
    def __init__(self, params: SamplingParams, device="cpu"):
        import torch  # here, not at the top: the CLI reads the defaults above without loading torch

        self.params = params
        self.generator = torch.Generator(device=device)
        if params.seed is not None:
            self.generator.manual_seed(params.seed)
        else:
            self.generator.seed()
        self.constraint = params.constraint.start() if params.constraint is not None else None

    def sample(self, logits: torch.Tensor, previous: list[int] | None = None) -> int:
        logits = logits.float()
        if self.constraint is not None or (self.params.repetition_penalty != 1.0 and previous):
            logits = logits.clone()  # changed in place below: never the caller's tensor
        if self.constraint is not None:
            self.constraint.mask(logits)  # before penalties and temperature: -inf stays -inf
        tok = self._pick(logits, previous)
        if self.constraint is not None:
            self.constraint.accept(tok)
        return tok

    def _pick(self, logits: torch.Tensor, previous: list[int] | None) -> int:
        import torch

        p = self.params
        if p.repetition_penalty != 1.0 and previous:
            idx = torch.tensor(sorted(set(previous)), device=logits.device)
            seen = logits[idx]
            logits[idx] = torch.where(seen > 0, seen / p.repetition_penalty, seen * p.repetition_penalty)
        if p.temperature < 1e-4:  # 0, or so small that logits / temperature overflow: greedy
            return int(torch.argmax(logits))
        logits = logits / p.temperature
        if p.top_k:
            kth = torch.topk(logits, min(p.top_k, logits.numel())).values[-1]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        if p.top_p < 1.0:
            logits = nucleus(logits, p.top_p)
        probs = torch.softmax(logits, dim=-1)
        return int(torch.multinomial(probs, 1, generator=self.generator))


NUCLEUS_CANDIDATES = 64  # first guess of the nucleus size: a top-k of 64 costs 0.08 ms, a sort of 49K 2.8 ms


def nucleus(logits: "torch.Tensor", top_p: float) -> "torch.Tensor":
    """logits (V,) with every token outside the top-p nucleus set to -inf: the most likely tokens
    whose probabilities, before each one, sum to less than top_p (so the token that crosses top_p
    stays). The nucleus is found among the top-k probabilities, k growing 8x until they cover
    top_p, instead of sorting the whole vocabulary: the same set as a full sort (up to ties)."""
    import torch

    probs = torch.softmax(logits, dim=-1)
    n = probs.numel()
    k = min(NUCLEUS_CANDIDATES, n)
    while True:
        top, order = torch.topk(probs, k)  # descending
        cum = top.cumsum(-1)
        if k == n or cum[-1] >= top_p:
            break
        k = min(n, k * 8)
    keep = order[cum - top < top_p]
    out = torch.full_like(logits, float("-inf"))
    out[keep] = logits[keep]
    return out


def token_logprobs(logits: "torch.Tensor", token: int, k: int = 0) -> tuple[float, list[tuple[int, float]]]:
    """(log-probability of `token`, the `k` most likely (id, log-probability) pairs, best first)
    under the distribution `logits` (V,) define: log_softmax in float32, no sampling settings."""
    import torch

    lp = torch.log_softmax(logits.float(), dim=-1)
    top = torch.topk(lp, min(k, lp.numel())) if k > 0 else None
    pairs = list(zip(top.indices.tolist(), top.values.tolist())) if top is not None else []
    return float(lp[token]), pairs


class TextDecoder:
    """Decode token ids incrementally in O(1) per token; hold back text while it ends in a partial
    character. Each step decodes only the ids since the last emitted piece (plus that piece, for
    context: tokenizers that strip a leading space or merge bytes decode differently in isolation),
    so a reply of any length costs the same per token."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.ids: list[int] = []  # ids from the start of the last emitted piece on
        self.read = 0  # ids[:read] are already emitted

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def add(self, token_id: int) -> str:
        self.ids.append(token_id)
        done = self._decode(self.ids[: self.read])
        text = self._decode(self.ids)
        if text.endswith("\ufffd") or len(text) <= len(done):
            return ""
        self.ids, self.read = self.ids[self.read :], len(self.ids) - self.read
        return text[len(done) :]

    def flush(self) -> str:
        done, text = self._decode(self.ids[: self.read]), self._decode(self.ids)
        self.ids, self.read = [], 0
        return text[len(done) :]
