"""Recall of evicted tokens: one global attention layer's memory of the tokens that left its ring.

What it does. Evicted stream tokens (non-sink tokens that leave the window) are grouped, in stream
order, into blocks of `block_size` consecutive tokens: block b holds stream tokens
`sinks + b*block_size ..` and enters the memory once all of them are evicted. A block keeps a
summary of its keys (per KV head, per channel max and min, as Quest does) and, in RAM, the storage
position frame its keys were rotated in (8 bytes). Its keys and values (float32 or bfloat16) and
its summary (float32) go to two bounded files (`SlotFile`) of `recall_memory_tokens // block_size`
slots each: block b lives in slot `b % slots`, so beyond the cap the oldest blocks are overwritten
(dropped). The files are unlinked right after they are created (they disappear with the engine)
and are written and read with pwrite/pread, never mapped: their pages are the kernel's page cache,
not the process's memory, so neither the stored tokens nor their summaries grow the process RSS.
A scan reads the summaries a piece at a time into one small buffer.

Before each forward (`select`), the layer chooses the `recall_blocks` blocks with the highest
score. `score="bound"` (the default): the Quest-style upper bound of the query-key scores: for one
query q and a block with per-channel key minimum mn and maximum mx, bound = sum_c max(q_c*mn_c,
q_c*mx_c). `score="mean"`: q . (the block's mean key), the block's mean query-key score, as
InfLLM's representative keys do with one representative (the summary is then the mean key alone,
half the bytes of max and min). `score="both"` keeps all three vectors and ranks the blocks by
each score apart; the choice takes the bound's best block, the mean key's best, the bound's
second, the mean key's second, ... (each block once) until `recall_blocks` (on the pass key the two
scores miss different keys: docs/recall_evals.md). The selection score is the per-query score summed over every query
head and every query of the forward (one selection per layer, shared by all its heads; a chunk's
queries all see the same blocks). With `select="head"` each KV head chooses its own
`recall_blocks` blocks instead, by the score of its own summary summed over its own
query heads (its GQA group) and the forward's queries only; `chosen` is then a tuple of one
choice per KV head. Since max(q*mn, q*mx) = q+ * mx + q- * mn, the sum over queries is
(sum q+) . mx + (sum q-) . mn: one matrix-vector product over all held blocks per term (per head:
one batched product, one vector per KV head); the mean score is (sum q) . mean, one product.
Scores are taken at the true text distance, in one frame for every block: the summaries are of
the keys rotated to their stream index (storage position minus the rebase shift of their frame),
and the query, as the model rotated it, is rotated the same way (one small matrix product, cached
between rebases), so blocks stored before and after ring rebases are scored by one product. Ties
go to the older block. Only blocks complete before the forward are eligible. With `every` = N > 1 a decoded token reuses the choice of the last decoded token that
chose, if that was fewer than N tokens back and its blocks are all still held (the scan over the
summaries, which grows with the memory, then runs once per N decode steps; blocks completed in
between wait for the next choice); a chunk always chooses.

The chosen blocks, in stream order, join the sink segment of the layer's attention: block i's
token m is rotated (one delta per block; per KV head and block with `select="head"`, each head
laying out its own blocks) to cache position `sinks + i*block_size + m` in the sinks' frame, and
the query's sink delta grows by R (the recalled tokens; the same R for every head), so sinks sit
at cache positions 0..S-1, recalled tokens at S..S+R-1, the window after them and the query right
after the window (never beyond S + recall_blocks*block_size + W). Chunks use the plan's
sink_keys/sink_values/sink_mask path. A decoded token attends through one fused SDPA over a mirror
of the layer's buffer with room for the recalled blocks ([sinks | ring | zero slot | recalled]):
the mirror copies the one ring slot the token wrote (the whole ring after a chunk or a rebase),
and the sinks and the recalled keys are rotated straight into the query's frame with the cache's
memoised per-step rotation matrix (the same delta for every layer), so no per-step concatenation
of the window, no query rotation and no grouped-head copies. The recalled keys in the sinks'
frame are cached while the choice does not change.

What it does NOT do: batch rows (one stream only: `StreamBatch` refuses recall), sliding-window
layers (they never get a memory), re-scoring inside a chunk, or keep the store file after the
engine is gone. `state_dict` includes the whole memory (summaries and the stored blocks' data),
so a saved stream continues exactly, at the size of the memory.
"""

