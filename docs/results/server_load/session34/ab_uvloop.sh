#!/usr/bin/env bash
# A/B: uvicorn on uvloop + httptools (what it picks when both are installed) against asyncio + h11
# (forced by a scratch patch, not kept, that passed loop="asyncio", http="h11" when SCRATCH_PLAIN=1).
cd "$(dirname "$0")/../../../.."
for i in 1 2 3; do
  for v in plain uvloop; do
    echo "== $v $(date -u +%H:%M:%S) load $(cut -d' ' -f1 /proc/loadavg)"
    if [ $v = plain ]; then export SCRATCH_PLAIN=1; else unset SCRATCH_PLAIN; fi
    .venv/bin/python benchmarks/load_test.py --serve smollm2-135m-instruct --serve-arg=--threads=2 --sessions 1,8 \
      --turns 2 --max-tokens 64 --questions long --time-cap-s 900 --rounds 2 2>&1 | grep -E "^ +[18] +[0-9]|median|x first"
  done
done
