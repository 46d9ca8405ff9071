#!/bin/bash
# One stream at a full 4+1020 cache, before (3a094fe, worktree /tmp/qk/wt_c) and after QuantLinear's leaner native
# call (e79aef5), alternated three times.
cd /work/main
for round in 1 2 3; do
  for T in /tmp/qk/wt_c /work/main; do
    echo "== $T $(date -u +%H:%M:%S) load $(cut -d' ' -f1 /proc/loadavg)"
    (cd $T && PYTHONPATH=src /work/main/.venv/bin/python benchmarks/profile_decode.py --threads 2 --cache 1024 --quant auto 2>&1 | grep "ms/step")
  done
done
