"""Rotary position math: find a model's rotary parameters per layer and rotate vectors by a delta.

A RoPE score depends only on the distance between query and key, so the engine never re-rotates
its cache to "move" positions: it rotates one query (or the few sink keys) by a position delta.
Angles are computed in float64 and reduced modulo 2*pi, so a delta of millions of positions costs
no precision. Stored keys already carry the rotary `attention_scaling`; a pure rotation here never
applies it again.

This module does not touch caches or attention; it is pure tensor math plus model inspection.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..errors import UnsupportedModelError

TWO_PI = 2 * math.pi


def find_rotary_module(model: torch.nn.Module) -> torch.nn.Module:
    """The model's shared rotary-embedding module (e.g. `model.model.rotary_emb`)."""
    for name, module in model.named_modules():
        if name.split(".")[-1] == "rotary_emb" and any(n.endswith("inv_freq") for n, _ in module.named_buffers()):
            return module
    raise UnsupportedModelError(
        f"{type(model).__name__} has no rotary position embedding (RoPE). StreamingLLM assigns positions "
        "within the cache, which needs relative (rotary) positions; models with learned absolute position "
        "embeddings (e.g. GPT-2) or ALiBi cannot be streamed exactly by this engine."
    )


@dataclass
class LayerRope:
    """The rotary parameters one attention layer uses.

    `inv_freq` is read from the rotary module at use time (dynamic RoPE types change it).
    `interleaved` says how pairs are laid out: False for the `rotate_half` layout (first half /
    second half, used by Llama, Qwen, Gemma, Phi3, GPT-NeoX), True for adjacent pairs.
    Only the first `2 * len(inv_freq)` channels rotate (partial rotary: Phi, GPT-NeoX).
    """

    module: torch.nn.Module
    buffer_name: str
    interleaved: bool

    @property
    def inv_freq(self) -> torch.Tensor:
        return getattr(self.module, self.buffer_name)

    @property
    def key(self) -> tuple:
        """Identifies these rotary parameters as they are now (a memo key: a changed `inv_freq`
        gives a new one)."""
        return id(self.module), self.buffer_name, self.inv_freq._version

    def cos_sin(self, delta: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin for rotating by `delta` positions; delta (T,) int/float -> each (T, rot_dim)."""
        freqs = self.inv_freq.detach().to(device=delta.device, dtype=torch.float32).double()
        angles = torch.remainder(delta.double()[:, None] * freqs[None, :], TWO_PI)  # (T, rot_dim/2)
        if self.interleaved:
            angles = angles.repeat_interleave(2, dim=-1)
        else:
            angles = torch.cat([angles, angles], dim=-1)
        return angles.cos().to(dtype), angles.sin().to(dtype)

    def rotate(self, x: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        """Rotate x (..., T, D) by delta (T,) positions (a pure rotation, no scaling)."""
        cos, sin = self.cos_sin(delta, x.dtype)
        return apply_rotation(x, cos, sin, self.interleaved)


def apply_rotation(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleaved: bool) -> torch.Tensor:
    """x (..., T, D) rotated with cos/sin (T, R), R <= D: the first R channels rotate, the rest pass."""
    rot = cos.shape[-1]
    x_rot, x_pass = x[..., :rot], x[..., rot:]
    if interleaved:
        pairs = x_rot.unflatten(-1, (-1, 2))
        turned = torch.stack((-pairs[..., 1], pairs[..., 0]), dim=-1).flatten(-2)
    else:
        half = rot // 2
        turned = torch.cat((-x_rot[..., half:], x_rot[..., :half]), dim=-1)
    out = x_rot * cos + turned * sin
    return torch.cat((out, x_pass), dim=-1) if x_pass.shape[-1] else out


def _detect_interleaved(module: torch.nn.Module, buffer_name: str, layer_type: str | None) -> bool:
    """Ask the rotary module for cos at position 1 and read its channel layout."""
    inv_freq = getattr(module, buffer_name)
    n = inv_freq.numel()
    if n < 2:
        return False
    x = torch.zeros(1, 1, 2 * n, dtype=torch.float32, device=inv_freq.device)
    pos = torch.ones(1, 1, dtype=torch.long, device=inv_freq.device)
    with torch.no_grad():
        try:
            cos, _ = module(x, pos, layer_type) if layer_type is not None else module(x, pos)
        except TypeError:
            cos, _ = module(x, pos)
    cos = cos.reshape(-1).float()
    if torch.allclose(cos[:n], cos[n:], atol=1e-6):
        return False
    if torch.allclose(cos[0::2], cos[1::2], atol=1e-6):
        return True
    raise UnsupportedModelError("unrecognised rotary layout: cos is neither half-split nor interleaved")


def layer_ropes(model: torch.nn.Module, layer_types: list[str]) -> list[LayerRope]:
    """One LayerRope per decoder layer. Models with per-layer-type rotary (Gemma3) keep a
    `{layer_type}_inv_freq` buffer per type; the others one `inv_freq`."""
    module = find_rotary_module(model)
    ropes: dict[str, LayerRope] = {}
    out = []
    for layer_type in layer_types:
        if layer_type not in ropes:
            name = f"{layer_type}_inv_freq"
            typed = hasattr(module, name)
            name = name if typed else "inv_freq"
            if not hasattr(module, name):
                raise UnsupportedModelError(f"rotary module has no inv_freq for layer type {layer_type!r}")
            ropes[layer_type] = LayerRope(module, name, _detect_interleaved(module, name, layer_type if typed else None))
        out.append(ropes[layer_type])
    return out
