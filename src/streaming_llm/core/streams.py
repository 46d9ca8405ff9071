"""One stream's state, for each of the four methods, behind one interface.

`StreamingLLM.feed` has one path: for every chunk it asks the stream for the model inputs
(`begin`), runs the model, and tells the stream the chunk is done (`end`). What differs per method
lives here:

- `SinkStream` (`streaming`, `window`): a `StreamingCache` (sinks + ring buffer, positions within
  the cache); the cache rides along as the `streaming_cache` forward argument.
- `DenseStream` (`dense`): transformers' `DynamicCache`, absolute positions, grows without bound.
- `RecomputeStream` (`recompute`): no KV cache; the last sinks+window token ids, and each token is
  recomputed from scratch over them with fresh positions (the paper's slow, exact baseline).

Every stream reports `tokens_seen`, `cache_tokens` (held now), `capacity` (None: unbounded) and
snapshots itself with `state_dict`/`load_state_dict` (`tokens_seen`, `history`, `cache`). This module runs no model and samples nothing.
"""

from __future__ import annotations

from collections import deque

import torch
from transformers.cache_utils import DynamicCache

from .cache import KWARG, StreamingCache


def _clone(x):
    return None if x is None else x.clone()


class SinkStream:
    """`streaming` / `window`: the sink + window cache (one row)."""

    max_chunk = None

    def __init__(self, cache: StreamingCache, cache_kw: str):
        self.cache, self._cache_kw = cache, cache_kw

    @property
    def tokens_seen(self) -> int:
        return self.cache.tokens_seen

    @property
    def cache_tokens(self) -> int:
        return self.cache.cache_tokens

    @property
    def capacity(self) -> int:
        return self.cache.capacity

    def begin(self, chunk: torch.Tensor, need_logits: bool) -> dict:
        pos = self.cache.prepare(chunk.numel(), device=chunk.device)
        return {"input_ids": chunk[None, :], self._cache_kw: self.cache, KWARG: self.cache, "use_cache": True,
                "position_ids": pos}

    def end(self, n: int) -> None:
        pass  # the layers advanced in their attention's commit

    def state_dict(self, copy: bool = True) -> dict:
        return {"tokens_seen": self.tokens_seen, "history": [], "cache": self.cache.state_dict(copy)}

    def load_state_dict(self, state: dict) -> None:
        self.cache.load_state_dict(state["cache"])


class DenseStream:
    """`dense`: every token kept, absolute positions."""

    max_chunk = None

    def __init__(self, cache: DynamicCache, cache_kw: str):
        self.cache, self._cache_kw = cache, cache_kw
        self.tokens_seen = 0

    @property
    def cache_tokens(self) -> int:
        return self.cache.get_seq_length()

    capacity = None

    def begin(self, chunk: torch.Tensor, need_logits: bool) -> dict:
        pos = torch.arange(self.tokens_seen, self.tokens_seen + chunk.numel(), device=chunk.device)[None, :]
        return {"input_ids": chunk[None, :], self._cache_kw: self.cache, "use_cache": True, "position_ids": pos}

    def end(self, n: int) -> None:
        self.tokens_seen += n

    def state_dict(self, copy: bool = True) -> dict:  # always copies
        return {"tokens_seen": self.tokens_seen, "history": [],
                "cache": [(_clone(layer.keys), _clone(layer.values)) for layer in self.cache.layers]}

    def load_state_dict(self, state: dict) -> None:
        self.tokens_seen = state["tokens_seen"]
        for i, (k, v) in enumerate(state["cache"]):
            if k is not None:
                self.cache.update(k.clone(), v.clone(), i)


class RecomputeStream:
    """`recompute`: each token recomputed over the last sinks+window token ids (itself included)."""

    max_chunk = 1  # one forward per token, over its own window

    def __init__(self, cache_size: int):
        self.history: deque[int] = deque(maxlen=cache_size)
        self.capacity = cache_size
        self.tokens_seen = 0

    @property
    def cache_tokens(self) -> int:
        return len(self.history)

    def begin(self, chunk: torch.Tensor, need_logits: bool) -> dict | None:
        self.history.extend(int(t) for t in chunk.tolist())
        if not need_logits:
            return None
        window = torch.tensor(list(self.history), device=chunk.device)[None, :]
        return {"input_ids": window, "use_cache": False}

    def end(self, n: int) -> None:
        self.tokens_seen += n

    def state_dict(self, copy: bool = True) -> dict:  # no tensors
        return {"tokens_seen": self.tokens_seen, "history": list(self.history), "cache": None}

    def load_state_dict(self, state: dict) -> None:
        self.tokens_seen = state["tokens_seen"]
        self.history.clear()
        self.history.extend(state["history"])
