"""StreamingLLM: feed an unbounded token stream to a causal LM, get logits, generate tokens.

The engine owns the cache for its method, the positions it passes to the model, the chunking of
long inputs (chunked prefill with exact streaming semantics) and the decode loop. Chat, server,
evaluation and benchmarks all consume `feed` and `generate`; the engine knows nothing about
terminals, HTTP, files or plots.

Methods (see `config.StreamingConfig`): what differs per method is the stream's state, behind
one interface (`streams.py`): `streaming` and `window` use `StreamingCache`; `dense` uses
transformers' `DynamicCache` (absolute positions, no eviction); `recompute` keeps only the last
sinks+window token ids and recomputes every token from scratch over them. Many streams in one
forward: `batch.StreamBatch`. The streaming cache's storage dtype is `kv_dtype` (`resolve_kv_dtype`:
bfloat16 for models whose linears were quantized for CPU speed, on CPUs where attention over a
bfloat16 ring was measured faster (`models.kv_ring`), else the model's own).
"""

from __future__ import annotations

import inspect
import time
from dataclasses import dataclass
from typing import Iterator, Mapping, Sequence

import torch
from transformers.cache_utils import DynamicCache, get_layer_types_and_kwargs

from . import attention
from .cache import StreamingCache
from .config import StreamingConfig
from ..errors import UnsupportedModelError, UserError
from ..models import kv_ring
from .rope import find_rotary_module, layer_ropes
from .sampling import SamplingParams, Sampler, TextDecoder, token_logprobs
from .streams import DenseStream, RecomputeStream, SinkStream


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
    # with generate(..., logprobs=k): log-probability of this token and the k most likely ones,
    # under the model's own distribution (log_softmax of the raw logits: before repetition
    # penalty, temperature, top-k/top-p)
    logprob: float | None = None
    top_logprobs: list[tuple[int, float]] | None = None


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


KV_DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32, "float16": torch.float16}


def resolve_kv_dtype(model, config: StreamingConfig, kv_dtype) -> torch.dtype | None:
    """The streaming cache's storage dtype; None: the model's own. "auto": the ring dtype recorded
    for a model whose linears were quantized for CPU speed (`models.kv_ring`: bfloat16 where this
    CPU's attention over it was measured faster; that fast path already trades float32 exactness
    for speed, within its measured perplexity budget), else the model's dtype, so the float32 path
    stays exact. Recall keeps the model's dtype (its store copies the ring's keys)."""
    if kv_dtype == "auto":
        quantized = getattr(model.config, "streaming_llm_quant", "none") not in (None, "none")
        on_cpu = next(model.parameters()).device.type == "cpu"
        if not (quantized and on_cpu and not config.recall_blocks):
            return None
        ring = getattr(model.config, "streaming_llm_kv_ring", None) or kv_ring.rule()
        return torch.bfloat16 if ring == "bfloat16" else None
    if kv_dtype is None or isinstance(kv_dtype, torch.dtype):
        return kv_dtype
    if kv_dtype not in KV_DTYPES:
        raise UserError(f"kv_dtype must be auto, None or one of {sorted(KV_DTYPES)}, got {kv_dtype!r}")
    return KV_DTYPES[kv_dtype]


def _layer_types(model) -> list[str]:
    return get_layer_types_and_kwargs(model.config.get_text_config(decoder=True))[0]


