"""Per-book first-half vs second-half perplexity and slope of the Gemma 3 250K-token run (reads result.json, curve.csv).

    python docs/results/gemma3_flat/within_books.py   (from the repository root)
"""
import csv, json, numpy as np
d = "docs/results/gemma3_flat/fig5/"
r = json.load(open(d + "result.json")); rows = list(csv.DictReader(open(d + "curve.csv")))
end = np.array([int(x["i"]) for x in rows]); nll = np.array([float(x["bucket_nll"]) for x in rows])
for b in r["per_book"]:
    idx = np.nonzero((end - 1000 >= b["token_start"]) & (end <= b["token_start"] + b["predicted"]))[0]
    if len(idx) >= 20:
        h = len(idx) // 2
        slope = np.polyfit(end[idx] / 1e6, nll[idx], 1)[0]
        print(f"{b['title']}: {len(idx)} buckets, first half ppl {np.exp(nll[idx[:h]].mean()):.2f}, second half {np.exp(nll[idx[h:]].mean()):.2f}, slope {slope:+.3f} nats/M")
