"""Weight-only int8 / int4 linear layers for fast CPU decoding.

Decoding one token reads every weight once, so it is memory-bound: fewer bytes per weight is
fewer milliseconds. `quantize_linears(model, bits)` swaps each `nn.Linear` (the output head
included) for a `QuantLinear` that keeps activations in float32 and calls PyTorch's packed
kernels (`_weight_int8pack_mm`: per-output-channel scales; `_weight_int4pack_mm_for_cpu`:
asymmetric groups of 32 with a scale and a zero point, the same layout as GGUF Q4_1, so the
default model's 4-bit weights map onto it almost exactly). Embedding lookups stay as they are.

This changes the model's numbers slightly; `streaming-llm ppl` measures by how much. It does not
touch attention or the cache.
"""

from __future__ import annotations

import torch
from torch import nn

GROUP = 32


class QuantLinear(nn.Module):
    """y = x @ W^T + b with W stored as int8 (per-channel) or packed int4 (per group of 32)."""

    def __init__(self, linear: nn.Linear, bits: int):
        super().__init__()
        w = linear.weight.detach().float()
        self.in_features, self.out_features, self.bits = linear.in_features, linear.out_features, bits
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().float(), requires_grad=False)
        if bits == 8:
            scale = w.abs().amax(dim=1).clamp(min=1e-12) / 127
            self.register_buffer("qweight", torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8))
            self.register_buffer("scales", scale)
        elif bits == 4:
            n, k = w.shape
            g = w.view(n, k // GROUP, GROUP)
            lo, hi = g.amin(-1, keepdim=True), g.amax(-1, keepdim=True)
            scale = ((hi - lo) / 15).clamp(min=1e-12)
            q = torch.round((g - lo) / scale).clamp(0, 15).to(torch.int32).view(n, k)
            # kernel convention: w = (q - 8) * scale + zero
            sz = torch.cat([scale, lo + 8 * scale], dim=-1).transpose(0, 1).contiguous()  # (K/G, N, 2)
            self.register_buffer("qweight", torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1))
            self.register_buffer("scales", sz)
        else:
            raise ValueError(f"bits must be 4 or 8, got {bits}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1]).float()
        if self.bits == 8:
            y = torch.ops.aten._weight_int8pack_mm(x2, self.qweight, self.scales)
        else:
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(x2, self.qweight, GROUP, self.scales)
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*shape[:-1], self.out_features).to(x.dtype)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, bits={self.bits}"


def quantizable(linear: nn.Linear, bits: int) -> bool:
    return bits == 8 or linear.in_features % GROUP == 0


def quantize_linears(model: nn.Module, bits: int) -> nn.Module:
    """Replace every eligible nn.Linear of `model` in place (CPU, float32 activations)."""
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.Linear) and quantizable(child, bits):
                setattr(parent, name, QuantLinear(child, bits))
    model.config.streaming_llm_weight_bits = bits
    return model
