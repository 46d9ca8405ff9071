"""The streaming settings: one frozen dataclass, passed explicitly everywhere.

CLI flags map 1:1 onto its fields. It validates itself and raises `UserError` on bad values; it
knows nothing about models, tensors or files.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace

from ..errors import UserError

METHODS = ("streaming", "window", "dense", "recompute")
POSITIONS = ("cache", "absolute")

DEFAULT_SINKS = 4
DEFAULT_WINDOW = 1020
DEFAULT_CHUNK = 256
# How model weights may be held: the one home of these choices (loading, quantize, the CLI, bench).


@dataclass(frozen=True)
class StreamingConfig:
    """How a token stream is attended.

    Rule for every method but `dense`: each token attends to at most `sinks + window` tokens,
    itself included: the first `sinks` tokens of the stream and its `window` most recent ones.

    - method: `streaming` (the paper), `window` (sinks forced to 0), `dense` (no eviction, absolute
      positions), `recompute` (every token recomputed from scratch over the last sinks+window tokens
      with fresh positions: the paper's slow, exact baseline).
    - positions: `cache` (the paper, Sec. 3.2: positions are assigned within the cache) or
      `absolute` (original text positions kept; an ablation).
    - chunk_size: tokens per forward pass when feeding long inputs (exact semantics either way).
    """

    method: str = "streaming"
    sinks: int = DEFAULT_SINKS
    window: int = DEFAULT_WINDOW
    positions: str = "cache"
    chunk_size: int = DEFAULT_CHUNK

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise UserError(f"unknown method {self.method!r}; choose one of {', '.join(METHODS)}")
        if self.positions not in POSITIONS:
            raise UserError(f"unknown positions {self.positions!r}; choose one of {', '.join(POSITIONS)}")
        if not isinstance(self.window, int) or self.window < 1:
            raise UserError(f"--window must be an integer >= 1 (got {self.window!r})")
        if not isinstance(self.sinks, int) or self.sinks < 0:
            raise UserError(f"--sinks must be an integer >= 0 (got {self.sinks!r})")
        if not isinstance(self.chunk_size, int) or self.chunk_size < 1:
            raise UserError(f"--chunk-size must be an integer >= 1 (got {self.chunk_size!r})")
        if self.method == "window" and self.sinks != 0:
            # The window baseline is, by definition, streaming without sinks.
            object.__setattr__(self, "sinks", 0)

    @property
    def cache_size(self) -> int:
        """Most tokens any query attends to (sinks + window); unbounded for dense."""
        return self.sinks + self.window

    def with_(self, **changes) -> "StreamingConfig":
        return replace(self, **changes)

    def to_dict(self) -> dict:
        return asdict(self)
