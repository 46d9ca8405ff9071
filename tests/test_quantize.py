"""Weight-only int8/int4 linears: exact on 4-bit-grid weights, close otherwise, usable by the engine."""

import torch
from torch import nn

from streaming_llm.core.config import StreamingConfig
from streaming_llm.core.engine import StreamingLLM
from streaming_llm.models.quantize import GROUP, QuantLinear, quantize_linears
from tiny_models import tiny_model


def grid_linear(n=48, k=96, seed=0):
    """A Linear whose weights are Q4_1-style: per group of 32, scale * q + min with q in 0..15."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randint(0, 16, (n, k // GROUP, GROUP), generator=g).float()
    q[..., 0], q[..., 1] = 0, 15  # every group spans the full range, as GGUF Q4_1 blocks do
    scale = torch.rand(n, k // GROUP, 1, generator=g) * 0.1 + 0.01
    lo = torch.randn(n, k // GROUP, 1, generator=g) * 0.1
    lin = nn.Linear(k, n, bias=True)
    with torch.no_grad():
        lin.weight.copy_((q * scale + lo).view(n, k))
    return lin


def test_int4_reproduces_4bit_grid_weights_to_bf16_precision():
    """Weights already on a Q4_1 grid come back up to bf16 rounding; arbitrary weights do not."""
    eye = torch.eye(96)
    grid = grid_linear()
    err = (QuantLinear(grid, 4)(eye).t() - grid.bias[:, None] - grid.weight).abs().max()
    assert err < 2 ** -7 * grid.weight.abs().max()  # bf16 scales and bf16 outputs: two roundings
    rough = nn.Linear(96, 48)
    err_rough = (QuantLinear(rough, 4)(eye).t() - rough.bias[:, None] - rough.weight).abs().max()
    assert err_rough / rough.weight.abs().max() > 4 * err / grid.weight.abs().max()


def test_int8_is_close():
    lin = nn.Linear(64, 40)
    x = torch.randn(3, 64)
    ref = lin(x)
    assert (QuantLinear(lin, 8)(x) - ref).abs().max() < 0.01 * ref.abs().max()


def test_quantized_model_streams_and_stays_close():
    model = tiny_model("llama")
    ids = torch.randint(0, 96, (40,), generator=torch.Generator().manual_seed(3))
    ref = StreamingLLM(model, None, StreamingConfig(sinks=2, window=8)).feed(ids)
    q = quantize_linears(tiny_model("llama"), "int8")
    assert any(isinstance(m, QuantLinear) for m in q.modules())
    out = StreamingLLM(q, None, StreamingConfig(sinks=2, window=8, chunk_size=5)).feed(ids)
    assert (out - ref).abs().max() < 0.05 * ref.abs().max()


def test_auto_quantizes_only_models_whose_weights_are_already_4bit():
    from streaming_llm.models.quantize import resolve_mode

    model = tiny_model("llama")
    assert resolve_mode(model, "auto") == "none"
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.Linear) and m is not model.get_output_embeddings():
                m.weight.copy_(grid_linear(*m.weight.shape).weight)
    assert resolve_mode(model, "auto") == "int4"
