"""Oracle diagnostic (issue 15, docs/recall_evals.md): would recall answer the pass key if every
global layer always recalled the key sentence's block(s)?

Prompts: the ones dense answers whose key sentence is outside the window (passkey.paired_target's
rule), read from docs/results/passkey_head/passkey/trials.csv, windows 124 and 252, recall 4x32.
Each is answered exactly as `reproduce passkey` answers it (`passkey.build_prompt`, an engine from
`retrieval.engine_for` with chunks of 512, `passkey.answer`: body fed in chunks, the question as one
forward, greedy decoding, the variant's stop rule and budget, exact match), once per column:
  normal  the engine's own selection (should reproduce trials.csv: 7/13 at 4+124, 4/7 at 4+252);
  forced  every global layer's selection, in EVERY forward (body chunks, the question, each decoded
          token), holds the held blocks that contain a key-sentence token; the other slots of the
          K = 4 go to the blocks the engine's bound (`RecallMemory.scores`) ranks highest;
  forced_q  (with --columns) as forced, but only in the forwards of the question and of the answer's
          tokens (those with at most len(question) queries; the body's chunks have ~500): the body
          keeps the engine's own selection;
  <name>  (with --scorer NAME, a scorer of scorers.py) every selection is the top 4 by that scorer.
The product code is untouched: each memory object's `select` is replaced inside this script.
Per prompt it also prints, for the question's forward, the fraction of layers whose choice holds
the key's block ("kb"; as key_blocks.py).

STREAMING_LLM_THREADS=1 nice -n 10 env PYTHONPATH=src .venv/bin/python docs/results/passkey_oracle/oracle.py [--columns normal,forced,forced_q] [--scorer NAME] [--out FILE] [--pick I,J]
    [--model M --trials CSV --windows W,.. --recall KxB or KxBeN]   (another model's or recall size's run; default: the one above)
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))

import scorers as sc  # noqa: E402


def selector(mem, column, forced_ids, question_len):
    """A `select(query, pos_shift)` for `column` on memory `mem` (None: the engine's own)."""
    if column == "normal":
        return None

    def select(query, pos_shift):
        if mem.stored == 0 or mem.k == 0:
            return ()
        if column == "forced" or (column == "forced_q" and query.shape[2] <= question_len):
            return sc.top(mem, mem.scores(query, pos_shift), forced=sorted(forced_ids))
        if column == "forced_q":
            return type(mem).select(mem, query, pos_shift)
        return sc.top(mem, sc.SCORERS[column](mem, query, pos_shift))
    return select


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--scorer", choices=list(sc.SCORERS), help="a third column: every selection by this scorer")
    ap.add_argument("--columns", default="normal,forced", help="from normal, forced, forced_q (normal is always run)")
    ap.add_argument("--out", default=str(HERE / "output.txt"))
    ap.add_argument("--pick", default="", help="comma-separated prompt indexes only (smoke test)")
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--trials", default=str(sc.TRIALS), help="the trials.csv whose prompts to answer")
    ap.add_argument("--windows", default="124,252")
    ap.add_argument("--recall", default="4x32", help="KxB (or KxBeN): the recall method of --trials")
    args = ap.parse_args()
    from streaming_llm.eval import passkey as pk
    from streaming_llm.eval import retrieval as rt

    t_start = time.time()
    spec = rt.parse_recall(args.recall)  # KxB, or e.g. 8x32e4 (a choice lasts 4 decode steps)
    k, b = spec[:2]
    model, tok, prompts = sc.load_prompts(args.model, args.trials, [int(w) for w in args.windows.split(",")], k, b, spec)
    if args.pick:
        prompts = [prompts[int(i)] for i in args.pick.split(",")]
    columns = ["normal"] + [c for c in args.columns.split(",") if c in ("forced", "forced_q")] + ([args.scorer] if args.scorer else [])
    lines = []
    say = lambda s="": (print(s, flush=True), lines.append(s))  # noqa: E731
    say(f"oracle.py columns: {', '.join(columns)}; {len(prompts)} prompts")
    engines, results = {}, []
    for w, m, p, row in prompts:
        e = engines.get(w) or engines.setdefault(w, rt.engine_for(model, tok, m, 512))
        sentence, kb = sc.key_blocks(tok, p, b)
        res = {}
        for col in columns:
            mems = []

            def install(col=col, mems=mems, reset=type(e).reset.__get__(e)):
                reset()  # a new cache, new memories: replace their `select` (None: keep the engine's)
                mems[:] = [x for x in e.cache.memories if x is not None]
                for mem in mems:
                    f = selector(mem, col, sentence, len(p.question))
                    if f is not None:
                        mem.select = f
                    mem.trace = []
            e.reset = install  # `passkey.answer` resets the engine first
            t0 = time.time()
            out = pk.answer(e, p)  # resets the engine, feeds, decodes, matches
            q = [next(t for t in mem.trace if t[0] == len(p.body) and t[1] == len(p.question)) for mem in mems]
            out["kb"] = sum(bool(set(t[2]) & kb) for t in q) / len(q)
            out["any"] = sum(bool(set(t[2]) & sentence) for t in q) / len(q)
            out["s"] = time.time() - t0
            res[col] = out
        e.__dict__.pop("reset", None)
        same = res["normal"]["reply"] == row["reply"] and str(res["normal"]["correct"]) == row["correct"]
        results.append((w, m, p, row, res, same))
        cells = "  ".join(f"{c} {'OK ' if r['correct'] else 'no '} kb {r['kb']:.2f} {r['reply']!r:<22}" for c, r in res.items())
        say(f"4+{w:<4} {p.variant:<14} {p.length:>5} {p.depth:>4} key {p.key:<6} blocks {sorted(sentence)}  "
            f"run {row['correct']:<5} {'(same reply)' if same else '(REPLY DIFFERS: ' + repr(row['reply']) + ')'}  {cells}")
    say()
    say(f"paired accuracy (prompts dense answers, key sentence outside the window), {args.model}, recall {args.recall}; "
        "kb = mean fraction of layers whose question-forward choice holds the key's block")
    say(f"  {'window':<8} {'variant':<15} {'n':>3}  " + "  ".join(f"{c:>20}" for c in columns) + "   trials.csv")
    for w in sorted({r[0] for r in results}):
        for v in [None, "base", "repeat-filler", "plain-question"]:
            sel = [r for r in results if r[0] == w and (v is None or r[2].variant == v)]
            if not sel:
                continue
            n = len(sel)
            cols = "  ".join(f"{sum(r[4][c]['correct'] for r in sel):>3}/{n:<3} ({sum(r[4][c]['correct'] for r in sel) / n:.2f}) kb {sum(r[4][c]['kb'] for r in sel) / n:.2f}"
                             for c in columns)
            ran = sum(r[3]["correct"] == "True" for r in sel)
            say(f"  4+{w:<6} {v or 'all':<15} {n:>3}  {cols}   {ran}/{n}")
    diff = sum(not r[5] for r in results)
    say(f"normal column vs trials.csv: {len(results) - diff}/{len(results)} prompts give the same reply and correctness")
    say(f"seconds: {time.time() - t_start:.0f} in all")
    Path(args.out).write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
