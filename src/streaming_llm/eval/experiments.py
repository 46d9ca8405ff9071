"""`streaming-llm reproduce NAME`: the paper's experiments (arXiv 2309.17453) as rerunnable commands.

Each experiment streams the first `--tokens` tokens of a corpus (default: the offline Gutenberg
corpus, `streaming_llm.eval.data`) through one or more engine configurations and writes result files
(JSON summary, CSV/NPZ data) under `<out>/<name>/`; `--plot` draws them (`streaming_llm.eval.plots`,
which reads those files only). Per-token NLL arrays of every run are cached under the user cache
(`runs/`), keyed by model, configuration and token source, so experiments that share a run
(e.g. streaming 4+1020 appears in fig3, table2, table6 and positions) compute it once; a run of N
tokens serves any request of up to N tokens (evaluation is causal). Long runs checkpoint and resume.
The stream starts with the BOS token when the model's rule says so (`models.special_tokens`;
`--bos` / `--no-bos` override it); every result file records the choice.

Experiments: throughput, fig3, table2, table6, positions, gemma3, fig5; and the two retrieval
evaluations of recall (issue 15), passkey and streameval (`passkey.py`, `streameval.py`), which
answer questions instead of scoring NLLs, so they build no Runner; their results go to
`<out>/<name>/` for the default model and `<out>/<name>_gemma3/` for gemma3-270m. This module does
not implement attention or caching (engine) nor draw (plots).
"""

from __future__ import annotations

import hashlib
import json
import math
import sys
import time
from pathlib import Path

from ..errors import UserError
from .results_io import write_csv as _write_csv, write_json as _write

DEFAULT_OUT = "docs/results"
DEFAULT_CORPUS = "gutenberg"
FIG5_CORPUS = "gutenberg-kjv"  # gutenberg + the KJV: 4,494,011 SmolLM2 tokens (the paper streams 4M)
DEFAULT_CHUNK = 512  # tokens per forward: a little faster than 256 on CPU, same numbers
DEFAULT_TOKENS = {"throughput": 3000, "fig3": 20_000, "table2": 4096, "table6": 6144, "positions": 20_000,
                  "gemma3": 8192, "fig5": None}
DEFAULT_RECOMPUTE_STRIDE = 20
CACHE = 1024


def ppl(nll) -> float:
    import numpy as np

    nll = np.asarray(nll, dtype=np.float64)
    return float(math.exp(nll.mean())) if nll.size else float("nan")


def segment_ppl(nll, lo: int, hi: int | None = None) -> float | None:
    """Perplexity over predicted tokens i in [lo, hi) (nll[k] scores token k+1)."""
    seg = nll[max(lo - 1, 0) : (None if hi is None else hi - 1)]
    return ppl(seg) if len(seg) else None


def _log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


