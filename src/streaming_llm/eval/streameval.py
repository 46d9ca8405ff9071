"""`streaming-llm reproduce streameval`: the paper's StreamEval (arXiv 2309.17453, Sec. 4.3, Fig. 8-9, Table 7).

One stream per (method, answer distance D): lines `The REGISTER_CONTENT in line {i} is <{v}>` with
random 5-digit values; after line D and then after every 10th line, the query
`The REGISTER_CONTENT in line {i-D} is`, answered greedily (temperature 0, no repetition penalty) and
scored by exact match of the first number in the reply against v. The paper's setting is D = 20;
the sweep runs several D, so answers lie inside and beyond each method's window.

Choices the paper leaves open, and what is done here:
- the answer stays in the stream (as in the paper's code, whose generated tokens stay in the KV
  cache): the stream is a transcript of lines, queries and the model's own answers; a newline
  follows an answer that did not end with one;
- stop rule: at `>` or a newline, or after `MAX_NEW_TOKENS` tokens;
- the stream opens with an instruction (`HEADER`, LongEval's, whose lines task StreamEval follows);
- no chat template: raw text (gemma3-270m is a base model; the paper used an instruct model with its
  template), the stream starting with BOS when the model's rule says so;
- every method sees the same values (one seed per distance); each query is its own forward, so
  recall selects blocks on the query's tokens; the lines between queries are fed in chunks.

Methods (`retrieval.method_list`, with the window baseline): dense, window 0+(4+W), streaming 4+W,
streaming 4+W + recall KxB. Result files under `<out>/streameval[_gemma3]/`: results.json,
queries.csv (one row per query), table.csv (accuracy per method and distance). This module does NOT
load models itself (`retrieval.load`) nor draw (`recall_plots`).
"""

from __future__ import annotations

import random
import sys
import time
from pathlib import Path

from ..errors import UserError
from . import retrieval as rt
from .results_io import write_csv, write_json

DEFAULT_DISTANCES = [20, 40, 100, 200]
DEFAULT_WINDOWS = [252, 508]
DEFAULT_RECALL = "4x32"
DEFAULT_QUERIES = 8
QUERY_EVERY = 10  # lines between queries (the paper's)
MAX_NEW_TOKENS = 12
# The stream opens with the instruction of LongEval's lines task (which StreamEval follows): the
# default model answered 0/4 queries 20 lines back without it, 2/6 with it (dense, a probe here)
HEADER = ("Below is a record of lines I want you to remember. Each line begins with 'line <line index>' and contains "
          "a '<REGISTER_CONTENT>' at the end of the line as a numerical value. For each line index, memorize its "
          "corresponding <REGISTER_CONTENT>. At the end of the record, I will ask you to retrieve the corresponding "
          "<REGISTER_CONTENT> of a certain line index. Now the record start:\n\n")
LINE = "The REGISTER_CONTENT in line {i} is <{v}>\n"
QUERY = "The REGISTER_CONTENT in line {i} is"
ANSWER_PATTERN = r"(\d+)"
# The paper's Table 7 (Llama-2-7B-32K-Instruct, streaming, answer 20 lines back): cache -> accuracy %
PAPER_TABLE7 = {"4+2044": 85.80, "4+4092": 84.60, "4+8188": 81.15, "4+16380": 77.65}


def values(distance: int, queries: int, seed: int) -> list[int]:
    """The register values of one stream (the same for every method)."""
    rng = random.Random(f"streameval:{seed}:{distance}")
    return [rng.randint(10000, 99999) for _ in range(distance + QUERY_EVERY * (queries - 1) + 1)]


def schedule(distance: int, queries: int) -> list[tuple[int, int]]:
    """(last line fed before the query, line asked) per query: after line D, D+10, ... ask line i-D."""
    return [(distance + QUERY_EVERY * q, QUERY_EVERY * q) for q in range(queries)]


def _encode(tokenizer, text: str) -> list[int]:
    return list(tokenizer.encode(text, add_special_tokens=False))


