"""Plots of the retrieval evaluations (`reproduce passkey`, `reproduce streameval`), from their result files.

- passkey: `passkey_heatmap.png` (accuracy per prompt length x key depth, one panel per method;
  a dot marks cells whose key is outside the method's window), `passkey_length.png` (accuracy
  against prompt length, averaged over depths), `passkey_variants.png` (accuracy per variant).
- streameval: `streameval.png` (accuracy against answer distance in lines, per method and cache:
  the analogue of the paper's Fig. 9 / Table 7).

Reads only `results.json` in the result folder (`plots.plot` registers these); loads no model.
"""

from __future__ import annotations

import re
from pathlib import Path

KIND_COLORS = {"dense": "tab:blue", "window": "tab:orange", "streaming": "tab:red", "recall": "tab:green"}
STYLES = ["-", "--", ":", "-."]


def _kind(label: str) -> str:
    if label == "dense":
        return "dense"
    if label.startswith("window"):
        return "window"
    return "recall" if "recall" in label else "streaming"


def _cache_size(label: str) -> int | None:
    """S+W of a method label ('window 0+128' and 'streaming 4+124 + recall 4x32' both: 128)."""
    m = re.search(r"(\d+)\+(\d+)", label)
    return int(m.group(1)) + int(m.group(2)) if m else None


def _styles(labels: list[str]) -> dict[str, tuple[str, str]]:
    """A colour per method kind and a line style per cache size, so one cache's methods read together."""
    sizes = sorted({c for c in map(_cache_size, labels) if c is not None})
    return {lab: (KIND_COLORS[_kind(lab)], "-" if _cache_size(lab) is None else STYLES[sizes.index(_cache_size(lab)) % len(STYLES)])
            for lab in labels}


def _log_ticks(ax, ticks) -> None:
    from matplotlib.ticker import NullFormatter

    ax.set_xticks(ticks, [str(x) for x in ticks])
    ax.xaxis.set_minor_formatter(NullFormatter())


def plot_passkey(d: Path) -> list[Path]:
    import numpy as np

    from .plots import _json, _plt, _save

    res = _json(d, "results.json")
    cells, labels = res["cells"], list(res["accuracy"])
    lengths = sorted({c["length"] for c in cells})
    depths = sorted({c["depth"] for c in cells})
    at = {(c["method"], c["length"], c["depth"]): c for c in cells}
    plt = _plt()
    cols = min(3, len(labels))
    rows = -(-len(labels) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 2.6 * rows + 0.4), squeeze=False)
    for ax, lab in zip(axes.flat, labels):
        grid = np.full((len(lengths), len(depths)), np.nan)
        for i, L in enumerate(lengths):
            for j, dep in enumerate(depths):
                c = at.get((lab, L, dep))
                if c is not None:
                    grid[i, j] = c["accuracy"]
                    ax.text(j, i, f"{c['accuracy']:.2f}" + (" •" if c["evicted"] else ""), ha="center", va="center",
                            fontsize=8, color="black" if c["accuracy"] > 0.45 else "white")
        ax.imshow(grid, vmin=0, vmax=1, cmap="viridis", aspect="auto")
        ax.set_xticks(range(len(depths)), [str(x) for x in depths], fontsize=8)
        ax.set_yticks(range(len(lengths)), [str(x) for x in lengths], fontsize=8)
        ax.set_title(lab, fontsize=9)
        ax.set_xlabel("key depth", fontsize=8)
        ax.set_ylabel("prompt tokens", fontsize=8)
    for ax in list(axes.flat)[len(labels):]:
        ax.axis("off")
    fig.suptitle(f"pass key accuracy, {res['model']} (• key outside the window)", fontsize=10)
    paths = [_save(fig, d / "passkey_heatmap.png")]

    style = _styles(labels)
    fig, ax = plt.subplots(figsize=(7, 4))
    for lab in labels:
        ys = []
        for L in lengths:
            sel = [at[(lab, L, dep)] for dep in depths if (lab, L, dep) in at]
            n = sum(c["n"] for c in sel)
            ys.append(sum(c["accuracy"] * c["n"] for c in sel) / n if n else np.nan)
        color, ls = style[lab]
        ax.plot(lengths, ys, marker="o", label=lab, color=color, ls=ls)
    ax.set_xscale("log", base=2)
    _log_ticks(ax, lengths)
    ax.set_ylim(-0.05, 1.05)
    ax.set_xlabel("prompt length (tokens)")
    ax.set_ylabel("accuracy (mean over depths and variants)")
    ax.set_title(f"pass key retrieval, {res['model']}", fontsize=10)
    ax.legend(fontsize=7)
    paths.append(_save(fig, d / "passkey_length.png"))

    variants = list(res.get("by_variant", {}))
    if variants:
        fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(variants) + 2), 4))
        width = 0.8 / len(labels)
        for k, lab in enumerate(labels):
            ys = [res["by_variant"][v].get(lab) or 0 for v in variants]
            ax.bar(np.arange(len(variants)) + k * width, ys, width, label=lab, color=style[lab][0],
                   hatch=None if style[lab][1] == "-" else "//", edgecolor="white")
        ax.set_xticks(np.arange(len(variants)) + 0.4 - width / 2, variants, fontsize=8)
        ax.set_ylim(0, 1.05)
        ax.set_ylabel("accuracy (all cells)")
        ax.set_title(f"pass key accuracy per variant, {res['model']}", fontsize=10)
        ax.legend(fontsize=7)
        paths.append(_save(fig, d / "passkey_variants.png"))
    return paths


def plot_streameval(d: Path) -> list[Path]:
    from .plots import _json, _plt, _save

    res = _json(d, "results.json")
    labels = list(res["accuracy"])
    style = _styles(labels)
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7.5, 4.2))
    for lab in labels:
        pts = sorted((int(k), v) for k, v in res["accuracy"][lab].items())
        color, ls = style[lab]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=lab, color=color, ls=ls, alpha=0.85)
    distances = sorted({c["distance"] for c in res["cells"]})
    ax.set_xscale("log")
    _log_ticks(ax, distances)
    ax.set_ylim(-0.05, 1.05)
    ax.set_xlabel("answer distance (lines)")
    ax.set_ylabel("exact-match accuracy")
    tpl = res.get("options", {}).get("tokens_per_line")
    ax.set_title(f"StreamEval, {res['model']}" + (f" (~{tpl} tokens per line)" if tpl else ""), fontsize=10)
    ax.legend(fontsize=7)
    return [_save(fig, d / "streameval.png")]
