"""Diagnostic (issue 15, docs/recall_evals.md "Other choosing rules, tried on the paired prompts"):
does another way of choosing the recalled blocks answer more of the pass-key prompts that count
for the target? It re-answers only the paired prompts of a stored `reproduce passkey` run (dense
answers them, the key sentence is outside streaming 4+W's window) with the recall method of that
run, as `reproduce passkey` does (`passkey.answer`, `retrieval.engine_for`, chunks of 512), once
per variant of the choosing rule, and prints each reply beside the stored one. Product code is
untouched: each variant replaces, inside this script, one method of `RecallMemory` or the
module's `recall.choose` (twopass: also the answering of a prompt, `answer_twopass`).

Variants (`--variants`, comma-separated):
  none       the engine's rule (checks that the stored replies are reproduced)
  maxq       score of a block = max over the forward's queries of the bound summed over the
             query heads (the engine sums over the queries too); a decode step (one query) is
             unchanged, only chunks choose differently
  maxall     max over query heads and queries of one head's bound
  lastq      the bound of the forward's last query only, summed over the query heads (the
             question's last token, "is" in "The pass key is")
  next       the K blocks taken as best block, its successor, 2nd best, its successor, ...
             (a key sentence that straddles a block edge comes whole)
  both       as next, with the predecessor too
  subN       the Quest bound over sub-blocks of N tokens (per-channel max and min of their keys,
             computed here from the stored keys), a block's score per query head and query the
             best of its sub-blocks, then summed as the engine sums; sub1 is the exact max of
             q . k over the block's keys (a tighter bound costs summaries of block/N records)
  shared     one choice per forward for every layer: the first recall layer's, by the engine's
             rule (the later layers' queries come after it, so it is the one a single pass has)
  mix        the bound and the mean key (`--recall-score mean`) together: the bound's best block,
             the mean's best, the bound's second, the mean's second, ... until K (each once);
             the engine has it since as `--recall-score both` (spec `KxBb`)
  sumz       the sum of the bound's and the mean key's scores, each z-scored over the held blocks
  twopass    the question is fed twice: a first pass (body and question) records every recall
             layer's bound scores; the second (`passkey.answer`, from the start) gives
             every layer the K blocks with the highest sum over layers of those scores, z-scored
             per layer (a consensus of all layers); the answer's decode steps choose as the engine

    PYTHONPATH=src .venv/bin/python docs/results/passkey_select_variants/variants.py \
        --trials-csv docs/results/passkey_trials3/passkey/trials.csv --window 252 \
        --lengths 256,512,1024 --depths 0.1,0.5,0.9 --variants none,maxq,maxall,next,both
"""

from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path

import torch

from streaming_llm.core import recall
from streaming_llm.eval import passkey
from streaming_llm.eval import retrieval as rt
from streaming_llm.eval.data import load_corpus
from streaming_llm.models.special_tokens import stream_prefix

sys.path.insert(0, str(Path(__file__).parent.parent / "passkey_oracle"))
import scorers as sc  # noqa: E402  (the oracle's helpers: queries and keys in the stream frame)

ENGINE_TOP, ENGINE_SCORES = recall.RecallMemory._top, recall.RecallMemory.scores


def query_scores(mem, query, pos_shift, reduce: str) -> torch.Tensor:
    """(n,) scores of the held blocks, oldest first, with the bound per (query head, query)
    reduced as `reduce` says (the summaries read whole: fine for a diagnostic)."""
    summ = mem.summary()
    q = sc._q(mem, query, pos_shift)  # (Hkv, G, C, D)
    per = (torch.einsum("hgcd,nhd->nhgc", q.clamp(min=0), summ["maxs"])
           + torch.einsum("hgcd,nhd->nhgc", q.clamp(max=0), summ["mins"]))  # (n, Hkv, G, C)
    if reduce == "maxq":
        out = per.sum((1, 2)).amax(-1)
    elif reduce == "lastq":
        out = per[..., -1].sum((1, 2))
    else:
        out = per.amax((1, 2, 3))
    if mem.n_blocks > mem.slots:
        out = torch.roll(out, -(mem.n_blocks % mem.slots), dims=-1)
    return out


