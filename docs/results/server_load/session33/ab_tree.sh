#!/bin/bash
# (scratch, as run on the session's machine: its /tmp paths held the variant sources, /tmp/qk/wt_old a worktree of the older commit)
# alternate two trees (OLD = a worktree, NEW = /work/main) under the same load test; args: label_old label_new rounds
cd /work/main
OLD=/tmp/qk/wt_old; NEW=/work/main
for round in $(seq 1 ${3:-2}); do
  for v in old new; do
    T=$OLD; L=$1; [ $v = new ] && T=$NEW && L=$2
    echo "== $L ($T) $(date -u +%H:%M:%S) load $(cut -d' ' -f1 /proc/loadavg)"
    (cd $T && PYTHONPATH=src /work/main/.venv/bin/python benchmarks/load_test.py --serve smollm2-135m-instruct --serve-arg=--threads=2 \
      --sessions 1,8,8,1 --turns 2 --max-tokens 64 --questions long 2>&1 | grep -A6 "median tok/s" | grep -v '^{')
  done
done
