"""Sink + window KV storage with fixed shapes, plugged into transformers as a `Cache`.

Each layer holds `sinks` slots for the first tokens of the stream and a ring buffer of `window`
slots for the most recent ones (plus one all-zero slot for softmax-off-by-one models). Keys are
stored as the model rotated them, at their storage position `stream index + pos_shift`; they are
never re-rotated per step. What the paper's positions-in-cache scheme changes is only the
query-to-sink distance, which `AttentionPlan.sink_delta` carries and the attention applies by
rotating the query (chunks) or the few sink keys (decode). Per-token maintenance is one ring write.

Positions stay small: before a forward that would push storage positions past `position_limit`,
`prepare()` rotates every layer's ring once by the excess (a rebase), so float32 angles in the
model's own rotary embedding never see large numbers, however long the stream runs.

The layer writes a chunk's tokens into the ring only after its attention ran (`commit`), because
they overwrite tokens earlier queries of the same chunk still see; a single decoded token overwrites
exactly the token it evicts, so it is written at once. This module computes no attention; see
`attention.py`, which receives each layer through `take_active_layer()`.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from .rope import LayerRope, apply_rotation

_ACTIVE = threading.local()


def take_active_layer() -> "SinkWindowLayer | None":
    """The layer whose `update` ran last in this thread (and clear it): the attention hand-off."""
    layer = getattr(_ACTIVE, "layer", None)
    _ACTIVE.layer = None
    return layer


@dataclass
class AttentionPlan:
    """What one layer's attention must attend to, for queries with stream indices t0..t0+C-1.

    Decode fast path (`sink_q is None`): attend over `keys`/`values` with `mask` (None = all).
    Chunk path: sink scores use the query rotated by `sink_delta` against `sink_keys`; window
    scores use the query as is against `keys`; `sink_mask`/`mask` say which are visible.
    """

    keys: torch.Tensor  # (B, Hkv, N, D)
    values: torch.Tensor  # (B, Hkv, N, Dv)
    mask: torch.Tensor | None  # (C, N) bool
    sink_keys: torch.Tensor | None = None  # (B, Hkv, s, D)
    sink_values: torch.Tensor | None = None
    sink_mask: torch.Tensor | None = None  # (C, s) bool
    sink_delta: torch.Tensor | None = None  # (C,) positions to rotate the query by, for sinks
    rope: LayerRope | None = None
    zero_slot: bool = False  # append a zero-score, zero-value key (softmax-off-by-one)
    window_rows_nonempty: bool = False  # every query sees at least one key of `keys` (not only sinks)
    causal: bool = False  # `keys` are stream tokens 0..N-1 in order: plain causal attention, end-aligned


class SinkWindowLayer(CacheLayerMixin):
    """One attention layer's sink slots + ring buffer. Never holds more than sinks+window tokens."""

    is_sliding = False
    is_compileable = False
    is_croppable = False

    def __init__(self, sinks: int, window: int, rope: LayerRope, owner: "StreamingCache", off_by_one: bool):
        super().__init__()
        self.sinks, self.window, self.rope, self.owner = sinks, window, rope, owner
        self.zero_slot = off_by_one
        self.seen = 0  # stream tokens committed to this layer
        self.sink_shift = 0  # sink j's key is rotated at storage position j + sink_shift
        self.sink_keys: torch.Tensor | None = None  # originals, as the model rotated them
        self._view_delta = 0  # rotation currently applied to the sink slots of `keys`
        self._pending: tuple[torch.Tensor, torch.Tensor, int] | None = None

    # ---- transformers CacheLayerMixin -------------------------------------------------------
    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        b, h, _, d = key_states.shape
        n = self.sinks + self.window + int(self.zero_slot)
        self.keys = key_states.new_zeros(b, h, n, d)
        self.values = value_states.new_zeros(b, h, n, value_states.shape[-1])
        self.sink_keys = key_states.new_zeros(b, h, self.sinks, d)
        self.device = key_states.device
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if getattr(_ACTIVE, "layer", None) is not None:
            raise RuntimeError(
                "a streaming cache was used but the model's attention did not consume it: switch the model "
                "to the streaming attention with streaming_llm.core.attention.enable(model)"
            )
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        n, c, s = self.seen, key_states.shape[-2], self.sinks
        # Sinks: the first `s` stream tokens go to their own slots, written now (never overwritten).
        if n < s:
            m = min(s, n + c) - n
            if n == 0:
                self.sink_shift = self.owner.pos_shift
            self.sink_keys[:, :, n : n + m] = key_states[:, :, :m]
            self.keys[:, :, n : n + m] = key_states[:, :, :m]
            self.values[:, :, n : n + m] = value_states[:, :, :m]
        written = c == 1 and n >= s
        if written:  # the decoded token overwrites exactly the token it evicts
            slot = s + (n - s) % self.window
            self.keys[:, :, slot] = key_states[:, :, 0]
            self.values[:, :, slot] = value_states[:, :, 0]
        self._pending = (key_states, value_states, n, written)
        _ACTIVE.layer = self
        return self.keys, self.values

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.sinks + self.window + query_length, 0

    def get_seq_length(self) -> int:
        return self.seen

    def get_max_length(self) -> int:
        return self.sinks + self.window

    def reset(self) -> None:
        self.keys = self.values = self.sink_keys = None
        self.is_initialized = False
        self.seen, self.sink_shift, self._view_delta, self._pending = 0, 0, 0, None

    # ---- streaming semantics ------------------------------------------------------------------
    def _sink_deltas(self, t: torch.Tensor) -> torch.Tensor:
        """Positions to rotate queries t by so that their distance to sink j is the paper's
        (cache position of the query minus j) or, for absolute positions, t - j."""
        shift = self.sink_shift - self.owner.pos_shift
        if self.owner.positions == "absolute":
            return torch.full_like(t, shift)
        return torch.clamp(t, max=self.sinks + self.window - 1) - t + shift

    def plan(self) -> AttentionPlan:
        key_states, value_states, n, written = self._pending
        c, s, w = key_states.shape[-2], self.sinks, self.window
        if written and n >= s + w - 1:  # decode with a full cache: every slot is visible
            shift = self.sink_shift - self.owner.pos_shift
            delta = shift if self.owner.positions == "absolute" else min(n, s + w - 1) - n + shift
            self._set_sink_view(delta)
            return AttentionPlan(self.keys, self.values, None, zero_slot=False)
        if n + c <= s + w and (s == 0 or (self.sink_shift == self.owner.pos_shift and self._view_delta == 0)):
            # Nothing evicted yet and every key at its own position (the first S+W tokens: prefill,
            # early decode): ordinary causal attention over the tokens so far, no empty ring slots.
            # The ring has not wrapped, so slot i holds stream token i.
            if written:
                keys, values = self.keys[:, :, : n + c], self.values[:, :, : n + c]
            else:
                keys = torch.cat([self.keys[:, :, :n], key_states], dim=-2)
                values = torch.cat([self.values[:, :, :n], value_states], dim=-2)
            return AttentionPlan(keys, values, None, zero_slot=self.zero_slot, causal=True)
        dev = key_states.device
        t = torch.arange(n, n + c, device=dev)  # query stream indices
        ring_end = n + c if written else n
        ring_start = max(s, ring_end - w)
        n_sinks = min(s, n + c)
        # Stream index held by each ring slot (-1: empty).
        slot = torch.arange(w, device=dev)
        last = ring_end - 1
        u_ring = last - torch.remainder(last - s - slot, w)
        u_ring = torch.where(u_ring >= ring_start, u_ring, torch.full_like(u_ring, -1))
        u_win = u_ring
        keys, values = self.keys[:, :, s : s + w], self.values[:, :, s : s + w]
        if not written:  # the chunk's own non-sink tokens follow the ring
            u_chunk = torch.arange(n, n + c, device=dev)
            u_chunk = torch.where(u_chunk >= s, u_chunk, torch.full_like(u_chunk, -1))
            u_win = torch.cat([u_ring, u_chunk])
            keys = torch.cat([keys, key_states], dim=-2)
            values = torch.cat([values, value_states], dim=-2)
        tt = t[:, None]
        mask = (u_win[None, :] >= 0) & (u_win[None, :] <= tt) & (u_win[None, :] > tt - w)
        j = torch.arange(n_sinks, device=dev)
        return AttentionPlan(
            keys,
            values,
            mask,
            sink_keys=self.sink_keys[:, :, :n_sinks],
            sink_values=self.values[:, :, :n_sinks],
            sink_mask=j[None, :] <= tt,
            sink_delta=self._sink_deltas(t),
            rope=self.rope,
            zero_slot=self.zero_slot,
            window_rows_nonempty=n >= s,  # a query past the sinks always sees itself in the window
        )

    def _set_sink_view(self, delta: int) -> None:
        """Make the sink slots of `keys` hold the sink keys rotated by -delta (decode fast path):
        one small matmul with a rotation matrix shared by all layers of the same rotary type."""
        if delta != self._view_delta and self.sinks:
            rot = self.owner.rotation_matrix(self.rope, -delta, self.sink_keys)
            self.keys[:, :, : self.sinks] = self.sink_keys @ rot
            self._view_delta = delta

    def commit(self) -> None:
        """After attention: write the chunk's last non-sink tokens into the ring, advance."""
        key_states, value_states, n, written = self._pending
        c, s, w = key_states.shape[-2], self.sinks, self.window
        if not written:
            lo = max(n, s, n + c - w)
            if lo < n + c:
                u = torch.arange(lo, n + c, device=key_states.device)
                slots = s + torch.remainder(u - s, w)
                self.keys.index_copy_(2, slots, key_states[:, :, lo - n :])
                self.values.index_copy_(2, slots, value_states[:, :, lo - n :])
        self.seen = n + c
        self._pending = None

    def rotate_ring(self, shift: int) -> None:
        """Move every stored window key `shift` positions back (a rebase); sinks move only while
        they are still being written, so that all sinks share one shift."""
        if not self.is_initialized:
            return
        s, w = self.sinks, self.window
        d = torch.full((w,), -shift, device=self.keys.device)
        self.keys[:, :, s : s + w] = self.rope.rotate(self.keys[:, :, s : s + w], d)
        if self.seen < s:
            self.sink_keys = self.rope.rotate(self.sink_keys, torch.full((s,), -shift, device=self.keys.device))
            self.keys[:, :, :s] = self.sink_keys
            self.sink_shift -= shift
            self._view_delta = 0

    def state(self) -> dict:
        """A snapshot (copies): the live buffers keep changing as the stream goes on."""
        copy = lambda x: None if x is None else x.clone()  # noqa: E731
        return {
            "keys": copy(self.keys),
            "values": copy(self.values),
            "sink_keys": copy(self.sink_keys),
            "seen": self.seen,
            "sink_shift": self.sink_shift,
            "view_delta": self._view_delta,
        }

    def load_state(self, st: dict) -> None:
        copy = lambda x: None if x is None else x.clone()  # noqa: E731
        self.keys, self.values, self.sink_keys = copy(st["keys"]), copy(st["values"]), copy(st["sink_keys"])
        self.seen, self.sink_shift, self._view_delta = st["seen"], st["sink_shift"], st["view_delta"]
        self.is_initialized = self.keys is not None
        if self.is_initialized:
            self.device = self.keys.device