class Runner:
    """One model + one token source; computes (and caches) per-token NLLs of engine configurations."""

    def __init__(self, model_name: str, corpus: str = DEFAULT_CORPUS, tokens: int | None = None,
                 chunk: int = DEFAULT_CHUNK, progress: bool = True, model=None, tokenizer=None, ids=None, books=None,
                 bos: bool | None = None):
        import numpy as np

        from ..models.special_tokens import bos_choice_label
        from .data import cache_root

        self.model_name, self.corpus, self.chunk, self.progress = model_name, corpus, chunk, progress
        if model is None:
            from ..models.loading import load_model

            model, tokenizer = load_model(model_name)
        self.model, self.tokenizer = model, tokenizer
        # what the stream starts with; given `ids`, the caller chose (and records it)
        self.start = bos_choice_label(tokenizer, bos) if ids is None else {}  # {"bos", "bos_rule"}
        if ids is None:
            from .data import load_corpus, tokenize_corpus

            ids, books = tokenize_corpus(load_corpus(corpus), tokenizer, bos=bos)
        ids = np.asarray(ids, dtype=np.int64)
        if tokens is not None:
            if tokens < 2:
                raise UserError(f"--tokens must be at least 2 (got {tokens})")
            ids = ids[:tokens]
        self.ids, self.books = ids, [(t, s) for t, s in (books or []) if s < len(ids)]
        self.run_dir = cache_root() / "runs"
        self.log: list[dict] = []  # what was computed, for the result files

    def _engine(self, method, sinks, window, positions="cache", chunk=None):
        from ..core.config import StreamingConfig
        from ..core.engine import StreamingLLM

        if method == "streaming" and sinks == 0:
            method = "window"  # the same thing; share the cached run
        cfg = StreamingConfig(method=method, sinks=sinks, window=window, positions=positions,
                              chunk_size=chunk or self.chunk)
        return StreamingLLM(self.model, self.tokenizer, cfg)

    def nll(self, method: str, sinks: int = 4, window: int = CACHE - 4, positions: str = "cache",
            prefix: list[int] | None = None, n: int | None = None):
        """Per-token NLL (float32, length n-1) of text tokens 1..n-1 under a configuration.
        `prefix`: tokens fed before the text (e.g. newline sinks); their own scores are dropped."""
        import numpy as np

        from .ppl import evaluate

        n = len(self.ids) if n is None else min(n, len(self.ids))
        prefix = list(prefix or [])
        engine = self._engine(method, sinks, window, positions)
        cfg = engine.config.to_dict()
        cfg.pop("chunk_size")
        spec = {"model": self.model_name, "config": cfg, "prefix": prefix, "source": self.corpus}
        if self.start.get("bos"):  # absent: no BOS (the key every run had before BOS handling)
            spec["bos"] = True
        key = hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:20]
        path = self.run_dir / f"{key}.npz"
        if path.is_file():  # a cached run of at least n tokens over the same tokens serves this one
            z = np.load(path)
            if len(z["ids"]) >= n and np.array_equal(z["ids"][:n], self.ids[:n]):
                self.log.append({"run": f"{spec['config']} prefix={len(prefix)}", "cached": str(path)})
                return z["nll"][: n - 1]
        stream = np.concatenate([np.asarray(prefix, dtype=np.int64), self.ids[:n]])
        label = f"{method} sinks={engine.config.sinks} window={window} pos={positions} prefix={len(prefix)} n={n}"
        _log(f"run {label}")
        self.run_dir.mkdir(parents=True, exist_ok=True)
        ckpt = None if method == "dense" else self.run_dir / f"{key}-{n}.ckpt"
        res = evaluate(engine, stream, checkpoint=ckpt, checkpoint_every=4096, resume=True, progress=self.progress,
                       keep_nll=True, fingerprint={**spec, "n": n}, desc=method)
        nll = res["nll"][len(prefix):]
        np.savez(path, nll=nll, ids=self.ids[:n].astype(np.int32), spec=json.dumps(spec))
        if ckpt is not None and ckpt.is_file():
            ckpt.unlink()
        self.log.append({"run": label, "seconds": res["seconds"], "tokens_per_s": res["tokens_per_s"]})
        _log(f"done {label}: ppl {ppl(nll):.3f}, {res['tokens_per_s']} tok/s")
        return nll

    def recompute(self, positions, cache: int = CACHE):
        """NLL of token i for each i in `positions`, recomputed from scratch over its last `cache`
        tokens with fresh positions 0..cache-1 (the paper's sliding window with re-computation),
        by the engine's `recompute` method: only the scored tokens run a forward."""
        import numpy as np
        import torch

        engine = self._engine("recompute", 0, cache)
        out = np.zeros(len(positions), dtype=np.float32)
        t0 = time.perf_counter()
        for k, i in enumerate(positions):
            engine.reset()
            if i - 1 > max(0, i - cache):  # the window's earlier tokens: held, not scored
                engine.feed(self.ids[max(0, i - cache) : i - 1], logits="none")
            logits = engine.feed(self.ids[i - 1 : i], logits="last")
            out[k] = float(torch.nn.functional.cross_entropy(logits[None], torch.tensor([int(self.ids[i])])))
        secs = time.perf_counter() - t0
        self.log.append({"run": f"recompute cache={cache} positions={len(positions)}", "seconds": round(secs, 1)})
        _log(f"done recompute over {len(positions)} positions in {secs:.0f}s")
        return out