def _stop(text: str) -> bool:
    return ">" in text or "\n" in text.lstrip()


def run_stream(engine, tokenizer, method: rt.Method, distance: int, queries: int, seed: int,
               prefix: list[int]) -> list[dict]:
    """One stream: lines, queries and the model's answers; one row per query."""
    vals = values(distance, queries, seed)
    newline = _encode(tokenizer, "\n")
    engine.reset()
    start: dict[int, int] = {}  # line -> stream index of its first token
    end: dict[int, int] = {}
    pending = list(prefix) + _encode(tokenizer, HEADER)
    fed = 0  # lines fed
    rows = []
    for q, (last, asked) in enumerate(schedule(distance, queries)):
        ids = pending
        for i in range(fed, last + 1):
            start[i] = engine.tokens_seen + len(ids)
            ids = ids + _encode(tokenizer, LINE.format(i=i, v=vals[i]))
            end[i] = engine.tokens_seen + len(ids)
        fed = last + 1
        engine.feed(ids, logits="none")
        q_ids = _encode(tokenizer, QUERY.format(i=asked))
        seen = engine.tokens_seen + len(q_ids)  # when the question's last token is fed
        reply = rt.greedy(engine, q_ids, MAX_NEW_TOKENS, _stop)
        got, ok = rt.exact_match(reply, ANSWER_PATTERN, str(vals[asked]))
        pending = [] if reply.endswith("\n") else list(newline)
        rows.append({"method": method.label, "kind": method.kind, "cache": method.cache, "distance": distance,
                     "query": q, "line": asked, "value": vals[asked], "distance_tokens": seen - start[asked],
                     "evicted": not method.in_window(seen - (end[asked] - 1)), "parsed": got, "correct": ok,
                     "reply": reply})
    return rows


QUERY_FIELDS = ["method", "kind", "cache", "distance", "query", "line", "value", "distance_tokens", "evicted",
                "parsed", "correct", "reply"]


def summarize(rows: list[dict], methods: list[rt.Method]) -> dict:
    labels = [m.label for m in methods if any(r["method"] == m.label for r in rows)]
    distances = sorted({r["distance"] for r in rows})
    cells = []
    for lab in labels:
        for d in distances:
            sel = [r for r in rows if r["method"] == lab and r["distance"] == d]
            if sel:
                cells.append({"method": lab, "distance": d, "n": len(sel), "accuracy": rt.accuracy(r["correct"] for r in sel),
                              "evicted": all(r["evicted"] for r in sel),
                              "distance_tokens": round(sum(r["distance_tokens"] for r in sel) / len(sel), 1)})
    acc = {(c["method"], c["distance"]): c for c in cells}
    checks = []
    for m in methods:
        if m.kind != "recall":
            continue
        s = rt.Method("streaming", m.window, sinks=m.sinks).label
        for d in distances:
            dn, st, rc = acc.get(("dense", d)), acc.get((s, d)), acc.get((m.label, d))
            if dn and st and rc:
                checks.append({"distance": d, "recall": m.label, "streaming": s, "dense": dn["accuracy"],
                               "streaming_accuracy": st["accuracy"], "recall_accuracy": rc["accuracy"],
                               **rt.target(dn["accuracy"], st["accuracy"], rc["accuracy"], st["evicted"])})
    counted = [c for c in checks if c["counts"]]
    return {"accuracy": {lab: {str(d): acc[(lab, d)]["accuracy"] for d in distances if (lab, d) in acc} for lab in labels},
            "cells": cells,
            "target": {"rule": rt.target_rule(), "cells_counted": len(counted),
                       "cells_met": sum(bool(c["met"]) for c in counted), "checks": checks}}


