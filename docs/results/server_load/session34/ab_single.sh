#!/bin/bash
# One stream at a full 4+1020 cache (what the chat does all day), before this session's kernels (f1a93f4,
# worktree /tmp/qk/wt_old) against after, alternated twice.
cd /work/main
for round in 1 2; do
  for T in /tmp/qk/wt_old /work/main; do
    echo "== $T $(date -u +%H:%M:%S) load $(cut -d' ' -f1 /proc/loadavg)"
    (cd $T && PYTHONPATH=src /work/main/.venv/bin/python benchmarks/profile_decode.py --threads 2 --cache 1024 --quant auto 2>&1 | grep -v "Loading\|USDT" | grep -i -E "ms|tok" | head -4)
  done
done