from __future__ import annotations

import math
import os
import tempfile
import weakref

import torch

from .rope import LayerRope, apply_rotation

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
# A score is one or two rankers, each reading some of a block's summary vectors; a summary record
# holds every vector its score's rankers read, in this order.
RANKERS = {"bound": (("maxs", "mins"),), "mean": (("means",),), "both": (("maxs", "mins"), ("means",))}
SUMMARIES = {score: tuple(name for ranker in rankers for name in ranker) for score, rankers in RANKERS.items()}
SCAN_PIECE = 256  # summary records per pread of a scan: a buffer that stays in the CPU's cache


class SlotFile:
    """`slots` records of `record` shape in `dtype` in an unlinked temporary file, written with
    pwrite and read with pread (no memory map: the data never counts in the process's RSS).
    Sparse: disk use grows with what is written. The file closes with the object. The recall
    memory keeps two: its blocks' keys and values, records (2, H, block, D), and their summaries,
    records (terms, H, D)."""

    def __init__(self, slots: int, record: tuple[int, ...], dtype: torch.dtype, directory: str | None = None):
        self.shape, self.dtype = (slots, *record), dtype
        self.slot_bytes = math.prod(record) * dtype.itemsize
        fd, path = tempfile.mkstemp(prefix="streaming-llm-recall-", suffix=".bin", dir=directory)
        try:
            os.ftruncate(fd, slots * self.slot_bytes)
        except OSError:
            os.close(fd)
            raise
        finally:
            os.unlink(path)  # the descriptor keeps the data; nothing is left behind
        self.fd = fd
        self._close = weakref.finalize(self, os.close, fd)

    def numel(self) -> int:
        return self.shape[0] * self.slot_bytes // self.dtype.itemsize

    def write(self, first: int, data: torch.Tensor) -> None:
        """Slots first, first + 1, .. from `data` (n, *record), any dtype and device."""
        buf = data.to(device="cpu", dtype=self.dtype).contiguous()
        os.pwrite(self.fd, buf.view(torch.uint8).numpy(), first * self.slot_bytes)

    def read(self, slots) -> torch.Tensor:
        """(len(slots), *record) of the given slots."""
        slots = list(slots)
        out = torch.empty((len(slots), *self.shape[1:]), dtype=self.dtype)
        raw = out.view(torch.uint8).numpy().reshape(len(slots), self.slot_bytes)
        for i, slot in enumerate(slots):
            self._pread(raw[i], slot)
        return out

    def pieces(self, count: int, piece: int):
        """Slots 0 .. count-1 in order, `piece` at a time, as views (m, *record) of ONE reused
        buffer (each is overwritten by the next: use it before asking for the next)."""
        buf = torch.empty((min(piece, count), *self.shape[1:]), dtype=self.dtype)
        raw = buf.view(torch.uint8).numpy().reshape(-1)
        for lo in range(0, count, piece):
            m = min(piece, count - lo)
            self._pread(raw[: m * self.slot_bytes], lo)
            yield buf[:m]

    def _pread(self, raw, slot: int) -> None:
        if os.preadv(self.fd, [raw], slot * self.slot_bytes) != raw.nbytes:
            raise OSError(f"recall store: short read at slot {slot}")