def sub_block_scores(mem, query, pos_shift, sub: int) -> torch.Tensor:
    """(n,) scores, oldest first: the bound of each sub-block of `sub` keys, the best sub-block
    per (query head, query), summed over query heads and queries."""
    k = sc.keys(mem)  # (n, Hkv, B, D), oldest first, in the stream frame
    n, hkv, b, d = k.shape
    k = k.reshape(n, hkv, b // sub, sub, d)
    mx, mn = k.amax(3), k.amin(3)  # (n, Hkv, S, D)
    q = sc._q(mem, query, pos_shift)  # (Hkv, G, C, D)
    per = (torch.einsum("hgcd,nhsd->nhgcs", q.clamp(min=0), mx)
           + torch.einsum("hgcd,nhsd->nhgcs", q.clamp(max=0), mn))
    return per.amax(-1).sum((1, 2, 3))


def top_with_neighbours(mem, s: torch.Tensor, sides: tuple[int, ...]) -> tuple[int, ...]:
    """Best block first, each followed by its neighbours at `sides` (held ones), until K. `s`:
    one ranker's scores (1, n), as `RecallMemory._top` gets them."""
    s = s[0]
    first = mem.n_blocks - mem.stored
    if s.numel() <= mem.k:
        return tuple(range(first, first + s.numel()))
    out: list[int] = []
    for i in torch.argsort(-s, stable=True).tolist():
        for j in (i, *(i + d for d in sides)):
            if 0 <= j < s.numel() and j not in out and len(out) < mem.k:
                out.append(j)
        if len(out) >= mem.k:
            break
    return tuple(sorted(first + i for i in out))


def mean_key_scores(mem, query, pos_shift) -> torch.Tensor:
    """(n,) q . (the block's mean key), summed over query heads and queries, oldest first (the
    engine's `--recall-score mean`, computed here from the stored keys)."""
    mean = sc.keys(mem).mean(2)  # (n, Hkv, D)
    return torch.einsum("hgcd,nhd->n", sc._q(mem, query, pos_shift), mean)


def select_two(mem, query, pos_shift, how: str) -> tuple:
    """The K blocks by the bound and the mean key together: `mix` takes the bound's best, the
    mean's best, the bound's second, ... (each block once: the engine's `_top` over two rankers,
    as `--recall-score both` does); `sumz` ranks by the sum of the two scores, each z-scored over
    the held blocks."""
    if mem.stored == 0 or mem.k == 0:
        return ()
    bound, mean = ENGINE_SCORES(mem, query, pos_shift), mean_key_scores(mem, query, pos_shift)
    if how == "sumz":
        z = lambda x: (x - x.mean()) / x.std().clamp(min=1e-9)  # noqa: E731
        return mem._top((z(bound) + z(mean))[None])
    return mem._top(torch.stack([bound, mean]))


ENGINE_CHOOSE = recall.choose
ENGINE_SELECT = recall.RecallMemory.select


def choose_shared(layer, query) -> bool:
    """Every recall layer takes the choice the first recall layer made in this forward (it
    chooses first, by the engine's rule, from its own queries)."""
    first = next(x for x in layer.owner.layers if getattr(x, "memory", None) is not None)
    if layer is first:
        return ENGINE_CHOOSE(layer, query)
    mem, src = layer.memory, first.memory
    mem.chosen, mem.chosen_at = src.chosen, src.chosen_at
    return bool(mem.chosen)


def answer_twopass(engine, p) -> dict:
    """`passkey.answer` with the question's choice made by a consensus of every recall layer
    (variant `twopass`, see the module docstring). The first pass feeds the body and the question
    and records the scores; `passkey.answer` then resets the engine and feeds the body again (the
    engine is exact, so its state before the question is the first pass's)."""
    scores, held = [], []

    def collect(layer, query):
        mem = layer.memory
        if mem.stored > 1:
            s = mem.scores(query, layer.owner.pos_shift[0])
            scores.append((s - s.mean()) / s.std().clamp(min=1e-9))
            held[:] = list(mem.eligible())
        return ENGINE_CHOOSE(layer, query)

    engine.reset()
    engine.feed(p.body, logits="none")
    recall.choose = collect
    try:
        engine.feed(p.question, logits="none")
    finally:
        recall.choose = ENGINE_CHOOSE
    pick = ()
    if scores:
        total = torch.stack(scores).sum(0)
        k = min(engine.config.recall_blocks, total.numel())
        pick = tuple(sorted(held[i] for i in torch.argsort(-total, stable=True)[:k].tolist()))

    def forced(layer, query):
        mem = layer.memory
        if pick and query.shape[2] == len(p.question):  # the question's forward
            mem.chosen, mem.chosen_at = pick, None
            return True
        return ENGINE_CHOOSE(layer, query)

    recall.choose = forced
    try:
        return passkey.answer(engine, p)
    finally:
        recall.choose = ENGINE_CHOOSE


def use(variant: str) -> None:
    recall.RecallMemory._top, recall.RecallMemory.scores = ENGINE_TOP, ENGINE_SCORES
    recall.RecallMemory.select = ENGINE_SELECT
    recall.choose = ENGINE_CHOOSE
    if variant in ("maxq", "maxall", "lastq"):
        recall.RecallMemory.scores = lambda mem, q, shift: query_scores(mem, q, shift, variant)
    elif variant.startswith("sub"):
        size = int(variant[3:])
        recall.RecallMemory.scores = lambda mem, q, shift: sub_block_scores(mem, q, shift, size)
    elif variant in ("next", "both"):
        sides = (1,) if variant == "next" else (1, -1)
        recall.RecallMemory._top = lambda mem, s: top_with_neighbours(mem, s, sides)
    elif variant in ("mix", "sumz"):
        recall.RecallMemory.select = lambda mem, q, shift: select_two(mem, q, shift, variant)
    elif variant == "shared":
        recall.choose = choose_shared
    elif variant not in ("none", "twopass"):
        raise SystemExit(f"unknown variant {variant!r}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trials-csv", required=True)
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--window", type=int, default=252)
    ap.add_argument("--lengths", required=True)
    ap.add_argument("--depths", required=True)
    ap.add_argument("--trials", type=int, default=3)
    ap.add_argument("--variants", default="none,maxq,maxall,next,both")
    ap.add_argument("--recall", help="answer with this recall spec (e.g. 16x32e4) instead of the stored run's; "
                                     "the replies are still compared with the stored run's")
    a = ap.parse_args()

    rows = list(csv.DictReader(open(a.trials_csv)))
    key = lambda r: (r["variant"], int(r["length"]), float(r["depth"]), int(r["trial"]))  # noqa: E731
    s_label = f"streaming 4+{a.window}"
    r_label = next(r["method"] for r in rows if r["method"].startswith(s_label + " + recall"))
    paired = ({key(r) for r in rows if r["method"] == "dense" and r["correct"] == "True"}
              & {key(r) for r in rows if r["method"] == s_label and r["evicted"] == "True"})
    stored = {key(r): r for r in rows if r["method"] == r_label}
    model, tok = rt.load(a.model)
    prompts = passkey.build_grid(tok, list(passkey.VARIANTS), [int(x) for x in a.lengths.split(",")],
                                 [float(x) for x in a.depths.split(",")], a.trials, 0,
                                 load_corpus("gutenberg").text, stream_prefix(tok, None))
    prompts = [p for p in prompts if (p.variant, p.length, p.depth, p.trial) in paired]
    spec = a.recall or r_label.split(" + recall ")[1]
    m = next(x for x in rt.method_list([a.window], rt.recall_list(spec)) if x.kind == "recall")
    engine = rt.engine_for(model, tok, m, 512)
    print(f"{a.model} {m.label}: {len(prompts)} paired prompts of {a.trials_csv}; stored answers "
          f"{sum(stored[k]['correct'] == 'True' for k in paired)}/{len(paired)}", flush=True)
    for variant in a.variants.split(","):
        use(variant)
        right = same = 0
        for p in prompts:
            res = answer_twopass(engine, p) if variant == "twopass" else passkey.answer(engine, p)
            old = stored[(p.variant, p.length, p.depth, p.trial)]
            right += res["correct"]
            same += res["reply"] == old["reply"]
            if res["correct"] != (old["correct"] == "True"):
                print(f"  {variant}: {p.variant} {p.length} {p.depth} trial {p.trial}: {res['correct']} "
                      f"{res['reply'][:40]!r} (stored {old['correct']} {old['reply'][:40]!r})", flush=True)
        print(f"{variant:7s} {right}/{len(prompts)} ({right / len(prompts):.2f}); replies as stored: "
              f"{same}/{len(prompts)}", flush=True)
    use("none")


if __name__ == "__main__":
    main()
