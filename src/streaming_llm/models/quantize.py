"""Weight-only int8 / int4 / bfloat16 linear layers for fast CPU decoding and chunked evaluation.

Decoding one token reads every weight once, so it is memory-bound: fewer bytes per weight is
fewer milliseconds. `quantize_linears(model, mode)` swaps each `nn.Linear` (the output head
included) for a `QuantLinear` holding int8 weights (per-output-channel scales) or int4 ones
(asymmetric groups of 32 with a scale and a minimum, the same layout as GGUF Q4_1, so the default
model's 4-bit weights map onto it almost exactly), float32 in and out. Two kernels run them:
- the native one (`models/qlinear.c` via `native.linear`, where the CPU has AVX512-VNNI or AVX2
  and a C compiler is present): each row's inputs quantized to int8 per group of 32, exact byte-product
  sums, scales and minimums in float16 (`pack_native`; a layer whose scales float16 cannot hold
  keeps torch's kernel). Its cost grows slowly with the rows: a batch of 8 rows or a chunk rides
  almost free;
- else PyTorch's packed kernels with bfloat16 inputs (their float32 paths are 20-90x slower on
  this CPU): `_weight_int8pack_mm` and `_weight_int4pack_mm_for_cpu` (scale and zero point in
  bfloat16).
Both give a row the same bits whatever other rows share its call. Embedding lookups stay as they are.

Many-row inputs (batched decode, chunked prefill) can take a *wide* copy of the weights instead,
whose cost stays almost flat in the rows: bfloat16 through oneDNN (AMX where the CPU has it) or
float16 through FBGEMM's packed float16 GEMM (`quantized::linear_dynamic_fp16`: float16 weights,
float32 arithmetic; x86 builds of torch, fast on AVX2). Its input is rounded to bfloat16 like the
packed kernels' input, so a row gives nearly the same numbers on either path.

`--quant auto` is chosen by timing the formats on the machine at hand (`calibrate.py`).
This changes the model's numbers slightly; `streaming-llm ppl` measures by how much. It does not
touch attention or the cache; it only records which ring dtype pays for a quantized model on this
CPU (`kv_ring.py`, read by `core.engine.resolve_kv_dtype`).
"""

from __future__ import annotations

import torch
from torch import nn

from . import QUANT_CHOICES, kv_ring, native

GROUP = 32
COMPUTE = torch.bfloat16  # the kernels' fast input dtype; outputs are cast back
WIDE_KINDS = ("bf16", "fp16")  # the wide copies (see the module docstring)


def fp16_gemm_available() -> bool:
    """Whether this torch build has FBGEMM's packed float16 linear (x86 builds do; ARM ones do not)."""
    return hasattr(torch.ops.quantized, "linear_prepack_fp16") and "fbgemm" in torch.backends.quantized.supported_engines


def amx_available() -> bool:
    """Whether this CPU has AMX tiles (oneDNN's bfloat16 matmul runs on them; private torch probe)."""
    return bool(getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)())


