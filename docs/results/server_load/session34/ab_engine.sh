#!/bin/bash
# The engine's batch steps, the commit before the AVX2 linears (f1a93f4, a worktree at /tmp/qk/wt_old:
# torch's packed int4/int8 kernels on this CPU) against the AVX2 path, alternated twice.
cd /work/main
for round in 1 2; do
  for T in /tmp/qk/wt_old /work/main; do
    echo "== $T $(date -u +%H:%M:%S) load $(cut -d' ' -f1 /proc/loadavg)"
    (cd $T && PYTHONPATH=src /work/main/.venv/bin/python -c "from streaming_llm.models import native; print(native.linear_status())" && \
     PYTHONPATH=src /work/main/.venv/bin/python benchmarks/batch_stages.py --batch 1,8 --steps 40 --rounds 2 --first 100 --step-tokens 25 2>&1 | tail -6)
  done
done
