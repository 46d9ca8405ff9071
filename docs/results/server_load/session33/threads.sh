#!/bin/bash
# (scratch, as run on the session's machine) ticks = 1/100 s of CPU per thread over ~6.2 s of an 8-session level (load_test.py --sessions 8 --turns 6 --max-tokens 64 --questions long); thread names from py-spy dump
# per-thread CPU of a serve process during an 8-session load level
cd /work/main
PORT=47999; DD=$(mktemp -d)
PYTHONPATH=src .venv/bin/python -m streaming_llm.cli serve --model smollm2-135m-instruct --host 127.0.0.1 --port $PORT --data-dir $DD --log-level warning --threads=2 >/dev/null 2>&1 &
SP=$!
until curl -s http://127.0.0.1:$PORT/health >/dev/null; do sleep 0.5; done
PYTHONPATH=src .venv/bin/python benchmarks/load_test.py --url http://127.0.0.1:$PORT --sessions 8 --turns 6 --max-tokens 64 --questions long > /tmp/qk/lt.out 2>&1 &
LP=$!
sleep 4
snap() { for t in /proc/$1/task/*; do echo "$(basename $t) $(awk '{print $14+$15}' $t/stat)"; done; }
snap $SP > /tmp/qk/s0; L0=$(awk '{print $14+$15}' /proc/$LP/stat); T0=$(date +%s.%N)
sleep 6
snap $SP > /tmp/qk/s1; L1=$(awk '{print $14+$15}' /proc/$LP/stat); T1=$(date +%s.%N)
.venv/bin/py-spy dump --pid $SP 2>/dev/null | grep -E "^Thread" > /tmp/qk/names
wait $LP
kill $SP; wait $SP
python3 - <<'PY'
import re
s0=dict(l.split() for l in open('/tmp/qk/s0')); s1=dict(l.split() for l in open('/tmp/qk/s1'))
names={}
for l in open('/tmp/qk/names'):
    m=re.match(r'Thread (0x[0-9A-Fa-f]+|\d+) \((\w+)\): "([^"]*)"',l)
    if m: pass
    m2=re.search(r'Thread (\d+)',l); 
    if m2: names[m2.group(1)]=l.strip()[:90]
rows=sorted(((int(s1[t])-int(s0.get(t,0)),t) for t in s1), reverse=True)
for d,t in rows[:12]: print(f"{t:>8} {d:5d} ticks  {names.get(t,'')}")
PY
echo "load generator ticks: $((L1-L0))"; python3 -c "print('seconds', $T1-$T0)"
grep "tok/s aggregate" /tmp/qk/lt.out
