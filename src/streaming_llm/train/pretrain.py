"""Pre-train small Llama models with and without an attention sink, then stream them (paper §3.3).

`streaming-llm pretrain --out DIR` trains three variants with identical budgets, seeds and data order
(vanilla, a learnable `<sink>` token at position 0 of every sample, softmax-off-by-one), evaluates
each with streaming perplexity at sinks 0, 1, 2, 4 and a fixed window on held-out books, records the
attention share on position 0 per layer, and writes DIR/results.json, results.md and results.png.
Each trained model is saved under DIR/<variant>/ in the standard transformers format. A stopped run
resumes from its checkpoints when run again with the same arguments.

It does NOT stream tokens itself: streaming perplexity comes from `streaming_llm.core.engine`.
"""

from __future__ import annotations

import json
import os
import shlex
import sys
import time
from dataclasses import replace
from pathlib import Path

from ..errors import UserError

DEFAULT_OUT = "out/pretrain"
DEFAULT_SINKS = "0,1,2,4"
DEFAULT_VAL_BOOKS = 4  # the last books of the corpus (for Gutenberg: Two Gentlemen, Winter's Tale, both editions)
# Budgets. Default: ~15 min per variant on a 2-core CPU (measured: see docs); quick: a smoke run.
PRESETS = {
    "default": dict(size="default", steps=1000, batch_size=16, lr=3e-3, eval_tokens=4096, window=128,
                    val_windows=64, tokenizer_chars=0),
    "quick": dict(size="quick", steps=120, batch_size=8, lr=3e-3, eval_tokens=1024, window=64,
                  val_windows=16, tokenizer_chars=2_000_000),
}


def add_arguments(parser) -> None:
    parser.add_argument("--out", default=DEFAULT_OUT, metavar="DIR", help=f"output folder (default {DEFAULT_OUT}); resumes if it has checkpoints")
    parser.add_argument("--quick", action="store_true", help="tiny model and budget: all three variants in a couple of minutes")
    parser.add_argument("--corpus", default="gutenberg", help="corpus: 'gutenberg' (default), a .txt file or a folder of .txt files")
    parser.add_argument("--variants", default="vanilla,sink_token,softmax_off_by_one", help="comma-separated subset to run")
    parser.add_argument("--size", choices=("default", "quick", "tiny"), help="model size preset")
    parser.add_argument("--steps", type=int, help="optimizer steps per variant")
    parser.add_argument("--batch-size", type=int, help="samples per step")
    parser.add_argument("--lr", type=float, help="peak learning rate")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--val-books", type=int, default=DEFAULT_VAL_BOOKS, help="held-out books at the end of the corpus")
    parser.add_argument("--eval-tokens", type=int, help="length of the held-out stream for streaming perplexity")
    parser.add_argument("--window", type=int, help="recent tokens kept when streaming (fixed while the sinks vary)")
    parser.add_argument("--sinks", default=DEFAULT_SINKS, help=f"sink counts to evaluate (default {DEFAULT_SINKS})")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (default: all cores)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def _settings(args) -> dict:
    from .model import SIZES

    p = dict(PRESETS["quick" if args.quick else "default"])
    for key in ("size", "steps", "batch_size", "lr", "eval_tokens", "window"):
        if getattr(args, key, None) is not None:
            p[key] = getattr(args, key)
    for key in ("steps", "batch_size", "eval_tokens", "window"):
        if p[key] < 1:
            raise UserError(f"--{key.replace('_', '-')} must be >= 1 (got {p[key]})")
    try:
        p["sinks"] = sorted({int(s) for s in str(args.sinks).split(",") if s.strip()})
    except ValueError:
        raise UserError(f"--sinks must be comma-separated integers (got {args.sinks!r})") from None
    if not p["sinks"] or min(p["sinks"]) < 0:
        raise UserError(f"--sinks must be integers >= 0 (got {args.sinks!r})")
    from .model import VARIANTS

    p["variants"] = [v.strip() for v in args.variants.split(",") if v.strip()]
    bad = [v for v in p["variants"] if v not in VARIANTS]
    if bad or not p["variants"]:
        raise UserError(f"unknown variant(s) {bad}; choose from {', '.join(VARIANTS)}")
    p["size"] = SIZES[p["size"]]
    return p


def _tokenizer(out: Path, corpus, n_val: int, vocab_size: int, max_chars: int):
    """The run's tokenizer: reused from DIR/tokenizer, else trained on the training books."""
    from .tokenizer import load_tokenizer, train_tokenizer

    path = out / "tokenizer"
    if (path / "tokenizer.json").is_file():
        return load_tokenizer(path)
    end = corpus.books[-n_val][1]  # training books only
    text = corpus.text[:end]
    if max_chars:
        text = text[:max_chars]
    tok = train_tokenizer([text], vocab_size)
    tok.save_pretrained(str(path))
    return tok


def _check_run(out: Path, ident: dict) -> None:
    path = out / "run.json"
    if path.is_file():
        old = json.loads(path.read_text(encoding="utf-8"))
        if old != ident:
            diff = {k: (old.get(k), ident.get(k)) for k in set(old) | set(ident) if old.get(k) != ident.get(k)}
            raise UserError(f"{out} holds a run with other settings {diff}; use another --out folder")
    else:
        out.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(ident, indent=1) + "\n", encoding="utf-8")


