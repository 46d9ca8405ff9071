"""Diagnostic (issue 15, docs/recall_evals.md): how often would other block scorers choose the key's
block for the question's forward? Same prompts as docs/results/passkey_head/key_blocks.py (the ones
dense answers whose key sentence is outside the window, from passkey_head/passkey/trials.csv, both
windows, recall 4x32). Each prompt is fed as `reproduce passkey` feeds it (body in chunks of 512
with the engine's own selection, then the question as one forward); the question's forward's
queries are captured in every global layer's `select` and every scorer below ranks that layer's
held blocks with them (top 4, ties to the older block). No generation; product code untouched.

Scorers (score of a held block; q: the forward's queries rotated to stream indices, as `scores`
does; per KV head kv, its query heads g, the forward's queries t):
  a_bound       the engine's rule: Quest bound summed over all query heads and queries
  b_last        the bound of the forward's last query only (summed over heads)
  c_headnorm    per query head: bound summed over queries, divided by that head's max |.| over
                blocks, then summed over heads (no head dominates)
  c_headz       as c_headnorm but z-scored over blocks per query head (minus mean, over std)
  e_centroid    q . (mean key of the block), summed over heads and queries (one vector per block)
  d_exact       exact max over the block's stored keys of q . k, summed over heads and queries
                (the expensive reference: the bound made tight)
  d_exact_last  d_exact with the last query only
  f_mass        softmax attention mass the block would get if each query head attended to the
                whole memory at once (scaled q . k, one softmax per head and query over every
                held key), summed over heads and queries (expensive reference)
  g_layervote   (added after the first run showed no per-layer scorer beats a) a vote across
                layers: layer l ranks by the sum over layers 0..l of a_bound z-scored over the
                blocks (the layers before it have already chosen when l chooses, so a real engine
                could do this in one pass). Measured on the normal run's queries, as all others.
Cheap (one or two products over the summaries, or one vector per block): a, b, c, e, g.

STREAMING_LLM_THREADS=1 nice -n 10 env PYTHONPATH=src .venv/bin/python docs/results/passkey_oracle/scorers.py
(writes scorers.txt next to this file; --model --trials --windows --recall KxB: another run, as oracle.py)
"""

from __future__ import annotations

import csv
import sys
from pathlib import Path

import torch

HERE = Path(__file__).parent
TRIALS = HERE.parent / "passkey_head" / "passkey" / "trials.csv"
K, B, S = 4, 32, 4


# ---- scorers: (mem, query (1, Hq, C, D) as the model rotated it, pos_shift) -> (n,) by block id ----
def _held(mem):
    ids = list(mem.eligible())
    return ids, [b % mem.slots for b in ids]


def _q(mem, query, pos_shift):
    """(Hkv, G, C, D) float32 queries rotated to stream indices (as RecallMemory.scores)."""
    q = query[0].float().cpu()
    if pos_shift:
        q = q @ mem._to_stream_frame(pos_shift, q.dtype, q.device)
    hkv, d = mem.summaries.shape[2:]
    return q.reshape(hkv, -1, q.shape[1], d)  # query head h = kv * G + g (HF repeat_kv order)


def bound(mem, query, pos_shift):
    """(Hkv, G, C, n): the Quest bound per query head, query and held block."""
    _, slots = _held(mem)
    q = _q(mem, query, pos_shift)
    summary = mem.summary()  # (stored, Hkv, D) by slot
    mn, mx = summary["mins"][slots], summary["maxs"][slots]  # (n, Hkv, D)
    pos = q.clamp(min=0)
    return torch.einsum("kgtd,nkd->kgtn", pos, mx) + torch.einsum("kgtd,nkd->kgtn", q - pos, mn)


def keys(mem):
    """(n, Hkv, B, D) float32 keys of the held blocks, rotated to stream indices."""
    _, slots = _held(mem)
    k = mem.store.read(slots)[:, 0].float()
    frames = mem.frames[slots].tolist()
    out = torch.empty_like(k)
    for i, f in enumerate(frames):
        out[i] = k[i] @ mem._to_stream_frame(f, torch.float32, k.device) if f else k[i]
    return out


def qk(mem, query, pos_shift):
    """(Hkv, G, C, n, B): exact q . k per query head, query, held block and key."""
    return torch.einsum("kgtd,nkmd->kgtnm", _q(mem, query, pos_shift), keys(mem))


def a_bound(mem, query, pos_shift):
    return bound(mem, query, pos_shift).sum((0, 1, 2))


def b_last(mem, query, pos_shift):
    return bound(mem, query, pos_shift)[:, :, -1].sum((0, 1))