def _segments(nll, cache: int, trained: int | None) -> dict:
    n = len(nll) + 1
    seg = {"all": segment_ppl(nll, 1), f"0-{cache}": segment_ppl(nll, 1, cache), f"{cache}-end": segment_ppl(nll, cache)}
    if trained and trained < n:
        seg[f"{cache}-{trained}"] = segment_ppl(nll, cache, trained)
        seg[f"{trained}-end"] = segment_ppl(nll, trained)
    return seg


def _trained_context(model) -> int | None:
    return getattr(model.config.get_text_config(decoder=True), "max_position_embeddings", None)


def headline(r: Runner, out: Path, stride: int, window_tokens: int | None = None) -> dict:
    """fig3 / gemma3: dense, window, recompute (every `stride`-th token), streaming at 4+1020.
    `window_tokens` caps the window baseline's stream (it has collapsed long before)."""
    import numpy as np

    runs = {
        "streaming": r.nll("streaming", 4, CACHE - 4),
        "window": r.nll("window", 0, CACHE, n=window_tokens),
        "dense": r.nll("dense", 0, CACHE),
    }
    n = len(r.ids)
    pos = np.arange(stride, n, stride) if stride else np.zeros(0, np.int64)  # --recompute-stride 0: none
    rec = r.recompute(pos.tolist()) if stride else np.zeros(0, np.float32)
    trained = _trained_context(r.model)
    out.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(out / "nll.npz", recompute_positions=pos, recompute=rec, **runs)
    summary = {"model": r.model_name, "corpus": r.corpus, **r.start, "tokens": n, "cache": "4+1020 (window: 0+1024)",
               "trained_context": trained, "recompute_stride": stride,
               "ppl": {m: _segments(v, CACHE, trained) for m, v in runs.items()},
               "tokens_per_method": {m: len(v) + 1 for m, v in runs.items()},
               # every method on the same tokens: from the first eviction to the end of the shortest run
               "same_tokens": {"range": [CACHE, min(len(v) for v in runs.values()) + 1],
                               **{m: segment_ppl(v, CACHE, min(len(x) for x in runs.values()) + 1) for m, v in runs.items()}},
               "subsampled_ppl": {m: ppl(v[pos[pos <= len(v)] - 1]) for m, v in runs.items()} | {"recompute": ppl(rec)},
               "runs": r.log}
    _write(out, "summary.json", summary)
    return summary


def exp_fig3(r, out, args):
    return headline(r, out, args.recompute_stride, args.window_tokens)


def exp_gemma3(r, out, args):
    return headline(r, out, args.recompute_stride, args.window_tokens)


def _merge_rows(r, out: Path, rows: list[dict], key: str):
    """Keep rows of an earlier run of this table (same model and corpus) whose `key` was not
    recomputed now, so a table can be filled in several invocations (each row records its tokens)."""
    old = out / "results.json"
    keep, log = [], list(r.log)
    if old.is_file():
        prev = json.loads(old.read_text())
        if prev.get("model") == r.model_name and prev.get("corpus") == r.corpus:
            done = {x[key] for x in rows}
            keep = [{**x, "tokens": x.get("tokens", prev.get("tokens"))} for x in prev["rows"] if x[key] not in done]
            log = prev.get("runs", []) + log
    out.mkdir(parents=True, exist_ok=True)
    merged = keep + rows
    merged.sort(key=lambda x: x[key])  # stable: keeps each cache's row order
    return merged, log


def exp_table2(r, out, args):
    """Sinks 0,1,2,4,8 at cache 1024 and 2048, plus 4 newline tokens as the sinks (prepended)."""
    nl = r.tokenizer("\n", add_special_tokens=False)["input_ids"]
    rows = []
    for cache in args.caches:
        for s in (0, 1, 2, 4, 8):
            v = r.nll("streaming", s, cache - s)
            rows.append({"cache": cache, "sinks": s, "sink_tokens": "text", "tokens": len(r.ids),
                         "ppl_after_fill": segment_ppl(v, cache), "ppl_all": segment_ppl(v, 1)})
        v = r.nll("streaming", 4, cache - 4, prefix=nl * 4)
        rows.append({"cache": cache, "sinks": 4, "sink_tokens": "4x newline", "tokens": len(r.ids),
                     "ppl_after_fill": segment_ppl(v, cache), "ppl_all": segment_ppl(v, 1)})
    rows, log = _merge_rows(r, out, rows, "cache")
    _write_csv(out / "table.csv", list(rows[0]), [[x.get(k) for k in rows[0]] for x in rows])
    res = {"model": r.model_name, "corpus": r.corpus, **r.start, "tokens": len(r.ids), "newline_ids": nl, "rows": rows,
           "runs": log}
    _write(out, "results.json", res)
    return res


