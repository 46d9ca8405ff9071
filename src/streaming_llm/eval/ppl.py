"""`streaming-llm ppl`: stream a text or a corpus through a model and report perplexity.

Tokenizes the text without special tokens (a corpus: each book on its own, see
`streaming_llm.eval.data.tokenize_corpus`), starts the stream with the BOS token when the model's
rule says so (`streaming_llm.models.special_tokens`; `--bos` / `--no-bos` override it), keeps the
first `--max-tokens` tokens t_0..t_{N-1} (BOS included), and scores every t_i (i >= 1) given t_<i under the chosen method, writing one JSON line per predicted
token to `--per-token-out`: {"i": i, "token": t_i, "nll": -log p(t_i | t_<i)}. Feeding is chunked
with exact streaming semantics; `--reference` feeds one token per forward (the paper's evaluation
loop) to check that. Prints the perplexity (overall, and per book when book boundaries are known),
then a one-line JSON summary. `--resume` continues from the last checkpoint (NLLs so far, the
engine's state, the running totals; written atomically every `--checkpoint-every` tokens), so a
multi-million-token run can be stopped and restarted and still give the same final numbers.

This module scores a stream; it does not build corpora, run the paper's experiments or draw plots
(see `data`, `experiments`, `plots`).
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from pathlib import Path

from ..errors import UserError
from .data import read_text

DEFAULT_CHECKPOINT_EVERY = 50_000
CURVE_EVERY = 1000  # tokens per point of the downsampled curve kept in results


def add_arguments(p) -> None:
    from ..cliargs import add_model_arguments
    from ..models.special_tokens import add_bos_arguments

    add_model_arguments(p)
    add_bos_arguments(p)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--text", help="UTF-8 text file to stream")
    src.add_argument("--corpus", help="corpus source: gutenberg | pg19 | a .txt file | a folder of .txt files")
    p.add_argument("--max-tokens", type=int, default=None, help="use only the first N tokens")
    p.add_argument("--per-token-out", default=None, help="write per-token NLL as JSONL here")
    p.add_argument("--out", default=None, help="write the result (summary, per-book ppl, curve) as JSON here")
    p.add_argument("--reference", action="store_true", help="feed one token per forward (slow; for checking)")
    p.add_argument("--resume", action="store_true", help="continue from --checkpoint if it exists")
    p.add_argument("--checkpoint", default=None, help="checkpoint file (default: <per-token-out or out>.ckpt)")
    p.add_argument("--checkpoint-every", type=int, default=DEFAULT_CHECKPOINT_EVERY, help="tokens between checkpoints")
    p.add_argument("--no-progress", action="store_true")


def check_max_tokens(n) -> None:
    if n is not None and n < 2:
        raise UserError(f"--max-tokens must be at least 2 (got {n})")


def score_blocks(engine, ids, start: int = 0, prev=None):
    """Feed ids[start:] into `engine` in blocks aligned to multiples of its chunk size; yield
    (first, targets, nll, last_logits) per block, where nll[k] = -log p(ids[first+k] | ids[<first+k]).

    `prev` holds the logits that predict ids[start] (None at the start of the stream). Blocks are
    aligned to the stream (not to `start`), so a resumed run feeds the same chunks as an
    uninterrupted one and gives bit-identical numbers."""
    import torch

    ids = torch.as_tensor(ids, dtype=torch.long)
    n, block = ids.numel(), max(engine.config.chunk_size, 1)
    lo = start
    while lo < n:
        hi = min((lo // block + 1) * block, n)
        logits = engine.feed(ids[lo:hi], logits="all")  # (hi-lo, V): logits[k] predicts ids[lo+k+1]
        preds = logits if prev is None else torch.cat([prev[None], logits])
        first = lo + 1 if prev is None else lo
        targets = ids[first:hi]
        nll = torch.nn.functional.cross_entropy(preds[: targets.numel()], targets, reduction="none")
        prev = logits[-1]
        yield first, targets, nll, prev
        lo = hi


def token_nlls(engine, ids, progress: bool = False, desc: str = "ppl"):
    """Yield (i, t_i, -log p(t_i | t_<i)) for i = 1..len(ids)-1, feeding `ids` into `engine`."""
    for first, targets, nll, _ in _progress(score_blocks(engine, ids), len(ids) - 1, progress, desc):
        for k, (t, v) in enumerate(zip(targets.tolist(), nll.tolist())):
            yield first + k, t, v


def _progress(blocks, total: int, enabled: bool, desc: str, done: int = 0):
    from tqdm import tqdm

    bar = tqdm(total=total, initial=done, desc=desc, unit="tok", disable=not enabled, file=sys.stderr, dynamic_ncols=True)
    s, c, t0 = 0.0, 0, time.perf_counter()
    for item in blocks:
        nll = item[2]
        s, c = s + float(nll.sum()), c + nll.numel()
        bar.update(nll.numel())
        if c and enabled:
            bar.set_postfix(ppl=f"{math.exp(s / c):.3f}", tok_s=f"{c / (time.perf_counter() - t0):.0f}")
        yield item
    bar.close()


class Totals:
    """Running sums that make up a result: overall, per book, and a downsampled curve."""

    def __init__(self, n_tokens: int, book_starts=None):
        import numpy as np

        self.n_tokens = n_tokens
        self.books = [(t, s) for t, s in (book_starts or []) if s < n_tokens]
        self.starts = np.array([s for _, s in self.books], dtype=np.int64)
        self.book_sum = np.zeros(len(self.books))
        self.book_count = np.zeros(len(self.books), dtype=np.int64)
        self.total, self.count = 0.0, 0
        self.curve: list[tuple[int, float, float]] = []  # (last i, running mean nll, mean nll of the bucket)
        self._bucket_sum, self._bucket_n = 0.0, 0

    def add(self, first: int, nll) -> None:
        import numpy as np

        nll = np.asarray(nll, dtype=np.float64)
        self.total += float(nll.sum())
        self.count += nll.size
        if self.books:
            idx = np.arange(first, first + nll.size)
            b = np.searchsorted(self.starts, idx, side="right") - 1
            ok = b >= 0
            self.book_sum += np.bincount(b[ok], weights=nll[ok], minlength=len(self.books))
            self.book_count += np.bincount(b[ok], minlength=len(self.books))
        for k, v in enumerate(nll.tolist()):  # the curve: one point per CURVE_EVERY tokens
            self._bucket_sum += v
            self._bucket_n += 1
            i = first + k
            if (i % CURVE_EVERY == 0) or i == self.n_tokens - 1:
                s0 = self.total - float(nll[k + 1 :].sum())
                c0 = self.count - (nll.size - k - 1)
                self.curve.append((i, s0 / c0, self._bucket_sum / self._bucket_n))
                self._bucket_sum, self._bucket_n = 0.0, 0

    def state(self) -> dict:
        return {k: v for k, v in vars(self).items()}

    def load(self, st: dict) -> None:
        vars(self).update(st)

    def result(self) -> dict:
        per_book = [
            {"title": t, "token_start": int(s), "predicted": int(c), "ppl": math.exp(v / c) if c else None}
            for (t, s), v, c in zip(self.books, self.book_sum, self.book_count)
        ]
        return {
            "predicted": self.count,
            "nll_mean": self.total / self.count,
            "ppl": math.exp(self.total / self.count),
            "per_book": per_book,
            "curve": [{"i": i, "running_nll": a, "bucket_nll": b} for i, a, b in self.curve],
        }


def _save_atomic(obj, path: Path) -> None:
    import torch

    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def evaluate(engine, ids, book_starts=None, per_token_out=None, checkpoint=None, checkpoint_every=DEFAULT_CHECKPOINT_EVERY,
             resume=False, progress=False, keep_nll=False, fingerprint=None, desc="ppl", on_checkpoint=None) -> dict:
    """Score a whole stream with `engine`; return the result dict (see `Totals.result`).

    With `checkpoint`, saves {engine state, last logits, totals, NLLs so far, JSONL offset} every
    `checkpoint_every` tokens (then calls `on_checkpoint(totals, tokens_done)`); with `resume` and an
    existing checkpoint, continues from it (the JSONL is truncated to what the checkpoint had
    written). `fingerprint` must match on resume."""
    import numpy as np
    import torch

    n = len(ids)
    totals = Totals(n, book_starts)
    nlls = np.zeros(n, dtype=np.float32)
    start, prev, offset, done = 0, None, 0, 0
    ckpt = Path(checkpoint) if checkpoint else None
    if resume and ckpt is not None and ckpt.is_file():
        st = torch.load(ckpt, weights_only=False)
        if st["fingerprint"] != fingerprint:
            old, new = st["fingerprint"], fingerprint
            if isinstance(old, dict) and isinstance(new, dict):  # name what differs, e.g. "bos: True there, False now"
                diff = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
                what = ", ".join(f"{k}: {old.get(k)!r} there, {new.get(k)!r} now" for k in diff)
            else:
                what = str(old)
            raise UserError(f"checkpoint {ckpt} is for another run ({what}); remove it or drop --resume")
        engine.load_state_dict(st["engine"])
        totals.load(st["totals"])
        start, prev, offset = st["next"], st["prev"], st["jsonl_offset"]
        nlls[: start] = st["nll"][:start]
        done = totals.count
        print(f"resuming at token {start} of {n} from {ckpt}", file=sys.stderr)
    out = None
    if per_token_out:
        out = open(per_token_out, "r+" if (done and Path(per_token_out).is_file()) else "w")
        out.seek(offset)
        out.truncate()
    since, t0 = 0, time.perf_counter()
    try:
        blocks = _progress(score_blocks(engine, ids, start, prev), n - 1, progress, desc, done)
        for first, targets, nll, prev in blocks:
            v = nll.numpy().astype(np.float32)
            nlls[first : first + v.size] = v
            totals.add(first, v)
            if out:
                out.write("".join(json.dumps({"i": first + k, "token": t, "nll": x}) + "\n"
                                  for k, (t, x) in enumerate(zip(targets.tolist(), nll.tolist()))))
            since += v.size
            end = first + v.size
            if ckpt is not None and since >= checkpoint_every and end < n:
                if out:
                    out.flush()
                _save_atomic({"fingerprint": fingerprint, "engine": engine.state_dict(), "totals": totals.state(),
                              "next": end, "prev": prev.clone(), "nll": nlls[:end].copy(),
                              "jsonl_offset": out.tell() if out else 0}, ckpt)
                since = 0
                if on_checkpoint is not None:
                    on_checkpoint(totals, end)
    finally:
        if out:
            out.close()
    seconds = time.perf_counter() - t0
    result = totals.result()
    result.update(seconds=round(seconds, 3), tokens_per_s=round((totals.count - done) / max(seconds, 1e-9), 2))
    if keep_nll:
        result["nll"] = nlls[1:]
    return result


def load_ids(args, tokenizer):
    """(ids, book_starts, source label) for --text or --corpus; BOS first as `args.bos` and the
    model's rule say (`special_tokens.wants_bos`)."""
    from ..models.special_tokens import stream_ids

    bos = getattr(args, "bos", None)
    if args.text is not None:
        text = read_text(args.text)
        ids, books, label = stream_ids(tokenizer, text, bos), None, args.text
    else:
        from .data import load_corpus, tokenize_corpus

        corpus = load_corpus(args.corpus)
        arr, books = tokenize_corpus(corpus, tokenizer, bos=bos)
        ids, label = arr, args.corpus
    if args.max_tokens is not None:
        ids = ids[: args.max_tokens]
    if len(ids) < 2:
        raise UserError(f"{label} has {len(ids)} token(s); at least 2 are needed to score one")
    return ids, books, label


