"""One decode step's attention call, the grouped-query heads as rows against `enable_gqa`.

A decoded token is one query per row. `core.attention.decode_attention` lays the G query heads
that share a KV head out as that head's G query rows, (B, Hkv, G, D), so SDPA reads each KV head
once; `enable_gqa=True` on the CPU expands K and V to Hq heads first. This times both forms of the
call, interleaved, per ring dtype, rows and cached slots, at the default model's head shapes
(9 query heads, 3 KV heads, head dim 64), with a mask that hides a few slots as a decode step's
does, and prints the median per call, their ratio and the largest difference of the outputs, then
one JSON line. It measures the call alone, not a whole decode step (`profile_decode.py` does).

    PYTHONPATH=src python benchmarks/decode_attention.py --threads 2
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rows", default="1,8")
    p.add_argument("--slots", default="256,1024,1280")
    p.add_argument("--dtypes", default="float32,bfloat16,float16")
    p.add_argument("--heads", default="9,3,64", help="query heads, KV heads, head dim")
    p.add_argument("--reps", type=int, default=300)
    args = p.parse_args(argv)
    import torch
    import torch.nn.functional as F

    from streaming_llm.core.attention import decode_attention

    torch.set_num_threads(args.threads)
    hq, hkv, d = (int(x) for x in args.heads.split(","))
    g = torch.Generator().manual_seed(0)
    rows = []
    print(f"{'dtype':<9} {'rows':>4} {'slots':>5}  {'enable_gqa us':>13} {'grouped us':>10}  {'grouped/gqa':>11}  max |diff|")
    for dtype in args.dtypes.split(","):
        dt = getattr(torch, dtype)
        for b in (int(x) for x in args.rows.split(",")):
            for n in (int(x) for x in args.slots.split(",")):
                q = torch.randn(b, hq, 1, d, generator=g).to(dt)
                k = torch.randn(b, hkv, n, d, generator=g).to(dt)
                v = torch.randn(b, hkv, n, d, generator=g).to(dt)
                mask = torch.ones(b, 1, 1, n, dtype=torch.bool)
                mask[..., n - 8:] = False
                calls = {"gqa": lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True),
                         "grouped": lambda: decode_attention(q, k, v, mask, None)}
                times = {name: [] for name in calls}
                with torch.no_grad():
                    for i in range(20 + args.reps):
                        for name, call in (calls.items() if i % 2 else reversed(calls.items())):
                            t0 = time.perf_counter()
                            call()
                            if i >= 20:
                                times[name].append((time.perf_counter() - t0) * 1e6)
                    diff = (calls["gqa"]().float() - calls["grouped"]().float()).abs().max().item()
                gqa, grp = statistics.median(times["gqa"]), statistics.median(times["grouped"])
                rows.append({"dtype": dtype, "rows": b, "slots": n, "gqa_us": round(gqa, 1),
                             "grouped_us": round(grp, 1), "ratio": round(grp / gqa, 3), "max_diff": diff})
                print(f"{dtype:<9} {b:>4} {n:>5}  {gqa:>13.1f} {grp:>10.1f}  {grp / gqa:>11.3f}  {diff:.2e}")
    print(json.dumps({"threads": args.threads, "heads": [hq, hkv, d], "load_avg": round(os.getloadavg()[0], 2),
                      "rows": rows}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
