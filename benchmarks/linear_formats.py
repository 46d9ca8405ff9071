"""Chunked streaming evaluation with each linear-layer format: speed and per-token NLL drift.

Feeds the same text (the offline corpus's first tokens) to a 4+1020 streaming engine over the
default model in each format (`none` = float32; the others with the bfloat16 KV ring that
`kv_dtype="auto"` gives quantized models; `bf16`, `int4`, `int4` with its bfloat16 wide path
for many-row inputs), chunked (`--chunk` tokens per forward: the chunked evaluation of
`streaming-llm ppl` / `reproduce throughput`) and, for float32, also token by token (the
reference path, on `--reference-tokens` tokens). Prints, per format, tokens/s, the speed-up over
float32's token-by-token path and the per-token NLL difference to float32 chunked (max, mean) and
the perplexity. The last stdout line is JSON; `--json` writes the same there.

It does NOT change any default: it measures. Run with the thread count you want to measure
(`STREAMING_LLM_THREADS` or `--threads`).

    PYTHONPATH=src python benchmarks/linear_formats.py --tokens 3000 --reference-tokens 300
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time

FORMATS = ("none", "bf16", "int4", "int4+wide")
CACHE_WARM = 1024  # tokens fed first so every scored token evicts one (as `reproduce throughput`)


def nll_of(engine, ids, chunk: int, prog=None) -> tuple[list[float], float]:
    """Per-token NLL of ids[CACHE_WARM + 1:] (each predicted from the stream before it), and the
    seconds spent in the scored forwards."""
    import torch

    engine.feed(ids[:CACHE_WARM], logits="none")
    nll, t = [], 0.0
    for lo in range(CACHE_WARM, ids.numel(), chunk):
        part = ids[lo : lo + chunk]
        t0 = time.perf_counter()
        logits = engine.feed(part, logits="all")  # (len(part), V): position i predicts token i + 1
        t += time.perf_counter() - t0
        targets = ids[lo + 1 : lo + 1 + part.numel()]
        lp = torch.log_softmax(logits[: targets.numel()].float(), dim=-1)
        nll += (-lp.gather(1, targets[:, None].long())[:, 0]).tolist()
        if prog is not None:
            prog.update(part.numel())
    return nll, t


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--tokens", type=int, default=3000, help="tokens scored after the first 1024")
    p.add_argument("--reference-tokens", type=int, default=300, help="float32 token-by-token tokens (speed only)")
    p.add_argument("--chunk", type=int, default=512)
    p.add_argument("--formats", default=",".join(FORMATS))
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    formats = [f for f in args.formats.split(",") if f]
    bad = [f for f in formats if f not in FORMATS]
    if bad or args.tokens < 2 or args.chunk < 1:
        print(f"error: formats must be among {FORMATS}, --tokens >= 2, --chunk >= 1", file=sys.stderr)
        return 2

    from streaming_llm.models.threads import apply as apply_threads

    apply_threads(args.threads)
    import copy

    import torch
    from tqdm import tqdm

    from streaming_llm.core.config import StreamingConfig
    from streaming_llm.core.engine import StreamingLLM
    from streaming_llm.eval.data import load_corpus, tokenize_corpus
    from streaming_llm.models.loading import load_model
    from streaming_llm.models.quantize import quantize_linears

    base, tok = load_model(args.model)
    ids = torch.as_tensor(tokenize_corpus(load_corpus(), tok)[0][: CACHE_WARM + args.tokens + 1])
    config = StreamingConfig(sinks=4, window=1020, chunk_size=args.chunk)
    rows, ref_nll = {}, None
    with tqdm(total=len(formats) * (ids.numel() - CACHE_WARM), desc="formats", file=sys.stderr) as prog:
        for fmt in formats:
            mode, wide = (fmt.split("+")[0], 1) if fmt.endswith("+wide") else (fmt, None)
            model = base if mode == "none" else quantize_linears(copy.deepcopy(base), mode, wide_rows=wide)
            engine = StreamingLLM(model, tok, config)  # kv_dtype auto: bfloat16 ring for the quantized formats
            nll, secs = nll_of(engine, ids, args.chunk, prog)
            if ref_nll is None:
                ref_nll = nll
            diff = [abs(a - b) for a, b in zip(nll, ref_nll)]
            rows[fmt] = {"kv_dtype": str(engine.kv_dtype or base.dtype).replace("torch.", ""), "tokens": len(nll), "seconds": round(secs, 3), "tok_s": round(len(nll) / secs, 2),
                         "ppl": round(math.exp(sum(nll) / len(nll)), 4),
                         "max_abs_nll_diff": float(f"{max(diff):.3g}"), "mean_abs_nll_diff": float(f"{sum(diff) / len(diff):.3g}")}
    ref = StreamingLLM(base, tok, config)  # warmed chunked, then one forward per token (the reference path)
    ref.feed(ids[:CACHE_WARM], logits="none")
    n = min(args.reference_tokens, ids.numel() - CACHE_WARM)
    t0 = time.perf_counter()
    for i in tqdm(range(CACHE_WARM, CACHE_WARM + n), desc="token by token", file=sys.stderr):
        ref.feed(ids[i : i + 1], logits="last")
    ref_tok_s = n / (time.perf_counter() - t0)
    print(f"{'format':<10} {'kv':>9} {'tok/s':>9} {'x token-by-token':>17} {'ppl':>10} {'max|dNLL|':>10} {'mean|dNLL|':>11}")
    for fmt, r in rows.items():
        r["speedup_over_token_by_token"] = round(r["tok_s"] / ref_tok_s, 2)
        print(f"{fmt:<10} {r['kv_dtype']:>9} {r['tok_s']:>9.1f} {r['speedup_over_token_by_token']:>17.2f} {r['ppl']:>10.4f} "
              f"{r['max_abs_nll_diff']:>10.3g} {r['mean_abs_nll_diff']:>11.3g}")
    from streaming_llm.bench.hardware import cpu_model

    summary = {"model": args.model, "cpu": cpu_model(), "chunk": args.chunk, "threads": torch.get_num_threads(),
               "reference_tok_s": round(ref_tok_s, 2), "reference_tokens": n, "results": rows}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(summary, f, indent=1)
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
