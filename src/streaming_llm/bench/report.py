"""Plots and markdown tables of `streaming-llm bench` results. They read the results JSON only.

- sweep results (`{"results": [...]}`): the Fig. 10 analog of the paper: per-token latency (p50,
  p90 as a thin band) and memory (peak RSS, and its increase over the loaded model) against cache
  size, one line per method;
- long-stream results (`{"long_stream": {...}}`): latency (p50 and p90 of each block) and RSS
  against tokens streamed;
- `markdown(data)`: the tables of BENCHMARKS.md, so the published tables come from the JSON as is.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import UserError

STYLE = {  # method -> (colour, marker)
    "streaming": ("tab:blue", "o"),
    "window": ("tab:cyan", "v"),
    "dense": ("tab:green", "s"),
    "hf": ("tab:gray", "D"),
    "recompute": ("tab:red", "^"),
    "llamacpp": ("tab:orange", "P"),
    "recall": ("tab:purple", "*"),
}


def load_results(path: str) -> dict:
    p = Path(path)
    if not p.is_file():
        raise UserError(f"results file not found: {path}")
    try:
        data = json.loads(p.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path} is not a JSON results file ({e})") from None
    if not isinstance(data, dict) or ("results" not in data and "long_stream" not in data):
        raise UserError(f"{path} has neither 'results' nor 'long_stream': not written by streaming-llm bench")
    return data


def plot_file(json_path: str, out: str | None = None) -> str:
    return plot_data(load_results(json_path), out or str(Path(json_path).with_suffix(".png")))


def _title(data: dict) -> str:
    m = data.get("machine", {})
    return f"{m.get('model', '')}  {m.get('dtype', '')}  |  {m.get('cpu', '')}, {m.get('torch_threads', '?')} threads"


def plot_data(data: dict, out: str) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig = _long(plt, data) if "long_stream" in data else _sweep(plt, data)
    fig.suptitle(_title(data), fontsize=9)
    fig.tight_layout()
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def row_label(r: dict, batch: bool = True) -> str:
    """A result row's method, with its batch size when it decoded several streams per forward; recall
    rows as `streaming+recallKxB` (`every N` when a choice lasts N decode steps), with their fill (tokens streamed into the memory first) when any."""
    b = r.get("batch_size", 1)
    name = r["method"]
    if name == "recall":
        name = f"streaming+recall{r.get('recall_blocks', '?')}x{r.get('block_size', '?')}"
        name += f" every {r['recall_every']}" if r.get("recall_every", 1) > 1 else ""
        name += f" fill {r['recall_fill']}" if r.get("recall_fill") else ""
    return name + (f" x{b}" if b > 1 and batch else "")


def _sweep(plt, data: dict):
    results = data["results"]
    if not results:
        raise UserError("the results file has no results to plot")
    fig, (ax_t, ax_m, ax_d) = plt.subplots(1, 3, figsize=(15, 4.2))
    methods = list(dict.fromkeys(row_label(r) for r in results))
    for method in methods:
        rows = sorted((r for r in results if row_label(r) == method), key=lambda r: r["cache_size"])
        x = [r["cache_size"] for r in rows]
        colour, marker = STYLE.get(rows[0]["method"], ("black", "x"))
        label = method + (f" ({_precision(rows[0])})" if rows[0].get("dtype") else "")
        ax_t.plot(x, [r["ms_per_token_p50"] for r in rows], marker=marker, color=colour, label=label)
        ax_t.fill_between(x, [r["ms_per_token_p50"] for r in rows], [r["ms_per_token_p90"] for r in rows],
                          color=colour, alpha=0.15, linewidth=0)
        ax_m.plot(x, [r["peak_rss_mb"] for r in rows], marker=marker, color=colour, label=method)
        ax_d.plot(x, [r["rss_increase_mb"] for r in rows], marker=marker, color=colour, label=method)
        if rows[0].get("decode_rss_increase_mb") is not None:
            ax_d.plot(x, [r["decode_rss_increase_mb"] for r in rows], marker=marker, color=colour, linestyle="--",
                      alpha=0.6, label=f"{method}, decode only")
        if rows[0].get("floor_ms") is not None:
            ax_t.plot(x, [r.get("floor_ms") for r in rows], color=colour, linestyle=":", label=f"{method} floor")
    for ax in (ax_t, ax_m, ax_d):
        ax.set_xscale("log", base=2)
        ax.set_xticks(sorted({r["cache_size"] for r in results}))
        ax.get_xaxis().set_major_formatter(plt.matplotlib.ticker.ScalarFormatter())
        ax.set_xlabel("cache size (tokens)")
        ax.grid(alpha=0.3)
    ax_t.set_yscale("log")
    ax_t.set_ylabel("decode latency, ms/step (p50; band to p90)")
    ax_m.set_ylabel("peak RSS of the process, MB")
    ax_d.set_ylabel("RSS increase over the loaded model, MB\n(solid: prefill + decode; dashed: decode)")
    for ax in (ax_t, ax_m, ax_d):
        ax.legend(fontsize=8)
    return fig


def _long(plt, data: dict):
    long = data["long_stream"]
    cps = long["checkpoints"]
    x = [c["tokens_decoded"] for c in cps]
    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(11, 4.2))
    ax_t.plot(x, [c["p50_ms"] for c in cps], color="tab:blue", label="p50 per block")
    ax_t.plot(x, [c["p90_ms"] for c in cps], color="tab:blue", alpha=0.4, linestyle="--", label="p90 per block")
    ax_t.axhline(long["p50_first_ms"] * 1.10, color="tab:red", linestyle=":", label="first-window p50 + 10%")
    ax_t.set_ylim(bottom=0)
    ax_t.set_ylabel("decode latency, ms/token")
    ax_m.plot(x, [c["rss_mb"] for c in cps], color="tab:green", label="RSS")
    ax_m.axhline(long["rss_first_mb"] * 1.05, color="tab:red", linestyle=":", label="first RSS + 5%")
    ax_m.set_ylim(bottom=0)
    ax_m.set_ylabel("RSS, MB")
    for ax in (ax_t, ax_m):
        ax.set_xlabel(f"tokens decoded ({long['method']}, cache {long['cache_size']})")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    return fig


def _cell(x, spec: str = ".2f") -> str:
    return "-" if x is None else format(x, spec)


def _precision(r: dict) -> str:
    quant = r.get("quant") or "none"
    return r.get("dtype", "") + ("" if quant == "none" else f" + {quant}")


def markdown(data: dict) -> str:
    """BENCHMARKS.md tables for a results JSON (sweep or long stream), machine line first."""
    m = data.get("machine", {})
    bw = m.get("bandwidth")
    lines = [f"Machine: {m.get('cpu', '?')}, {m.get('logical_cpus', '?')} CPUs, torch {m.get('torch', '?')}, "
             f"transformers {m.get('transformers', '?')}, {m.get('torch_threads', '?')} threads, "
             f"dtype {_precision(m)}, load average {m.get('load_avg_1m', '?')} at start"
             + (f", threads chosen by {m['thread_policy']} ({m.get('thread_reason', '')})" if m.get("thread_policy") else "")
             + (f", beside a {m['busy_threads']}-thread matmul loop" if m.get("busy_threads") else "")
             + (f"; memory bandwidth read {bw['read_gb_s']} GB/s, copy {bw['copy_gb_s']} GB/s" if bw else ""), ""]
    if "long_stream" in data:
        ls = data["long_stream"]
        lines += [
            "| method | cache | tokens decoded | p50 first window (ms) | p50 last window (ms) | last/first (<= 1.10) "
            "| RSS first (MB) | RSS max (MB) | RSS growth (< 5%) |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
            f"| {ls['method']} | {ls['cache_size']} | {ls['tokens_decoded']} | {ls['p50_first_ms']:.2f} | "
            f"{ls['p50_last_ms']:.2f} | {ls['p50_last_over_first']:.3f} | {ls['rss_first_mb']:.0f} | "
            f"{ls['rss_max_mb']:.0f} | {ls['rss_growth_pct']:.2f}% |",
        ]
        return "\n".join(lines)
    results = data["results"]
    floor = any(r.get("floor_ms") is not None for r in results)
    lines += [
        "| method (x streams per forward) | dtype | cache | p50 ms/step | p90 ms/step | tok/s (all streams) | peak RSS MB | RSS increase MB (decode only) "
        "| prefill tok/s |"
        + (" floor ms | x floor |" if floor else ""),
        "|---|---|---:|---:|---:|---:|---:|---:|---:|" + ("---:|---:|" if floor else ""),
    ]
    order = {m: i for i, m in enumerate(STYLE)}
    for r in sorted(results, key=lambda r: (order.get(r["method"], len(order)), r.get("batch_size", 1), r["cache_size"])):
        row = (f"| {row_label(r)} | {_precision(r)} | {r['cache_size']} | {r['ms_per_token_p50']:.2f} | "
               f"{r['ms_per_token_p90']:.2f} | {_cell(r.get('tokens_per_s'), '.1f')} | {r['peak_rss_mb']:.0f} | "
               f"{r['rss_increase_mb']:.1f} ({_cell(r.get('decode_rss_increase_mb'), '.1f')}) | "
               f"{_cell(r.get('prefill_tok_per_s'), '.0f')} |")
        if floor:
            row += f" {_cell(r.get('floor_ms'))} | {_cell(r.get('x_floor'))} |"
        lines.append(row)
    if any(r["method"] == "recall" for r in results):
        lines += ["", *recall_markdown(results)]
    ratio_keys = ("streaming_vs_recompute_speedup", "streaming_over_dense", "hf_over_streaming", "streaming_over_llamacpp")
    ratios = {size: e for size, e in data.get("ratios", {}).items() if any(k in e for k in ratio_keys)}
    if ratios:
        lines += ["", "| cache | streaming vs recompute speed-up (>= 100x at 4096) | streaming / dense (<= 1.15) "
                  "| hf / streaming (>= 2) | streaming / llama.cpp (<= 0.85) |", "|---:|---:|---:|---:|---:|"]
        for size, e in ratios.items():
            lines.append(f"| {size} | {_cell(e.get('streaming_vs_recompute_speedup'), '.1f')} | "
                         f"{_cell(e.get('streaming_over_dense'), '.3f')} | {_cell(e.get('hf_over_streaming'), '.2f')} | "
                         f"{_cell(e.get('streaming_over_llamacpp'), '.3f')} |")
    return "\n".join(lines)


def recall_markdown(results: list[dict]) -> list[str]:
    """The recall rows against streaming at the same cache size: p50/p90, their ratio to streaming's
    p50, the tokens held in the memory, and RSS (peak, decode peak, and at the end its anonymous and
    file-backed parts: the store's pages are file-backed)."""
    stream = {r["cache_size"]: r for r in results if r["method"] == "streaming" and r.get("batch_size", 1) == 1}
    lines = ["| method | cache (S+W) | attends to | tokens in memory | p50 ms | p90 ms | p50 / streaming (<= 1.5) "
             "| peak RSS MB | decode peak RSS MB | anon RSS MB | file RSS MB | block reads per layer-step |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    rows = [r for r in results if r["method"] in ("streaming", "recall") and r.get("batch_size", 1) == 1]
    for r in sorted(rows, key=lambda r: (r["cache_size"], r["method"] != "streaming", r.get("recall_fill", 0))):
        base = stream.get(r["cache_size"])
        extra = r.get("recall_blocks", 0) * r.get("block_size", 0) if r["method"] == "recall" else 0
        ratio = r["ms_per_token_p50"] / base["ms_per_token_p50"] if base else None
        lines.append(f"| {row_label(r)} | {r['cache_size']} | {r['cache_size'] + extra} | "
                     f"{_cell(r.get('recall_stored_tokens'), 'd')} | {r['ms_per_token_p50']:.2f} | "
                     f"{r['ms_per_token_p90']:.2f} | {_cell(ratio, '.3f')} | {r['peak_rss_mb']:.0f} | "
                     f"{_cell(r.get('decode_peak_rss_mb'), '.0f')} | {_cell(r.get('rss_anon_mb'), '.0f')} | "
                     f"{_cell(r.get('rss_file_mb'), '.0f')} | {_cell(r.get('recall_gathers_per_layer_step'), '.3f')} |")
    for r in rows:
        if r.get("fill_rss"):
            lines += ["", f"RSS while {row_label(r)} filled its memory (MB; anon = private memory, file = file-backed "
                      "pages, e.g. the model's memory-mapped weights):", "",
                      "| tokens in memory | RSS | anon | file |", "|---:|---:|---:|---:|"]
            lines += [f"| {c['stored_tokens']} | {c['rss_mb']:.0f} | {_cell(c.get('rss_anon_mb'), '.0f')} | "
                      f"{_cell(c.get('rss_file_mb'), '.0f')} |" for c in r["fill_rss"]]
    return lines
