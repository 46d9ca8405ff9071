"""`streaming-llm ppl`: stream a text through a model and report perplexity.

Tokenizes the text without special tokens, keeps the first `--max-tokens` tokens t_0..t_{N-1},
and scores every t_i (i >= 1) given t_<i under the chosen method, writing one JSON line per
predicted token to `--per-token-out`: {"i": i, "token": t_i, "nll": -log p(t_i | t_<i)}.
Feeding is chunked with exact streaming semantics; `--reference` feeds one token per forward
(the paper's evaluation loop) to check that. Prints the perplexity, then a one-line JSON summary.
This module scores a stream; it does not build corpora or draw plots.
"""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path
from typing import Iterator

from .errors import UserError

DEFAULT_MODEL = "smollm2-135m-instruct"


def add_model_arguments(p, quant_default: str = "none") -> None:
    """Flags shared by every verb that loads a model and streams through it."""
    from .config import DEFAULT_CHUNK, DEFAULT_SINKS, DEFAULT_WINDOW, METHODS, POSITIONS

    p.add_argument("--model", default=DEFAULT_MODEL, help="alias, local folder, .gguf file or hub id")
    p.add_argument("--method", default="streaming", choices=METHODS)
    p.add_argument("--sinks", type=int, default=DEFAULT_SINKS, help="attention sinks kept (0 for --method window)")
    p.add_argument("--window", type=int, default=DEFAULT_WINDOW, help="most recent tokens kept")
    p.add_argument("--positions", default="cache", choices=POSITIONS, help="cache: the paper; absolute: ablation")
    p.add_argument("--chunk-size", type=int, default=DEFAULT_CHUNK, help="tokens per forward when feeding")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--device", default="cpu")
    p.add_argument("--quant", default=quant_default, choices=["auto", "none", "int8", "int4"],
                   help="weight-only quantization of the linear layers for CPU decoding speed; auto: int4 "
                   "when the weights are already 4-bit (Q4 GGUF models), else none (default: %(default)s)")


def load_model_from_args(args):
    """(model, tokenizer) as the shared model flags say, quantized if asked."""
    from .loading import load_model
    from .quantize import quantize_linears

    model, tokenizer = load_model(args.model, dtype=args.dtype, device=args.device)
    quant = getattr(args, "quant", "none")
    if quant == "auto" and (args.device != "cpu" or args.dtype != "float32"):
        quant = "none"
    if quant != "none":
        if args.device != "cpu" or args.dtype != "float32":
            raise UserError("--quant needs --device cpu and --dtype float32")
        quantize_linears(model, quant)
    return model, tokenizer


def config_from_args(args):
    from .config import StreamingConfig

    return StreamingConfig(
        method=args.method, sinks=args.sinks, window=args.window, positions=args.positions, chunk_size=args.chunk_size
    )


def add_arguments(p) -> None:
    add_model_arguments(p)
    p.add_argument("--text", required=True, help="UTF-8 text file to stream")
    p.add_argument("--max-tokens", type=int, default=None, help="use only the first N tokens")
    p.add_argument("--per-token-out", default=None, help="write per-token NLL as JSONL here")
    p.add_argument("--reference", action="store_true", help="feed one token per forward (slow; for checking)")
    p.add_argument("--no-progress", action="store_true")


def read_text(path: str) -> str:
    p = Path(path)
    if not p.is_file():
        raise UserError(f"text file not found: {path}")
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"{path} is not valid UTF-8 text ({e.reason} at byte {e.start})") from None
    if not text.strip():
        raise UserError(f"{path} is empty")
    return text


def token_nlls(engine, ids, progress: bool = False, desc: str = "ppl") -> Iterator[tuple[int, int, float]]:
    """Yield (i, t_i, -log p(t_i | t_<i)) for i = 1..len(ids)-1, feeding `ids` into `engine`.

    Feeds in blocks of the engine's chunk size; the last logits of one block score the first
    token of the next. Works for every method (recompute feeds token by token internally)."""
    import torch
    from tqdm import tqdm

    ids = torch.as_tensor(ids, dtype=torch.long)
    n = ids.numel()
    block = max(engine.config.chunk_size, 1)
    bar = tqdm(total=n - 1, desc=desc, unit="tok", disable=not progress, file=sys.stderr, dynamic_ncols=True)
    total, count, t0 = 0.0, 0, time.perf_counter()
    prev = None  # logits that predict ids[lo]
    for lo in range(0, n, block):
        hi = min(lo + block, n)
        logits = engine.feed(ids[lo:hi], logits="all")  # (hi-lo, V): logits[k] predicts ids[lo+k+1]
        preds = logits if prev is None else torch.cat([prev[None], logits])
        first = lo + 1 if prev is None else lo
        targets = ids[first:hi]
        scored = preds[: targets.numel()]
        nll = torch.nn.functional.cross_entropy(scored, targets, reduction="none")
        for k, v in enumerate(nll.tolist()):
            yield first + k, int(targets[k]), v
        total, count = total + float(nll.sum()), count + targets.numel()
        prev = logits[-1]
        bar.update(targets.numel())
        if count:
            bar.set_postfix(ppl=f"{math.exp(total / count):.3f}", tok_s=f"{count / (time.perf_counter() - t0):.0f}")
    bar.close()


def run(args) -> int:
    from .engine import StreamingLLM

    text = read_text(args.text)
    if args.max_tokens is not None and args.max_tokens < 2:
        raise UserError(f"--max-tokens must be at least 2 (got {args.max_tokens})")
    config = config_from_args(args)
    if args.reference:
        config = config.with_(chunk_size=1)
    model, tokenizer = load_model_from_args(args)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if args.max_tokens is not None:
        ids = ids[: args.max_tokens]
    if len(ids) < 2:
        raise UserError(f"{args.text} has {len(ids)} token(s); at least 2 are needed to score one")
    engine = StreamingLLM(model, tokenizer, config)
    out = open(args.per_token_out, "w") if args.per_token_out else None
    total, count, t0 = 0.0, 0, time.perf_counter()
    try:
        for i, tok, nll in token_nlls(engine, ids, progress=not args.no_progress):
            total, count = total + nll, count + 1
            if out:
                out.write(json.dumps({"i": i, "token": tok, "nll": nll}) + "\n")
    finally:
        if out:
            out.close()
    seconds = time.perf_counter() - t0
    ppl = math.exp(total / count)
    print(f"perplexity: {ppl:.4f} over {count} predicted tokens ({config.method}, sinks {config.sinks}, "
          f"window {config.window}, {count / seconds:.1f} tok/s)")
    summary = {
        "model": args.model,
        **config.to_dict(),
        "dtype": args.dtype,
        "quant": args.quant,
        "tokens": len(ids),
        "predicted": count,
        "nll_mean": total / count,
        "ppl": ppl,
        "seconds": round(seconds, 3),
        "tokens_per_s": round(count / seconds, 2),
    }
    print(json.dumps(summary))
    return 0