class StreamingCache(Cache):
    """A transformers `Cache` whose layers are `SinkWindowLayer`s: pass it as the model's cache.

    `layer_shapes` gives (sinks, window) per decoder layer: sinks+window for global layers, (0,
    trained window) for sliding-window layers. Keep your own reference: it is mutated in place.
    """

    def __init__(
        self,
        layer_shapes: list[tuple[int, int]],
        ropes: list[LayerRope],
        positions: str = "cache",
        off_by_one: bool = False,
        start_position: int = 0,
        position_limit: int | None = None,
    ):
        self.positions = positions
        self.pos_shift = start_position  # storage position of stream token i is i + pos_shift
        self._rotations: dict = {}
        largest = max(s + w for s, w in layer_shapes)
        self.position_limit = position_limit or max(4 * largest, 4096)
        layers = [SinkWindowLayer(s, w, r, self, off_by_one) for (s, w), r in zip(layer_shapes, ropes)]
        super().__init__(layers=layers)

    @property
    def tokens_seen(self) -> int:
        return self.layers[0].seen

    @property
    def cache_tokens(self) -> int:
        """Tokens currently held by the largest layer (at most its sinks + window)."""
        return max(min(layer.seen, layer.sinks + layer.window) for layer in self.layers)

    @property
    def capacity(self) -> int:
        return max(layer.sinks + layer.window for layer in self.layers)

    def rotation_matrix(self, rope: LayerRope, delta: int, like: torch.Tensor) -> torch.Tensor:
        """(D, D) matrix R with x @ R == x rotated by `delta` positions; memoised per step."""
        key = (id(rope.module), rope.buffer_name, rope.inv_freq._version, delta, like.dtype, like.device)
        rot = self._rotations.get(key)
        if rot is None:
            if len(self._rotations) > 64:
                self._rotations.clear()
            eye = torch.eye(like.shape[-1], dtype=like.dtype, device=like.device)
            cos, sin = rope.cos_sin(torch.tensor([delta], device=like.device), like.dtype)  # (1, R): every row
            rot = apply_rotation(eye, cos, sin, rope.interleaved)
            self._rotations[key] = rot
        return rot

    def prepare(self, n_new: int, device: torch.device | str = "cpu") -> torch.Tensor:
        """Position ids (1, n_new) for the next forward, rebasing first if they would grow too big."""
        first = self.tokens_seen + self.pos_shift
        if first + n_new > self.position_limit or first < 0:
            shift = first - self.capacity  # the next token lands at storage position `capacity`
            for layer in self.layers:
                layer.rotate_ring(shift)
            self.pos_shift -= shift
            first -= shift
        return torch.arange(first, first + n_new, device=device)[None, :]

    def state_dict(self) -> dict:
        return {"pos_shift": self.pos_shift, "layers": [layer.state() for layer in self.layers]}

    def load_state_dict(self, state: dict) -> None:
        self.pos_shift = state["pos_shift"]
        for layer, st in zip(self.layers, state["layers"]):
            layer.load_state(st)