def run(args) -> int:
    import hashlib

    import numpy as np

    from ..core.engine import StreamingLLM

    check_max_tokens(args.max_tokens)
    if args.text is not None:
        read_text(args.text)  # fail on a missing/empty file before loading the model
    if args.checkpoint_every < 1:
        raise UserError(f"--checkpoint-every must be >= 1 (got {args.checkpoint_every})")
    from ..cliargs import config_from_args, load_model_from_args
    from ..models.special_tokens import bos_choice_label

    config = config_from_args(args)
    if args.reference:
        config = config.with_(chunk_size=1)
    model, tokenizer = load_model_from_args(args)
    ids, books, label = load_ids(args, tokenizer)
    ids = np.asarray(ids, dtype=np.int64)
    start = bos_choice_label(tokenizer, args.bos)  # {"bos": used?, "bos_rule": why}
    base = args.per_token_out or args.out
    ckpt = args.checkpoint or (base + ".ckpt" if base else None)
    if args.resume and ckpt is None:
        raise UserError("--resume needs --checkpoint, --per-token-out or --out to know where the checkpoint is")
    fingerprint = {"model": args.model, "config": config.to_dict(), "dtype": args.dtype, "quant": args.quant, "source": label,
                   "bos": start["bos"], "tokens": len(ids), "ids_sha256": hashlib.sha256(ids.tobytes()).hexdigest()[:16]}
    engine = StreamingLLM(model, tokenizer, config)
    res = evaluate(engine, ids, books, args.per_token_out, ckpt, args.checkpoint_every, args.resume,
                   progress=not args.no_progress, fingerprint=fingerprint)
    print(f"perplexity: {res['ppl']:.4f} over {res['predicted']} predicted tokens ({config.method}, sinks {config.sinks}, "
          f"window {config.window}, {res['tokens_per_s']:.1f} tok/s)")
    for b in res["per_book"]:
        if b["predicted"]:
            print(f"  {b['ppl']:10.4f}  {b['predicted']:>9} tok  {b['title']}")
    summary = {"model": args.model, **config.to_dict(), "dtype": args.dtype, "quant": args.quant, "source": label, **start,
               "tokens": len(ids),
               "predicted": res["predicted"], "nll_mean": res["nll_mean"], "ppl": res["ppl"],
               "seconds": res["seconds"], "tokens_per_s": res["tokens_per_s"]}
    if res["per_book"]:
        summary["per_book_ppl"] = [[b["title"], b["ppl"]] for b in res["per_book"] if b["predicted"]]
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({**summary, **res}, indent=1) + "\n")
    if ckpt and Path(ckpt).is_file():
        Path(ckpt).unlink()  # finished: the checkpoint is stale now
    print(json.dumps(summary))
    return 0
