"""Diagnostic (issue 14, docs/server.md "Not done"): would int8 activations make an 8-row decode
step cheaper? The default model's decoder linears run the packed int4 kernel
(`aten._weight_int4pack_mm_for_cpu`, bfloat16 activations), whose cost grows with the rows of a
batched decode step. An int8 x int8 product with int32 sums (`torch._int_mm`, VNNI where the CPU
has it) is exact in its sums, so a row would keep its bits at any row count, and it does 4x the
multiply-adds per instruction. Here one linear of each decoder shape is timed three ways, 1 and
8 rows of one token each:

  int4     the product's `QuantLinear` (bits=4), as `--quant auto` decodes
  int_mm   `torch._int_mm` alone, activations already int8 (the floor of the idea)
  w8a8     a whole W8A8 linear: int8 weights per output channel, each row's activations
           quantized to int8 by its own max (one scale per row), `_int_mm`, both scales applied

Random weights and inputs (speed does not depend on the values); mean ms of 300 calls after 10
warm-ups, the three interleaved per shape and repeated `--rounds` times. Not a product path: it
measures whether one is worth building.

    PYTHONPATH=src .venv/bin/python docs/results/server_load/w8a8/w8a8_linear.py --threads 2
"""

from __future__ import annotations

import argparse
import time

import torch
from torch import nn

from streaming_llm.bench.hardware import cpu_model
from streaming_llm.models.quantize import QuantLinear

SHAPES = [(576, 576), (192, 576), (1536, 576), (576, 1536)]  # (out, in) of SmolLM2-135M's decoder


class W8A8(nn.Module):
    def __init__(self, linear: nn.Linear):
        super().__init__()
        w = linear.weight.detach().float()
        self.scale = w.abs().amax(1).clamp(min=1e-12) / 127  # (N,)
        self.q = torch.round(w / self.scale[:, None]).clamp(-127, 127).to(torch.int8)  # (N, K)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(-1, x.shape[-1])
        a = torch.linalg.vector_norm(x2, float("inf"), dim=-1, keepdim=True).clamp_(min=1e-12)
        xq = torch.round(x2 * (127 / a)).to(torch.int8)
        y = torch._int_mm(xq, self.q.t()) * self.scale * (a / 127)
        return y.view(*x.shape[:-1], -1)


def mean_ms(f, n: int = 300) -> float:
    for _ in range(10):
        f()
    t0 = time.perf_counter()
    for _ in range(n):
        f()
    return (time.perf_counter() - t0) / n * 1e3


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=2)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    print(f"cpu {cpu_model()}, {a.threads} threads; mean ms per call: int4 / int_mm / w8a8")
    for r in range(a.rounds):
        total = {m: {"int4": 0.0, "int_mm": 0.0, "w8a8": 0.0} for m in (1, 8)}
        for n, k in SHAPES:
            lin = nn.Linear(k, n, bias=False)
            int4, w8 = QuantLinear(lin, 4), W8A8(lin)
            line = []
            for m in (1, 8):
                x = torch.randn(m, 1, k)
                xq = torch.randint(-127, 128, (m, k), dtype=torch.int8)
                t = {"int4": mean_ms(lambda: int4(x)), "int_mm": mean_ms(lambda: torch._int_mm(xq, w8.q.t())),
                     "w8a8": mean_ms(lambda: w8(x))}
                for key, v in t.items():
                    total[m][key] += v * (2 if (n, k) in ((576, 576), (192, 576), (1536, 576)) else 1)
                line.append(f"M{m}: {t['int4']:.3f} / {t['int_mm']:.3f} / {t['w8a8']:.3f}")
            print(f"round {r} {n}x{k}  " + "  ".join(line), flush=True)
        for m, t in total.items():  # one layer: q, o (576x576), k, v (192x576), gate, up (1536x576), down
            print(f"round {r} one decoder layer, {m} row(s): int4 {t['int4']:.3f} ms, int_mm {t['int_mm']:.3f} ms, "
                  f"w8a8 {t['w8a8']:.3f} ms", flush=True)


if __name__ == "__main__":
    main()
