#!/bin/bash
# The perplexity grid of docs/recall.md ("Perplexity"): streaming, recall 4x32, 8x16, 8x32 and 16x32 scored by
# both the bound and the mean key (--recall-score both), and streaming at
# the same attended size (S + K*B + W), at windows 1020 and 252, on the first TOKENS tokens of the corpus.
# One thread, niced (a shared machine). Results: docs/results/recall_ppl/<name>.json and runs.log.
# ONLY="name ..." runs just those rows (the table shows every row whose result file exists).
#   TOKENS=10000 benchmarks/recall_ppl.sh
#   TOKENS=10000 ONLY="w1020_recall8x32 w1276_streaming w252_recall8x32 w508_streaming" benchmarks/recall_ppl.sh
cd "$(dirname "$0")/.." || exit 1
TOKENS=${TOKENS:-20000}
OUT=docs/results/recall_ppl
PY=${PYTHON:-python}
mkdir -p $OUT
run() {  # name, flags...
  name=$1; shift
  if [ -n "$ONLY" ] && [[ " $ONLY " != *" $name "* ]]; then return; fi
  echo "== $name: $(date -u +%FT%TZ) load $(cut -d' ' -f1 /proc/loadavg)" >> $OUT/runs.log
  echo "\$ streaming-llm ppl --corpus gutenberg --max-tokens $TOKENS $* --out $OUT/$name.json" >> $OUT/runs.log
  PYTHONPATH=src STREAMING_LLM_THREADS=1 nice -n 5 $PY -m streaming_llm ppl --corpus gutenberg \
    --max-tokens $TOKENS "$@" --out $OUT/$name.json --no-progress | tail -1 >> $OUT/runs.log
}
run w1020_streaming --window 1020
run w1020_recall4x32 --window 1020 --recall-blocks 4 --block-size 32
run w1020_recall8x16 --window 1020 --recall-blocks 8 --block-size 16
run w1020_recall8x32 --window 1020 --recall-blocks 8 --block-size 32
run w1148_streaming --window 1148
run w1276_streaming --window 1276
run w1020_recall16x32b --window 1020 --recall-blocks 16 --block-size 32 --recall-score both
run w1532_streaming --window 1532
run w252_streaming --window 252
run w252_recall4x32 --window 252 --recall-blocks 4 --block-size 32
run w252_recall8x16 --window 252 --recall-blocks 8 --block-size 16
run w252_recall8x32 --window 252 --recall-blocks 8 --block-size 32
run w380_streaming --window 380
run w508_streaming --window 508
run w252_recall16x32b --window 252 --recall-blocks 16 --block-size 32 --recall-score both
run w764_streaming --window 764
echo "== done $(date -u +%FT%TZ) load $(cut -d' ' -f1 /proc/loadavg)" >> $OUT/runs.log
# the table of docs/recall.md
$PY - <<'PY'
import json, pathlib
rows = [("w1020_streaming", "streaming", 1020, 0, 0), ("w1020_recall4x32", "recall 4x32", 1020, 4, 32),
        ("w1020_recall8x16", "recall 8x16", 1020, 8, 16), ("w1020_recall8x32", "recall 8x32", 1020, 8, 32),
        ("w1148_streaming", "streaming", 1148, 0, 0), ("w1276_streaming", "streaming", 1276, 0, 0),
        ("w1020_recall16x32b", "recall 16x32, both scores", 1020, 16, 32), ("w1532_streaming", "streaming", 1532, 0, 0),
        ("w252_streaming", "streaming", 252, 0, 0), ("w252_recall4x32", "recall 4x32", 252, 4, 32),
        ("w252_recall8x16", "recall 8x16", 252, 8, 16), ("w252_recall8x32", "recall 8x32", 252, 8, 32),
        ("w380_streaming", "streaming", 380, 0, 0), ("w508_streaming", "streaming", 508, 0, 0),
        ("w252_recall16x32b", "recall 16x32, both scores", 252, 16, 32), ("w764_streaming", "streaming", 764, 0, 0)]
print("| method | window | attends to (S + K·B + W) | ppl | mean NLL | tok/s |\n|---|---:|---:|---:|---:|---:|")
for name, label, w, k, b in rows:
    if not pathlib.Path(f"docs/results/recall_ppl/{name}.json").exists():
        continue
    d = json.loads(pathlib.Path(f"docs/results/recall_ppl/{name}.json").read_text())
    print(f"| {label} | {w} | {4 + k * b + w} | {d['ppl']:.3f} | {d['nll_mean']:.4f} | {d['tokens_per_s']:.0f} |")
PY
