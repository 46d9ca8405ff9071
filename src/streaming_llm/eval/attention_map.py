"""`streaming-llm attention-map`: the attention-sink phenomenon (the paper's Fig. 2) in a model.

Runs plain dense forwards (eager attention, `output_attentions=True`) over `--samples` windows of
`--tokens` tokens taken from a text or corpus (each window a sequence of its own: BOS first when the
model's rule or `--bos` says so, see `streaming_llm.models.special_tokens`), and writes to `--out`:
- `attention.npz`: `maps` (chosen layers, T, T): attention averaged over heads (or `--heads`) and
  samples; `first_share` (all layers, T): share of each query's attention that lands on the first
  `--first-k` tokens, averaged over heads and samples, with `share_positions`;
- `summary.json`, and the PNGs `attention_maps.png`, `sink_share.png` (drawn by `plots`).
It uses no streaming cache: this is the model's own dense attention.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import UserError

DEFAULT_OUT = "docs/results/attention"
DEFAULT_TOKENS = 256
DEFAULT_SAMPLES = 4


def add_arguments(p) -> None:
    from ..models import DEFAULT_DTYPE, DEFAULT_MODEL, DTYPE_CHOICES
    from ..models.special_tokens import add_bos_arguments

    p.add_argument("--model", default=DEFAULT_MODEL)
    src = p.add_mutually_exclusive_group()
    src.add_argument("--text", help="UTF-8 text file")
    src.add_argument("--corpus", default="gutenberg", help="corpus source (default: gutenberg)")
    p.add_argument("--tokens", type=int, default=DEFAULT_TOKENS, help="tokens per sample (one dense forward each)")
    p.add_argument("--samples", type=int, default=DEFAULT_SAMPLES, help="windows averaged, spread over the text")
    p.add_argument("--layers", default=None, help="comma-separated layers to draw maps for (default: 5 spread out)")
    p.add_argument("--heads", default=None, help="comma-separated heads to average (default: all)")
    p.add_argument("--first-k", type=int, default=1, help="the share plot counts attention on the first k tokens")
    p.add_argument("--out", default=DEFAULT_OUT)
    p.add_argument("--dtype", default=DEFAULT_DTYPE, choices=DTYPE_CHOICES)
    p.add_argument("--device", default="cpu")
    add_bos_arguments(p)


def _ints(s: str | None, limit: int, what: str) -> list[int] | None:
    if s is None:
        return None
    try:
        vals = [int(x) for x in s.split(",") if x.strip()]
    except ValueError:
        raise UserError(f"--{what} must be comma-separated integers (got {s!r})") from None
    bad = [v for v in vals if not 0 <= v < limit]
    if bad or not vals:
        raise UserError(f"--{what} values must be in 0..{limit - 1} (got {s!r})")
    return vals


def attention_stats(model, samples, layers, heads=None, first_k: int = 1):
    """(maps (len(layers), T, T), first_share (n_layers, T)) averaged over heads and samples."""
    import torch

    maps, share = None, None
    with torch.inference_mode():
        for ids in samples:
            out = model(input_ids=torch.as_tensor(ids, dtype=torch.long)[None, :], output_attentions=True, use_cache=False)
            att = torch.stack([a[0].float() for a in out.attentions])  # (L, H, T, T)
            if heads is not None:
                att = att[:, heads]
            att = att.mean(1)  # (L, T, T)
            m, s = att[layers], att[:, :, :first_k].sum(-1)
            maps = m if maps is None else maps + m
            share = s if share is None else share + s
    n = len(samples)
    return (maps / n).numpy(), (share / n).numpy()


def run(args) -> int:
    import numpy as np

    from ..models.loading import load_model
    from .data import read_text

    if args.tokens < 2 or args.samples < 1 or args.first_k < 1:
        raise UserError("--tokens must be >= 2, --samples >= 1, --first-k >= 1")
    if args.text:
        read_text(args.text)
    model, tokenizer = load_model(args.model, dtype=args.dtype, device=args.device)
    model.set_attn_implementation("eager")  # the only implementation that returns attention weights
    cfg = model.config.get_text_config(decoder=True)
    n_layers, n_heads = cfg.num_hidden_layers, cfg.num_attention_heads
    layers = _ints(args.layers, n_layers, "layers") or sorted({0, 1, n_layers // 3, 2 * n_layers // 3, n_layers - 1})
    heads = _ints(args.heads, n_heads, "heads")
    from ..models.special_tokens import bos_choice_label, stream_ids, stream_prefix

    if args.text:
        ids = stream_ids(tokenizer, read_text(args.text), False)
        label = args.text
    else:
        from .data import load_corpus, tokenize_corpus

        ids, _ = tokenize_corpus(load_corpus(args.corpus), tokenizer, bos=False)
        label = args.corpus
    # every sample is a sequence of its own: BOS first when the model's rule (or --bos) says so
    prefix = stream_prefix(tokenizer, args.bos)
    ids = np.asarray(ids, dtype=np.int64)
    text_tokens = args.tokens - len(prefix)
    need = text_tokens * args.samples
    if len(ids) < text_tokens:
        raise UserError(f"{label} has {len(ids)} tokens; --tokens {args.tokens} needs at least {text_tokens}")
    span = min(len(ids), max(need, 200_000))  # spread the samples over the first 200K tokens
    starts = np.linspace(0, span - text_tokens, args.samples).astype(int)
    samples = [np.concatenate([np.asarray(prefix, dtype=np.int64), ids[s : s + text_tokens]]) for s in starts]
    maps, share = attention_stats(model, samples, layers, heads, args.first_k)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    pos = np.arange(args.tokens)
    np.savez_compressed(out / "attention.npz", maps=maps, layers=np.array(layers), first_share=share, share_positions=pos)
    # how much attention the first token(s) get, for queries far from them (positions >= T/2)
    late = share[:, args.tokens // 2 :].mean(1)
    summary = {"model": args.model, "source": label, **bos_choice_label(tokenizer, args.bos),
               "tokens": args.tokens, "samples": args.samples,
               "sample_starts": starts.tolist(), "layers": layers, "heads": heads or "all", "first_k": args.first_k,
               "show_tokens": min(args.tokens, 32),
               "first_token_share": [round(float(x), 4) for x in late],
               "uniform_share": round(float(np.mean(args.first_k / (pos[args.tokens // 2 :] + 1))), 4)}
    (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    from .plots import plot_attention

    for p in plot_attention(out):
        print(f"wrote {p}")
    print("share of attention on the first token(s), queries in the second half, by layer:")
    print("  " + " ".join(f"{x:.2f}" for x in late))
    print(json.dumps(summary))
    return 0
