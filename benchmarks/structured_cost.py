"""What JSON mode costs per token: decode time with and without an xgrammar constraint, and the
mask step alone (fill bitmask + apply + UTF-8 mask + accept), on the default model.

    PYTHONPATH=src python benchmarks/structured_cost.py [--model smollm2-135m-instruct] [--tokens 128]

Greedy, one stream, the engine's own `generate` (the server's decode loop). The schema is a small
object with a bounded string, an enum, a boolean and an integer; the prompt asks for it. The
last stdout line is JSON. Not a test: a measurement whose output docs/server.md quotes.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace

import torch

from streaming_llm.core.config import StreamingConfig
from streaming_llm.core.engine import StreamingLLM
from streaming_llm.core.sampling import SamplingParams
from streaming_llm.models import DEFAULT_MODEL
from streaming_llm.models.loading import load_model
from streaming_llm.models.special_tokens import stop_ids
from streaming_llm.server.structured import StructuredOutputs

SCHEMA = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 24}, "ok": {"type": "boolean"},
                                            "color": {"enum": ["red", "green", "blue"]}, "n": {"type": "integer"}},
          "required": ["name", "ok", "color", "n"], "additionalProperties": False}


class Timed:
    """A constraint whose states add their mask + accept time to `spent` (seconds)."""

    def __init__(self, inner):
        self.inner, self.spent, self.steps = inner, 0.0, 0

    def start(self):
        state, timed = self.inner.start(), self

        class State:
            def mask(self, logits):
                t0 = time.perf_counter()
                state.mask(logits)
                timed.spent += time.perf_counter() - t0
                timed.steps += 1

            def accept(self, token):
                t0 = time.perf_counter()
                state.accept(token)
                timed.spent += time.perf_counter() - t0

        return State()


def run(engine, prompt, sampling, n, stops):
    """(ms per token after the first, excluding the prefill; tokens; text)."""
    t_first, count, text = None, 0, ""
    for tok in engine.generate(prompt, n, sampling, stop_ids=stops):
        t_first = t_first or time.perf_counter()
        count, text = count + 1, text + tok.text
    return (time.perf_counter() - t_first) / max(1, count - 1) * 1000, count, text


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=DEFAULT_MODEL)
    ap.add_argument("--tokens", type=int, default=128)
    args = ap.parse_args()
    model, tok = load_model(args.model)
    t0 = time.perf_counter()
    so = StructuredOutputs(model, tok)
    setup_ms = (time.perf_counter() - t0) * 1000
    t0 = time.perf_counter()
    constraint = so.constraint({"type": "json_schema", "json_schema": {"name": "thing", "schema": SCHEMA}})
    compile_ms = (time.perf_counter() - t0) * 1000
    prompt = tok.apply_chat_template([{"role": "user", "content": "Describe a thing as JSON: name, ok, color, n."}],
                                     add_generation_prompt=True, tokenize=False)
    ids = tok(prompt, add_special_tokens=False).input_ids
    stops = stop_ids(model, tok)
    plain = SamplingParams(temperature=0)
    constraint = Timed(constraint)
    rows = {}
    for label, sampling in (("plain", plain), ("json_schema", replace(plain, constraint=constraint)),
                            ("plain", plain), ("json_schema", replace(plain, constraint=constraint))):
        engine = StreamingLLM(model, tok, StreamingConfig())
        constraint.spent, constraint.steps = 0.0, 0  # the warm round's numbers are kept
        ms, count, text = run(engine, ids, sampling, args.tokens, stops)
        rows[label] = (ms, count, text)  # the second round (warm) is kept
    in_loop_ms = constraint.spent / max(1, constraint.steps) * 1000  # the second (warm) round
    # the mask step alone, on one logits vector, in a state inside the string
    state = constraint.inner.start()
    for t in tok('{"name": "ab', add_special_tokens=False).input_ids:
        state.accept(t)
    logits = torch.randn(so.vocab_size)
    t0 = time.perf_counter()
    for _ in range(200):
        state.mask(logits.clone())
    mask_ms = (time.perf_counter() - t0) / 200 * 1000
    for label, (ms, count, text) in rows.items():
        print(f"{label:12s} {ms:7.2f} ms/token over {count} tokens: {text[:80]!r}")
    print(f"mask + accept in the decode loop {in_loop_ms:.3f} ms/token")
    print(f"mask step alone {mask_ms:.3f} ms; setup {setup_ms:.0f} ms (once per server); compile {compile_ms:.1f} ms")
    print(json.dumps({"model": args.model, "vocab": so.vocab_size, "plain_ms_per_token": round(rows["plain"][0], 2),
                      "json_ms_per_token": round(rows["json_schema"][0], 2), "mask_ms": round(mask_ms, 3), "in_loop_mask_ms": round(in_loop_ms, 3),
                      "setup_ms": round(setup_ms), "compile_ms": round(compile_ms, 1),
                      "json_valid": _valid(rows["json_schema"][2]), "threads": torch.get_num_threads()}))


def _valid(text: str) -> bool:
    try:
        json.loads(text)
        return True
    except ValueError:
        return False


if __name__ == "__main__":
    main()
