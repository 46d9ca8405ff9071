"""`streaming-llm reproduce passkey`: pass-key retrieval over a grid of prompt lengths and key depths.

A prompt is: the stream start (BOS when the model's rule says so), a one-line instruction, filler
text with a key sentence inserted at depth d (the fraction of the filler before it, snapped to a word
start), then a question fed as its own forward; the answer is decoded greedily (temperature 0, no
repetition penalty) and parsed: the first substring shaped like the key must equal it. The prompt is
exactly `length` tokens (question included). Plain text, no chat template (gemma3-270m is a base
model; the instruct SmolLM2 answers a raw-text prompt as well), so both models see the same prompts.

Variants (one factor changed at a time from `base`, each reported on its own):
- filler: `gutenberg` (a random passage of the offline corpus, `data.load_corpus`; `--corpus` names
  another source) or `repeat`
  (the classic "The grass is green. ..." sentences);
- key: `digits` (a 5-digit number) or `code` (a word-like code such as "tovami-kelupa");
- question: `primed` ("What is the pass key? The pass key is") or `plain` (a question, then "Answer:").

Methods (`retrieval.method_list`): dense (the ceiling), streaming 4+W for each window and
streaming 4+W + recall KxB. Result files under `<out>/passkey[_gemma3]/`: results.json (summary,
per-cell and per-variant accuracy, the target check), trials.csv (one row per prompt and method),
cells.csv. This module does NOT load models itself (`retrieval.load`) nor draw (`recall_plots`).
"""

from __future__ import annotations

import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from ..errors import UserError
from . import retrieval as rt
from .results_io import write_csv, write_json

DEFAULT_LENGTHS = [256, 512, 1024]
DEFAULT_DEPTHS = [0.1, 0.5, 0.9]
DEFAULT_WINDOWS = [124, 252]
DEFAULT_RECALL = "4x32"
DEFAULT_CORPUS = "gutenberg"  # where the `gutenberg` filler's passages come from (--corpus: another text)
# new tokens per question, and whether a newline ends the answer: the primed answer is the key
# itself; the plain question's answer restates it ("The pass key in the text above is 80620": 13
# tokens with SmolLM2's digits) and the instruct model often opens it on a new line
ANSWER_BUDGET = {"primed": (12, True), "plain": (24, False)}

INTRO = ("There is an important piece of information hidden inside a lot of irrelevant text. "
         "Find it and memorize it. I will quiz you about it.\n")
KEY_SENTENCE = " The pass key is {key}. Remember it. {key} is the pass key."
REPEAT = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
QUESTIONS = {"primed": "\nWhat is the pass key? The pass key is",
             "plain": "\nQuestion: What was the pass key in the text above?\nAnswer:"}
# key format -> (regex of a reply's answer, case-insensitive compare)
KEY_PATTERNS = {"digits": (r"\d+", False), "code": (r"[A-Za-z]+(?:-[A-Za-z]+)+", True)}
FILLERS = ("gutenberg", "repeat")
VARIANTS = {"base": ("gutenberg", "digits", "primed"), "repeat-filler": ("repeat", "digits", "primed"),
            "code-key": ("gutenberg", "code", "primed"), "plain-question": ("gutenberg", "digits", "plain")}
_CONSONANTS, _VOWELS = "bdfgklmnprstvz", "aeiou"


def make_key(fmt: str, rng: random.Random) -> str:
    if fmt == "digits":
        return str(rng.randint(10000, 99999))
    word = lambda: "".join(rng.choice(_CONSONANTS) + rng.choice(_VOWELS) for _ in range(3))  # noqa: E731
    return f"{word()}-{word()}"


@dataclass
class Prompt:
    variant: str
    length: int
    depth: float
    trial: int
    key: str
    body: list[int]  # everything before the question
    question: list[int]
    key_span: tuple[int, int]  # token indexes [start, end) of the key sentence in the prompt
    filler_tokens: int
    filler_before: int  # filler tokens before the key sentence

    @property
    def key_format(self) -> str:
        return VARIANTS[self.variant][1]

    @property
    def depth_actual(self) -> float:
        return self.filler_before / max(self.filler_tokens, 1)

    @property
    def tokens(self) -> int:
        return len(self.body) + len(self.question)

    def key_distance(self) -> int:
        """Tokens from the key sentence's last token to the end of the prompt (1: the last token)."""
        return self.tokens - (self.key_span[1] - 1)


