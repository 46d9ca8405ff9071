#!/bin/bash
# The load test, the commit before the AVX2 linears (f1a93f4, worktree /tmp/qk/wt_old: torch's packed
# kernels on this CPU) against the AVX2 path, alternated; each run --sessions 1,8 --rounds 2.
cd /work/main
for round in 1 2; do
  for T in /tmp/qk/wt_old /work/main; do
    echo "== $T $(date -u +%H:%M:%S) load $(cut -d' ' -f1 /proc/loadavg)"
    (cd $T && PYTHONPATH=src /work/main/.venv/bin/python benchmarks/load_test.py --serve smollm2-135m-instruct --serve-arg=--threads=2 \
      --sessions 1,8 --turns 2 --max-tokens 64 --questions long --time-cap-s 900 --rounds 2 2>&1 | grep -E "^ +[18] +[0-9]|median|x first")
  done
done