def exp_table6(r, out, args):
    rows = []
    for w in args.windows:
        v = r.nll("streaming", 4, w)
        rows.append({"cache": f"4+{w}", "window": w, "tokens": len(r.ids), "ppl_after_fill": segment_ppl(v, w + 4),
                     "ppl_1024_2048": segment_ppl(v, 1024, 2048), "ppl_4096_end": segment_ppl(v, 4096),
                     "ppl_all": segment_ppl(v, 1)})  # the middle two: the same tokens in every row
    rows, log = _merge_rows(r, out, rows, "window")
    _write_csv(out / "table.csv", list(rows[0]), [[x.get(k) for k in rows[0]] for x in rows])
    res = {"model": r.model_name, "corpus": r.corpus, **r.start, "tokens": len(r.ids), "rows": rows, "runs": log}
    _write(out, "results.json", res)
    return res


def exp_positions(r, out, args):
    import numpy as np

    runs = {"cache": r.nll("streaming", 4, CACHE - 4, "cache"), "absolute": r.nll("streaming", 4, CACHE - 4, "absolute")}
    out.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(out / "nll.npz", **runs)
    trained = _trained_context(r.model)
    res = {"model": r.model_name, "corpus": r.corpus, **r.start, "tokens": len(r.ids), "trained_context": trained,
           "ppl": {k: _segments(v, CACHE, trained) for k, v in runs.items()}, "runs": r.log}
    _write(out, "summary.json", res)
    return res


def exp_throughput(r, out, args):
    """Chunked vs token-by-token at 4+1020 after the cache is full: tok/s and NLL agreement."""
    import numpy as np

    from .ppl import score_blocks

    n_fast, n_ref = len(r.ids) - CACHE, min(args.reference_tokens, len(r.ids) - CACHE)
    if n_fast < 2:
        raise UserError(f"throughput needs more than {CACHE} tokens")
    base = r._engine("streaming", 4, CACHE - 4)
    _log(f"prefill {CACHE} tokens (chunked)")
    prev = None
    for _, _, _, prev in score_blocks(base, r.ids[:CACHE]):
        pass
    state, results = base.state_dict(), {}
    for name, chunk, count in (("chunked", r.chunk, n_fast), ("token_by_token", 1, n_ref)):
        e = r._engine("streaming", 4, CACHE - 4, chunk=r.chunk)
        e.load_state_dict(state)
        e.config = e.config.with_(chunk_size=chunk)
        stream = r.ids[: CACHE + count]
        t0, nll = time.perf_counter(), []
        for _, _, v, _ in score_blocks(e, stream, CACHE, prev):
            nll.append(v.numpy())
        secs = time.perf_counter() - t0
        results[name] = {"chunk_size": chunk, "tokens": count, "seconds": round(secs, 2),
                         "tokens_per_s": round(count / secs, 2), "nll": np.concatenate(nll)}
        _log(f"{name}: {count} tokens in {secs:.1f}s = {count / secs:.2f} tok/s")
    a, b = results["chunked"]["nll"][:n_ref], results["token_by_token"]["nll"]
    res = {"model": r.model_name, **r.start, "cache": "4+1020", "prefill": CACHE,
           **{k: {kk: vv for kk, vv in v.items() if kk != "nll"} for k, v in results.items()},
           "speedup": round(results["chunked"]["tokens_per_s"] / results["token_by_token"]["tokens_per_s"], 2),
           "nll_max_abs_diff": float(np.abs(a - b).max()), "ppl_chunked": ppl(a), "ppl_token_by_token": ppl(b)}
    _write(out, "result.json", res)
    return res


