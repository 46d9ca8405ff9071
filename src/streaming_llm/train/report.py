"""Result files of `streaming-llm pretrain`: the markdown table and the plot, from results.json only.

Any results.json can be re-plotted without recomputing: `python -m streaming_llm.train.report DIR`.
It does NOT train or evaluate.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

LABELS = {
    "vanilla": "vanilla",
    "sink_token": "learnable sink token",
    "softmax_off_by_one": "softmax-off-by-one (zero sink)",
}


def _fmt(x) -> str:
    if x is None:
        return "-"
    if isinstance(x, float):
        return f"{x:,.2f}" if x < 1e5 else f"{x:.3g}"
    return str(x)


def markdown(results: dict) -> str:
    ev = results.get("evaluation", {})
    variants = results["variants"]
    sinks = sorted({s for v in variants.values() for s in v.get("ppl_by_sinks", {})}, key=int)
    lines = [
        "# Pre-training with attention sinks: streaming perplexity (Table 3 analog)",
        "",
        f"Streaming perplexity on {ev.get('tokens', '?')} held-out tokens ({ev.get('stream_over_context', '?')}x the "
        f"training context of {ev.get('context', '?')}), window {ev.get('window', '?')} recent tokens plus S sinks. "
        "For the sink-token variant the `<sink>` token starts the stream and is the first sink.",
        "",
        "| variant | " + " | ".join(f"S={s}" for s in sinks) + " | val loss | train loss |",
        "|---|" + "---:|" * (len(sinks) + 2),
    ]
    for name, v in variants.items():
        row = [_fmt(v.get("ppl_by_sinks", {}).get(s)) for s in sinks]
        lines.append(f"| {LABELS.get(name, name)} | " + " | ".join(row) + f" | {_fmt(v.get('val_loss'))} | {_fmt(v.get('train_loss'))} |")
    lines += ["", "Attention share on position 0 per layer (mean over heads, queries in the second half of each window):", ""]
    n_layers = max((len(v.get("attention", {}).get("first_position_share", [])) for v in variants.values()), default=0)
    if n_layers:
        lines += ["| variant | " + " | ".join(f"layer {i}" for i in range(n_layers)) + " |", "|---|" + "---:|" * n_layers]
        for name, v in variants.items():
            share = v.get("attention", {}).get("first_position_share", [])
            lines.append(f"| {LABELS.get(name, name)} | " + " | ".join(f"{x:.3f}" for x in share) + " |")
            if "zero_slot_share" in v.get("attention", {}):
                zs = v["attention"]["zero_slot_share"]
                lines.append("| ↳ share on the zero slot | " + " | ".join(f"{x:.3f}" for x in zs) + " |")
    s = results.get("settings", {})
    if s:
        lines += ["", f"Model: {s.get('parameters', '?'):,} parameters, {json.dumps(s.get('size', {}))}; "
                  f"{s.get('train', {}).get('steps', '?')} steps of {s.get('tokens_per_step', '?')} tokens, seed "
                  f"{s.get('train', {}).get('seed', '?')}, identical for all variants."]
    if results.get("command"):
        lines += ["", f"Command: `{results['command']}`"]
    return "\n".join(lines) + "\n"


def plot(results: dict, png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    variants = results["variants"]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    ax = axes[0]
    for name, v in variants.items():
        items = sorted(v.get("ppl_by_sinks", {}).items(), key=lambda kv: int(kv[0]))
        if items:
            ax.plot([int(k) for k, _ in items], [x for _, x in items], marker="o", label=LABELS.get(name, name))
    ax.set_yscale("log")
    ax.set_xticks(results.get("evaluation", {}).get("sinks") or ax.get_xticks())
    ax.set_xlabel("sinks kept (S)")
    ax.set_ylabel("streaming perplexity")
    ev = results.get("evaluation", {})
    ax.set_title(f"S sinks + {ev.get('window', '?')} recent tokens")
    ax.legend(fontsize=8)
    ax = axes[1]
    for name, v in variants.items():
        share = v.get("attention", {}).get("first_position_share", [])
        if share:
            ax.plot(range(len(share)), share, marker="o", label=LABELS.get(name, name))
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.set_xlabel("layer")
    ax.set_ylabel("attention share on position 0")
    ax.set_ylim(0, 1)
    ax.set_title("attention on the first position")
    ax = axes[2]
    for name, v in variants.items():
        curve = v.get("train", {}).get("loss_curve", [])
        if curve:
            ax.plot([c[0] for c in curve], [c[1] for c in curve], label=LABELS.get(name, name))
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    ax.set_title("training loss")
    fig.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=110)
    plt.close(fig)


def write_reports(out_dir: Path) -> None:
    results = json.loads((out_dir / "results.json").read_text(encoding="utf-8"))
    (out_dir / "results.md").write_text(markdown(results), encoding="utf-8")
    plot(results, out_dir / "results.png")


if __name__ == "__main__":
    write_reports(Path(sys.argv[1] if len(sys.argv) > 1 else "."))
