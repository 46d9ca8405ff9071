#!/bin/bash
# The load test before (057b1b9, worktree /tmp/qk/wt_prev) and after the turn threads' fewer tensor calls
# (d19e96a), alternated twice; each run --sessions 1,8 --rounds 2; the 8-session levels' gather_s printed.
cd /work/main
for round in 1 2; do
  for T in /tmp/qk/wt_prev /work/main; do
    echo "== $T $(date -u +%H:%M:%S) load $(cut -d' ' -f1 /proc/loadavg)"
    (cd $T && PYTHONPATH=src /work/main/.venv/bin/python benchmarks/load_test.py --serve smollm2-135m-instruct --serve-arg=--threads=2 \
      --sessions 1,8 --turns 2 --max-tokens 64 --questions long --time-cap-s 900 --rounds 2 --out /tmp/qk/ab_turn.json 2>&1 | grep -A3 "median tok/s")
    /work/main/.venv/bin/python docs/results/server_load/session34/breakdown.py /tmp/qk/ab_turn.json | grep "^  8"
  done
done