def c_headnorm(mem, query, pos_shift):
    per_head = bound(mem, query, pos_shift).sum(2)  # (Hkv, G, n)
    return (per_head / per_head.abs().amax(-1, keepdim=True).clamp(min=1e-9)).sum((0, 1))


def c_headz(mem, query, pos_shift):
    per_head = bound(mem, query, pos_shift).sum(2)
    if per_head.shape[-1] < 2:
        return per_head.sum((0, 1))
    mu, sd = per_head.mean(-1, keepdim=True), per_head.std(-1, keepdim=True).clamp(min=1e-9)
    return ((per_head - mu) / sd).sum((0, 1))


def e_centroid(mem, query, pos_shift):
    return torch.einsum("kgtd,nkd->n", _q(mem, query, pos_shift), keys(mem).mean(2))


def d_exact(mem, query, pos_shift):
    return qk(mem, query, pos_shift).amax(-1).sum((0, 1, 2))


def d_exact_last(mem, query, pos_shift):
    return qk(mem, query, pos_shift)[:, :, -1].amax(-1).sum((0, 1))


def f_mass(mem, query, pos_shift):
    s = qk(mem, query, pos_shift)  # (Hkv, G, C, n, B)
    d = s.shape  # one softmax per (head, query) over every held key
    p = torch.softmax(s.reshape(*d[:3], -1) / mem.summaries.shape[-1] ** 0.5, -1).reshape(d)
    return p.sum((0, 1, 2, 4))


SCORERS = {f.__name__: f for f in (a_bound, b_last, c_headnorm, c_headz, e_centroid, d_exact, d_exact_last, f_mass)}


def top(mem, s: torch.Tensor, forced=()) -> tuple[int, ...]:
    """The K chosen ids (stream order) of `mem`'s held blocks: the `forced` ones, then the highest
    `s` (ties: the older block)."""
    return top_of(list(mem.eligible()), s, mem.k, forced)


def top_of(ids: list[int], s: torch.Tensor, k: int, forced=()) -> tuple[int, ...]:
    if len(ids) <= k:
        return tuple(ids)
    pick = [b for b in forced if b in ids][:k]
    for i in torch.argsort(-s, stable=True).tolist():
        if len(pick) == k:
            break
        if ids[i] not in pick:
            pick.append(ids[i])
    return tuple(sorted(pick))


# ---- the prompts ----------------------------------------------------------------------------------
def load_prompts(model_name="smollm2-135m-instruct", trials=TRIALS, windows=(124, 252), k=K, b=B, recall=None):
    """(model, tokenizer, [(window, method label, Prompt, trials.csv row of the recall method)]):
    the prompts of `trials` (a `reproduce passkey` trials.csv of `model_name`) that dense answers
    and whose key sentence streaming 4+w has evicted, for recall KxB at each window w (`recall`:
    the method's whole `retrieval.parse_recall` tuple, e.g. for 8x32e4; default (k, b))."""
    from streaming_llm.eval import passkey as pk
    from streaming_llm.eval import retrieval as rt
    from streaming_llm.eval.data import load_corpus
    from streaming_llm.models.special_tokens import stream_prefix

    rows = list(csv.DictReader(open(trials)))
    model, tok = rt.load(model_name)
    corpus = load_corpus(pk.DEFAULT_CORPUS).text
    prefix = stream_prefix(tok, None)
    cell = lambda r: (r["variant"], int(r["length"]), float(r["depth"]), int(r["trial"]))  # noqa: E731
    dense_ok = {cell(r) for r in rows if r["method"] == "dense" and r["correct"] == "True"}
    out = []
    for w in windows:
        m = rt.Method("recall", w, recall or (k, b))
        st = {cell(r): r for r in rows if r["method"] == rt.Method("streaming", w).label}
        rc = {cell(r): r for r in rows if r["method"] == m.label}
        for c in sorted(rc):
            if c in dense_ok and st[c]["evicted"] == "True":  # as passkey.paired_target
                p = pk.build_prompt(tok, c[0], c[1], c[2], c[3], 0, corpus, prefix)
                assert p.key == rc[c]["key"], (c, p.key, rc[c]["key"])
                out.append((w, m, p, rc[c]))
    return model, tok, out