def exp_fig5(r, out, args):
    """Streaming 4+1020 over the whole corpus; resumable; partial results written at checkpoints."""
    from .ppl import evaluate

    import re

    label = r.model_name if r.corpus == DEFAULT_CORPUS else f"{r.model_name}-{r.corpus}"  # one checkpoint per stream
    stem = r.run_dir / ("fig5-" + re.sub(r"[^\w.-]+", "_", label).strip("_"))  # a path is a model name too
    r.run_dir.mkdir(parents=True, exist_ok=True)
    eng = r._engine("streaming", 4, CACHE - 4)
    fp = {"model": r.model_name, "source": r.corpus, "bos": r.start.get("bos", False), "tokens": len(r.ids),
          "ids_sha256": hashlib.sha256(r.ids.tobytes()).hexdigest()[:16]}

    def publish(res: dict, done: int, final: bool) -> dict:
        res = {"model": r.model_name, "corpus": r.corpus, **r.start, "cache": "4+1020", "tokens_total": len(r.ids),
               "tokens_done": done, "complete": final, "updated": time.strftime("%Y-%m-%d %H:%M:%S"),
               "resume_command": _command(getattr(args, "name", "fig5")) + "  (resumes from the checkpoint automatically)", **res}
        res.pop("nll", None)
        out.mkdir(parents=True, exist_ok=True)
        _write_csv(out / "curve.csv", ["i", "running_nll", "bucket_nll"],
                   [(c["i"], f"{c['running_nll']:.5f}", f"{c['bucket_nll']:.5f}") for c in res.pop("curve")])
        _write(out, "result.json", res)
        return res

    res = evaluate(eng, r.ids, r.books, per_token_out=str(stem) + ".jsonl", checkpoint=str(stem) + ".ckpt",
                   checkpoint_every=args.checkpoint_every, resume=True, progress=r.progress, fingerprint=fp,
                   desc="fig5", on_checkpoint=lambda totals, done: publish(totals.result(), done, False))
    return publish(res, len(r.ids), True)


EXPERIMENTS = {"throughput": exp_throughput, "fig3": exp_fig3, "table2": exp_table2, "table6": exp_table6,
               "positions": exp_positions, "gemma3": exp_gemma3, "fig5": exp_fig5}
RETRIEVAL = ("passkey", "streameval")  # modules of this package with run(args, out) -> result
TABLE6_WINDOWS = [252, 508, 1020, 2044, 4092]


def _command(name: str) -> str:
    """The command line of this run, as `streaming-llm reproduce NAME ...`."""
    return "streaming-llm reproduce " + " ".join(sys.argv[sys.argv.index(name):] if name in sys.argv else [name])


def _int_list(s: str) -> list[int]:
    try:
        return [int(x) for x in s.split(",") if x.strip()]
    except ValueError:
        import argparse

        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {s!r}") from None


def _float_list(s: str) -> list[float]:
    try:
        return [float(x) for x in s.split(",") if x.strip()]
    except ValueError:
        import argparse

        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {s!r}") from None


