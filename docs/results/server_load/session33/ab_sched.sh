#!/bin/bash
# (scratch, as run on the session's machine: its /tmp paths held the variant sources, /tmp/qk/wt_old a worktree of the older commit)
# static vs dynamic OpenMP schedule in the native kernels, engine batch step, with and without a burner
cd "$(git rev-parse --show-toplevel)"
for round in 1 2; do
 for burn in none "1 3"; do
  for v in static dyn; do
    cp /tmp/qk/${v}_qlinear.c src/streaming_llm/models/qlinear.c; cp /tmp/qk/${v}_decode_attention.c src/streaming_llm/models/decode_attention.c
    BP=; [ "$burn" != none ] && { python3 docs/results/server_load/session33/burner.py $burn & BP=$!; }
    echo "== $v burner=$burn $(date -u +%H:%M:%S) load $(cut -d' ' -f1 /proc/loadavg): $(PYTHONPATH=src .venv/bin/python benchmarks/batch_stages.py --batch 1,8 --steps 40 --rounds 2 --first 100 --step-tokens 25 2>&1 | grep 'B=' | tr '\n' ' ')"
    [ -n "$BP" ] && kill $BP
  done
 done
done
cp /tmp/qk/dyn_qlinear.c src/streaming_llm/models/qlinear.c; cp /tmp/qk/dyn_decode_attention.c src/streaming_llm/models/decode_attention.c