class RecallMemory:
    """The evicted-token memory of one global attention layer of a single-stream cache."""

    def __init__(self, recall_blocks: int, block_size: int, memory_tokens: int, dtype: str, sinks: int,
                 rope: LayerRope, directory: str | None = None, select: str = "layer", every: int = 1,
                 score: str = "bound"):
        self.k, self.block, self.every, self.score = recall_blocks, block_size, every, score
        self.per_head = select == "head"  # one choice per KV head (else one per layer)
        self.slots = max(1, memory_tokens // block_size)  # block slots in the store
        self.store_dtype = DTYPES[dtype]
        self.sinks, self.rope, self.directory = sinks, rope, directory
        self.trace: list | None = None  # for tests: a list gets (first index, n queries, chosen) per forward
        self.gathers = 0  # times `recalled` read blocks from the store (a new choice); never reset (bench reads it)
        self.store: SlotFile | None = None  # (slots, 2, H, block, D) on disk, created with the first block
        self.summaries: SlotFile | None = None  # (slots, terms, H, D) float32 on disk, created with the store
        self.reset()

    # ---- state -----------------------------------------------------------------------------------
    def reset(self) -> None:
        self.n_blocks = 0  # blocks ever completed; ids n_blocks - stored .. n_blocks - 1 are held
        self.staged = 0  # evicted tokens waiting for their block to complete
        self.stage_k = self.stage_v = None  # (H, block, D) in the current storage frame
        self.frames = torch.zeros(0, dtype=torch.long)  # pos_shift each slot's block was stored with (RAM)
        self.hold = None  # (stream index, key, value): a decoded token's evicted token, until commit
        self.chosen: tuple = ()  # block ids in stream order; per head: one such tuple per KV head
        self.chosen_at: int | None = None  # stream index of the decoded token that chose `chosen` (None: a chunk did)
        self._recalled = None  # (ids, sink_shift, dtype, keys, values) of the last chosen blocks
        self._unshift = None  # (pos_shift, (D, D) matrix): x @ matrix rotates x by -pos_shift (to stream indices)
        self.mirror_k = self.mirror_v = None  # (1, H, ring + k*block, D): the decode path's buffer, derived
        self._mirror_next = -1  # stream index whose ring slot the mirror copies next (-1: copy the whole ring)
        self._mirror_ids = None  # the blocks whose values the mirror holds

    @property
    def stored(self) -> int:
        """Blocks held now (the newest `slots` at most)."""
        return min(self.n_blocks, self.slots)

    @property
    def stored_tokens(self) -> int:
        return self.stored * self.block

    def eligible(self) -> range:
        return range(self.n_blocks - self.stored, self.n_blocks)

    @property
    def terms(self) -> int:
        """Summary vectors per block and KV head: max and min keys (score "bound"), or the mean key."""
        return len(SUMMARIES[self.score])

    def _open_store(self, h: int, d: int) -> None:
        self.store = SlotFile(self.slots, (2, h, self.block, d), self.store_dtype, self.directory)
        self.summaries = SlotFile(self.slots, (self.terms, h, d), torch.float32, self.directory)

    # ---- filling -----------------------------------------------------------------------------------
    def capture(self, keys: torch.Tensor, values: torch.Tensor, first: int, pos_shift: int) -> None:
        """Evicted tokens `first ..` (keys/values (H, n, D), as stored in the ring at storage
        positions index + pos_shift), in stream order, continuing the ones before."""
        expected = self.sinks + self.n_blocks * self.block + self.staged
        if first != expected:
            raise RuntimeError(f"recall memory expected evicted token {expected}, got {first}")
        h, n, d = keys.shape
        if self.stage_k is None:
            self.stage_k = keys.new_zeros(h, self.block, d)
            self.stage_v = values.new_zeros(h, self.block, values.shape[-1])
        done = 0
        while done < n:
            m = min(self.block - self.staged, n - done)
            self.stage_k[:, self.staged : self.staged + m] = keys[:, done : done + m]
            self.stage_v[:, self.staged : self.staged + m] = values[:, done : done + m]
            self.staged += m
            done += m
            if self.staged == self.block:
                self._finish_block(pos_shift)

    def _finish_block(self, pos_shift: int) -> None:
        h, _, d = self.stage_k.shape
        if self.store is None:
            self._open_store(h, d)
        slot = self.n_blocks % self.slots
        if slot >= self.frames.shape[0]:  # grow the frames (8 bytes a block), up to the cap
            frames = torch.zeros(min(self.slots, max(16, 2 * self.frames.shape[0])), dtype=torch.long)
            frames[: self.frames.shape[0]] = self.frames
            self.frames = frames
        k = self.stage_k.float() @ self._to_stream_frame(pos_shift, torch.float32, self.stage_k.device)
        vectors = {"maxs": lambda: k.amax(dim=1), "mins": lambda: k.amin(dim=1), "means": lambda: k.mean(dim=1)}
        summary = torch.stack([vectors[name]() for name in SUMMARIES[self.score]])
        self.summaries.write(slot, summary[None])
        self.frames[slot] = pos_shift
        self.store.write(slot, torch.stack([self.stage_k, self.stage_v])[None])
        self.n_blocks += 1
        self.staged = 0

    def _to_stream_frame(self, pos_shift: int, dtype: torch.dtype, device) -> torch.Tensor:
        """(D, D) R with x @ R == x rotated by -pos_shift (storage positions to stream indices)."""
        c = self._unshift
        if c is None or c[0] != pos_shift or c[1].dtype != dtype or c[1].device != device:
            d = self.stage_k.shape[-1] if self.stage_k is not None else self.store.shape[-1]
            eye = torch.eye(d, dtype=dtype, device=device)
            cos, sin = self.rope.cos_sin(torch.tensor([-pos_shift], device=device), dtype)
            self._unshift = c = (pos_shift, apply_rotation(eye, cos, sin, self.rope.interleaved))
        return c[1]

    def rebase(self, shift: int) -> None:
        """The ring moved `shift` positions back: so do the staged tokens (one frame per block)."""
        self._mirror_next = -1  # the ring's keys were rotated: the decode mirror copies them again
        if self.staged:
            d = torch.full((self.staged,), -shift, device=self.stage_k.device)
            self.stage_k[:, : self.staged] = self.rope.rotate(self.stage_k[:, : self.staged], d)

    def block_keys(self, block_id: int) -> tuple[torch.Tensor, int]:
        """(keys (H, block, D) float32 as stored, pos_shift of their frame) of a held block (for tests)."""
        if block_id not in self.eligible():
            raise KeyError(f"block {block_id} is not held (held: {self.eligible()})")
        slot = block_id % self.slots
        return self.store.read([slot])[0, 0].float(), int(self.frames[slot])

    # ---- selection -------------------------------------------------------------------------------
    def summary(self) -> dict[str, torch.Tensor]:
        """The held blocks' summaries, by slot (stored, H, D) float32, read from their file:
        {"maxs", "mins"} (score "bound"), {"means"} ("mean") or all three ("both") (for snapshots,
        tests and diagnostics)."""
        n = self.stored
        if self.summaries is None or n == 0:
            return {}
        data = self.summaries.read(range(n))
        return {name: data[:, i].contiguous() for i, name in enumerate(SUMMARIES[self.score])}

    def scores(self, query: torch.Tensor, pos_shift: int) -> torch.Tensor:
        """Selection scores of the held blocks, oldest first, for `query` (B=1, Hq, C, D) rotated by
        the model at storage positions (stream index + pos_shift): rotated to stream indices, as the
        summaries are, then one float32 product per piece of the summary file (read SCAN_PIECE
        records at a time into one small buffer, so the summaries are never all in RAM; no
        per-block Python work): (n,) summed over all heads, or with `select="head"` (Hkv, n), each
        KV head's score summed over its own query heads; with score "both" a leading dimension of 2
        (the bound's scores, then the mean key's)."""
        n = self.stored
        hkv, d = self.summaries.shape[2:]
        q = query[0].float().cpu()  # (Hq, C, D)
        if pos_shift:
            q = q @ self._to_stream_frame(pos_shift, q.dtype, q.device)
        q = q.reshape(hkv, -1, d)  # (Hkv, G*C, D)
        # per summary vector, what it is multiplied with: records (max, min) give the bound
        # sum q+ . max + sum q- . min; the mean key gives (sum q) . mean
        total, pos = q.sum(1), q.clamp(min=0).sum(1)  # (Hkv, D)
        against = {"maxs": pos, "mins": total - pos, "means": total}
        rankers, at = [], 0  # per ranker: (its records' slice of the summary terms, (terms, Hkv, D))
        for ranker in RANKERS[self.score]:
            rankers.append((slice(at, at + len(ranker)), torch.stack([against[name] for name in ranker])))
            at += len(ranker)
        parts = []
        for x in self.summaries.pieces(n, SCAN_PIECE):  # (m, terms, Hkv, D)
            if self.per_head:  # each KV head against its own summaries: (rankers, Hkv, m)
                parts.append(torch.stack([torch.einsum("mthd,thd->hm", x[:, t], v) for t, v in rankers]))
            else:  # (rankers, m)
                parts.append(torch.stack([x[:, t].reshape(x.shape[0], -1) @ v.flatten() for t, v in rankers]))
        out = torch.cat(parts, dim=-1)
        if self.n_blocks > self.slots:  # slots wrapped: the oldest held block is in slot n_blocks % slots
            out = torch.roll(out, -(self.n_blocks % self.slots), dims=-1)
        return out if out.shape[0] > 1 else out[0]

    def select(self, query: torch.Tensor, pos_shift: int) -> tuple:
        """The ids of the chosen blocks, in stream order: the top `recall_blocks` by `scores`
        (all of them when fewer are held; ties to the older block); with score "both" the bound's
        best, the mean key's best, the bound's second best, ... (each block once) until
        `recall_blocks`; with `select="head"` one such tuple per KV head. () when nothing is held."""
        if self.stored == 0 or self.k == 0:
            return ()
        s = self.scores(query, pos_shift)
        if self.score != "both":
            s = s[None]  # one ranker
        if self.per_head:
            return tuple(self._top(s[:, h]) for h in range(s.shape[1]))
        return self._top(s)

    def reuses(self, n: int) -> bool:
        """Whether the decoded token with stream index n keeps the current choice (`every` > 1): a
        decoded token made it fewer than `every` tokens before n, and all of its blocks are still
        held. (By stream index, so a forward that is interrupted and fed again decides the same.)"""
        if self.every == 1 or self.chosen_at is None or not 0 <= n - self.chosen_at < self.every or not self.chosen:
            return False
        return min(b for head in self._heads(self.chosen) for b in head) in self.eligible()

    def _heads(self, ids: tuple) -> tuple:
        """A choice as one tuple of block ids per choosing unit: per KV head, or the one shared tuple."""
        return ids if self.per_head else (ids,)

    def _top(self, s: torch.Tensor) -> tuple[int, ...]:
        """The `recall_blocks` block ids the rankers' scores `s` (rankers, n) choose, in stream
        order: one ranker's top K, or the rankers' bests taken in turn (each block once)."""
        first, n = self.n_blocks - self.stored, s.shape[-1]
        if n <= self.k:
            return tuple(range(first, first + n))
        if s.shape[0] == 1:
            vals, top = torch.topk(s[0], self.k + 1)  # one more, to see a tie at the cut
            if vals[-2] == vals[-1]:  # a tie at the K-th place goes to the older block: the stable sort decides
                top = torch.argsort(-s[0], stable=True)
            return tuple(sorted(first + i for i in top[: self.k].tolist()))
        orders = torch.argsort(-s, dim=-1, stable=True)[:, : self.k].T.flatten().tolist()  # 1st of each, 2nd of each, ...
        return tuple(sorted(first + i for i in list(dict.fromkeys(orders))[: self.k]))

    def recalled(self, ids: tuple, sink_shift: int, like: torch.Tensor):
        """Keys/values (1, H, R, D) of the chosen blocks `ids` (one tuple, or one per KV head),
        each head's block i's keys rotated to storage position `sinks + i*block + m + sink_shift`
        (the sinks' frame: cache position + sink_shift). The union of the heads' blocks is read
        from the store once; each head then takes its own blocks (the same ones for every head
        with one shared choice)."""
        c = self._recalled
        if c is not None and c[0] == ids and c[1] == sink_shift and c[2] == like.dtype:
            return c[3], c[4]
        self.gathers += 1
        per_head = self._heads(ids)  # P = Hkv choices, or 1 shared by every head
        union = sorted(set().union(*per_head))
        at = {b: j for j, b in enumerate(union)}
        data = self.store.read([b % self.slots for b in union]).to(device=like.device, dtype=like.dtype)
        h, d = data.shape[2], data.shape[-1]  # data: (len(union), 2, H, block, D)
        pick = torch.tensor([[at[b] for b in chosen] for chosen in per_head], device=like.device)  # (P, k)
        heads = torch.arange(h, device=like.device)[:, None]  # broadcast with pick: (H, k)
        keys = data[:, 0][pick, heads].reshape(1, h, -1, d)  # (H, k, block, D) -> (1, H, k*block, D)
        values = data[:, 1][pick, heads].reshape(1, h, -1, data.shape[-1])
        frames = self.frames[[b % self.slots for b in union]].tolist()
        stored_at = torch.tensor([[self.sinks + b * self.block + frames[at[b]] for b in chosen] for chosen in per_head])
        target = torch.tensor([self.sinks + i * self.block + sink_shift for i in range(len(per_head[0]))])
        delta = (target - stored_at).repeat_interleave(self.block, dim=-1).to(like.device)  # (P, R)
        cos, sin = self.rope.cos_sin(delta.flatten(), keys.dtype)
        rot = (len(per_head), delta.shape[-1], cos.shape[-1])  # (P, R, rot dims): broadcast over heads
        keys = apply_rotation(keys, cos.reshape(rot), sin.reshape(rot), self.rope.interleaved)
        self._recalled = (ids, sink_shift, like.dtype, keys, values)
        return keys, values

    @property
    def recalled_tokens(self) -> int:
        """Tokens the last forward recalled (per head: each head recalls that many)."""
        return len(self._heads(self.chosen)[0]) * self.block if self.chosen else 0

    def mirror(self, layer, n: int, ids: tuple, rv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The decode buffers (1, H, ring + k*block, D) of a decoded token with stream index n: the
        layer's ring (one slot copied per decoded token, all of it after a chunk or a rebase) and
        the recalled values `rv` (1, H, R, D: per head with per-head choices) of blocks `ids` after
        it, copied when the choice changes; the caller writes the sink and recalled keys."""
        ring = layer.keys.shape[-2]  # sinks + window (+ the zero slot of softmax-off-by-one)
        if self.mirror_k is None or self.mirror_k.dtype != layer.keys.dtype or self.mirror_k.device != layer.keys.device:
            h, d, dv = layer.keys.shape[1], layer.keys.shape[-1], layer.values.shape[-1]
            self.mirror_k = layer.keys.new_zeros(1, h, ring + self.k * self.block, d)
            self.mirror_v = layer.values.new_zeros(1, h, ring + self.k * self.block, dv)
            self._mirror_next, self._mirror_ids = -1, None
        if self._mirror_next == n:
            slot = layer.sinks + (n - layer.sinks) % layer.window
            self.mirror_k[:, :, slot] = layer.keys[:, :, slot]
            self.mirror_v[:, :, slot] = layer.values[:, :, slot]
        else:
            self.mirror_k[:, :, :ring] = layer.keys
            self.mirror_v[:, :, :ring] = layer.values
        self._mirror_next = n + 1
        if self._mirror_ids != ids:
            self.mirror_v[:, :, ring : ring + rv.shape[-2]] = rv
            self._mirror_ids = ids
        return self.mirror_k, self.mirror_v

    # ---- snapshots -------------------------------------------------------------------------------
    def state(self) -> dict:
        clone = lambda x: None if x is None else x.clone()  # noqa: E731
        summary = self.summary()
        return {
            "n_blocks": self.n_blocks, "staged": self.staged, "stage_k": clone(self.stage_k),
            "stage_v": clone(self.stage_v), "mins": summary.get("mins"), "maxs": summary.get("maxs"),
            "means": summary.get("means"),
            "frames": self.frames[: self.stored].clone(), "hold": None if self.hold is None else
            (self.hold[0], self.hold[1].clone(), self.hold[2].clone()),
            "store": None if self.store is None else self.store.read(range(min(self.stored, self.slots))),
            "chosen": self.chosen, "chosen_at": self.chosen_at,  # a decoded token may reuse the last choice
        }

    def load_state(self, st: dict) -> None:
        self.reset()
        self.n_blocks, self.staged = st["n_blocks"], st["staged"]
        self.stage_k, self.stage_v = st["stage_k"], st["stage_v"]
        self.frames = st["frames"].clone()
        self.hold = st["hold"]
        self.chosen, self.chosen_at = st.get("chosen", ()), st.get("chosen_at")  # older states: the next token chooses
        if st["store"] is not None:
            data = st["store"]
            if self.store is None or self.store.shape[2:] != data.shape[2:]:
                self._open_store(data.shape[2], data.shape[4])
            if data.shape[0]:
                self.store.write(0, data)
        if self.stored:  # by slot; states saved while the summaries lived in RAM hold more slots: cut
            self.summaries.write(0, torch.stack([st[name][: self.stored] for name in SUMMARIES[self.score]], dim=1))


# ---- the layer's side: capturing evicted tokens, plans with recalled blocks ----------------------
def capture_chunk(layer, n: int, c: int, keys: torch.Tensor, values: torch.Tensor) -> None:
    """Before the commit of a chunk (row 0 saw n tokens, then c more: keys/values (1, H, c, D)):
    hand the tokens it evicts (still in the ring, or the chunk's own) to the layer's memory."""
    s, w = layer.sinks, layer.window
    lo, hi = max(s, n - w), n + c - w  # stream indices evicted by this chunk
    if hi <= lo:
        return
    parts_k, parts_v = [], []
    if lo < n:
        slots = s + torch.remainder(torch.arange(lo, min(hi, n), device=layer.device) - s, w)
        parts_k.append(layer.keys[0].index_select(1, slots))
        parts_v.append(layer.values[0].index_select(1, slots))
    if hi > n:
        parts_k.append(keys[0, :, max(lo, n) - n : hi - n])
        parts_v.append(values[0, :, max(lo, n) - n : hi - n])
    k, v = (torch.cat(parts_k, 1), torch.cat(parts_v, 1)) if len(parts_k) > 1 else (parts_k[0], parts_v[0])
    layer.memory.capture(k, v, lo, layer.owner.pos_shift[0])


def hold_decoded(layer, n: int, slot: int) -> None:
    """A decoded token (stream index n) is about to overwrite ring `slot`, which holds token n - w:
    keep that one until the commit (kept across an interrupted forward that re-runs)."""
    mem, i = layer.memory, n - layer.window
    if i >= layer.sinks and (mem.hold is None or mem.hold[0] != i):
        mem.hold = (i, layer.keys[0, :, slot : slot + 1].clone(), layer.values[0, :, slot : slot + 1].clone())


def commit_decoded(layer) -> None:
    mem = layer.memory
    if mem.hold is not None:
        i, k, v = mem.hold
        mem.hold = None
        mem.capture(k, v, i, layer.owner.pos_shift[0])


def choose(layer, query: torch.Tensor | None) -> bool:
    """Select this forward's blocks (recorded in `memory.chosen`); True when any were chosen."""
    mem, p = layer.memory, layer._pending
    if query is None:
        raise RuntimeError("recall needs the forward's queries: call plan(query)")
    if not (p.written and mem.reuses(p.seen[0])):
        mem.chosen = mem.select(query, layer.owner.pos_shift[0])
        mem.chosen_at = p.seen[0] if p.written else None
    if mem.trace is not None:
        mem.trace.append((p.seen[0], p.keys.shape[-2], mem.chosen))
    return bool(mem.chosen)


def _sink_delta(layer, t: torch.Tensor, r: int) -> torch.Tensor:
    """Query-to-sink-frame rotation with R recalled tokens: the query sits at cache position
    S + R + W - 1 (the window is full whenever a block is held)."""
    return (layer.sinks + r + layer.window - 1 - t + layer._shift(0))[None, :]


def with_recall(layer, plan):
    """A chunk plan (sinks + ring + chunk) with the chosen blocks appended to its sink segment."""
    rk, rv = layer.memory.recalled(layer.memory.chosen, layer.sink_shift[0], plan.keys)
    r, c = rk.shape[-2], plan.sink_delta.shape[-1]
    t = layer._pending.seen[0] + torch.arange(c, device=plan.keys.device)
    plan.sink_keys = torch.cat([plan.sink_keys, rk], dim=-2)
    plan.sink_values = torch.cat([plan.sink_values, rv], dim=-2)
    ones = torch.ones(1, c, r, dtype=torch.bool, device=plan.keys.device)
    plan.sink_mask = torch.cat([torch.broadcast_to(plan.sink_mask, (1, c, plan.sink_mask.shape[-1])), ones], dim=-1)
    plan.sink_delta = _sink_delta(layer, t, r)
    return plan


def decode_plan(layer, plan_cls):
    """A decoded token with blocks recalled: one fused attention over the memory's mirror of the
    ring with the recalled blocks after it, sinks and recalled keys rotated into the query's frame
    (the query sits at cache position S + R + W - 1; the window is full whenever a block is held)."""
    mem, s, w = layer.memory, layer.sinks, layer.window
    n = layer._pending.seen[0]
    rk, rv = mem.recalled(mem.chosen, layer.sink_shift[0], layer.keys)  # sinks' frame, cached per choice
    r, ring = rk.shape[-2], layer.keys.shape[-2]
    mk, mv = mem.mirror(layer, n, mem.chosen, rv)
    delta = s + r + w - 1 - n + layer._shift(0)  # the query-to-sink-frame rotation (as `_sink_delta`)
    rot = layer.owner.rotation_matrix(layer.rope, -delta, layer.keys)  # shared by the layers this step
    mk[:, :, :s] = layer.sink_keys[:, :, :s] @ rot
    mk[:, :, ring : ring + r] = rk @ rot
    mask = None
    if r < mem.k * mem.block:  # fewer blocks held than K: the rest of the mirror is not attended
        mask = (torch.arange(mk.shape[-2], device=mk.device) < ring + r)[None, None, :]
    return plan_cls(mk, mv, mask)