def add_arguments(p) -> None:
    p.add_argument("name", choices=list(EXPERIMENTS) + list(RETRIEVAL), help="which reproduction to run")
    p.add_argument("--model", default=None, help="default: smollm2-135m-instruct (gemma3-270m for gemma3)")
    p.add_argument("--corpus", default=None, help=f"gutenberg | gutenberg-kjv | pg19 | a .txt file | a folder of .txt "
                   f"files (default: {DEFAULT_CORPUS}; {FIG5_CORPUS} for fig5)")
    p.add_argument("--tokens", type=int, default=None, help="stream the first N corpus tokens (default per experiment)")
    p.add_argument("--out", default=DEFAULT_OUT, help="results root; files go to <out>/<name>/")
    p.add_argument("--chunk-size", type=int, default=DEFAULT_CHUNK)
    p.add_argument("--recompute-stride", type=int, default=DEFAULT_RECOMPUTE_STRIDE,
                   help="fig3/gemma3: recompute every Nth token only (one full-cache forward each); 0: skip")
    p.add_argument("--window-tokens", type=int, default=None, help="fig3/gemma3: cap the window baseline's stream")
    p.add_argument("--caches", type=_int_list, default=[1024, 2048], help="table2: cache sizes (comma-separated)")
    p.add_argument("--windows", type=_int_list, default=None,
                   help=f"table6: windows with 4 sinks (default {','.join(map(str, TABLE6_WINDOWS))}); passkey, "
                   "streameval: the windows W of the 4+W caches compared (defaults in passkey.py, streameval.py)")
    p.add_argument("--recall", default=None, help="passkey, streameval: recall specs KxB, comma-separated, "
                   "each run as streaming 4+W + recall K blocks of B tokens at every window; a trailing h (4x32h): "
                   "each KV head selects its own blocks (--recall-select head); KxBm: blocks scored by their mean key "
                   "(--recall-score mean); KxBeN: a choice lasts N decode steps (default 4x32; none: no recall)")
    p.add_argument("--lengths", type=_int_list, default=None, help="passkey: prompt lengths in tokens")
    p.add_argument("--depths", type=_float_list, default=None, help="passkey: key depths (fractions of the filler)")
    p.add_argument("--trials", type=int, default=1, help="passkey: prompts per cell and variant (different keys)")
    p.add_argument("--variants", default=None, help="passkey: comma-separated, from base, repeat-filler, code-key, "
                   "plain-question (default: all)")
    p.add_argument("--distances", type=_int_list, default=None, help="streameval: answer distances in lines")
    p.add_argument("--queries", type=int, default=None, help="streameval: queries per stream")
    p.add_argument("--seed", type=int, default=0, help="passkey, streameval: seed of the keys, fillers and values")
    p.add_argument("--reference-tokens", type=int, default=3000, help="throughput: tokens for the token-by-token path")
    p.add_argument("--checkpoint-every", type=int, default=20_000, help="fig5: tokens between checkpoints")
    p.add_argument("--plot", action="store_true", help="draw the plots from the result files afterwards")
    p.add_argument("--no-progress", action="store_true")
    from ..models.special_tokens import add_bos_arguments

    add_bos_arguments(p)


def _run_retrieval(args) -> tuple[Path, dict]:
    import importlib

    from .retrieval import DEFAULT_MODEL, results_dir

    args.model = args.model or DEFAULT_MODEL
    out = results_dir(args.out, args.name, args.model)
    return out, importlib.import_module(f"{__package__}.{args.name}").run(args, out)


def run(args) -> int:
    t0 = time.perf_counter()
    if args.name in RETRIEVAL:
        out, res = _run_retrieval(args)
        tokens = res.get("tokens")
    else:
        tokens = args.tokens if args.tokens is not None else DEFAULT_TOKENS[args.name]
        if tokens is not None and tokens < 2:
            raise UserError(f"--tokens must be at least 2 (got {tokens})")
        if args.windows is None:
            args.windows = TABLE6_WINDOWS
        model = args.model or ("gemma3-270m" if args.name == "gemma3" else "smollm2-135m-instruct")
        out = Path(args.out) / args.name
        corpus = args.corpus or (FIG5_CORPUS if args.name == "fig5" else DEFAULT_CORPUS)
        r = Runner(model, corpus, tokens, args.chunk_size, progress=not args.no_progress, bos=args.bos)
        t0 = time.perf_counter()
        res = EXPERIMENTS[args.name](r, out, args)
        tokens = len(r.ids)
    cmd = _command(args.name)
    meta = {"command": cmd, "seconds": round(time.perf_counter() - t0, 1), "tokens": tokens}
    _write(out, "run.json", meta)
    if args.plot:
        from .plots import plot

        for path in plot(args.name, out):
            print(f"wrote {path}")
    printable = {k: v for k, v in res.items() if k not in ("per_book", "runs", "cells", "options", "target",
                                                          "target_paired")}
    if "target" in res:  # retrieval: the target's counts, not every checked cell
        printable["target"] = {k: v for k, v in res["target"].items() if k != "checks"}
    print(json.dumps({"experiment": args.name, **meta, **printable}, default=str))
    return 0