def key_blocks(tok, p, b=B):
    """(blocks holding a key-sentence token, {the block of the token completing the key's first 3
    characters}) as in passkey_head/key_blocks.py."""
    sentence = {(t - S) // b for t in range(*p.key_span)}
    at = next(t for t in range(*p.key_span) if p.key[:3] in tok.decode(p.body[p.key_span[0]:t + 1]))
    return sentence, {(at - S) // b}


def main():
    import argparse

    from streaming_llm.core.engine import StreamingLLM

    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=str(HERE / "scorers.txt"))
    ap.add_argument("--pick", default="", help="comma-separated prompt indexes only (smoke test)")
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--trials", default=str(TRIALS), help="the trials.csv whose prompts to score")
    ap.add_argument("--windows", default="124,252")
    ap.add_argument("--recall", default=f"{K}x{B}", help="KxB: the recall method of --trials")
    args = ap.parse_args()
    kk, bs = (int(x) for x in args.recall.split("x"))
    model, tok, prompts = load_prompts(args.model, args.trials, [int(w) for w in args.windows.split(",")], kk, bs)
    if args.pick:
        prompts = [prompts[int(i)] for i in args.pick.split(",")]
    lines, totals = [], {}
    say = lambda s: (print(s, flush=True), lines.append(s))  # noqa: E731
    engines, mismatch = {}, [0]
    for w, m, p, row in prompts:
        e = engines.get(w) or engines.setdefault(w, StreamingLLM(model, tok, m.config(512)))
        e.reset()
        mems = [x for x in e.cache.memories if x is not None]
        caught, on = {}, [False]
        for i, mem in enumerate(mems):
            orig = type(mem).select.__get__(mem)

            def rec(query, pos_shift, orig=orig, i=i, mem=mem):
                # score now: blocks completed by this forward's own tokens are held only after it
                if on[0]:
                    caught[i] = (list(mem.eligible()), {name: f(mem, query, pos_shift) for name, f in SCORERS.items()},
                                 mem.scores(query, pos_shift))
                return orig(query, pos_shift)
            mem.select = rec
        e.feed(p.body, logits="none")
        on[0] = True
        e.feed(p.question, logits="none")
        sentence, kb = key_blocks(tok, p, bs)
        hits = {n: [0, 0, []] for n in [*SCORERS, "g_layervote"]}  # any, key, rank of the key block
        vote = 0
        for i, mem in enumerate(mems):
            ids, scores, engine_s = caught[i]
            a = scores["a_bound"]
            vote = vote + ((a - a.mean()) / a.std().clamp(min=1e-9) if len(a) > 1 else a)
            scores = {**scores, "g_layervote": vote}
            for name, s in scores.items():
                ch = set(top_of(ids, s, mem.k))
                if name == "a_bound":  # the engine's own rule: its choice is what counts (float sums may differ)
                    assert torch.allclose(s, engine_s, rtol=1e-4, atol=1e-2)
                    mismatch[0] += ch != set(mem.chosen)
                    ch = set(mem.chosen)
                hits[name][0] += bool(ch & sentence)
                hits[name][1] += bool(ch & kb)
                order = [ids[j] for j in torch.argsort(-s, stable=True).tolist()]
                b = next(iter(kb))
                hits[name][2].append(order.index(b) + 1 if b in order else len(order) + 1)
        n = len(mems)
        head = f"{m.label:<30} {p.variant:<14} {p.length:>5} {p.depth:>4} held {len(caught[0][0]):>2} key {sorted(kb)} answered {row['correct']:<5}"
        say(head + "  key-block hit: " + "  ".join(f"{k.split('_', 1)[1]} {v[1] / n:.2f}" for k, v in hits.items()))
        for name, (a, k, ranks) in hits.items():
            t = totals.setdefault((w, name), [0, 0.0, 0.0, 0.0, 0, 0.0])
            t[0] += 1; t[1] += a / n; t[2] += k / n; t[3] += sum(ranks) / n; t[4] += k / n >= 0.5
            t[5] += sum(r <= 2 * kk for r in ranks) / n
    say("")
    say(f"totals over prompts (mean over prompts of the fraction of the global layers whose top {kk} holds the block):")
    say(f"  {'window':<7} {'scorer':<13} {'n':>3} {'key':>5} {'any':>5} {'mean rank of key block':>23} {'prompts with key>=0.5':>22}"
        f" {f'key in top {2 * kk}':>13}")
    for (w, name), (cnt, a, k, r, half, k8) in totals.items():
        say(f"  4+{w:<5} {name:<13} {cnt:>3} {k / cnt:>5.2f} {a / cnt:>5.2f} {r / cnt:>23.1f} {half:>18}/{cnt:<3} {k8 / cnt:>13.2f}")
    say(f"(key in top {2 * kk}: the same scorer's top {2 * kk} instead of {kk}, a count of ranks; the blocks held and the queries stay those of the {args.recall} run)")
    say(f"(a_bound counts the engine's own choice; the script's recomputation of the bound picked a different top {kk} in {mismatch[0]} layer choices)")
    Path(args.out).write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    sys.path.insert(0, str(HERE))
    main()
