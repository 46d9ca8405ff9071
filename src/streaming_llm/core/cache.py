"""Sink + window KV storage with fixed shapes for B independent streams, as a transformers `Cache`.

Each layer holds, per batch row (one stream), `sinks` slots for the first tokens of the stream and
a ring buffer of `window` slots for the most recent ones (plus one all-zero slot for
softmax-off-by-one models): buffers of shape (B, H, sinks + window [+1], D), allocated once. Every
row has its own counters: tokens seen, the shift of its storage positions (`pos_shift`, changed
by a rebase) and of its sinks (`sink_shift`). Keys are stored as the model rotated them, at the
row's storage position `stream index + pos_shift`, and never re-rotated per step. What the
paper's positions-in-cache scheme changes is only the query-to-sink distance, which
`AttentionPlan.sink_delta` carries and the attention applies by rotating the query (chunks) or the
few sink keys (decode). Per-token maintenance is one ring write per row.

The hand-off to the attention is explicit: the attention function receives this cache as the
forward keyword argument `streaming_cache` (the engine passes it; under a plain
`model.generate(..., cache=cache)` the cache adds itself to the forward's keyword arguments that
transformers hands to `Cache.update`) and reads `cache.layers[module.layer_idx].plan()`. There is
no thread-local or global state: two caches can run forwards on two threads at once.

A forward covers the rows `prepare(n, rows)` names (all rows by default), each getting n tokens
(rows fed different numbers of tokens in one forward: `mixed.py`).
Positions stay small: before a forward that would push a row's storage positions past
`position_limit`, `prepare()` rotates that row's ring once by the excess (a rebase). The layer
writes a chunk's tokens into the ring only after its attention ran (`commit`), because they
overwrite tokens that earlier queries of the same chunk still see; a single decoded token
overwrites exactly the token it evicts, so it is written at once. This module computes no
attention; see `attention.py`.
"""

from __future__ import annotations

import math
import mmap
from dataclasses import dataclass

import numpy as np
import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from . import recall as _recall
from .plan import AttentionPlan
from .rope import LayerRope, apply_rotation

KWARG = "streaming_cache"  # the forward keyword argument that carries the cache to the attention
MAPPED_BYTES = 256 * 1024  # CPU buffers from this size are anonymous maps (zeros_like_device)


@dataclass(slots=True)
class _Pending:
    keys: torch.Tensor  # (B, H, C, D): this forward's keys for the rows below
    values: torch.Tensor
    rows: tuple[int, ...]
    seen: tuple[int, ...]  # tokens each row had seen before this forward
    written: bool  # the chunk is already in the buffers (single token per row)


def zeros_like_device(like: torch.Tensor, shape: tuple, dtype: torch.dtype) -> torch.Tensor:
    """A zeroed buffer on `like`'s device. On the CPU nothing fills it in parallel, so no OpenMP
    team starts on the calling thread (a server's turn thread allocating a session's 47 MB ring
    beside the model thread's forward took up to 0.4 s with torch.zeros' parallel fill): a buffer
    of `MAPPED_BYTES` or more is an anonymous private memory map (POSIX), whose pages the kernel
    gives zeroed when first written, so a stream pays (in time and memory) only for the slots it
    fills (a new session's 4+1020 ring holding 200 tokens: 3-4 ms instead of 20-26 ms to
    allocate, 9.5 MB of its 47 MB resident; docs/results/server_load/mapped_buffers/alloc.txt); a
    smaller one, or any on a system without such maps, is one thread's memset."""
    count = math.prod(shape)
    if like.device.type != "cpu" or count == 0:
        return like.new_zeros(shape, dtype=dtype)
    nbytes = count * dtype.itemsize
    if nbytes >= MAPPED_BYTES and hasattr(mmap, "MAP_PRIVATE"):  # POSIX; the tensor holds the map
        block = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)  # private: copy-on-write in a fork
        return torch.frombuffer(block, dtype=dtype).view(shape)
    block = np.empty(nbytes, dtype=np.uint8)
    block.fill(0)
    return torch.from_numpy(block).view(dtype).view(shape)


