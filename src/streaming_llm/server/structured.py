"""Structured outputs (OpenAI's `response_format`): JSON mode and JSON schema, by grammar-constrained decoding.

`StructuredOutputs(model, tokenizer)` is made once per server, on the first request that asks for
JSON (importing xgrammar and reading the vocabulary cost a fraction of a second). Its
`constraint(response_format)` turns the request field into a `JsonConstraint`, or None for
`{"type": "text"}` / no field, and raises `BadResponseFormat` (an HTTP 400) for anything it
cannot honour. The constraint goes into `SamplingParams.constraint`; the `Sampler` (core/sampling.py)
then asks it for a token mask before every sample, in the engine's one decode loop, so batched and
unbatched turns, chat and completions, streaming or not, all get it.

The grammar engine is xgrammar (the one vLLM and SGLang use by default): it compiles a JSON schema
into a pushdown automaton over the tokenizer's vocabulary and fills a next-token bitmask in
microseconds. Compiled grammars are cached by xgrammar's compiler, keyed by schema.

- `{"type": "json_object"}`: one JSON object (any keys), compact (no free whitespace).
- `{"type": "json_schema", "json_schema": {"name", "schema", "strict"}}`: output that validates
  against `schema`, in xgrammar's strict mode whatever `strict` says (no properties or items
  beyond those the schema names; the output is still valid under the non-strict reading).
  xgrammar refuses what it cannot compile (unknown types, bad `$ref`s); that message is the 400.
- Besides the grammar, three kinds of tokens are never allowed: special tokens other than the
  stop tokens (a `<|im_start|>` would decode to text inside a string), and tokens containing a
  control character (JSON forbids them raw in strings, and compact JSON needs none outside), and
  tokens whose bytes would make the reply invalid UTF-8 (xgrammar's byte-level string rule lets
  e.g. encoded surrogates through; decoded, each bad byte became U+FFFD and broke `maxLength`).
  The UTF-8 state (how many continuation bytes are due, and their range) is tracked per reply;
  the mask for each of the few states is computed once per server.
- When the grammar is complete only stop tokens are allowed, so the reply ends there with
  finish_reason "stop"; at max_tokens it ends with "length" and the JSON may be incomplete
  (as with OpenAI).

What it does NOT do: sampling, HTTP, `response_format` for tools/function calling, regex or
free-form grammars (xgrammar has them; the OpenAI API does not).
"""

from __future__ import annotations

import json
import re

import torch

from ..models.special_tokens import stop_ids

NAME_RE = re.compile(r"^[A-Za-z0-9_-]{1,64}$")  # OpenAI's rule for json_schema.name
_XGR_PREFIX = re.compile(r"^\[[\d:]+\] \S+:\d+: ")  # "[09:02:26] /project/cpp/x.cc:5082: "


class BadResponseFormat(Exception):
    """The request's response_format cannot be honoured (-> HTTP 400)."""

    def __init__(self, message: str, param: str = "response_format"):
        super().__init__(message)
        self.param = param


class JsonMatcher:
    """One generation's grammar state (what `Sampler` drives)."""

    def __init__(self, owner: "StructuredOutputs", grammar):
        import xgrammar as xgr

        self.owner = owner
        self.matcher = xgr.GrammarMatcher(grammar)
        self.utf8 = UTF8_START  # the reply's UTF-8 state after the tokens accepted so far
        self.bitmask = xgr.allocate_token_bitmask(1, owner.vocab_size)

    def mask(self, logits: torch.Tensor) -> None:
        """Disallowed tokens of `logits` (V,) to -inf, in place."""
        import xgrammar as xgr

        if self.matcher.is_terminated():
            return
        self.matcher.fill_next_token_bitmask(self.bitmask)
        n = min(logits.numel(), self.owner.vocab_size)
        view = logits[:n].view(1, n)
        xgr.apply_token_bitmask_inplace(view, self.bitmask, vocab_size=n)
        view.masked_fill_(self.owner.never[:n].view(1, n), float("-inf"))
        view.masked_fill_(self.owner.bad_utf8(self.utf8)[:n].view(1, n), float("-inf"))
        if logits.numel() > n:  # ids beyond the tokenizer's vocabulary (padded embeddings)
            logits[n:] = float("-inf")

    def accept(self, token: int) -> None:
        if not self.matcher.is_terminated() and not self.matcher.accept_token(token):
            raise RuntimeError(f"the grammar rejected token {token}, which its own mask allowed")
        if token < self.owner.vocab_size and token not in self.owner.special:
            self.utf8 = utf8_scan(self.owner.vocab_bytes[token], self.utf8) or UTF8_START


UTF8_START = (0, 0x80, 0xBF)  # (continuation bytes due, lowest and highest allowed next one)
_LEADS = [(0xC2, 0xDF, 1, 0x80, 0xBF), (0xE0, 0xE0, 2, 0xA0, 0xBF), (0xE1, 0xEC, 2, 0x80, 0xBF),
          (0xED, 0xED, 2, 0x80, 0x9F), (0xEE, 0xEF, 2, 0x80, 0xBF), (0xF0, 0xF0, 3, 0x90, 0xBF),
          (0xF1, 0xF3, 3, 0x80, 0xBF), (0xF4, 0xF4, 3, 0x80, 0x8F)]  # RFC 3629's well-formed sequences


