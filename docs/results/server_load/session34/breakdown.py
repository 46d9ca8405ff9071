import json, sys
for f in sys.argv[1:]:
    d=json.load(open(f))
    for l in d['levels']:
        b=l['level_batch']
        busy = b['decode_s']+b['prefill_s']+b['gather_s']+b['calls_s']
        print(f"{l['sessions']:3d} wall {l['wall_s']:5.2f} tok/s {l['completion_tokens_per_s']:6.1f} dec {b['decode_s']:.2f}/{b['decode_steps']} = {b['decode_s']/b['decode_steps']*1000:5.1f} ms  pre {b['prefill_s']:.2f} ({b['prefill_tokens']})  gather {b['gather_s']:.2f} calls {b['calls_s']:.2f} idle {l['wall_s']-busy:.2f} persist p50 {l['persist_ms']['p50']} max {l['persist_ms']['max']} ttft95 {l['ttft_ms']['p95']}")
