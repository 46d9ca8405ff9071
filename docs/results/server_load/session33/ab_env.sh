#!/bin/bash
# (scratch, as run on the session's machine: its /tmp paths held the variant sources, /tmp/qk/wt_old a worktree of the older commit)
# alternate env settings for the spawned server under the same load test. args: rounds "label|ENV=..." ...
cd /work/main
R=$1; shift
for round in $(seq 1 $R); do
  for spec in "$@"; do
    L=${spec%%|*}; E=${spec#*|}
    echo "== $L ($E) $(date -u +%H:%M:%S) load $(cut -d' ' -f1 /proc/loadavg)"
    env $E PYTHONPATH=src .venv/bin/python benchmarks/load_test.py --serve smollm2-135m-instruct --serve-arg=--threads=2 \
      --sessions 1,8,8,1 --turns 2 --max-tokens 64 --questions long 2>&1 | grep -A3 "median tok/s" | grep -v '^{'
  done
done
