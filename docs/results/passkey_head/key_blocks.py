"""Diagnostic for the per-head pass-key run (docs/recall.md, "Per-KV-head selection"): on the prompts
dense answers whose key sentence is outside the window (read from passkey/trials.csv of this run),
feed the prompt as `reproduce passkey` does (body in chunks of 512, the question as one forward) and
read which blocks each global layer (layer) or each KV head of it (head) chose for the question's
forward. Reports the fraction of layer choices, resp. (layer, KV head) choices, that include a
block holding a key-sentence token ("any") or the block holding the key's digits ("key"). Does not
generate; prints one line per prompt and method, then totals.

STREAMING_LLM_THREADS=1 PYTHONPATH=src python docs/results/passkey_head/key_blocks.py
"""

import csv
from pathlib import Path

from streaming_llm.core.engine import StreamingLLM
from streaming_llm.eval import passkey as pk
from streaming_llm.eval import retrieval as rt
from streaming_llm.eval.data import load_corpus
from streaming_llm.models.special_tokens import stream_prefix

HERE = Path(__file__).parent
rows = list(csv.DictReader(open(HERE / "passkey" / "trials.csv")))
model, tok = rt.load("smollm2-135m-instruct")
corpus = load_corpus(pk.DEFAULT_CORPUS).text
prefix = stream_prefix(tok, None)
dense_ok = {(r["variant"], int(r["length"]), float(r["depth"])) for r in rows if r["method"] == "dense" and r["correct"] == "True"}
totals = {}
for w in (124, 252):
    for spec in ("4x32", "4x32h"):
        m = rt.Method("recall", w, rt.parse_recall(spec))
        by = {(r["variant"], int(r["length"]), float(r["depth"])): r for r in rows if r["method"] == m.label}
        todo = [k for k in sorted(by) if k in dense_ok and by[k]["evicted"] == "True"]
        e = StreamingLLM(model, tok, m.config())
        for variant, length, depth in todo:
            p = pk.build_prompt(tok, variant, length, depth, 0, 0, corpus, prefix)
            assert p.key == by[(variant, length, depth)]["key"]
            e.reset()
            traces = {}
            for i, mem in enumerate(e.cache.memories):
                if mem is not None:
                    mem.trace = traces[i] = []
            e.feed(p.body, logits="none")
            e.feed(p.question, logits="none")
            s, b = 4, 32
            key_sentence = {(t - s) // b for t in range(*p.key_span)}
            # the block of the token that completes the key's first 3 characters (its first mention)
            at = next(t for t in range(*p.key_span) if p.key[:3] in tok.decode(p.body[p.key_span[0]:t + 1]))
            key_block = {(at - s) // b}
            mem = next(x for x in e.cache.memories if x is not None)
            held = sorted(key_sentence & set(mem.eligible()))
            choices = []  # one set of block ids per (layer) or (layer, KV head)
            for i, t in traces.items():
                chosen = t[-1][2]
                choices += [set(c) for c in chosen] if chosen and isinstance(chosen[0], tuple) else [set(chosen)]
            anyf = sum(bool(c & key_sentence) for c in choices) / len(choices)
            keyf = sum(bool(c & key_block) for c in choices) / len(choices)
            ok = by[(variant, length, depth)]["correct"]
            print(f"{m.label:<32} {variant:<15} {length:>5} {depth:>4}  key blocks {sorted(key_sentence)} (held {held})  "
                  f"any {anyf:.2f}  key {keyf:.2f}  answered {ok}", flush=True)
            tt = totals.setdefault(m.label, [0, 0.0, 0.0, 0])
            tt[0] += 1; tt[1] += anyf; tt[2] += keyf; tt[3] += ok == "True"
print("totals: mean fraction of choices holding a key-sentence block (any) / the key's block (key), answered")
for lab, (n, a, k, ok) in totals.items():
    print(f"  {lab:<32} n={n:<3} any {a / n:.2f}  key {k / n:.2f}  answered {ok}/{n}")
