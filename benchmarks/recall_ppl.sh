#!/bin/bash
# The perplexity grid of docs/recall.md ("Perplexity"): streaming, recall 4x32 and 8x16, and streaming at the
# same attended size (S + K*B + W), at windows 1020 and 252, on the first TOKENS tokens of the corpus.
# One thread, niced (a shared machine). Results: docs/results/recall_ppl/<name>.json and runs.log.
#   TOKENS=10000 benchmarks/recall_ppl.sh
cd "$(dirname "$0")/.." || exit 1
TOKENS=${TOKENS:-20000}
OUT=docs/results/recall_ppl
PY=${PYTHON:-python}
mkdir -p $OUT
run() {  # name, flags...
  name=$1; shift
  echo "== $name: $(date -u +%FT%TZ) load $(cut -d' ' -f1 /proc/loadavg)" >> $OUT/runs.log
  echo "\$ streaming-llm ppl --corpus gutenberg --max-tokens $TOKENS $* --out $OUT/$name.json" >> $OUT/runs.log
  PYTHONPATH=src STREAMING_LLM_THREADS=1 nice -n 5 $PY -m streaming_llm ppl --corpus gutenberg \
    --max-tokens $TOKENS "$@" --out $OUT/$name.json --no-progress | tail -1 >> $OUT/runs.log
}
run w1020_streaming --window 1020
run w1020_recall4x32 --window 1020 --recall-blocks 4 --block-size 32
run w1020_recall8x16 --window 1020 --recall-blocks 8 --block-size 16
run w1148_streaming --window 1148
run w252_streaming --window 252
run w252_recall4x32 --window 252 --recall-blocks 4 --block-size 32
run w252_recall8x16 --window 252 --recall-blocks 8 --block-size 16
run w380_streaming --window 380
echo "== done $(date -u +%FT%TZ) load $(cut -d' ' -f1 /proc/loadavg)" >> $OUT/runs.log
