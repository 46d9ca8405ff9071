"""The bench decoder for B streams in one forward (`streaming-llm bench --batch-sizes ...`).

`BatchDecoder` prefills B distinct streams of `size` tokens each into one `StreamBatch` (every
cache full, so every decode step evicts in every row), then each step feeds one greedy token per
row in one forward. It plugs into `measure.py`'s timing loop like the single-stream decoders; the
row it reports per step covers all B tokens (aggregate tokens/s = B / step time).
"""

from __future__ import annotations


class BatchDecoder:
    """streaming / window at batch size B through `StreamBatch.feed`."""

    def __init__(self, model, method: str, size: int, sinks: int, chunk: int, batch: int):
        from ..core.batch import StreamBatch
        from ..core.config import StreamingConfig
        from ..core.engine import StreamingLLM

        sinks = 0 if method == "window" else sinks
        config = StreamingConfig(method=method, sinks=sinks, window=size - sinks, chunk_size=chunk)
        self.batch = StreamBatch(StreamingLLM(model, None, config), slots=batch)
        self.rows = [self.batch.add() for _ in range(batch)]
        self.method, self.size, self.prefill_len = method, size, size

    @property
    def cache(self):
        return self.batch.cache

    def prefill(self, ids) -> None:
        import torch

        # B distinct streams: the same prompt rotated by a different offset per row
        rows = torch.stack([torch.roll(ids, 7 * r) for r in range(len(self.rows))])
        self.batch.feed(self.rows, rows, logits="none")

    def before_step(self) -> None:
        pass

    def step(self, tok):
        import torch

        toks = torch.as_tensor([tok] * len(self.rows) if isinstance(tok, int) else tok)
        return self.batch.feed(self.rows, toks[:, None]).argmax(-1).tolist()

    def state(self) -> dict:
        r = self.rows[0]
        seen, held = self.batch.tokens_seen(r), self.batch.cache_tokens(r)
        return {"cache_tokens": held, "tokens_seen": seen, "evicted": seen - held}
