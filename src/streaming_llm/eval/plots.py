"""`streaming-llm plot NAME`: draw a reproduction's figures from its result files (matplotlib, Agg).

Reads only what `streaming_llm.eval.experiments` / `attention_map` wrote under `<results>/<name>/`
(JSON, CSV, NPZ) and writes PNGs next to them, so any result can be re-plotted without recomputing.
It loads no model and computes no perplexity.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

from ..errors import UserError
from .recall_plots import plot_passkey, plot_streameval

DEFAULT_RESULTS = "docs/results"
SMOOTH = 200  # tokens in the moving average of per-token curves
COLORS = {"dense": "tab:blue", "window": "tab:orange", "recompute": "tab:green", "streaming": "tab:red",
          "cache": "tab:red", "absolute": "tab:purple"}


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _json(d: Path, name: str) -> dict:
    p = d / name
    if not p.is_file():
        raise UserError(f"no result files in {d} (missing {name}); run `streaming-llm reproduce {d.name}` first")
    return json.loads(p.read_text())


def _moving(x, k: int):
    import numpy as np

    x = np.asarray(x, dtype=np.float64)
    k = max(1, min(k, len(x)))
    c = np.cumsum(np.insert(x, 0, 0.0))
    return (c[k:] - c[:-k]) / k, np.arange(k, len(x) + 1)  # mean of nll[j-k:j] is plotted at token j


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    _plt().close(fig)
    return path


def plot_curves(d: Path, keys: list[str] | None = None, title: str = "") -> list[Path]:
    """fig3 / gemma3 / positions: log-ppl (moving average of per-token NLL) against tokens."""
    import numpy as np

    summary = _json(d, "summary.json")
    if not (d / "nll.npz").is_file():
        raise UserError(f"no result files in {d} (missing nll.npz)")
    z = np.load(d / "nll.npz")
    keys = keys or [k for k in ("dense", "window", "streaming", "cache", "absolute") if k in z.files]
    plt = _plt()
    fig, ax = plt.subplots(figsize=(8, 4.2))
    for k in keys:
        y, x = _moving(z[k], SMOOTH)
        ax.plot(x, y, label=k, color=COLORS.get(k), lw=1.2)
    if "recompute" in z.files and len(z["recompute"]):
        pos, rec = z["recompute_positions"], z["recompute"]
        stride = summary.get("recompute_stride")
        if len(rec) < 50:  # too few for a moving average: show each recomputed token against streaming's
            ax.scatter(pos, rec, marker="x", s=30, color=COLORS["recompute"], zorder=3,
                       label=f"recompute: NLL of every {stride}th token")
            if "streaming" in z.files:
                ok = pos <= len(z["streaming"])
                ax.scatter(pos[ok], z["streaming"][pos[ok] - 1], marker="o", s=30, facecolors="none",
                           edgecolors=COLORS["streaming"], zorder=3, label="streaming: NLL of the same tokens")
        else:
            y, x = _moving(rec, max(1, SMOOTH // max(int(stride or 1), 1)))
            ax.plot(pos[x - 1], y, label=f"recompute (every {stride}th token)", color=COLORS["recompute"], lw=1.2, ls="--")
    trained = summary.get("trained_context")
    if trained and trained < len(z[keys[0]]):
        ax.axvline(trained, color="gray", ls=":", lw=1)
        ax.text(trained, 0.3, " trained context", fontsize=8, color="gray")
    if len(z[keys[0]]) > 1024:
        ax.axvline(1024, color="gray", ls="--", lw=0.6)  # the cache fills: evictions start
    ax.set_xlabel("input length (tokens)")
    ax.set_ylabel(f"log perplexity ({SMOOTH}-token moving average)")
    ax.set_title(title or f"{summary.get('model')}: {summary.get('tokens')} tokens of {summary.get('corpus')}")
    ymax = max([float(np.nanmax(_moving(z[k], SMOOTH)[0])) for k in keys] + [float(np.max(z["recompute"], initial=0))
                                                                               if "recompute" in z.files else 0])
    ax.set_ylim(0, min(ymax * 1.08, 16))
    ax.set_ylabel(f"log perplexity ({SMOOTH}-token moving average)\nor one token's NLL (markers)", fontsize=9)
    ax.legend(fontsize=8)
    return [_save(fig, d / f"{d.name}.png")]


def plot_fig5(d: Path) -> list[Path]:
    res = _json(d, "result.json")
    with open(d / "curve.csv") as f:
        rows = [(int(r["i"]), float(r["running_nll"]), float(r["bucket_nll"])) for r in csv.DictReader(f)]
    if not rows:
        raise UserError(f"{d / 'curve.csv'} is empty")
    plt = _plt()
    fig, ax = plt.subplots(figsize=(10, 4.2))
    i, run, bucket = zip(*rows)
    ax.plot(i, bucket, color="tab:red", lw=0.5, alpha=0.5, label="log ppl per 1000 tokens")
    ax.plot(i, run, color="black", lw=1.2, label="running log ppl")
    for b in res.get("per_book", []):
        if b["token_start"] <= i[-1]:
            ax.axvline(b["token_start"], color="gray", lw=0.3, alpha=0.6)
    ax.set_xlabel("tokens streamed (book boundaries: grey lines)")
    ax.set_ylabel("log perplexity")
    state = "complete" if res.get("complete") else f"partial: {res.get('tokens_done'):,} of {res.get('tokens_total'):,} tokens"
    ax.set_title(f"StreamingLLM 4+1020, {res.get('model')} on {res.get('corpus')} ({state})")
    ax.legend(fontsize=8)
    return [_save(fig, d / "fig5.png")]


def plot_table(d: Path) -> list[Path]:
    """table2 (sinks x cache, newline sinks) and table6 (cache sizes): bar charts of ppl after fill."""
    res = _json(d, "results.json")
    rows = res["rows"]
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7.5, 4))
    if d.name == "table2" or "sinks" in rows[0]:
        caches = sorted({r["cache"] for r in rows})
        labels = [f"{r['sinks']} sinks" if r["sink_tokens"] == "text" else "4 newline sinks"
                  for r in rows if r["cache"] == caches[0]]
        width = 0.8 / len(caches)
        for k, c in enumerate(caches):
            vals = [r["ppl_after_fill"] for r in rows if r["cache"] == c]
            xs = [j + k * width for j in range(len(vals))]
            bars = ax.bar(xs, vals, width, label=f"cache {c}")
            ax.bar_label(bars, fmt="%.1f", fontsize=7)
        ax.set_xticks([j + width * (len(caches) - 1) / 2 for j in range(len(labels))], labels, fontsize=8)
        ax.set_yscale("log")
        toks = sorted({f"cache {r['cache']}: {r.get('tokens', res.get('tokens'))}" for r in rows})
        ax.set_title(f"{res.get('model')}: ppl after the cache fills\n(tokens streamed: {', '.join(toks)})", fontsize=9)
        ax.legend(fontsize=8)
    else:
        common = next((k for k in ("ppl_4096_end", "ppl_1024_2048") if all(r.get(k) for r in rows)), None)
        xs = range(len(rows))
        for off, key, color in ((-0.2, "ppl_after_fill", "tab:red"), (0.2, common, "tab:gray")):
            vals = [r.get(key) if key else None for r in rows]
            if any(v is None for v in vals):
                continue
            span = "4096-end" if key == "ppl_4096_end" else "1024-2048"
            label = "tokens after this cache fills" if key == "ppl_after_fill" else f"tokens {span} (the same in every row)"
            bars = ax.bar([x + off for x in xs], vals, 0.4, color=color, label=label)
            ax.bar_label(bars, fmt="%.2f", fontsize=7)
        ax.set_xticks(list(xs), [f"{r['cache']}\n({r.get('tokens', '?')} tok)" for r in rows], fontsize=8)
        ax.legend(fontsize=8, loc="lower right")
        ax.set_ylabel("perplexity")
        ax.set_title(f"{res.get('model')}: streaming ppl vs cache size")
        ax.set_xlabel("cache (sinks + window)")
    if not ax.get_ylabel():
        ax.set_ylabel("perplexity (tokens after the cache is full)")
    return [_save(fig, d / f"{d.name}.png")]


def plot_throughput(d: Path) -> list[Path]:
    res = _json(d, "result.json")
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5, 3.5))
    names = ["token_by_token", "chunked"]
    vals = [res[n]["tokens_per_s"] for n in names]
    bars = ax.bar(["token by token\n(--reference)", f"chunked ({res['chunked']['chunk_size']})"], vals,
                  color=["gray", "tab:red"])
    ax.bar_label(bars, fmt="%.1f tok/s", fontsize=8)
    ax.set_title(f"{res['model']} 4+1020: {res['speedup']}x, max |dNLL| {res['nll_max_abs_diff']:.1e}", fontsize=9)
    ax.set_ylabel("tokens / s")
    return [_save(fig, d / "throughput.png")]


def plot_attention(d: Path) -> list[Path]:
    import numpy as np

    summary = _json(d, "summary.json")
    if not (d / "attention.npz").is_file():
        raise UserError(f"no result files in {d} (missing attention.npz)")
    z = np.load(d / "attention.npz")
    maps, layers = z["maps"], [int(x) for x in z["layers"]]
    plt = _plt()
    cols = len(layers)
    fig, axes = plt.subplots(1, cols, figsize=(3.2 * cols, 3.4), squeeze=False)
    show = min(maps.shape[-1], int(summary.get("show_tokens", 32)))
    for ax, m, layer in zip(axes[0], maps, layers):
        a = m[:show, :show]
        ax.imshow(np.where(np.tril(np.ones_like(a)) > 0, a, np.nan), cmap="viridis", vmin=0, vmax=min(1.0, np.nanmax(a[1:])))
        ax.set_title(f"layer {layer}", fontsize=9)
        ax.set_xlabel("key", fontsize=8)
        ax.set_ylabel("query", fontsize=8)
    fig.suptitle(f"{summary['model']}: attention averaged over heads and {summary['samples']} samples "
                 f"(first {show} of {summary['tokens']} tokens)", fontsize=9)
    out = [_save(fig, d / "attention_maps.png")]
    share, pos = z["first_share"], z["share_positions"]
    fig, ax = plt.subplots(figsize=(7, 4))
    for k in range(share.shape[0]):
        ax.plot(pos, share[k], lw=0.9, color=plt.cm.viridis(k / max(share.shape[0] - 1, 1)))
    sm = plt.cm.ScalarMappable(cmap="viridis", norm=plt.Normalize(0, share.shape[0] - 1))
    fig.colorbar(sm, ax=ax, label="layer")
    ax.set_xlabel("query position")
    ax.set_ylabel(f"attention on the first {summary['first_k']} token(s)")
    ax.set_title(f"{summary['model']}: attention-sink share by layer (mean over heads)", fontsize=9)
    ax.set_xscale("log")
    out.append(_save(fig, d / "sink_share.png"))
    return out


def plot_positions(d: Path) -> list[Path]:
    """Both curves, plus the moving average of the per-token NLL difference (absolute - cache)."""
    import numpy as np

    paths = plot_curves(d, ["cache", "absolute"], "positions in the cache (paper) vs absolute positions")
    z = np.load(d / "nll.npz")
    diff = z["absolute"].astype(np.float64) - z["cache"].astype(np.float64)
    plt = _plt()
    fig, ax = plt.subplots(figsize=(8, 3))
    for k, c in ((SMOOTH, "tab:purple"), (2000, "black")):
        y, x = _moving(diff, k)
        ax.plot(x, y, lw=1 if k == SMOOTH else 1.8, color=c, label=f"{k}-token moving average")
    ax.axhline(0, color="gray", lw=0.6)
    trained = _json(d, "summary.json").get("trained_context")
    if trained and trained < len(diff):
        ax.axvline(trained, color="gray", ls=":", lw=1)
    ax.set_xlabel("input length (tokens)")
    ax.set_ylabel("NLL(absolute) - NLL(cache)")
    ax.legend(fontsize=8)
    return paths + [_save(fig, d / "positions_diff.png")]


PLOTTERS = {
    "fig3": plot_curves, "gemma3": plot_curves,
    "positions": plot_positions,
    "fig5": plot_fig5, "table2": plot_table, "table6": plot_table, "throughput": plot_throughput,
    "attention": plot_attention,
    # the retrieval evaluations (recall_plots.py); _gemma3: the same plots of gemma3-270m's results
    "passkey": plot_passkey, "passkey_gemma3": plot_passkey,
    "streameval": plot_streameval, "streameval_gemma3": plot_streameval,
}


def plot(name: str, directory: str | Path) -> list[Path]:
    if name not in PLOTTERS:
        raise UserError(f"no plot named {name!r}; choose one of {', '.join(PLOTTERS)}")
    d = Path(directory)
    if not d.is_dir():
        raise UserError(f"no result files in {d}; run `streaming-llm reproduce {name}` first")
    return PLOTTERS[name](d)


def add_arguments(p) -> None:
    p.add_argument("name", nargs="+", help=f"one or more of: {', '.join(PLOTTERS)}, or 'all'")
    p.add_argument("--results", default=DEFAULT_RESULTS, help="results root (plots go next to <results>/<name>/)")


def run(args) -> int:
    names = list(PLOTTERS) if args.name == ["all"] else args.name
    done = []
    for name in names:
        d = Path(args.results) / name
        if args.name == ["all"] and not d.is_dir():
            continue
        for path in plot(name, d):
            print(f"wrote {path}")
            done.append(str(path))
    print(json.dumps({"plots": done}))
    return 0