def utf8_scan(data: bytes, state: tuple[int, int, int]) -> tuple[int, int, int] | None:
    """The UTF-8 state after `data` from `state`, or None if `data` makes the text ill-formed."""
    due, lo, hi = state
    for b in data:
        if due:
            if not lo <= b <= hi:
                return None
            due, lo, hi = due - 1, 0x80, 0xBF
        elif b >= 0x80:
            lead = next((x for x in _LEADS if x[0] <= b <= x[1]), None)
            if lead is None:
                return None
            due, lo, hi = lead[2:]
    return due, lo, hi


class JsonConstraint:
    """A compiled grammar; `start()` gives a fresh state per generation (SamplingParams.constraint)."""

    def __init__(self, owner: "StructuredOutputs", grammar, kind: str):
        self.owner, self.grammar, self.kind = owner, grammar, kind

    def start(self) -> JsonMatcher:
        return JsonMatcher(self.owner, self.grammar)


class StructuredOutputs:
    """xgrammar's compiler for one tokenizer, and the tokens never allowed (see the module docstring)."""

    def __init__(self, model, tokenizer):
        try:
            import xgrammar as xgr
        except ImportError as e:
            raise BadResponseFormat(f"response_format needs the xgrammar package on the server "
                                    f"(pip install 'streaming-llm[server]'): {e}")
        if not hasattr(tokenizer, "get_vocab"):
            raise BadResponseFormat("this model's tokenizer cannot be used for constrained decoding")
        self.vocab_size = int(model.get_output_embeddings().weight.shape[0])
        stops = stop_ids(model, tokenizer)  # the same ids the engine stops on
        self.info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=self.vocab_size, stop_token_ids=stops)
        self.compiler = xgr.GrammarCompiler(self.info, max_threads=1)
        self.vocab_bytes = list(self.info.decoded_vocab[: self.vocab_size])  # read once: the property rebuilds the list
        never = torch.zeros(self.vocab_size, dtype=torch.bool)
        special = set(getattr(tokenizer, "all_special_ids", []) or []) | set(getattr(tokenizer, "added_tokens_decoder", {}) or {})
        self.special = frozenset(special)
        self._bad_utf8: dict[tuple[int, int, int], torch.Tensor] = {}
        for i in special - set(stops):
            if i < self.vocab_size:
                never[i] = True
        for i, piece in enumerate(self.vocab_bytes):
            if i not in special and any(b < 0x20 for b in piece):
                never[i] = True
        self.never = never

    def bad_utf8(self, state: tuple[int, int, int]) -> torch.Tensor:
        """(V,) True for the ordinary tokens that would make the text ill-formed UTF-8 from `state`."""
        bad = self._bad_utf8.get(state)
        if bad is None:
            vocab = self.vocab_bytes
            bad = torch.tensor([i not in self.special and utf8_scan(piece, state) is None for i, piece in enumerate(vocab)]
                               + [False] * (self.vocab_size - len(vocab)), dtype=torch.bool)
            self._bad_utf8[state] = bad  # a few states only; a race computes one twice, harmlessly
        return bad

    def constraint(self, response_format) -> JsonConstraint | None:
        """The constraint for a request's `response_format` (None: plain text)."""
        if response_format is None:
            return None
        if not isinstance(response_format, dict):
            raise BadResponseFormat("response_format must be an object such as {\"type\": \"json_object\"}")
        kind = response_format.get("type")
        if kind == "text":
            return None
        if kind == "json_object":
            return JsonConstraint(self, self._compile({"type": "object"}), kind)
        if kind != "json_schema":
            raise BadResponseFormat(f"response_format.type must be 'text', 'json_object' or 'json_schema' (got {kind!r})",
                                    "response_format.type")
        spec = response_format.get("json_schema")
        if not isinstance(spec, dict):
            raise BadResponseFormat("response_format.json_schema must be an object with 'name' and 'schema'",
                                    "response_format.json_schema")
        name = spec.get("name")
        if not isinstance(name, str) or not NAME_RE.match(name):
            raise BadResponseFormat("response_format.json_schema.name must be 1-64 characters from a-z A-Z 0-9 _ -",
                                    "response_format.json_schema.name")
        if spec.get("strict") not in (None, True, False):
            raise BadResponseFormat("response_format.json_schema.strict must be a boolean", "response_format.json_schema.strict")
        schema = spec.get("schema", {"type": "object"})
        if not isinstance(schema, dict):
            raise BadResponseFormat("response_format.json_schema.schema must be a JSON Schema object",
                                    "response_format.json_schema.schema")
        return JsonConstraint(self, self._compile(schema), kind)

    def _compile(self, schema: dict):
        try:
            return self.compiler.compile_json_schema(json.dumps(schema), any_whitespace=False, strict_mode=True)
        except Exception as e:  # xgrammar raises RuntimeError/ValueError with its C++ location first
            msg = _XGR_PREFIX.sub("", str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__)
            raise BadResponseFormat(f"response_format.json_schema.schema is not supported: {msg}",
                                    "response_format.json_schema.schema")


class LazyStructuredOutputs:
    """Makes the `StructuredOutputs` on first use (one per app, never at import)."""

    def __init__(self, model, tokenizer):
        self.model, self.tokenizer = model, tokenizer
        self._made: StructuredOutputs | None = None

    def constraint(self, response_format) -> JsonConstraint | None:
        if response_format is None or response_format == {"type": "text"}:
            return None
        if self._made is None:
            self._made = StructuredOutputs(self.model, self.tokenizer)
        return self._made.constraint(response_format)
