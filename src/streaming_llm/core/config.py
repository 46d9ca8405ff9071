"""The streaming settings: one frozen dataclass, passed explicitly everywhere.

CLI flags map 1:1 onto its fields. It validates itself and raises `UserError` on bad values; it
knows nothing about models, tensors or files.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace

from ..errors import UserError

METHODS = ("streaming", "window", "dense", "recompute")
POSITIONS = ("cache", "absolute")

DEFAULT_SINKS = 4
DEFAULT_WINDOW = 1020
DEFAULT_CHUNK = 256
# Recall of evicted tokens (see recall.py, docs/recall.md). 32-token blocks: Quest uses 16-token
# pages, InfLLM 128-token blocks; 32 keeps the RAM summaries at 1/32 of the stored KV (min + max
# per block vs 32 keys + 32 values) while a block is still small enough to hold one fact.
DEFAULT_BLOCK_SIZE = 32
# 2^17 tokens in memory (covers the 100K-token cost measurement); on disk that is about
# 6 GB in float32 for smollm2-135m (30 layers x 3 KV heads x 64 channels), half in bfloat16.
DEFAULT_RECALL_MEMORY_TOKENS = 131_072
RECALL_DTYPES = ("float32", "bfloat16")
# How a layer chooses its recalled blocks: one choice shared by all heads, or one per KV head.
RECALL_SELECTS = ("layer", "head")
RECALL_SCORES = ("bound", "mean", "both")  # StreamingConfig.recall_score: Quest's bound, q . mean key, or both in turn
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
    - recall_blocks: evicted-token blocks each global layer recalls per forward (0: off, exactly
      plain streaming); `block_size` tokens per block; `recall_memory_tokens` caps the tokens kept
      in the memory (oldest blocks dropped); `recall_dtype` is how the stored blocks are held.
      With recall a query attends to at most sinks + recall_blocks*block_size + window tokens.
      `recall_select`: `layer` (one choice per layer and forward, shared by all heads) or `head`
      (each KV head chooses its own blocks by the bound of its own query heads). `recall_every`:
      decode steps one choice lasts (1: every forward chooses; N: a decoded token reuses the
      choice of the last decode step that chose, for N-1 steps, while its blocks are held; a chunk
      always chooses). `recall_score`: how a block is scored against the queries: `bound` (Quest's
      upper bound from per-channel key minima and maxima), `mean` (q . the block's mean key) or
      `both` (the bound's best block, the mean key's best, the bound's second, ... until K).
    """

    method: str = "streaming"
    sinks: int = DEFAULT_SINKS
    window: int = DEFAULT_WINDOW
    positions: str = "cache"
    chunk_size: int = DEFAULT_CHUNK
    recall_blocks: int = 0
    block_size: int = DEFAULT_BLOCK_SIZE
    recall_memory_tokens: int = DEFAULT_RECALL_MEMORY_TOKENS
    recall_dtype: str = "float32"
    recall_select: str = "layer"
    recall_every: int = 1
    recall_score: str = "bound"

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
        if not isinstance(self.recall_blocks, int) or self.recall_blocks < 0:
            raise UserError(f"--recall-blocks must be an integer >= 0 (got {self.recall_blocks!r})")
        if not isinstance(self.block_size, int) or self.block_size < 1:
            raise UserError(f"--block-size must be an integer >= 1 (got {self.block_size!r})")
        if not isinstance(self.recall_memory_tokens, int) or self.recall_memory_tokens < self.block_size:
            raise UserError(f"--recall-memory-tokens must be an integer >= --block-size ({self.block_size}) "
                            f"(got {self.recall_memory_tokens!r})")
        if self.recall_dtype not in RECALL_DTYPES:
            raise UserError(f"unknown recall dtype {self.recall_dtype!r}; choose one of {', '.join(RECALL_DTYPES)}")
        if self.recall_select not in RECALL_SELECTS:
            raise UserError(f"--recall-select must be one of {', '.join(RECALL_SELECTS)} (got {self.recall_select!r})")
        if self.recall_score not in RECALL_SCORES:
            raise UserError(f"--recall-score must be one of {', '.join(RECALL_SCORES)} (got {self.recall_score!r})")
        if not isinstance(self.recall_every, int) or self.recall_every < 1:
            raise UserError(f"--recall-every must be an integer >= 1 (got {self.recall_every!r})")
        if self.recall_blocks and self.method != "streaming":
            raise UserError(f"--recall-blocks needs --method streaming (got --method {self.method})")
        if self.recall_blocks and self.positions != "cache":
            raise UserError("--recall-blocks needs --positions cache (recalled blocks get positions within the cache)")
        if self.method == "window" and self.sinks != 0:
            # The window baseline is, by definition, streaming without sinks.
            object.__setattr__(self, "sinks", 0)

    @property
    def cache_size(self) -> int:
        """Most tokens any query attends to (sinks + recalled + window); unbounded for dense."""
        return self.sinks + self.recall_blocks * self.block_size + self.window

    def with_(self, **changes) -> "StreamingConfig":
        return replace(self, **changes)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, saved: dict) -> "StreamingConfig":
        """A config saved with `to_dict`; fields added since it was saved take their defaults (a
        stream saved before `recall_select` existed was saved with its default). UserError for
        fields this build does not know or values it refuses."""
        unknown = set(saved) - {f.name for f in fields(cls)}
        if unknown:
            raise UserError(f"the saved stream's settings have fields this build does not know: {sorted(unknown)}")
        return cls(**saved)

    def matches(self, saved: dict) -> bool:
        """Whether a saved `to_dict()` describes this config (missing newer fields at their defaults)."""
        try:
            return StreamingConfig.from_dict(saved) == self
        except (UserError, TypeError):
            return False
