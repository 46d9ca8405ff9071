"""Compare this run's replies with docs/results/passkey_budget_every's, prompt by prompt.

    python docs/results/passkey_disk_summaries/compare.py
"""
import csv
from pathlib import Path

here = Path(__file__).parent


def load(p):
    return {(r["method"], r["cache"], r["variant"], r["length"], r["depth"], r["trial"]): r for r in csv.DictReader(open(p))}


old = load(here.parent / "passkey_budget_every" / "passkey" / "trials.csv")
new = load(here / "trials.csv")
common = [k for k in new if k in old]
diff = [k for k in common if old[k]["reply"] != new[k]["reply"]]
print(f"{len(new)} replies here, {len(common)} of them also in passkey_budget_every; {len(diff)} differ")
for k in diff:
    print(k, repr(old[k]["reply"]), repr(new[k]["reply"]))