class SinkWindowLayer(CacheLayerMixin):
    """One attention layer's sink slots + ring buffer for every row. Never holds more than
    sinks+window tokens per row."""

    is_sliding = False
    is_compileable = False
    is_croppable = False

    def __init__(self, sinks: int, window: int, rope: LayerRope, owner: "StreamingCache", off_by_one: bool):
        super().__init__()
        self.sinks, self.window, self.rope, self.owner = sinks, window, rope, owner
        self.zero_slot = off_by_one
        b = owner.n_rows
        self.seen = [0] * b  # stream tokens committed to this layer, per row
        self.sink_shift = [0] * b  # sink j of row r is rotated at storage position j + sink_shift[r]
        self.view_delta = [0] * b  # rotation currently applied to row r's sink slots of `keys`
        self.sink_keys: torch.Tensor | None = None  # originals, as the model rotated them
        self._pending: _Pending | None = None
        self.mixed: tuple | None = None  # a mixed forward's (keys, values) of every group, until attended
        self.memory: _recall.RecallMemory | None = None  # evicted-token recall (global layers, one row)

    # ---- transformers CacheLayerMixin -------------------------------------------------------
    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        b, h, d = self.owner.n_rows, key_states.shape[1], key_states.shape[-1]
        n = self.sinks + self.window + int(self.zero_slot)
        kv = self.owner.kv_dtype or key_states.dtype  # the ring's storage dtype (bfloat16: half the reads)
        self.keys = zeros_like_device(key_states, (b, h, n, d), kv)
        self.values = zeros_like_device(value_states, (b, h, n, value_states.shape[-1]), kv)
        self.sink_keys = zeros_like_device(key_states, (b, h, self.sinks, d), key_states.dtype)  # the originals
        self.device = key_states.device
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        forward_kwargs = kwargs.get("kwargs")
        if self._pending is not None or (not isinstance(forward_kwargs, dict) and not self.owner.prepared):
            raise RuntimeError(
                "a streaming cache was used but the model's attention did not receive it: switch the model to the "
                "streaming attention with streaming_llm.core.attention.enable(model); if this architecture does not "
                f"hand its keyword arguments to the cache (GPT-NeoX), call the model with {KWARG}=cache, or use "
                "StreamingLLM.feed/generate instead of model.generate"
            )
        if isinstance(forward_kwargs, dict):  # transformers' own forward kwargs: hand ourselves to the attention
            forward_kwargs.setdefault(KWARG, self.owner)
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        if self.owner.groups is not None:  # a mixed forward: the attention writes each group (mixed.py)
            self.mixed = (key_states, value_states)
            return self.keys, self.values
        return self.write(key_states, value_states)

    def write(self, key_states: torch.Tensor, value_states: torch.Tensor):
        """This forward's keys/values (B, H, C, D) for the rows the owner names: a row's first
        tokens into its sink slots, a decoded token into its ring slot; the rest waits for `commit`."""
        rows = self.owner.rows_for(key_states.shape[0])
        seen = tuple([self.seen[r] for r in rows])
        c, s, w = key_states.shape[-2], self.sinks, self.window
        if min(seen) < s:  # sinks: a row's first `s` tokens go to its own slots, written now, never overwritten
            for i, (r, n) in enumerate(zip(rows, seen)):
                if n < s:
                    m = min(s, n + c) - n
                    if n == 0:
                        self.sink_shift[r] = self.owner.pos_shift[r]
                    self.sink_keys[r, :, n : n + m] = key_states[i, :, :m]
                    self.keys[r, :, n : n + m] = key_states[i, :, :m]
                    self.values[r, :, n : n + m] = value_states[i, :, :m]
        written = c == 1
        if written and len(rows) == 1:  # a decoded token overwrites exactly the token it evicts
            r, n = rows[0], seen[0]
            if n >= s:
                slot = s + (n - s) % w
                # one stream in the whole cache: write through the batch dimension (no row views)
                keys, values = (self.keys, self.values) if self.owner.n_rows == 1 else (self.keys[r : r + 1], self.values[r : r + 1])
                if self.memory is not None:
                    _recall.hold_decoded(self, n, slot)
                keys[:, :, slot] = key_states[:, :, 0]
                values[:, :, slot] = value_states[:, :, 0]
        elif written:
            h, n = self.keys.shape[1:3]
            idx = self.owner.shared(("ring", s, w, h, n, rows, seen, self.device), lambda: self._ring_slots(rows, seen))
            if idx is not None:  # one index_copy_ per tensor: rows of its (rows * heads * slots, D) view
                batch, flat = idx
                for buf, new in ((self.keys, key_states), (self.values, value_states)):
                    new = new[:, :, 0] if batch is None else new[batch, :, 0]
                    buf.view(-1, buf.shape[-1]).index_copy_(0, flat, new.reshape(-1, buf.shape[-1]).to(buf.dtype))
        self._pending = _Pending(key_states, value_states, rows, seen, written)
        return self.keys, self.values

    def _ring_slots(self, rows: tuple[int, ...], seen: tuple[int, ...]):
        """Where a decoded token per row past its sinks goes: (its batch indices, None for every
        batch row in order; its flat row indices in the (rows * heads * slots, D) view of the
        cache buffers, head by head), or None where no row is past its sinks."""
        s, w = self.sinks, self.window
        h, n = self.keys.shape[1:3]
        ring = [(i, r, s + (t - s) % w) for i, (r, t) in enumerate(zip(rows, seen)) if t >= s]
        if not ring:
            return None
        flat = torch.tensor([(r * h + j) * n + slot for _, r, slot in ring for j in range(h)], device=self.device)
        batch = None if len(ring) == len(rows) else torch.tensor([i for i, _, _ in ring], device=self.device)
        return batch, flat

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.sinks + self.window + query_length, 0

    def get_seq_length(self) -> int:
        return self.seen[0]

    def get_max_length(self) -> int:
        return self.sinks + self.window

    def reset(self) -> None:
        for r in range(self.owner.n_rows):
            self.reset_row(r)
        self._pending = None

    @torch.inference_mode()
    def reset_row(self, r: int) -> None:
        """Forget row r's stream (its buffers are kept and overwritten later, never reallocated).
        Its slots are zeroed, so a row never hands a stream's keys to the next one (a snapshot of
        a row copies its whole buffers). Only the slots it used: sinks and ring fill in order, so
        those are the first min(seen, sinks+window); the rest are still zero from before."""
        used = min(self.seen[r], self.sinks + self.window)
        self.seen[r], self.sink_shift[r], self.view_delta[r] = 0, 0, 0
        if self.is_initialized:  # stale slots are masked out by the counters; zero them anyway
            self.keys[r, :, :used].zero_()
            self.values[r, :, :used].zero_()
            self.sink_keys[r, :, : min(used, self.sinks)].zero_()
        if self.memory is not None:
            self.memory.reset()

    # ---- streaming semantics ------------------------------------------------------------------
    def _shift(self, r: int) -> int:
        return self.sink_shift[r] - self.owner.pos_shift[r]

    def _decode_delta(self, r: int, n: int) -> int:
        """The query-to-sink rotation of a single query with stream index n in row r."""
        if self.owner.positions == "absolute":
            return self._shift(r)
        return min(n, self.sinks + self.window - 1) - n + self._shift(r)

    def plan(self, query: torch.Tensor | None = None) -> AttentionPlan:
        """`query` (B, Hq, C, D), as rotated by the model, is needed only with recall (selection)."""
        p = self._pending
        c, s, w = p.keys.shape[-2], self.sinks, self.window
        sel = self.owner.selector()
        recall = self.memory is not None and _recall.choose(self, query)
        if recall and p.written:
            return _recall.decode_plan(self, AttentionPlan)
        if p.written and min(p.seen) >= s + w - 1:  # decode with every row's cache full: every slot is visible
            self._set_sink_view(p.rows, p.seen)
            if isinstance(sel, slice) and sel == slice(0, self.owner.n_rows):  # every row: no view needed
                return AttentionPlan(self.keys, self.values, None)
            return AttentionPlan(self.keys[sel], self.values[sel], None)
        same = len(set(p.seen)) == 1
        n0 = p.seen[0]
        if same and n0 + c <= s + w and (s == 0 or all(
                self.sink_shift[r] == self.owner.pos_shift[r] and self.view_delta[r] == 0 for r in p.rows)):
            # Nothing evicted yet and every key at its own position (the first S+W tokens: prefill,
            # early decode): ordinary causal attention over the tokens so far, no empty ring slots.
            # The ring has not wrapped, so slot i holds stream token i.
            if p.written:
                keys, values = self.keys[:, :, : n0 + c][sel], self.values[:, :, : n0 + c][sel]
            else:
                keys = torch.cat([self.keys[:, :, :n0][sel], p.keys], dim=-2)
                values = torch.cat([self.values[:, :, :n0][sel], p.values], dim=-2)
            return AttentionPlan(keys, values, None, zero_slot=self.zero_slot, causal=True)
        dev = p.keys.device
        if p.written:  # decode, rows at different stages: sinks viewed per row
            self._set_sink_view(p.rows, p.seen)
            used, mask = self.owner.shared(("mask", s, w, self.zero_slot, p.seen, dev),
                                           lambda: self._decode_mask(p.seen, dev))
            # each row's own slots: the first min(n + 1, S + W) (they fill in order), as alone
            lengths = None if self.zero_slot else tuple(min(n + 1, s + w) for n in p.seen)
            if used == w:
                return AttentionPlan(self.keys[sel], self.values[sel], mask, row_lengths=lengths)
            return AttentionPlan(self.keys[:, :, : s + used][sel], self.values[:, :, : s + used][sel], mask,
                                 row_lengths=lengths)
        seen = torch.tensor(p.seen, device=dev)  # (B,)
        t = seen[:, None] + torch.arange(c, device=dev)[None, :]  # (B, C) query stream indices
        ring_start = torch.clamp(seen - w, min=s)  # oldest stream index the ring still holds
        last = (seen - 1)[:, None]
        u_ring = last - torch.remainder(last - s - torch.arange(w, device=dev)[None, :], w)  # (B, w)
        u_ring = torch.where(u_ring >= ring_start[:, None], u_ring, torch.full_like(u_ring, -1))
        u_chunk = torch.where(t >= s, t, torch.full_like(t, -1))  # the chunk's own non-sink tokens follow
        u_win = torch.cat([u_ring, u_chunk], dim=1)[:, None, :]  # (B, 1, w + C)
        tt = t[:, :, None]
        mask = (u_win >= 0) & (u_win <= tt) & (u_win > tt - w)  # (B, C, w + C)
        keys = torch.cat([self.keys[:, :, s : s + w][sel], p.keys], dim=-2)
        values = torch.cat([self.values[:, :, s : s + w][sel], p.values], dim=-2)
        n_sinks = min(s, max(p.seen) + c)
        shift = torch.tensor([self._shift(r) for r in p.rows], device=dev)[:, None]
        if self.owner.positions == "absolute":
            delta = shift.expand(-1, c)
        else:
            delta = torch.clamp(t, max=s + w - 1) - t + shift
        plan = AttentionPlan(
            keys,
            values,
            mask,
            sink_keys=self.sink_keys[:, :, :n_sinks][sel],
            sink_values=self.values[:, :, :n_sinks][sel].to(p.values.dtype),
            sink_mask=torch.arange(n_sinks, device=dev)[None, None, :] <= tt,
            sink_delta=delta,
            rope=self.rope,
            zero_slot=self.zero_slot,
            window_rows_nonempty=min(p.seen) >= s,  # a query past the sinks always sees itself
        )
        return _recall.with_recall(self, plan) if recall else plan

    def _decode_mask(self, seen: tuple[int, ...], dev) -> tuple[int, torch.Tensor]:
        """(ring slots attended, (B, 1, N) mask) of one decoded token per row, rows at different
        stages: each row sees its sinks so far and the ring slots it has filled."""
        s, w = self.sinks, self.window
        n = torch.tensor(seen, device=dev)  # (B,)
        filled = torch.clamp(n + 1 - s, min=0, max=w)  # ring slots in use (the ring fills in order)
        # only the slots some row uses: rows that have not filled their ring yet (a served
        # session's first ~1,000 tokens) attend over what they hold, not over the whole buffer
        used = w if self.zero_slot else int(filled.max())
        mask = torch.cat([
            torch.arange(s, device=dev)[None, :] <= n[:, None],
            torch.arange(used, device=dev)[None, :] < filled[:, None],
            torch.ones(len(seen), int(self.zero_slot), dtype=torch.bool, device=dev),
        ], dim=1)[:, None, :]  # (B, 1, N)
        return used, mask

    def _set_sink_view(self, rows: tuple[int, ...], seen: tuple[int, ...]) -> None:
        """Make each row's sink slots of `keys` hold its sink keys rotated by -delta, the decode
        delta of its query (stream index `seen`): one small matmul per row with a rotation matrix
        shared by all layers of the same rotary type."""
        if not self.sinks:
            return
        if len(rows) == 1:
            r, d = rows[0], self._decode_delta(rows[0], seen[0])
            if d != self.view_delta[r]:
                rot = self.owner.rotation_matrix(self.rope, -d, self.sink_keys)
                if self.owner.n_rows == 1:  # no row views
                    self.keys[:, :, : self.sinks] = self.sink_keys @ rot
                else:
                    self.keys[r, :, : self.sinks] = self.sink_keys[r] @ rot
                self.view_delta[r] = d
            return
        todo = tuple((r, d) for r, n in zip(rows, seen) if (d := self._decode_delta(r, n)) != self.view_delta[r])
        if todo:
            key = ("sinkview", self.rope.key, todo, self.sink_keys.shape[-1], self.sink_keys.dtype, self.device)
            r_idx, rot = self.owner.shared(key, lambda: self._sink_rotations(todo))
            self.keys[r_idx, :, : self.sinks] = (self.sink_keys[r_idx] @ rot).to(self.keys.dtype)
            for r, d in todo:
                self.view_delta[r] = d

    def _sink_rotations(self, todo: tuple[tuple[int, int], ...]):
        """(rows, (n, 1, D, D) rotation matrices) for the (row, delta) pairs of `_set_sink_view`:
        a slice when the rows are contiguous (a view, not an indexed copy)."""
        rows = [r for r, _ in todo]
        if rows == list(range(rows[0], rows[0] + len(rows))):
            r_idx = slice(rows[0], rows[0] + len(rows))
        else:
            r_idx = torch.tensor(rows, device=self.device)
        rot = torch.stack([self.owner.rotation_matrix(self.rope, -d, self.sink_keys) for _, d in todo])
        return r_idx, rot[:, None]

    def commit(self) -> None:
        """After attention: write each row's last non-sink chunk tokens into its ring, advance."""
        p = self._pending
        c, s, w = p.keys.shape[-2], self.sinks, self.window
        if self.memory is not None:  # the tokens this forward evicts, before the ring forgets them
            if p.written:
                _recall.commit_decoded(self)
            else:
                _recall.capture_chunk(self, p.seen[0], c, p.keys, p.values)
        if p.written and len(p.rows) == 1:
            self.seen[p.rows[0]] = p.seen[0] + 1
            self._pending = None
            return
        for i, (r, n) in enumerate(zip(p.rows, p.seen)):
            if not p.written:
                lo = max(n, s, n + c - w)
                if lo < n + c:
                    slots = s + torch.remainder(torch.arange(lo, n + c, device=self.device) - s, w)
                    self.keys[r].index_copy_(1, slots, p.keys[i, :, lo - n :].to(self.keys.dtype))
                    self.values[r].index_copy_(1, slots, p.values[i, :, lo - n :].to(self.values.dtype))
            self.seen[r] = n + c
        self._pending = None

    def drop_pending(self) -> None:
        """Forget a forward that was interrupted before this layer's attention ran."""
        self._pending = self.mixed = None

    def rotate_ring(self, r: int, shift: int) -> None:
        """Move row r's stored window keys `shift` positions back (a rebase); its sinks move only
        while they are still being written, so that all of a row's sinks share one shift."""
        if not self.is_initialized:
            return
        s, w = self.sinks, self.window
        if self.memory is not None:
            self.memory.rebase(shift)
        d = torch.full((w,), -shift, device=self.keys.device)
        self.keys[r, :, s : s + w] = self.rope.rotate(self.keys[r, :, s : s + w].to(self.sink_keys.dtype), d)
        if self.seen[r] < s:
            self.sink_keys[r] = self.rope.rotate(self.sink_keys[r], torch.full((s,), -shift, device=self.keys.device))
            self.keys[r, :, :s] = self.sink_keys[r]
            self.sink_shift[r] -= shift
            self.view_delta[r] = 0

    def row_state(self, r: int, copy: bool = True) -> dict:
        """A snapshot of row r (batch dimension 1): copies, since the live buffers keep changing;
        copy=False gives views of them instead, for a caller that is done with them before the
        stream is fed again (a store serializing a turn)."""
        if not self.is_initialized:
            take = lambda x: None  # noqa: E731
        else:
            take = (lambda x: x[r : r + 1].clone()) if copy else (lambda x: x[r : r + 1])  # noqa: E731
        return {
            "keys": take(self.keys),
            "values": take(self.values),
            "sink_keys": take(self.sink_keys),
            "seen": self.seen[r],
            "sink_shift": self.sink_shift[r],
            "view_delta": self.view_delta[r],
            **({} if self.memory is None else {"recall": self.memory.state()}),
        }

    def allocate_like(self, source: "SinkWindowLayer", src: int | None = None) -> None:
        """Allocate this layer's buffers (if not yet) with `source`'s head shapes and dtypes, so a
        later `copy_row(src, 0, source=source)` only copies (allocating zeroed pages is the slow
        part). With `src`, the slots that copy will fill beyond this layer's own (row 0's) are
        written with zeros now, which they hold already: a mapped buffer's pages are then faulted
        in here, on the caller's thread, not during the copy (a server's model thread)."""
        if source.is_initialized and not self.is_initialized:
            self.lazy_initialization(source.sink_keys, source.values)
        if src is None or not source.is_initialized:
            return
        full = self.sinks + self.window
        mine, theirs = min(self.seen[0], full), min(source.seen[src], full)
        if theirs > mine:
            with torch.inference_mode():
                self.keys[0, :, mine:theirs].zero_()
                self.values[0, :, mine:theirs].zero_()

    @torch.inference_mode()
    def copy_row(self, src: int, dst: int, source: "SinkWindowLayer | None" = None) -> None:
        """Row dst becomes a copy of row src of `source` (this layer by default; another cache's
        layer of the same shape, e.g. a single-stream engine's, to move a stream into or out of a
        batch): buffer to buffer, no snapshot in between. Only the slots either row used are
        touched (sinks and ring fill in order: the first min(seen, sinks+window)), so the slots
        beyond stay zero, as `reset_row` keeps them."""
        source = self if source is None else source
        if self.memory is not None or source.memory is not None:
            raise RuntimeError("a recall memory belongs to one stream: rows with recall cannot be copied")
        if (source.sinks, source.window) != (self.sinks, self.window):
            raise ValueError(f"cannot copy a row of a {source.sinks}+{source.window} layer into a {self.sinks}+{self.window} one")
        if not source.is_initialized:  # the source row holds nothing yet
            self.reset_row(dst)
            return
        self.allocate_like(source)
        full = self.sinks + self.window
        n, before = min(source.seen[src], full), min(self.seen[dst], full)
        for mine, theirs in ((self.keys, source.keys), (self.values, source.values)):
            mine[dst, :, :n] = theirs[src, :, :n]
            if before > n:
                mine[dst, :, n:before].zero_()
        self.sink_keys[dst] = source.sink_keys[src]
        self.seen[dst], self.sink_shift[dst], self.view_delta[dst] = source.seen[src], source.sink_shift[src], source.view_delta[src]

    @torch.inference_mode()
    def load_row_state(self, r: int, st: dict) -> None:
        if st["keys"] is None:
            self.reset_row(r)
            return
        if not self.is_initialized:
            self.lazy_initialization(st["keys"], st["values"])
        self.keys[r : r + 1] = st["keys"]
        self.values[r : r + 1] = st["values"]
        self.sink_keys[r : r + 1] = st["sink_keys"]
        self.seen[r], self.sink_shift[r], self.view_delta[r] = st["seen"], st["sink_shift"], st["view_delta"]
        if self.memory is not None:
            self.memory.load_state(st["recall"])


