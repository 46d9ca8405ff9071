"""How one linear layer's time grows with the rows it is given: the default model's shapes, int4 /
int8 / bfloat16 `QuantLinear` against a float32 `nn.Linear`, for 1-16 rows (batched decode).
`--wide` times instead the packed kernel (int4; int8 for the head) against its two wide copies
(`wide_rows=1`: bfloat16 through oneDNN, float16 through FBGEMM), for 1-32 rows.

Random weights (the kernels' speed does not depend on the values); each entry is the mean of 30
calls after 3 warm-up calls, on `--threads` torch threads. Prints one line per shape, ms for
int4/int8/bf16/float32 ("nan": int4 is not used for the output head), and the CPU. It measures;
it chooses nothing (`--quant auto` does that, `models/calibrate.py`).

    PYTHONPATH=src python benchmarks/linear_rows.py --threads 2
    PYTHONPATH=src python benchmarks/linear_rows.py --threads 2 --wide
"""

from __future__ import annotations

import argparse
import sys
import time

SHAPES = [(576, 576), (192, 576), (1536, 576), (576, 1536), (49152, 576)]  # (out, in); the last is the head
ROWS = (1, 2, 4, 8, 16)
WIDE_ROWS = (1, 2, 4, 8, 16, 32)


def mean_ms(f, x, n: int = 30) -> float:
    for _ in range(3):
        f(x)
    t0 = time.perf_counter()
    for _ in range(n):
        f(x)
    return (time.perf_counter() - t0) / n * 1e3


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--wide", action="store_true", help="packed kernel against its bfloat16 and float16 wide copies")
    args = p.parse_args(argv)
    import torch

    from streaming_llm.bench.hardware import cpu_model
    from streaming_llm.models.quantize import QuantLinear

    torch.set_num_threads(args.threads)
    if args.wide:
        return wide(args.threads)
    print(f"cpu {cpu_model()}, {args.threads} threads; ms per call as int4/int8/bf16/float32")
    with torch.inference_mode():
        for n, k in SHAPES:
            lin = torch.nn.Linear(k, n, bias=False)
            q4 = QuantLinear(lin, 4) if n != 49152 else None
            q8, q16 = QuantLinear(lin, 8), QuantLinear(lin, 16)
            cells = []
            for m in ROWS:
                x = torch.randn(m, k)
                times = [mean_ms(q4, x) if q4 else float("nan"), mean_ms(q8, x), mean_ms(q16, x), mean_ms(lin, x)]
                cells.append(f"M{m}: " + "/".join(f"{t:.3f}" for t in times))
            print(n, k, " ".join(cells), flush=True)
    return 0


def wide(threads: int) -> int:
    import torch

    from streaming_llm.bench.hardware import cpu_model
    from streaming_llm.models.quantize import QuantLinear, fp16_gemm_available

    kinds = ["bf16"] + (["fp16"] if fp16_gemm_available() else [])
    print(f"cpu {cpu_model()}, {threads} threads; ms per call as packed/" + "/".join(kinds))
    with torch.inference_mode():
        for n, k in SHAPES:
            lin = torch.nn.Linear(k, n, bias=False)
            bits = 8 if n == 49152 else 4  # the head is int8 in int4 mode
            fs = [QuantLinear(lin, bits)] + [QuantLinear(lin, bits, 1, kind) for kind in kinds]
            cells = []
            for m in WIDE_ROWS:
                x = torch.randn(m, k)
                cells.append(f"M{m}: " + "/".join(f"{mean_ms(f, x):.3f}" for f in fs))
            print(n, k, f"int{bits}", " ".join(cells), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