class QuantLinear(nn.Module):
    """y = x @ W^T + b with W stored as int8 (per-channel), packed int4 (per group of 32) or
    bfloat16 (bits=16: oneDNN's bfloat16 matmul, AMX where the CPU has it).

    `wide_rows`: inputs of at least this many tokens per stream (chunked prefill and evaluation)
    go through a `wide_kind` copy of the weights ("bf16": a bfloat16 matmul, flat on AMX; "fp16":
    FBGEMM's packed float16 GEMM, flat on AVX2) instead of the int4/int8 kernel, whose cost grows
    with the rows; None: never. Tokens per stream are the input's second-to-last dimension: a
    batch of B streams fed C tokens each, (B, C, D), counts C, so a row's kernel, and with it its
    numerics, never depends on how many other streams share its forward (the int4/int8 kernels
    give each row the same bits at any row count: a batched decode row equals its stream alone).
    `--quant auto` measures where the copy pays and which copy on the machine at hand
    (`calibrate.py`)."""

    def __init__(self, linear: nn.Linear, bits: int, wide_rows: int | None = None, wide_kind: str = "bf16"):
        super().__init__()
        w = linear.weight.detach().float()
        self.in_features, self.out_features, self.bits = linear.in_features, linear.out_features, bits
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().float(), requires_grad=False)
        if wide_kind not in WIDE_KINDS:
            raise ValueError(f"wide_kind must be one of {WIDE_KINDS}, got {wide_kind!r}")
        self.wide_rows = None if bits == 16 else wide_rows
        self.wide_kind = wide_kind
        # read only by many-row inputs: a plain attribute, not a buffer, so that what counts a decode
        # step's weight bytes (bench's bandwidth floor) does not count it. bf16: the (N, K) tensor;
        # fp16: FBGEMM's packed weights (an opaque torch object)
        self.wide = None
        if self.wide_rows is not None:
            self.wide = w.to(COMPUTE) if wide_kind == "bf16" else torch.ops.quantized.linear_prepack_fp16(w, None)
        self.native = False  # the weights are in qlinear.c's layout (models/native.py), not torch's
        self.register_buffer("mins", None)
        if bits == 16:
            self.register_buffer("qweight", w.to(COMPUTE))
            self.register_buffer("scales", None)
        elif bits == 8:
            scale = w.abs().amax(dim=1).clamp(min=1e-12) / 127
            q = torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int32)
            packed = pack_native(q + 128, scale, -128 * scale, 8)
            if packed is None:
                self.register_buffer("qweight", q.to(torch.int8))
                self.register_buffer("scales", scale.to(COMPUTE))
        elif bits == 4:
            n, k = w.shape
            g = w.view(n, k // GROUP, GROUP)
            lo, hi = g.amin(-1, keepdim=True), g.amax(-1, keepdim=True)
            scale = ((hi - lo) / 15).clamp(min=1e-12)
            q = torch.round((g - lo) / scale).clamp(0, 15).to(torch.int32).view(n, k)
            packed = pack_native(q, scale[..., 0], lo[..., 0], 4)
            if packed is None:  # torch's kernel convention: w = (q - 8) * scale + zero
                sz = torch.cat([scale, lo + 8 * scale], dim=-1).transpose(0, 1).contiguous()  # (K/G, N, 2)
                self.register_buffer("qweight", torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1))
                self.register_buffer("scales", sz.to(COMPUTE))
        else:
            raise ValueError(f"bits must be 4, 8 or 16, got {bits}")
        if bits != 16 and packed is not None:
            self.native = True
            for name, t in zip(("qweight", "scales", "mins"), packed):
                self.register_buffer(name, t)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        wide = self.wide_rows is not None and x.dim() > 1 and x.shape[-2] >= self.wide_rows  # tokens per stream
        if self.native and not wide:  # int8 codes of the inputs, per group of 32 (qlinear.c), in x's shape
            y = native.linear(x, self.qweight, self.scales, self.mins, self.bits == 4, self.bits, self.out_features)
            # (a decoder runs hundreds of these a token: no casts or views it does not need)
            return y if self.bias is None and x.dtype == torch.float32 else self._finish(x, y)
        x2 = (x if x.dim() == 2 else x.reshape(-1, x.shape[-1])).to(COMPUTE)
        if self.bits == 16:
            y = torch.nn.functional.linear(x2, self.qweight)
        elif wide:
            if self.wide_kind == "bf16":
                y = torch.nn.functional.linear(x2, self.wide)
            else:  # float32 in and out; x2 is already rounded to bfloat16 as the packed kernels see it
                y = torch.ops.quantized.linear_dynamic_fp16(x2.float(), self.wide)
        elif self.bits == 8:
            y = torch.ops.aten._weight_int8pack_mm(x2, self.qweight, self.scales)
        else:
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(x2, self.qweight, GROUP, self.scales)
        return self._finish(x, y)

    def _finish(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        y = y.to(x.dtype)
        if self.bias is not None:
            y = y + self.bias
        return y if x.dim() == 2 else y.view(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        wide = "" if self.wide_rows is None else f", {self.wide_kind} from {self.wide_rows} tokens per stream"
        kernel = ", native" if self.native else ""
        return f"in={self.in_features}, out={self.out_features}, bits={self.bits}{kernel}{wide}"


NATIVE_TILE = 16  # outputs per tile of qlinear.c
F16_SMALLEST = 2.0 ** -14  # float16's smallest normal number


def pack_native(codes: torch.Tensor, scale: torch.Tensor, mins: torch.Tensor, bits: int):
    """(weights, scales, mins) in qlinear.c's layout (its header comment) for w = codes * scale +
    mins, codes (N, K) unsigned (int4: 0..15, int8: 0..255), scale and mins (N, K/32) for int4,
    (N,) for int8; None where the native linear does not run here or does not fit: no vector
    path in this build (`native.linear_available`), N not a multiple of 16, or a scale or minimum that float16
    cannot hold to its full precision (then the layer keeps torch's packed kernel)."""
    n, k = codes.shape
    if not native.linear_available() or n % NATIVE_TILE or k % GROUP:
        return None
    sm = torch.stack([scale, mins]).float()
    if not bool(((sm == 0) | ((sm.abs() >= F16_SMALLEST) & (sm.abs() <= 65504))).all()):
        return None
    return native_layout(codes, scale, mins, bits)


def native_layout(codes: torch.Tensor, scale: torch.Tensor, mins: torch.Tensor, bits: int):
    """`pack_native`'s layout without its checks (N a multiple of 16, K of 32)."""
    n, k = codes.shape
    t, g = n // NATIVE_TILE, k // GROUP
    if bits == 4:
        c = codes.view(t, NATIVE_TILE, g, 4, 2, 4).permute(0, 2, 3, 1, 5, 4)  # tile, group, chunk, lane, j, nibble
        weights = (c[..., 0] | (c[..., 1] << 4)).to(torch.uint8).contiguous()
        per = lambda v: v.reshape(t, NATIVE_TILE, g).permute(0, 2, 1).contiguous().half()  # noqa: E731
    else:
        weights = codes.view(t, NATIVE_TILE, g * 8, 4).permute(0, 2, 1, 3).to(torch.uint8).contiguous()
        per = lambda v: v.reshape(t, NATIVE_TILE).contiguous().half()  # noqa: E731
    return weights.view(-1), per(scale), per(mins)


def wide_thresholds(model: nn.Module) -> tuple[int | None, int | None]:
    """(the fewest tokens per stream from which some decoder linear takes its wide copy, the same
    for the output head): None where none does. Where an input's shape changes the kernel."""
    head = model.get_output_embeddings()
    dec = [m.wide_rows for m in model.modules() if isinstance(m, QuantLinear) and m is not head and m.wide_rows]
    return min(dec) if dec else None, head.wide_rows if isinstance(head, QuantLinear) else None


def format_bits(mode: str, is_head: bool) -> int:
    """The bits `quantize_linears` gives a linear in `mode` (the head: int8 in int4 mode)."""
    return 16 if mode == "bf16" else 8 if mode == "int8" or is_head else 4


def quantizable(linear: nn.Linear, bits: int) -> bool:
    return bits != 4 or linear.in_features % GROUP == 0


QUANT_MODES = QUANT_CHOICES  # the one home: models/__init__.py


def on_4bit_grid(weight: torch.Tensor) -> bool:
    """True if the groups of 32 weights are scale * q + min with q in 0..15 (a GGUF Q4 tensor),
    judged on the first rows (a sample keeps this cheap)."""
    n, k = weight.shape
    if k % GROUP:
        return False
    n = min(n, 16)
    g = weight.detach()[:n].float().reshape(n, k // GROUP, GROUP)
    lo, hi = g.amin(-1, keepdim=True), g.amax(-1, keepdim=True)
    scale = ((hi - lo) / 15).clamp(min=1e-12)
    resid = (g - lo) / scale
    return bool((resid - resid.round()).abs().max() < 1e-2)


def resolve_mode(model: nn.Module, mode: str) -> str:
    """The rule for "auto" where nothing is measured: "int4" when the decoder's linears already hold 4-bit weights (a model converted
    from a Q4 GGUF, so int4 loses nothing but bf16 rounding), else "none"."""
    if mode != "auto":
        return mode
    head = model.get_output_embeddings()
    linears = [m for m in model.modules() if isinstance(m, nn.Linear) and m is not head]
    on_grid = sum(on_4bit_grid(m.weight) for m in linears)
    return "int4" if linears and on_grid >= 0.9 * len(linears) else "none"


def quantize_linears(model: nn.Module, mode: str, wide_rows: int | None = None, wide_kind: str = "bf16",
                     head_wide: tuple[int | None, str] | None = None) -> nn.Module:
    """Replace every eligible nn.Linear of `model` in place (CPU, float32 in and out).

    "int8": all linears int8 per channel. "int4": decoder linears int4 (groups of 32), the output
    head int8: the head is shared with the embedding, which GGUF files keep at higher precision.
    "bf16": all linears bfloat16 (AMX through oneDNN where the CPU has it: for prefill, chunked
    evaluation and batches, not for one-token decode). `wide_rows` (int4/int8): inputs of that
    many rows or more use a `wide_kind` copy of the weights (`QuantLinear`); `head_wide`
    (rows, kind) gives the output head its own (None: as the others). "auto": the fastest allowed
    format and both wide paths measured on this machine (`calibrate.choose_auto`; without a
    measurement, `resolve_mode` and no wide path)."""
    if mode == "auto":
        from .calibrate import choose_auto

        mode = choose_auto(model)
        wide_rows = model.config.streaming_llm_quant_calibration.get("wide_rows")
        wide_kind = model.config.streaming_llm_quant_calibration.get("wide_kind") or "bf16"
        head_wide = (model.config.streaming_llm_quant_calibration.get("head_wide_rows"),
                     model.config.streaming_llm_quant_calibration.get("head_wide_kind") or "bf16")
    if mode == "none":
        return model
    if mode not in QUANT_MODES:
        raise ValueError(f"quantization must be one of {QUANT_MODES}, got {mode!r}")
    head = model.get_output_embeddings()
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.Linear):
                bits = format_bits(mode, child is head)
                rows, kind = head_wide if child is head and head_wide is not None else (wide_rows, wide_kind)
                if quantizable(child, bits):
                    setattr(parent, name, QuantLinear(child, bits, rows, kind))
    model.config.streaming_llm_quant = mode
    model.config.streaming_llm_wide_rows = wide_rows if mode != "bf16" else None
    model.config.streaming_llm_wide_kind = wide_kind if model.config.streaming_llm_wide_rows else None
    model.config.streaming_llm_head_wide = head_wide if mode != "bf16" else None
    ring = kv_ring.choose(model)  # the streaming cache's storage dtype that pays here (core.engine reads it)
    model.config.streaming_llm_kv_ring = ring["choice"]
    model.config.streaming_llm_kv_ring_calibration = {k: ring.get(k) for k in ("source", "timings_ms", "path")}
    return model
