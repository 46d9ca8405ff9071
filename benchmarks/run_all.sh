#!/usr/bin/env bash
# The publishable benchmark runs of BENCHMARKS.md (issue 7). Run from the repository root on a QUIET
# machine (check `uptime`: load average well under the core count; every result row records it).
#
#   benchmarks/run_all.sh            # sweep (with the floor), profile, long stream, in that order
#   benchmarks/run_all.sh floor      # any of: sweep floor profile long peer peer-busy threads (floor: quick re-check only)
#
# Environment: MODEL, DTYPE (engine weights; the hf baseline is always float32), QUANT (auto | none | int8 |
# int4: the engine's weight-only quantization; hf stays plain), THREADS, OUT,
# PYTHON, LONG (tokens of the long stream), LONG_CACHE. Outputs go to $OUT: <name>.json, .png,
# .txt (stdout: table, markdown, one-line JSON summary) and .log (stderr: progress).
set -euo pipefail

MODEL=${MODEL:-smollm2-135m-instruct}
DTYPE=${DTYPE:-float32}
QUANT=${QUANT:-auto}
THREADS=${THREADS:-2}
OUT=${OUT:-benchmarks/results}
PYTHON=${PYTHON:-python}
LONG=${LONG:-100000}
LONG_CACHE=${LONG_CACHE:-1024}
export PYTHONPATH="src${PYTHONPATH:+:$PYTHONPATH}"
mkdir -p "$OUT"

bench() {  # bench NAME ARGS...: run one bench command, keep its outputs under $OUT
    local name=$1
    shift
    echo "== $name: streaming-llm bench $*" >&2
    local t0=$SECONDS
    "$PYTHON" -m streaming_llm.cli bench --model "$MODEL" --dtype "$DTYPE" --quant "$QUANT" --threads "$THREADS" "$@" \
        2> "$OUT/$name.log" | tee "$OUT/$name.txt"
    echo "== $name: $((SECONDS - t0)) s" >&2
}

run() {
    case $1 in
        # Table 1 + Fig. 10 analog + floor: every method at every default cache size (about 15-25 min).
        sweep) bench sweep --floor --markdown --json "$OUT/sweep.json" --plot "$OUT/sweep.png" ;;
        # Hardware floor alone, for a quick re-check after an engine change (about 5 min).
        floor) bench floor --methods streaming,dense --floor --markdown --json "$OUT/floor.json" ;;
        # Where the time goes: profiler tables of 5 decode steps at cache 1024 (about 1-2 min).
        profile) bench profile --methods streaming,hf --cache-sizes 1024 --steps 50 --profile --profile-steps 5 \
                     --json "$OUT/profile.json" ;;
        # Flat latency and memory over a long stream (~LONG x p50 ms/token: 100K x 30 ms = 50 min, x 60 ms = 100 min).
        long) bench long --methods streaming --cache-sizes "$LONG_CACHE" --long-stream "$LONG" --every 1000 \
                  --markdown --json "$OUT/long.json" --plot "$OUT/long.png" ;;
        # Engine and llama.cpp side by side (issue 17, targets 1 and 5): same GGUF, threads, cached tokens (~4 min).
        peer) bench peer --methods streaming,dense,llamacpp,hf --cache-sizes 256,1024,4096 --markdown \
                  --json "$OUT/peer.json" --plot "$OUT/peer.png" ;;
        # The same beside a 2-thread matmul loop that bench starts and stops itself (target 4; ~2 min).
        peer-busy) bench peer_busy --methods streaming,llamacpp --cache-sizes 1024 --busy 2 --markdown \
                       --json "$OUT/peer_busy.json" ;;
        # Thread policies quiet and busy, engine and llama.cpp (~4 min a round; not through bench(): own flags).
        threads) echo "== threads: benchmarks/thread_policy.py" >&2
                 "$PYTHON" benchmarks/thread_policy.py --rounds 2 --json "$OUT/thread_policy.json" \
                     2> "$OUT/thread_policy.log" | tee "$OUT/thread_policy.txt" ;;
        *) echo "unknown run '$1' (sweep | floor | profile | long | peer | peer-busy | threads)" >&2; exit 2 ;;
    esac
}

if [ $# -eq 0 ]; then
    set -- sweep profile long
fi
uptime >&2
for name in "$@"; do
    run "$name"
done