def table(summary: dict) -> str:
    """Accuracy per method (rows) and answer distance in lines (columns); * marks an evicted answer."""
    cells = summary["cells"]
    distances = sorted({c["distance"] for c in cells})
    acc = {(c["method"], c["distance"]): c for c in cells}
    width = max(len(lab) for lab in summary["accuracy"])
    lines = [f"{'method':<{width}}  " + "  ".join(f"{'D=' + str(d):>7}" for d in distances)]
    for lab in summary["accuracy"]:
        row = []
        for d in distances:
            c = acc.get((lab, d))
            row.append(f"{'-' if c is None else format(c['accuracy'], '.2f') + ('*' if c['evicted'] else ' '):>7}")
        lines.append(f"{lab:<{width}}  " + "  ".join(row))
    lines.append("(D: answer distance in lines; * the answer line is outside the method's window at every query)")
    return "\n".join(lines)


def run(args, out: Path) -> dict:
    from ..models.special_tokens import bos_choice_label, stream_prefix

    distances = args.distances or DEFAULT_DISTANCES
    if any(d < 1 for d in distances):
        raise UserError(f"--distances must be integers >= 1 (got {distances})")
    queries = args.queries if args.queries is not None else DEFAULT_QUERIES
    if queries < 1:
        raise UserError(f"--queries must be at least 1 (got {queries})")
    methods = rt.method_list(args.windows or DEFAULT_WINDOWS, rt.recall_list(args.recall or DEFAULT_RECALL),
                             with_window=True)
    model, tokenizer = args.loaded if getattr(args, "loaded", None) else rt.load(args.model)
    prefix = stream_prefix(tokenizer, args.bos)
    tokens_per_line = len(_encode(tokenizer, LINE.format(i=123, v=45678)))
    head = {"model": args.model, "task": "streameval", **bos_choice_label(tokenizer, args.bos),
            "options": {"header": HEADER, "line": LINE, "query": QUERY, "query_every": QUERY_EVERY, "queries_per_stream": queries,
                        "answers_stay_in_stream": True, "chat_template": False, "chunk_size": args.chunk_size,
                        "decoding": "greedy (temperature 0, repetition penalty 1.0)", "max_new_tokens": MAX_NEW_TOKENS,
                        "stop": "at '>' or a newline", "match": "the first number in the reply equals the value",
                        "tokens_per_line": tokens_per_line, "seed": args.seed},
            "distances": distances, "methods": [m.label for m in methods], "paper_table7_streaming_d20": PAPER_TABLE7}
    rows, seconds, tokens = [], {}, 0
    bar = rt.progress_bar(len(methods) * len(distances), "streameval", not args.no_progress)
    for m in methods:
        engine, t0 = rt.engine_for(model, tokenizer, m, args.chunk_size), time.perf_counter()
        for d in distances:
            rows += run_stream(engine, tokenizer, m, d, queries, args.seed, prefix)
            tokens += engine.tokens_seen
            bar.update(1)
        seconds[m.label] = round(time.perf_counter() - t0, 1)
        _publish(out, head, rows, methods, seconds, tokens, complete=False)
    bar.close()
    res = _publish(out, head, rows, methods, seconds, tokens, complete=True)
    print(table(res), flush=True)
    return res


def _publish(out: Path, head: dict, rows, methods, seconds, tokens: int, complete: bool) -> dict:
    s = summarize(rows, methods)
    res = {**head, "complete": complete, "tokens": tokens, "seconds_per_method": seconds,
           "updated": time.strftime("%Y-%m-%d %H:%M:%S"), **s}
    write_json(out, "results.json", res)
    write_csv(out / "queries.csv", QUERY_FIELDS, [[r[k] for k in QUERY_FIELDS] for r in rows])
    write_csv(out / "table.csv", ["method", "distance", "n", "accuracy", "evicted", "distance_tokens"],
              [[c[k] for k in ("method", "distance", "n", "accuracy", "evicted", "distance_tokens")] for c in s["cells"]])
    print(f"[{time.strftime('%H:%M:%S')}] streameval: wrote {out} ({len(rows)} answers)", file=sys.stderr, flush=True)
    return res
