"""AttentionPlan: what one layer's attention must attend to, as the cache lays it out.

The streaming cache (`cache.py`, and `recall.py` for recalled blocks) makes one per layer and
forward; the attention function (`attention.py`) carries it out. Nothing else: no tensors are
computed here.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .rope import LayerRope


@dataclass
class AttentionPlan:
    """What one layer's attention must attend to, for B rows of C queries each.

    `keys`/`values` (B, Hkv, N, D) with `mask` (B, C, N) bool (None: all visible). Chunk path
    (`sink_delta` set): sink scores use the query rotated by `sink_delta` (B, C) against
    `sink_keys` (B, Hkv, s, D) with `sink_mask` (B, C, s); window scores use the query as is.
    """

    keys: torch.Tensor
    values: torch.Tensor
    mask: torch.Tensor | None
    sink_keys: torch.Tensor | None = None
    sink_values: torch.Tensor | None = None
    sink_mask: torch.Tensor | None = None
    sink_delta: torch.Tensor | None = None
    rope: LayerRope | None = None
    zero_slot: bool = False  # append a zero-score, zero-value key (softmax-off-by-one)
    window_rows_nonempty: bool = False  # every query sees at least one key of `keys` (not only sinks)
    causal: bool = False  # `keys` are stream tokens 0..N-1 in order: plain causal attention, end-aligned
    row_lengths: tuple[int, ...] | None = None  # decode: row i sees exactly keys[i, :, :row_lengths[i]]
