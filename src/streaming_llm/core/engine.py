"""StreamingLLM: feed an unbounded token stream to a causal LM, get logits, generate tokens.

The engine owns the cache for its method, the positions it passes to the model, the chunking of
long inputs (chunked prefill with exact streaming semantics) and the decode loop. Chat, server,
evaluation and benchmarks all consume `feed` and `generate`; the engine knows nothing about
terminals, HTTP, files or plots.

Methods (see `config.StreamingConfig`): `streaming` and `window` use `StreamingCache`; `dense`
uses transformers' `DynamicCache` (absolute positions, no eviction); `recompute` keeps only the
last sinks+window token ids and recomputes every token from scratch over them.
"""

from __future__ import annotations

import inspect
import time
from collections import deque
from dataclasses import dataclass
from typing import Iterator, Mapping, Sequence

import torch
from transformers.cache_utils import DynamicCache, get_layer_types_and_kwargs

from . import attention
from .cache import StreamingCache, take_active_layer
from .config import StreamingConfig
from ..errors import UnsupportedModelError, UserError
from .rope import find_rotary_module, layer_ropes
from .sampling import SamplingParams, Sampler, TextDecoder


@dataclass
class Token:
    """One generated token, as every front end consumes it."""

    id: int
    text: str  # the new text this token completes (may be "" while a UTF-8 sequence is partial)
    index: int  # 0-based position within this generation
    ms: float  # wall time of the forward pass that produced it
    tokens_seen: int
    cache_tokens: int
    finish_reason: str | None = None  # "stop" | "length" on the last token


def layer_shapes(model, config: StreamingConfig) -> list[tuple[int, int]]:
    """(sinks, window) per decoder layer: global layers get the config's, sliding layers keep
    their trained window without sinks. Unsupported layer kinds raise a clear error."""
    text_config = model.config.get_text_config(decoder=True)
    types, kwargs = get_layer_types_and_kwargs(text_config)
    shapes = []
    for kind, kw in zip(types, kwargs):
        if kind == "full_attention":
            shapes.append((config.sinks, config.window))
        elif kind == "sliding_attention":
            shapes.append((0, int(kw["sliding_window"])))
        else:
            raise UnsupportedModelError(f"layer type {kind!r} is not supported for streaming")
    return shapes


def _clone(x):
    return None if x is None else x.clone()


def _layer_types(model) -> list[str]:
    return get_layer_types_and_kwargs(model.config.get_text_config(decoder=True))[0]