def _encode(tokenizer, text: str) -> list[int]:
    return list(tokenizer.encode(text, add_special_tokens=False))


def word_starts(tokenizer, ids: list[int]) -> list[int]:
    """Indexes k where token k begins a word (its text starts with whitespace; 0 always)."""
    out = [0]
    for k in range(1, len(ids)):
        pair, prev = tokenizer.decode(ids[k - 1 : k + 1]), tokenizer.decode(ids[k - 1 : k])
        added = pair[len(prev):] if pair.startswith(prev) else pair
        if added[:1].isspace():
            out.append(k)
    return out


def filler_ids(tokenizer, filler: str, n: int, rng: random.Random, corpus_text: str | None) -> list[int]:
    """At least `n` filler tokens: a random corpus passage (from a line start) or repeated sentences."""
    if filler == "repeat":
        start = rng.randrange(REPEAT.count(". "))
        sentences = REPEAT.split(". ")[:-1]
        one = ". ".join(sentences[start:] + sentences[:start]) + ". "
        text = one * (n // 8 + 2)
    elif filler == "gutenberg":
        if not corpus_text:
            raise UserError("the gutenberg filler needs the offline corpus (`streaming-llm data fetch`)")
        chars = 8 * n + 2000
        for _ in range(10):
            at = rng.randrange(max(1, len(corpus_text) - chars))
            at = corpus_text.find("\n", at) + 1
            text = " ".join(corpus_text[at : at + chars].split())  # one paragraph: no blank lines, no indents
            ids = _encode(tokenizer, text)
            if len(ids) >= n:
                return ids
        raise UserError(f"could not find {n} filler tokens in the corpus")
    else:
        raise UserError(f"unknown filler {filler!r}; choose one of {', '.join(FILLERS)}")
    ids = _encode(tokenizer, text)
    while len(ids) < n:
        text += text
        ids = _encode(tokenizer, text)
    return ids


def build_prompt(tokenizer, variant: str, length: int, depth: float, trial: int, seed: int = 0,
                 corpus_text: str | None = None, prefix: list[int] | None = None) -> Prompt:
    """The prompt of one grid cell: exactly `length` tokens, key sentence at `depth` of the filler."""
    if variant not in VARIANTS:
        raise UserError(f"unknown passkey variant {variant!r}; choose from {', '.join(VARIANTS)}")
    if not 0.0 <= depth <= 1.0:
        raise UserError(f"--depths must lie in [0, 1] (got {depth})")
    filler, fmt, question = VARIANTS[variant]
    rng = random.Random(f"passkey:{seed}:{variant}:{length}:{depth}:{trial}")
    key = make_key(fmt, rng)
    head = list(prefix or []) + _encode(tokenizer, INTRO)
    key_ids = _encode(tokenizer, KEY_SENTENCE.format(key=key))
    q_ids = _encode(tokenizer, QUESTIONS[question])
    n = length - len(head) - len(key_ids) - len(q_ids)
    if n < 1:
        raise UserError(f"--lengths: {length} tokens cannot hold the instruction, key and question "
                        f"({length - n + 1} tokens at least)")
    f = filler_ids(tokenizer, filler, n, rng, corpus_text)[:n]
    before = min(word_starts(tokenizer, f) + [n], key=lambda k: abs(k - depth * n))  # n: the filler's end
    body = head + f[:before] + key_ids + f[before:]
    span = (len(head) + before, len(head) + before + len(key_ids))
    return Prompt(variant, length, depth, trial, key, body, q_ids, span, n, before)


def build_grid(tokenizer, variants, lengths, depths, trials, seed, corpus_text, prefix) -> list[Prompt]:
    return [build_prompt(tokenizer, v, L, d, t, seed, corpus_text, prefix)
            for v in variants for L in lengths for d in depths for t in range(trials)]


def stop_rule(fmt: str, at_newline: bool = True):
    """Stop once the first key-shaped answer is complete, or at the end of the first sentence (or line,
    with `at_newline`) of what the model says."""
    pattern = KEY_PATTERNS[fmt][0]

    def stop(text: str) -> bool:
        import re

        m = re.search(pattern, text)
        said = text.lstrip()
        return bool((m and m.end() < len(text)) or (at_newline and "\n" in said) or ". " in said or said.endswith("."))

    return stop


def answer(engine, p: Prompt) -> dict:
    """Run one prompt on a (reset) engine: the reply, the parsed answer, whether it is correct."""
    engine.reset()
    engine.feed(p.body, logits="none")
    budget, at_newline = ANSWER_BUDGET[VARIANTS[p.variant][2]]
    reply = rt.greedy(engine, p.question, budget, stop_rule(p.key_format, at_newline))
    pattern, ignore_case = KEY_PATTERNS[p.key_format]
    got, ok = rt.exact_match(reply, pattern, p.key, ignore_case)
    return {"reply": reply, "parsed": got, "correct": ok}


TRIAL_FIELDS = ["method", "cache", "variant", "filler", "key_format", "question", "length", "depth", "trial",
                "tokens", "depth_actual", "key_distance", "evicted", "key", "parsed", "correct", "reply"]


def _trial_row(m: rt.Method, p: Prompt, res: dict) -> dict:
    filler, fmt, question = VARIANTS[p.variant]
    return {"method": m.label, "cache": m.cache, "variant": p.variant, "filler": filler, "key_format": fmt,
            "question": question, "length": p.length, "depth": p.depth, "trial": p.trial, "tokens": p.tokens,
            "depth_actual": round(p.depth_actual, 4), "key_distance": p.key_distance(),
            "evicted": not m.in_window(p.key_distance()), "key": p.key, **res}


def summarize(rows: list[dict], methods: list[rt.Method]) -> dict:
    """Accuracy per method, per variant, per (length, depth) cell, and the target check per cell
    and window (the key counts as evicted in a cell when it is outside the window in every prompt)."""
    labels = [m.label for m in methods if any(r["method"] == m.label for r in rows)]
    by = lambda **kw: [r for r in rows if all(r[k] == v for k, v in kw.items())]  # noqa: E731
    cells, checks = [], []
    lengths = sorted({r["length"] for r in rows})
    depths = sorted({r["depth"] for r in rows})
    for L in lengths:
        for d in depths:
            for lab in labels:
                sel = by(method=lab, length=L, depth=d)
                if sel:
                    cells.append({"method": lab, "length": L, "depth": d, "n": len(sel),
                                  "accuracy": rt.accuracy(r["correct"] for r in sel),
                                  "evicted": all(r["evicted"] for r in sel)})
    acc = {(c["method"], c["length"], c["depth"]): c for c in cells}
    for m in methods:
        if m.kind != "recall":
            continue
        s = rt.Method("streaming", m.window, sinks=m.sinks).label
        for L in lengths:
            for d in depths:
                dn, st, rc = acc.get(("dense", L, d)), acc.get((s, L, d)), acc.get((m.label, L, d))
                if dn and st and rc:
                    t = rt.target(dn["accuracy"], st["accuracy"], rc["accuracy"], st["evicted"])
                    checks.append({"length": L, "depth": d, "recall": m.label, "streaming": s, "dense": dn["accuracy"],
                                   "streaming_accuracy": st["accuracy"], "recall_accuracy": rc["accuracy"], **t})
    counted = [c for c in checks if c["counts"]]
    variants = sorted({r["variant"] for r in rows}, key=list(VARIANTS).index)
    return {"accuracy": {lab: rt.accuracy(r["correct"] for r in by(method=lab)) for lab in labels},
            "accuracy_evicted_only": {lab: rt.accuracy(r["correct"] for r in by(method=lab) if r["evicted"])
                                      for lab in labels},
            "by_variant": {v: {lab: rt.accuracy(r["correct"] for r in by(method=lab, variant=v)) for lab in labels}
                           for v in variants},
            "cells": cells,
            "target": {"rule": rt.target_rule(), "cells_counted": len(counted),
                       "cells_met": sum(bool(c["met"]) for c in counted), "checks": checks},
            "target_paired": paired_target(rows, methods, variants)}


def paired_target(rows: list[dict], methods: list[rt.Method], variants: list[str]) -> list[dict]:
    """The target on the prompts themselves: among the prompts that dense answers correctly and whose key
    is outside the window of streaming 4+W, how many streaming 4+W and streaming 4+W + recall answer
    (per recall method, over all variants and per variant). Target: recall >= 0.8, streaming <= 0.1."""
    prompt = lambda r: (r["variant"], r["length"], r["depth"], r["trial"])  # noqa: E731
    table = {(r["method"], prompt(r)): r for r in rows}
    dense_ok = {prompt(r) for r in rows if r["method"] == "dense" and r["correct"]}
    out = []
    for m in methods:
        if m.kind != "recall":
            continue
        s = rt.Method("streaming", m.window, sinks=m.sinks).label
        for v in [None] + variants:
            keys = [k for k in dense_ok if (v is None or k[0] == v) and (s, k) in table and (m.label, k) in table
                    and table[(s, k)]["evicted"]]
            st = rt.accuracy(table[(s, k)]["correct"] for k in keys)
            rc = rt.accuracy(table[(m.label, k)]["correct"] for k in keys)
            out.append({"recall": m.label, "streaming": s, "variant": v or "all", "prompts": len(keys),
                        "streaming_accuracy": st, "recall_accuracy": rc,
                        "met": None if not keys else bool(rc >= rt.RATIO and st <= rt.NEAR_ZERO)})
    return out


def paired_table(summary: dict) -> str:
    lines = ["prompts dense answers with the key outside the window: streaming vs recall accuracy"]
    for c in summary.get("target_paired", []):
        if c["prompts"]:
            lines.append(f"  {c['recall']:<32} {c['variant']:<15} n={c['prompts']:<3} streaming {c['streaming_accuracy']:.2f}"
                         f"  recall {c['recall_accuracy']:.2f}  target {'met' if c['met'] else 'missed'}")
    return "\n".join(lines)


def table(summary: dict) -> str:
    """The human table: accuracy per (length, depth) cell and method; * marks an evicted key."""
    cells = summary["cells"]
    labels = list(summary["accuracy"])
    keys = sorted({(c["length"], c["depth"]) for c in cells})
    acc = {(c["method"], c["length"], c["depth"]): c for c in cells}
    lines = ["length depth  " + "  ".join(f"{lab:>{max(8, len(lab))}}" for lab in labels)]
    for L, d in keys:
        row = []
        for lab in labels:
            c = acc.get((lab, L, d))
            txt = "-" if c is None else f"{c['accuracy']:.2f}" + ("*" if c["evicted"] else " ")
            row.append(f"{txt:>{max(8, len(lab))}}")
        lines.append(f"{L:>6} {d:>5}  " + "  ".join(row))
    lines.append("all          " + "  ".join(f"{summary['accuracy'][lab]:>{max(8, len(lab))}.2f}" for lab in labels))
    lines.append("(* the key sentence is outside the method's window when the question comes)")
    return "\n".join(lines)


def run(args, out: Path) -> dict:
    from ..models.special_tokens import bos_choice_label, stream_prefix

    variants = [v.strip() for v in args.variants.split(",") if v.strip()] if args.variants else list(VARIANTS)
    for v in variants:
        if v not in VARIANTS:
            raise UserError(f"unknown passkey variant {v!r}; choose from {', '.join(VARIANTS)}")
    lengths = args.lengths or DEFAULT_LENGTHS
    depths = args.depths or DEFAULT_DEPTHS
    if any(not 0.0 <= d <= 1.0 for d in depths):
        raise UserError(f"--depths must lie in [0, 1] (got {depths})")
    if args.trials < 1:
        raise UserError(f"--trials must be at least 1 (got {args.trials})")
    methods = rt.method_list(args.windows or DEFAULT_WINDOWS, rt.recall_list(args.recall or DEFAULT_RECALL))
    model, tokenizer = args.loaded if getattr(args, "loaded", None) else rt.load(args.model)
    corpus_text = None
    if any(VARIANTS[v][0] == "gutenberg" for v in variants):
        from .data import load_corpus

        corpus_text = load_corpus(args.corpus or DEFAULT_CORPUS).text
    prefix = stream_prefix(tokenizer, args.bos)
    prompts = build_grid(tokenizer, variants, lengths, depths, args.trials, args.seed, corpus_text, prefix)
    head = {"model": args.model, "task": "passkey", **bos_choice_label(tokenizer, args.bos),
            "options": {"chat_template": False, "question_fed_as_its_own_forward": True, "chunk_size": args.chunk_size,
                        "decoding": "greedy (temperature 0, repetition penalty 1.0)", "max_new_tokens": {q: b for q, (b, _) in ANSWER_BUDGET.items()},
                        "stop": "once the first key-shaped answer is complete, or at the end of the first sentence "
                                "(primed question: or line)",
                        "match": "the first key-shaped substring of the reply equals the key (codes: any case)",
                        "length": "prompt tokens, question included", "corpus": args.corpus or DEFAULT_CORPUS, "depth": "fraction of the filler before the key",
                        "intro": INTRO, "key_sentence": KEY_SENTENCE, "questions": QUESTIONS,
                        "variants": {v: dict(zip(("filler", "key_format", "question"), VARIANTS[v])) for v in variants}},
            "grid": {"lengths": lengths, "depths": depths, "trials": args.trials, "seed": args.seed,
                     "variants": variants}, "methods": [m.label for m in methods]}
    kept, earlier = _earlier_rows(out, head, variants)
    if kept:
        head["grid"]["variants"] = [v for v in VARIANTS if v in variants or any(r["variant"] == v for r in kept)]
        head["earlier_run"] = earlier
    rows, seconds = [], {}
    bar = rt.progress_bar(len(prompts) * len(methods), "passkey", not args.no_progress)
    for m in methods:
        engine, t0 = rt.engine_for(model, tokenizer, m, args.chunk_size), time.perf_counter()
        for p in prompts:
            rows.append(_trial_row(m, p, answer(engine, p)))
            bar.update(1)
        seconds[m.label] = round(time.perf_counter() - t0, 1)
        _publish(out, head, kept + rows, methods, seconds, complete=False)
    bar.close()
    res = _publish(out, head, kept + rows, methods, seconds, complete=True)
    print(table(res), flush=True)
    print(paired_table(res), flush=True)
    return res


def _typed(row: dict) -> dict:
    """A trials.csv row with its types back."""
    out = dict(row)
    for k in ("length", "trial", "tokens", "key_distance"):
        out[k] = int(row[k])
    for k in ("depth", "depth_actual"):
        out[k] = float(row[k])
    for k in ("evicted", "correct"):
        out[k] = row[k] == "True"
    out["parsed"] = row["parsed"] or None
    return out


def _earlier_rows(out: Path, head: dict, variants: list[str]) -> tuple[list[dict], dict]:
    """Rows of an earlier complete run in `out` with the same model, grid and methods, for the variants
    this run does not redo (so one variant can be rerun without the others), and what that run was."""
    import csv
    import json

    old = out / "results.json"
    if not old.is_file() or not (out / "trials.csv").is_file():
        return [], {}
    prev = json.loads(old.read_text())
    same = prev.get("complete") and all(prev.get(k) == head[k] for k in ("model", "methods", "bos")) and all(
        prev.get("grid", {}).get(k) == head["grid"][k] for k in ("lengths", "depths", "trials", "seed"))
    if not same:
        return [], {}
    with open(out / "trials.csv", newline="") as f:
        kept = [_typed(r) for r in csv.DictReader(f) if r["variant"] not in variants]
    redone = sorted({r["variant"] for r in kept} ^ set(prev["grid"].get("variants", [])))
    return kept, {"updated": prev.get("updated"), "seconds_per_method": prev.get("seconds_per_method"),
                  "kept_variants": sorted({r["variant"] for r in kept}), "replaced_variants": redone}


def _publish(out: Path, head: dict, rows: list[dict], methods, seconds: dict, complete: bool) -> dict:
    """Write the result files (after every method, so an interrupted run keeps what it did)."""
    s = summarize(rows, methods)
    res = {**head, "complete": complete, "prompts": len({(r["variant"], r["length"], r["depth"], r["trial"]) for r in rows}),
           "tokens": sum(r["tokens"] for r in rows), "seconds_per_method": seconds,
           "updated": time.strftime("%Y-%m-%d %H:%M:%S"), **s}
    write_json(out, "results.json", res)
    write_csv(out / "trials.csv", TRIAL_FIELDS, [[r[k] for k in TRIAL_FIELDS] for r in rows])
    write_csv(out / "cells.csv", ["method", "length", "depth", "n", "accuracy", "evicted"],
              [[c[k] for k in ("method", "length", "depth", "n", "accuracy", "evicted")] for c in s["cells"]])
    print(f"[{time.strftime('%H:%M:%S')}] passkey: wrote {out} ({len(rows)} answers)", file=sys.stderr, flush=True)
    return res