class StreamingLLM:
    """A model plus one stream's state. Not thread-safe: one stream, one caller at a time (two
    engines, even over the same model, can run on two threads at once). Many streams in one
    forward: `batch.StreamBatch`."""

    def __init__(self, model, tokenizer=None, config: StreamingConfig | None = None, start_position: int = 0,
                 recall_dir: str | None = None, kv_dtype: str | torch.dtype | None = "auto"):
        self.model = attention.enable(model.eval())
        self.recall_dir = recall_dir  # where the recall memory's (unlinked, pread/pwrite) block files go; None: tmp
        self.tokenizer = tokenizer
        self.config = config or StreamingConfig()
        self.start_position = start_position
        find_rotary_module(model)  # fail early, with a clear message, on non-RoPE models
        self.shapes = layer_shapes(model, self.config)
        self.ropes = layer_ropes(model, _layer_types(model))
        params = inspect.signature(model.forward).parameters
        self.cache_kw = "cache" if "cache" in params else "past_key_values"
        self.can_keep_logits = "logits_to_keep" in params
        self.device = next(model.parameters()).device
        self.kv_dtype = resolve_kv_dtype(model, self.config, kv_dtype)
        self.reset()

    @classmethod
    def from_pretrained(cls, name_or_path: str, dtype="float32", device: str = "cpu", **config) -> "StreamingLLM":
        """Load a model by alias, path or hub id and wrap it: `from_pretrained("smollm2-135m-instruct", sinks=4, window=1020)`."""
        from ..models.loading import load_model

        model, tokenizer = load_model(name_or_path, dtype=dtype, device=device)
        return cls(model, tokenizer, StreamingConfig(**config))

    # ---- state -------------------------------------------------------------------------------
    def new_cache(self, batch_size: int = 1):
        """A fresh cache for this engine's method (None for recompute); usable with plain
        `model.generate(..., cache=engine.new_cache())` too."""
        method = self.config.method
        if method == "dense":
            return DynamicCache(config=self.model.config)
        if method == "recompute":
            return None
        recall = None
        if self.config.recall_blocks:
            if batch_size != 1:
                raise UserError("recall of evicted tokens (--recall-blocks) runs one stream per engine: "
                                "batched streams (StreamBatch, the server's batched scheduler) do not support it")
            c = self.config
            recall = dict(recall_blocks=c.recall_blocks, block_size=c.block_size, memory_tokens=c.recall_memory_tokens,
                          dtype=c.recall_dtype, select=c.recall_select, every=c.recall_every, score=c.recall_score,
                          directory=self.recall_dir,
                          layers=[kind == "full_attention" for kind in _layer_types(self.model)])
        return StreamingCache(
            self.shapes,
            self.ropes,
            positions=self.config.positions,
            off_by_one=bool(getattr(self.model.config, "softmax_off_by_one", False)),
            start_position=self.start_position,
            batch_size=batch_size,
            recall=recall,
            kv_dtype=self.kv_dtype,
        )

    def reset(self) -> None:
        if getattr(self, "feeder", None) is not None:
            raise UserError("this stream is attached to a batch row: detach it before resetting it")
        self.feeder = None  # see attach()
        method = self.config.method
        if method == "recompute":
            self.stream = RecomputeStream(self.config.cache_size)
        elif method == "dense":
            self.stream = DenseStream(self.new_cache(), self.cache_kw)
        else:
            self.stream = SinkStream(self.new_cache(), self.cache_kw)

    @property
    def cache(self):
        """The stream's KV cache (`StreamingCache`, `DynamicCache`, or None for recompute)."""
        return getattr(self.stream, "cache", None)

    @property
    def tokens_seen(self) -> int:
        return (self.feeder or self.stream).tokens_seen

    @property
    def cache_tokens(self) -> int:
        return (self.feeder or self.stream).cache_tokens

    # ---- running inside a batch --------------------------------------------------------------
    def attach(self, feeder) -> None:
        """Continue this stream elsewhere, e.g. in a row of a `StreamBatch` that a scheduler steps
        together with other streams: `feeder` got this stream's `state_dict()` and serves
        `feed(ids, logits)`, `tokens_seen`, `cache_tokens` and `state()` until `detach`. Until then
        every feed (and so `generate`) goes through it; this engine's own cache sits unused."""
        if self.feeder is not None:
            raise UserError("this stream is already attached")
        self.feeder = feeder

    def detach(self, load: bool = True) -> None:
        """Take the stream back from the feeder: its state is copied into this engine's cache, or,
        with load=False, the caller has already put it there (`StreamBatch.copy_out`) or wants the
        stream as it was at attach (this engine's cache is untouched while attached)."""
        feeder, self.feeder = self.feeder, None
        if feeder is not None and load:
            self.stream.load_state_dict(feeder.state())

    @property
    def capacity(self) -> int | None:
        """Most tokens the cache will ever hold (None: unbounded, dense)."""
        return self.stream.capacity

    @property
    def evicted(self) -> int:
        return self.tokens_seen - self.cache_tokens

    def state_dict(self, copy: bool = True) -> dict:
        """Everything needed to continue this stream exactly (tensors stay on their device), as
        copies; copy=False may hand views of the live cache instead, valid until the next feed
        (for a caller that serializes them at once)."""
        if self.feeder is not None:
            return self.feeder.state()
        return {"config": self.config.to_dict(), **self.stream.state_dict(copy)}

    def load_state_dict(self, state: dict) -> None:
        if not self.config.matches(state["config"]):
            raise UserError(f"saved stream used {state['config']}, this engine uses {self.config.to_dict()}")
        self.reset()
        self.stream.load_state_dict(state)

    # ---- feeding -----------------------------------------------------------------------------
    def feed(self, ids: Sequence[int] | torch.Tensor, logits: str = "all") -> torch.Tensor | None:
        """Append tokens (ids, a tensor, or a tokenizer's output) to the stream. Returns float32
        logits predicting each next token:
        (T, V) for logits="all", (V,) for "last", None for "none". Exact for any chunking."""
        if isinstance(ids, Mapping):  # a tokenizer's BatchEncoding
            ids = ids["input_ids"]
        ids = torch.as_tensor(ids, dtype=torch.long)
        ids = ids if ids.dim() == 1 and ids.device == self.device else ids.reshape(-1).to(self.device)
        # (a decoded token's list needs neither: each tensor call on a server's turn thread gives up
        # the interpreter lock, and taking it back waits for the model thread)
        if ids.numel() == 0:
            raise UserError("nothing to feed: empty token sequence")
        if self.feeder is not None:
            return self.feeder.feed(ids, logits)
        outs = []
        step = min(self.config.chunk_size, self.stream.max_chunk or self.config.chunk_size)
        for lo in range(0, ids.numel(), step):
            chunk = ids[lo : lo + step]
            last = lo + step >= ids.numel()
            need = logits == "all" or (logits == "last" and last)
            out = self._forward(chunk, need, keep_all=logits == "all")
            if need:
                outs.append(out)
        if logits == "none":
            return None
        return torch.cat(outs, dim=0) if logits == "all" else outs[-1][-1]

    @torch.inference_mode()
    def _forward(self, chunk: torch.Tensor, need_logits: bool, keep_all: bool) -> torch.Tensor | None:
        """One model call for `chunk`, as the stream lays it out; float32 logits (n, V) of its
        tokens (only the last one unless keep_all), None when the stream needed no forward."""
        inputs = self.stream.begin(chunk, need_logits)
        out = None
        if inputs is not None:
            keep_one = not keep_all or inputs["input_ids"].shape[-1] != chunk.numel()  # recompute: its last token
            if self.can_keep_logits and keep_one:
                inputs["logits_to_keep"] = 1
            logits = self.model(**inputs).logits[0]
            out = (logits[-1:] if keep_one else logits).float()
        self.stream.end(chunk.numel())
        return out

    # ---- generation --------------------------------------------------------------------------
    def generate(
        self,
        prompt_ids: Sequence[int] | torch.Tensor,
        max_new_tokens: int = 256,
        sampling: SamplingParams | None = None,
        stop_ids: Sequence[int] = (),
        logprobs: int | None = None,
    ) -> Iterator[Token]:
        """Feed the prompt (chunked), then yield generated tokens one by one.

        Each token is fed to the stream before it is yielded, so stopping the iteration at any
        point leaves the stream a faithful transcript of what was yielded. A stop token is fed
        and yielded too, with finish_reason="stop" and no text. `Token.ms` is the time of the
        forward pass that consumed the token. With `logprobs=k` (k >= 0) every token carries its
        log-probability under the model's distribution and the k most likely alternatives
        (`Token.logprob`, `Token.top_logprobs`), whatever the sampling settings."""
        sampling = sampling or SamplingParams()
        sampler = Sampler(sampling, device=self.device)
        decoder = TextDecoder(self.tokenizer) if self.tokenizer is not None else None
        stop = set(int(s) for s in stop_ids)
        logits = self.feed(prompt_ids, logits="last")
        produced: list[int] = []
        for index in range(max_new_tokens):
            tok = sampler.sample(logits, produced)
            lp = top = None
            if logprobs is not None:
                lp, top = token_logprobs(logits, tok, logprobs)
            produced.append(tok)
            t0 = time.perf_counter()
            logits = self.feed([tok], logits="last")
            ms = (time.perf_counter() - t0) * 1000
            finish = "stop" if tok in stop else ("length" if index == max_new_tokens - 1 else None)
            text = decoder.add(tok) if decoder is not None and finish != "stop" else ""
            if decoder is not None and finish is not None:
                text += decoder.flush()
            yield Token(tok, text, index, ms, self.tokens_seen, self.cache_tokens, finish, lp, top)
            if finish is not None:
                return