class StreamingCache(Cache):
    """A transformers `Cache` whose layers are `SinkWindowLayer`s, for `batch_size` streams (rows).

    `layer_shapes` gives (sinks, window) per decoder layer: sinks+window for global layers, (0,
    trained window) for sliding-window layers. Keep your own reference: it is mutated in place.
    `recall` (one row only): `recall.RecallMemory` keyword arguments plus `layers`, one bool per
    layer saying which get a memory of their evicted tokens (see recall.py). `kv_dtype`: the
    storage dtype of the ring and sink slots (None: the model's; bfloat16 halves the bytes every
    decode step reads); the sinks' original keys stay in the model's dtype, and a chunk's own
    keys are attended in the model's dtype before they are stored.
    """

    def __init__(
        self,
        layer_shapes: list[tuple[int, int]],
        ropes: list[LayerRope],
        positions: str = "cache",
        off_by_one: bool = False,
        start_position: int = 0,
        position_limit: int | None = None,
        batch_size: int = 1,
        recall: dict | None = None,
        kv_dtype: torch.dtype | None = None,
    ):
        self.positions = positions
        self.kv_dtype = kv_dtype
        self.n_rows = batch_size  # streams (rows) this cache holds; transformers reserves `batch_size`
        self.start_position = start_position
        self.pos_shift = [start_position] * batch_size  # storage position of row r's token i: i + pos_shift[r]
        self._rows: tuple[int, ...] = tuple(range(batch_size))  # rows of the next forward
        self._sel = None  # their index into the buffers (see selector)
        self.prepared = False  # True once an engine drives this cache (and passes it to the attention itself)
        self.groups: list | None = None  # a mixed forward's [(rows, tokens per row), ...] (mixed.py), else None
        self._rotations: dict = {}
        self._shared: dict = {}  # see `shared`
        largest = max(s + w for s, w in layer_shapes)
        self.position_limit = position_limit or max(4 * largest, 4096)
        layers = [SinkWindowLayer(s, w, r, self, off_by_one) for (s, w), r in zip(layer_shapes, ropes)]
        if recall:
            if batch_size != 1:
                raise ValueError("recall of evicted tokens needs a single-stream cache")
            kw = {k: v for k, v in recall.items() if k != "layers"}
            for layer, on in zip(layers, recall["layers"]):
                if on:
                    layer.memory = _recall.RecallMemory(sinks=layer.sinks, rope=layer.rope, **kw)
        super().__init__(layers=layers)

    # ---- rows ------------------------------------------------------------------------------------
    def rows_for(self, batch: int) -> tuple[int, ...]:
        if batch != len(self._rows):
            raise RuntimeError(f"forward of {batch} rows, but the cache was prepared for rows {self._rows}")
        return self._rows

    def selector(self):
        """Index of this forward's rows into the buffers: a slice (a view, no copy) when they are
        contiguous, else an index tensor (a copy per read). Computed once per forward."""
        if self._sel is None:
            rows = self._rows
            if rows == tuple(range(rows[0], rows[0] + len(rows))):
                self._sel = slice(rows[0], rows[0] + len(rows))
            else:
                self._sel = torch.tensor(rows, device=self.layers[0].device)
        return self._sel

    def reset_row(self, r: int) -> None:
        self.pos_shift[r] = self.start_position
        for layer in self.layers:
            layer.reset_row(r)

    # ---- counters --------------------------------------------------------------------------------
    def seen(self, r: int = 0) -> int:
        return self.layers[0].seen[r]

    @property
    def tokens_seen(self) -> int:
        return self.seen(0)

    def held(self, r: int = 0) -> int:
        """Tokens row r's largest layer holds now (at most its sinks + window)."""
        return max(min(layer.seen[r], layer.sinks + layer.window) for layer in self.layers)

    @property
    def cache_tokens(self) -> int:
        return self.held(0)

    @property
    def capacity(self) -> int:
        return max(layer.sinks + layer.window for layer in self.layers)

    @property
    def memories(self) -> list:
        """The layers' recall memories (None for layers without one)."""
        return [layer.memory for layer in self.layers]

    def shared(self, key: tuple, make):
        """make(), computed once for all the layers of a forward that ask with the same `key`
        (index tensors, masks, rotations of a batched decode step: the same for every layer of a
        shape). The key must name everything the value depends on: an entry is a pure function of
        its key, so a hit is right whenever it comes; the memo is emptied at each `prepare`."""
        value = self._shared.get(key)
        if value is None:
            if len(self._shared) > 256:
                self._shared.clear()
            value = self._shared[key] = make()
        return value

    def rotation_matrix(self, rope: LayerRope, delta: int, like: torch.Tensor) -> torch.Tensor:
        """(D, D) matrix R with x @ R == x rotated by `delta` positions; memoised per step."""
        key = (*rope.key, delta, like.dtype, like.device)
        rot = self._rotations.get(key)
        if rot is None:
            if len(self._rotations) > 64 + 4 * self.n_rows:
                self._rotations.clear()
            eye = torch.eye(like.shape[-1], dtype=like.dtype, device=like.device)
            cos, sin = rope.cos_sin(torch.tensor([delta], device=like.device), like.dtype)  # (1, R): every row
            rot = apply_rotation(eye, cos, sin, rope.interleaved)
            self._rotations[key] = rot
        return rot

    def prepare(self, n_new: int, rows=None, device: torch.device | str = "cpu") -> torch.Tensor:
        """Position ids (len(rows), n_new) for the next forward over `rows` (default: all), rebasing
        a row first if its positions would grow too big. Drops what an interrupted forward left."""
        rows = tuple(range(self.n_rows)) if rows is None else tuple(int(r) for r in rows)
        self.start_forward(None)
        self.use_rows(rows)
        firsts = [self.first_position(r, n_new) for r in rows]
        if len(firsts) == 1:
            return torch.arange(firsts[0], firsts[0] + n_new, device=device)[None, :]
        return torch.tensor(firsts, device=device)[:, None] + torch.arange(n_new, device=device)[None, :]

    def start_forward(self, groups: list | None) -> None:
        """A new forward begins: the memo is emptied and what an interrupted one left is dropped.
        `groups`: None for a forward of equal-length rows (`prepare`), else the [(rows, tokens
        per row), ...] of a mixed forward (`mixed.prepare`)."""
        self.prepared = True
        self.groups = groups
        self._shared.clear()
        for layer in self.layers:
            layer.drop_pending()

    def use_rows(self, rows: tuple[int, ...]) -> None:
        """The rows the layers' next `write` covers."""
        if rows != self._rows:
            self._rows, self._sel = rows, None

    def first_position(self, r: int, n_new: int) -> int:
        """Storage position of row r's next token, rebasing the row first if n_new more tokens
        would pass `position_limit`."""
        first = self.seen(r) + self.pos_shift[r]
        if first + n_new > self.position_limit or first < 0:
            shift = first - self.capacity  # the next token lands at storage position `capacity`
            for layer in self.layers:
                layer.rotate_ring(r, shift)
            self.pos_shift[r] -= shift
            first -= shift
        return first

    # ---- snapshots -------------------------------------------------------------------------------
    def row_state(self, r: int = 0, copy: bool = True) -> dict:
        return {"pos_shift": self.pos_shift[r], "layers": [layer.row_state(r, copy) for layer in self.layers]}

    def allocate_like(self, source: "StreamingCache", src: int | None = None) -> None:
        """`SinkWindowLayer.allocate_like` for every layer."""
        for layer, theirs in zip(self.layers, source.layers):
            layer.allocate_like(theirs, src)

    def copy_row(self, src: int, dst: int, source: "StreamingCache | None" = None) -> None:
        """Row dst becomes a copy of row src of `source` (this cache by default, or another one
        of the same layer shapes): see `SinkWindowLayer.copy_row`."""
        source = self if source is None else source
        if len(source.layers) != len(self.layers):
            raise ValueError(f"cannot copy a row of a {len(source.layers)}-layer cache into a {len(self.layers)}-layer one")
        self.pos_shift[dst] = source.pos_shift[src]
        for layer, theirs in zip(self.layers, source.layers):
            layer.copy_row(src, dst, theirs)

    def load_row_state(self, r: int, state: dict) -> None:
        self.pos_shift[r] = state["pos_shift"]
        for layer, st in zip(self.layers, state["layers"]):
            layer.load_row_state(r, st)

    def state_dict(self, copy: bool = True) -> dict:
        """Row 0's stream (the single-stream engine's state); copy=False: see `row_state`."""
        return self.row_state(0, copy)

    def load_state_dict(self, state: dict) -> None:
        self.load_row_state(0, state)
