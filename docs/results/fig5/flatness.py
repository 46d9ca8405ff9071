"""Is the Fig. 5 curve flat? Statistics from this folder's result.json and curve.csv only.

    python docs/results/fig5/flatness.py [FOLDER]

FOLDER (default: this script's folder) holds a `reproduce fig5` run's result.json and curve.csv,
e.g. docs/results/gemma3_flat/fig5 for the Gemma 3 run.
Prints the perplexity of each tenth of the stream, the least-squares slope of the 1,000-token
bucket NLLs against stream position, a within-book drift test (for each book with at least 20
whole buckets: mean bucket NLL of its second half minus its first half; a model that degrades
with stream length makes these positive), and the per-book table.
"""

import csv
import json
import math
import sys
from pathlib import Path

import numpy as np

here = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).resolve().parent
r = json.loads((here / "result.json").read_text())
rows = list(csv.DictReader((here / "curve.csv").open()))
end = np.array([int(x["i"]) for x in rows])  # bucket k covers tokens (end - 1000, end]
nll = np.array([float(x["bucket_nll"]) for x in rows])
n = len(nll)
print(f"tokens_done {r['tokens_done']:,} complete {r['complete']} ppl {r['ppl']:.2f} buckets {n}")
print("\n| tokens | ppl |\n|---|---:|")
for k in range(10):
    sl = slice(k * n // 10, (k + 1) * n // 10)
    if end[-1] >= 1e6:
        print(f"| {(end[sl][0] - 1000) / 1e6:.2f}M-{end[sl][-1] / 1e6:.2f}M | {math.exp(nll[sl].mean()):.2f} |")
    else:  # a shorter stream: thousands
        print(f"| {(end[sl][0] - 1000) / 1e3:.0f}K-{end[sl][-1] / 1e3:.0f}K | {math.exp(nll[sl].mean()):.2f} |")
slope = np.polyfit(end / 1e6, nll, 1)[0]
print(f"\nleast-squares slope of the bucket NLLs: {slope:+.4f} nats per million tokens")
diffs = []
for b in r["per_book"]:
    idx = np.nonzero((end - 1000 >= b["token_start"]) & (end <= b["token_start"] + b["predicted"]))[0]
    if len(idx) >= 20:
        h = len(idx) // 2
        diffs.append(nll[idx[h:]].mean() - nll[idx[:h]].mean())
d = np.array(diffs)
print(f"within-book drift, {len(d)} books: second half minus first half NLL mean {d.mean():+.4f}, "
      f"median {np.median(d):+.4f}, positive in {(d > 0).sum()} of {len(d)}")
print("\n| # | book (in stream order) | tokens scored | ppl |\n|---:|---|---:|---:|")
for i, b in enumerate(r["per_book"]):
    if b["predicted"]:
        print(f"| {i + 1} | {b['title']} | {b['predicted']:,} | {b['ppl']:.2f} |")