def _write_json(path: Path, obj) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def run_pretrain(args) -> dict:
    """Train and evaluate every requested variant; returns the results dict (also written to DIR)."""
    # OpenMP threads that spin while waiting slow training 10-20x when other processes share the
    # cores; sleeping ones cost little here. Read once when torch loads, so set it before that.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    import torch

    from ..eval import data
    from .evaluate import first_position_share, ppl, stream_for, streaming_nlls, validation_loss
    from .loop import TRAIN_SUMMARY, TrainSettings, train_variant, write_summary
    from .model import build_model, count_parameters, load_trained
    from .report import write_reports
    from .tokenizer import sink_token_id
    from ..models.special_tokens import stream_prefix

    if args.threads:
        torch.set_num_threads(args.threads)
    p = _settings(args)
    size = p["size"]
    out = Path(args.out)
    t_start = time.perf_counter()
    corpus = data.load_corpus(args.corpus)
    n_val = args.val_books
    if n_val < 1 or n_val >= len(corpus.books):
        raise UserError(f"--val-books must be between 1 and {len(corpus.books) - 1} for this corpus ({len(corpus.books)} books)")
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = _tokenizer(out, corpus, n_val, size.vocab_size, p["tokenizer_chars"])
    size = replace(size, vocab_size=len(tokenizer))  # a small corpus may give fewer merges
    ids, starts = data.tokenize_corpus(corpus, tokenizer, bos=False)  # training text; the eval stream's start below
    split = starts[len(corpus.books) - n_val][1]
    train_ids, val_ids = ids[:split], ids[split:]
    ctx = size.context
    if len(val_ids) < ctx + 2:
        raise UserError(f"the {n_val} held-out books have {len(val_ids)} tokens, fewer than one window of {ctx + 1}")
    eval_tokens = min(p["eval_tokens"], len(val_ids))
    sink_id = sink_token_id(tokenizer)
    settings = TrainSettings(steps=p["steps"], batch_size=p["batch_size"], lr=p["lr"], seed=args.seed)
    ident = {
        "corpus": corpus.name, "corpus_sha256": corpus.sha256, "val_books": n_val, "size": size.to_dict(),
        "train": settings.to_dict(), "tokenizer_chars": p["tokenizer_chars"],
    }
    _check_run(out, ident)
    n_params = None
    results = {
        "variants": {},
        "settings": {
            **ident, "tokens_per_step": settings.batch_size * ctx, "train_tokens": int(len(train_ids)),
            "val_tokens": int(len(val_ids)), "val_first_book": starts[len(corpus.books) - n_val][0],
            "torch_threads": torch.get_num_threads(), "preset": "quick" if args.quick else "default",
        },
        "evaluation": {
            "method": "streaming (streaming_llm.core.engine, positions in the cache)", "window": p["window"],
            "sinks": p["sinks"], "tokens": eval_tokens, "context": ctx,
            "stream_over_context": round(eval_tokens / ctx, 1), "scored_tokens": eval_tokens - 1,
        },
        "command": "streaming-llm pretrain " + " ".join(shlex.quote(a) for a in sys.argv[2:]) if sys.argv[1:2] == ["pretrain"] else None,
    }
    for variant in p["variants"]:
        vdir = out / variant
        v_sink = sink_id if variant == "sink_token" else None
        summary_path = vdir / TRAIN_SUMMARY
        if summary_path.is_file() and (vdir / "config.json").is_file():
            train_summary = json.loads(summary_path.read_text(encoding="utf-8"))
            model = load_trained(vdir)
        else:
            model = build_model(size, variant, args.seed, sink_token_id=sink_id)
            train_summary = train_variant(
                model, train_ids, ctx, settings, vdir, sink_id=v_sink, progress=not args.no_progress, desc=variant
            )
            model.save_pretrained(str(vdir))
            tokenizer.save_pretrained(str(vdir))
            write_summary(vdir, train_summary)
        n_params = count_parameters(model)
        t0 = time.perf_counter()
        val_loss = validation_loss(model, val_ids, ctx, v_sink, p["val_windows"])
        attention = first_position_share(model, val_ids, ctx, v_sink)
        stream, first = stream_for(val_ids, eval_tokens, v_sink, stream_prefix(tokenizer))
        by_sinks = {}
        for s in p["sinks"]:
            by_sinks[str(s)] = round(ppl(streaming_nlls(model, tokenizer, stream, first, s, p["window"])), 4)
        results["variants"][variant] = {
            "ppl_by_sinks": by_sinks,
            "val_loss": round(val_loss, 5),
            "val_ppl": round(float(torch.tensor(val_loss).exp()), 4),
            "train_loss": round(train_summary["train_loss"], 5),
            "attention": attention,
            "train": train_summary,
            "eval_seconds": round(time.perf_counter() - t0, 1),
            "model_path": str(vdir),
        }
        results["settings"]["parameters"] = n_params
        _write_json(out / "results.json", results)  # partial results survive an interruption
        print(f"{variant}: val loss {val_loss:.4f}, streaming ppl by sinks {by_sinks}", file=sys.stderr)
    results["wall_seconds"] = round(time.perf_counter() - t_start, 1)
    _write_json(out / "results.json", results)
    write_reports(out)
    return results


def run(args) -> int:
    from .report import markdown

    results = run_pretrain(args)
    print(markdown(results))
    summary = {
        "out": str(Path(args.out)),
        "wall_seconds": results["wall_seconds"],
        **{v: {"ppl_by_sinks": r["ppl_by_sinks"], "val_loss": r["val_loss"]} for v, r in results["variants"].items()},
    }
    print(json.dumps(summary))
    return 0