class StreamingLLM:
    """A model plus one stream's state. Not thread-safe: one stream, one caller at a time."""

    def __init__(self, model, tokenizer=None, config: StreamingConfig | None = None, start_position: int = 0):
        self.model = attention.enable(model.eval())
        self.tokenizer = tokenizer
        self.config = config or StreamingConfig()
        self.start_position = start_position
        find_rotary_module(model)  # fail early, with a clear message, on non-RoPE models
        self.shapes = layer_shapes(model, self.config)
        self.ropes = layer_ropes(model, _layer_types(model))
        params = inspect.signature(model.forward).parameters
        self._cache_kw = "cache" if "cache" in params else "past_key_values"
        self._keep_kw = "logits_to_keep" in params
        self.device = next(model.parameters()).device
        self.reset()

    @classmethod
    def from_pretrained(cls, name_or_path: str, dtype="float32", device: str = "cpu", **config) -> "StreamingLLM":
        """Load a model by alias, path or hub id and wrap it: `from_pretrained("smollm2-135m-instruct", sinks=4, window=1020)`."""
        from ..models.loading import load_model

        model, tokenizer = load_model(name_or_path, dtype=dtype, device=device)
        return cls(model, tokenizer, StreamingConfig(**config))

    # ---- state -------------------------------------------------------------------------------
    def new_cache(self):
        """A fresh cache for this engine's method (None for recompute)."""
        method = self.config.method
        if method == "dense":
            return DynamicCache(config=self.model.config)
        if method == "recompute":
            return None
        return StreamingCache(
            self.shapes,
            self.ropes,
            positions=self.config.positions,
            off_by_one=bool(getattr(self.model.config, "softmax_off_by_one", False)),
            start_position=self.start_position,
        )

    def reset(self) -> None:
        self.cache = self.new_cache()
        self.tokens_seen = 0
        self.history: deque[int] = deque(maxlen=self.config.cache_size)  # recompute's window

    @property
    def cache_tokens(self) -> int:
        if isinstance(self.cache, StreamingCache):
            return self.cache.cache_tokens
        if self.cache is None:
            return len(self.history)
        return self.cache.get_seq_length()

    @property
    def capacity(self) -> int | None:
        """Most tokens the cache will ever hold (None: unbounded, dense)."""
        if self.config.method == "dense":
            return None
        return self.cache.capacity if isinstance(self.cache, StreamingCache) else self.config.cache_size

    @property
    def evicted(self) -> int:
        return self.tokens_seen - self.cache_tokens

    def state_dict(self) -> dict:
        """Everything needed to continue this stream exactly (tensors stay on their device)."""
        if isinstance(self.cache, StreamingCache):
            cache = self.cache.state_dict()
        elif self.cache is None:
            cache = None
        else:
            cache = [(_clone(layer.keys), _clone(layer.values)) for layer in self.cache.layers]
        return {
            "config": self.config.to_dict(),
            "tokens_seen": self.tokens_seen,
            "history": list(self.history),
            "cache": cache,
        }

    def load_state_dict(self, state: dict) -> None:
        if state["config"] != self.config.to_dict():
            raise UserError(f"saved stream used {state['config']}, this engine uses {self.config.to_dict()}")
        self.reset()
        self.tokens_seen = state["tokens_seen"]
        self.history.extend(state["history"])
        if isinstance(self.cache, StreamingCache):
            self.cache.load_state_dict(state["cache"])
        elif self.cache is not None:
            for layer, (k, v) in zip(self.cache.layers, state["cache"]):
                if k is not None:
                    layer.update(k, v)

    # ---- feeding -----------------------------------------------------------------------------
    def feed(self, ids: Sequence[int] | torch.Tensor, logits: str = "all") -> torch.Tensor | None:
        """Append tokens (ids, a tensor, or a tokenizer's output) to the stream. Returns float32
        logits predicting each next token:
        (T, V) for logits="all", (V,) for "last", None for "none". Exact for any chunking."""
        if isinstance(ids, Mapping):  # a tokenizer's BatchEncoding
            ids = ids["input_ids"]
        ids = torch.as_tensor(ids, dtype=torch.long).reshape(-1)
        if ids.numel() == 0:
            raise UserError("nothing to feed: empty token sequence")
        if self.config.method == "recompute":
            return self._feed_recompute(ids, logits)
        outs = []
        step = self.config.chunk_size
        for lo in range(0, ids.numel(), step):
            chunk = ids[lo : lo + step]
            keep = logits == "all" or (logits == "last" and lo + step >= ids.numel())
            out = self._forward(chunk, keep_all=logits == "all")
            if keep:
                outs.append(out)
        if logits == "none":
            return None
        return torch.cat(outs, dim=0) if logits == "all" else outs[-1][-1]

    @torch.inference_mode()
    def _forward(self, chunk: torch.Tensor, keep_all: bool) -> torch.Tensor:
        take_active_layer()  # drop a hand-off left by an interrupted forward
        n = chunk.numel()
        if isinstance(self.cache, StreamingCache):
            pos = self.cache.prepare(n, self.device)
        else:
            pos = torch.arange(self.tokens_seen, self.tokens_seen + n, device=self.device)[None, :]
        kwargs = {self._cache_kw: self.cache, "use_cache": True, "position_ids": pos}
        if self._keep_kw and not keep_all:
            kwargs["logits_to_keep"] = 1
        out = self.model(input_ids=chunk.to(self.device)[None, :], **kwargs)
        self.tokens_seen += n
        return out.logits[0].float()

    @torch.inference_mode()
    def _feed_recompute(self, ids: torch.Tensor, logits: str) -> torch.Tensor | None:
        outs = []
        for i, tok in enumerate(ids.tolist()):
            self.history.append(tok)
            self.tokens_seen += 1
            if logits == "all" or (logits == "last" and i == ids.numel() - 1):
                window = torch.tensor(list(self.history), device=self.device)[None, :]
                out = self.model(input_ids=window, use_cache=False, **({"logits_to_keep": 1} if self._keep_kw else {}))
                outs.append(out.logits[0, -1].float())
        if logits == "none":
            return None
        return torch.stack(outs) if logits == "all" else outs[-1]

    # ---- generation --------------------------------------------------------------------------
    def generate(
        self,
        prompt_ids: Sequence[int] | torch.Tensor,
        max_new_tokens: int = 256,
        sampling: SamplingParams | None = None,
        stop_ids: Sequence[int] = (),
    ) -> Iterator[Token]:
        """Feed the prompt (chunked), then yield generated tokens one by one.

        Each token is fed to the stream before it is yielded, so stopping the iteration at any
        point leaves the stream a faithful transcript of what was yielded. A stop token is fed
        and yielded too, with finish_reason="stop" and no text. `Token.ms` is the time of the
        forward pass that consumed the token."""
        sampling = sampling or SamplingParams()
        sampler = Sampler(sampling, device=self.device)
        decoder = TextDecoder(self.tokenizer) if self.tokenizer is not None else None
        stop = set(int(s) for s in stop_ids)
        logits = self.feed(prompt_ids, logits="last")
        produced: list[int] = []
        for index in range(max_new_tokens):
            tok = sampler.sample(logits, produced)
            produced.append(tok)
            t0 = time.perf_counter()
            logits = self.feed([tok], logits="last")
            ms = (time.perf_counter() - t0) * 1000
            finish = "stop" if tok in stop else ("length" if index == max_new_tokens - 1 else None)
            text = decoder.add(tok) if decoder is not None and finish != "stop" else ""
            if decoder is not None and finish is not None:
                text += decoder.flush()
            yield Token(tok, text, index, ms, self.tokens_seen, self.cache_tokens, finish)
            if finish is not None:
                return
