"""StreamBatch: many independent streams of one model in one forward, each exact as if alone.

A batch owns one `StreamingCache` of `slots` rows (fixed buffers, allocated once: memory is
`slots` times one stream's bounded cache). A stream takes a free row (`add`, optionally from a
`StreamingLLM.state_dict()`), is fed through `feed(rows, ids)` together with any other rows (each
row its own counters: tokens seen, ring slot, sink offset, rebase shift), and leaves (`remove`),
handing its row to the next stream without touching the other rows. Rows given to one `feed` are
read in place when they are contiguous (a view of the buffers); any other set of rows works too,
at the cost of a copy of their cache per layer, so a scheduler keeps its decoding rows together.

What it does NOT do: sample, decode text, schedule (the server's worker does), or batch the
`dense` and `recompute` baselines (their caches are not bounded: use one `StreamingLLM` each).
"""

from __future__ import annotations

from typing import Sequence

import torch

from ..errors import UserError
from ..models.quantize import wide_thresholds
from . import mixed
from .cache import KWARG
from .engine import StreamingLLM


class StreamBatch:
    """Up to `slots` streams sharing `engine`'s model and streaming config."""

    def __init__(self, engine: StreamingLLM, slots: int):
        if engine.config.method not in ("streaming", "window"):
            raise UserError(f"batched streams need --method streaming or window (got {engine.config.method})")
        if engine.config.recall_blocks:
            raise UserError("batched streams do not support recall of evicted tokens (--recall-blocks): "
                            "use one StreamingLLM per stream")
        if slots < 1:
            raise UserError(f"a batch needs at least one slot (got {slots})")
        self.engine = engine
        self.slots = slots
        self.cache = engine.new_cache(batch_size=slots)
        self._free = list(range(slots))
        self._wide = wide_thresholds(engine.model)  # where a linear's kernel changes (see mixes_exactly)

    # ---- rows ------------------------------------------------------------------------------------
    @property
    def active(self) -> list[int]:
        return sorted(set(range(self.slots)) - set(self._free))

    def add(self, state: dict | None = None) -> int:
        """Give a new stream (or the saved one `state`, a `StreamingLLM.state_dict()`) the lowest free row."""
        if not self._free:
            raise UserError(f"all {self.slots} batch slots are in use")
        row = min(self._free)
        if state is None:
            self.cache.reset_row(row)
        else:  # every buffer and counter of the row is overwritten
            self.load(row, state)
        self._free.remove(row)
        return row

    def add_from(self, engine: StreamingLLM) -> int:
        """Give `engine`'s stream the lowest free row, copied from the engine's own cache buffer to
        buffer (what `add(engine.state_dict())` does, without the snapshot in between)."""
        self._check_engine(engine)
        if not self._free:
            raise UserError(f"all {self.slots} batch slots are in use")
        row = min(self._free)
        self.cache.copy_row(0, row, source=engine.stream.cache)
        self._free.remove(row)
        return row

    def make_room(self, engine: StreamingLLM, row: int | None = None) -> None:
        """Allocate `engine`'s own cache buffers if it has none yet (a stream that started in a
        row), and with `row` fault in the pages `copy_out(row, engine)` will write, so that it
        only copies. Safe on another thread than the forwards while `row` is not fed: it reads
        the batch's shapes and the row's counters, and writes only zeros, into the engine's own
        cache's slots beyond its stream, which hold zeros (an attached engine's own cache is not in
        use); a stale `row` (a scheduler moved the stream meanwhile) only faults fewer or more pages."""
        self._check_engine(engine)
        engine.stream.cache.allocate_like(self.cache, row)

    def copy_out(self, row: int, engine: StreamingLLM) -> None:
        """Copy row's stream into `engine`'s own cache, buffer to buffer (the row keeps it)."""
        self._check([row])
        self._check_engine(engine)
        engine.stream.cache.copy_row(row, 0, source=self.cache)

    def _check_engine(self, engine: StreamingLLM) -> None:
        if engine.config != self.engine.config or getattr(engine.stream, "cache", None) is None:
            raise UserError(f"a stream of {engine.config.to_dict()} cannot share a batch of {self.engine.config.to_dict()}")

    def remove(self, row: int) -> None:
        """End row's stream and free its row (its buffers stay allocated for the next stream)."""
        self._check([row])
        self.cache.reset_row(row)
        self._free.append(row)

    def move(self, src: int, dst: int) -> None:
        """Move the stream in row `src` to the free row `dst` (a copy of one row's buffers), so a
        scheduler can keep its active rows contiguous (read in place) after streams leave."""
        self._check([src])
        if dst in self.active or not 0 <= dst < self.slots:
            raise UserError(f"row {dst} is not free")
        self.cache.copy_row(src, dst)
        self.cache.reset_row(src)
        self._free.remove(dst)
        self._free.append(src)

    def state(self, row: int) -> dict:
        """Row's stream as a `StreamingLLM.state_dict()` (copies): load it into an engine or a batch."""
        self._check([row])
        return {"config": self.engine.config.to_dict(), "tokens_seen": self.cache.seen(row), "history": [],
                "cache": self.cache.row_state(row)}

    def load(self, row: int, state: dict) -> None:
        if not self.engine.config.matches(state["config"]):
            raise UserError(f"saved stream used {state['config']}, this batch uses {self.engine.config.to_dict()}")
        self.cache.load_row_state(row, state["cache"])

    def tokens_seen(self, row: int) -> int:
        return self.cache.seen(row)

    def cache_tokens(self, row: int) -> int:
        return self.cache.held(row)

    def _check(self, rows: Sequence[int]) -> None:
        bad = [r for r in rows if not 0 <= r < self.slots or r in self._free]
        if bad:
            raise UserError(f"rows {bad} hold no stream (active: {self.active})")
        if len(set(rows)) != len(rows):
            raise UserError(f"a row appears twice in one feed: {list(rows)}")

    # ---- feeding ---------------------------------------------------------------------------------
    def feed(self, rows: Sequence[int], ids, logits: str = "last") -> torch.Tensor | None:
        """Append ids[i] (C tokens each) to the stream in rows[i], for all i in one forward per
        chunk. Returns float32 logits (B, C, V) for logits="all", (B, V) for "last", None for "none"."""
        rows = [int(r) for r in rows]
        self._check(rows)
        ids = torch.as_tensor(ids, dtype=torch.long).to(self.engine.device)
        if ids.dim() == 1:
            ids = ids[:, None]
        if ids.shape[0] != len(rows) or ids.shape[1] == 0:
            raise UserError(f"feed needs one row of ids per stream: got ids of shape {tuple(ids.shape)} for {len(rows)} rows")
        outs, step, total = [], self.engine.config.chunk_size, ids.shape[1]
        for lo in range(0, total, step):
            last = lo + step >= total
            keep_all = logits == "all"
            out = self._forward(rows, ids[:, lo : lo + step], keep_all)
            if keep_all or (logits == "last" and last):
                outs.append(out)
        if logits == "none":
            return None
        return torch.cat(outs, dim=1) if logits == "all" else outs[-1][:, -1]

    def feed_mixed(self, parts: Sequence[tuple[Sequence[int], object, str]]) -> list:
        """ONE forward over rows fed different numbers of tokens (`core/mixed.py`): parts
        [(rows, ids (len(rows), n), logits), ...], rows disjoint across parts, n at most the chunk
        size (e.g. decoding rows with one token each beside one row's prefill chunk). Returns, per
        part, float32 logits (B, n, V) for logits="all", (B, V) for "last", None for "none"; each
        row's logits equal those of its stream alone (bit for bit where `mixes_exactly`)."""
        parts = [([int(r) for r in rows], torch.as_tensor(ids, dtype=torch.long).to(self.engine.device), mode)
                 for rows, ids, mode in parts]
        self._check([r for rows, _, _ in parts for r in rows])
        for rows, ids, mode in parts:
            if not rows or ids.dim() != 2 or ids.shape[0] != len(rows) or not 0 < ids.shape[1] <= self.engine.config.chunk_size:
                raise UserError(f"feed_mixed needs ids of shape ({len(rows)}, 1..{self.engine.config.chunk_size}) "
                                f"for rows {rows}: got {tuple(ids.shape)}")
            if mode not in ("all", "last", "none"):
                raise UserError(f"logits must be all, last or none (got {mode!r})")
        return self._forward_mixed(parts)

    def mixes_exactly(self, parts: Sequence[tuple[int, int, str]]) -> bool:
        """Whether a `feed_mixed` of parts [(rows, tokens per row, logits), ...] gives every row the
        bits of its stream alone. The forward lays all T tokens end to end, so a quantized linear
        sees T tokens (the head: the K positions whose logits are kept) where each stream alone
        shows it its own count; the answer is yes when that changes no kernel: T (and K) below the
        first count at which a wide copy takes over (`QuantLinear`), or no wide copy at all."""
        t = sum(n * c for n, c, _ in parts)
        k = sum(n * c if mode == "all" else n if mode == "last" else 0 for n, c, mode in parts)
        return all(limit is None or limit <= 1 or size < limit for size, limit in zip((t, k), self._wide))

    @torch.inference_mode()
    def _forward_mixed(self, parts: list) -> list:
        engine, dev = self.engine, self.engine.device
        pos = mixed.prepare(self.cache, [(tuple(rows), ids.shape[1]) for rows, ids, _ in parts], dev)
        keep, start = [], 0  # the positions whose logits some part wants, in order
        for _, ids, mode in parts:
            at = torch.arange(start, start + ids.numel(), device=dev).reshape(ids.shape)
            keep.append(at.flatten() if mode == "all" else at[:, -1] if mode == "last" else at[:, :0].flatten())
            start += ids.numel()
        keep_t = torch.cat(keep)
        kwargs = {engine.cache_kw: self.cache, KWARG: self.cache, "use_cache": True, "position_ids": pos}
        if engine.can_keep_logits:
            kwargs["logits_to_keep"] = keep_t
        flat = torch.cat([ids.flatten() for _, ids, _ in parts])[None]
        try:
            logits = engine.model(input_ids=flat, **kwargs).logits.float()[0]
        finally:
            self.cache.groups = None  # the next forward is an ordinary one unless it says otherwise
        if not engine.can_keep_logits:
            logits = logits[keep_t]
        outs, at = [], 0
        for (_, ids, mode), k in zip(parts, keep):
            part = logits[at : at + k.numel()]
            at += k.numel()
            outs.append(None if mode == "none" else part.reshape(*ids.shape, -1) if mode == "all" else part)
        return outs

    @torch.inference_mode()
    def _forward(self, rows: list[int], chunk: torch.Tensor, keep_all: bool) -> torch.Tensor:
        engine = self.engine
        pos = self.cache.prepare(chunk.shape[1], rows, device=chunk.device)
        kwargs = {engine.cache_kw: self.cache, KWARG: self.cache, "use_cache": True, "position_ids": pos}
        if engine.can_keep_logits and not keep_all:
            kwargs["logits_to_keep"] = 1
        return engine.model(input_ids=chunk, **kwargs).logits.float()
