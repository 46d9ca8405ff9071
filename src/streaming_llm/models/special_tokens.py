"""The special-token rules of a stream: how it begins (BOS or not) and what ends a chat turn.

How a stream begins. A raw-text stream starts with the model's beginning-of-sequence token exactly
when the model was trained that way, as its own tokenizer metadata says. `load_model` decides once
per load (`decide_bos`) and records the decision on the tokenizer (`record_bos`); every raw-text
path (ppl, reproduce, attention-map, bench prefill, /v1/completions text sessions, pre-training
evaluation) then asks `wants_bos` / `stream_ids`, optionally overridden by `--bos` / `--no-bos`.
The evidence, strongest first:

1. a GGUF's `tokenizer.ggml.add_bos_token` (SmolLM2's: false; Gemma 3's: true);
2. an explicit `add_bos_token` in a model folder's `tokenizer_config.json`;
3. what the tokenizer itself does with special tokens on: whether `tokenizer("a")` starts with its
   BOS id (its post-processor). This is where the family convention survives conversion:
   transformers' GGUF loader drops `add_bos_token` from Gemma 3's saved config and the loaded
   tokenizer reports `add_bos_token=False`, yet its post-processor still writes `<bos>`, as every
   Gemma model is trained;
4. otherwise no BOS.

What ends a chat turn: `stop_ids` (the tokenizer's eos, the model's generation eos ids and the known
end-of-turn tokens of common templates, as far as they are special tokens) and
`END_OF_TURN_TOKENS`, used by model loading (written into the converted generation config), the
chat session and the server.

`turn_end` finds which of those ids the chat template writes after an assistant message (and the
text it writes after it), and `chat_stream_start` makes a chat stream start with BOS exactly once
when the rule asks for one (a template that writes `{{ bos_token }}` already has it; one that
does not gets it; a doubled one loses the copy).

What this module does NOT do: load models or tokenizers, or feed anything to a model.
"""

from __future__ import annotations

import json
from pathlib import Path

# Tokens that end a turn in common chat templates, besides the tokenizer's eos (ChatML, Gemma,
# Llama 3, Phi 3). The one table of them in the project.
END_OF_TURN_TOKENS = ("<|im_end|>", "<end_of_turn>", "<|eot_id|>", "<|end|>")
# Attribute of the loaded tokenizer that holds the load-time decision (see `record_bos`).
_BOS_ATTR = "streaming_llm_add_bos"
_BOS_SOURCE_ATTR = "streaming_llm_add_bos_source"
_MARK = "\u2063MARK\u2063"  # a content string no template touches: locates the end-of-turn text


# ---- how a stream begins -----------------------------------------------------------------------
_GGUF_SIZES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}  # fixed-size value types
_GGUF_STRING, _GGUF_ARRAY, _GGUF_BOOL = 8, 9, 7


def gguf_metadata_value(path: str | Path, key: str):
    """One scalar metadata value of a GGUF file (bool, number or string), None if absent or the file
    is unreadable. Scans the key-value header only, skipping arrays (the vocabulary) without
    decoding them: milliseconds, where `gguf.GGUFReader` takes seconds on a 262K-token vocabulary."""
    import struct

    def skip(f, vtype: int) -> None:
        if vtype in _GGUF_SIZES:
            f.seek(_GGUF_SIZES[vtype], 1)
        elif vtype == _GGUF_STRING:
            (n,) = struct.unpack("<Q", f.read(8))
            f.seek(n, 1)
        elif vtype == _GGUF_ARRAY:
            etype, count = struct.unpack("<IQ", f.read(12))
            if etype in _GGUF_SIZES:
                f.seek(_GGUF_SIZES[etype] * count, 1)
            else:
                for _ in range(count):
                    skip(f, etype)
        else:
            raise ValueError(f"unknown GGUF value type {vtype}")

    try:
        with open(path, "rb") as f:
            if f.read(4) != b"GGUF":
                return None
            version, _, kv_count = struct.unpack("<IQQ", f.read(20))
            if version < 2:
                return None
            for _ in range(kv_count):
                (n,) = struct.unpack("<Q", f.read(8))
                name = f.read(n).decode("utf-8", "replace")
                (vtype,) = struct.unpack("<I", f.read(4))
                if name != key:
                    skip(f, vtype)
                    continue
                if vtype == _GGUF_BOOL:
                    return f.read(1) != b"\x00"
                if vtype == _GGUF_STRING:
                    (m,) = struct.unpack("<Q", f.read(8))
                    return f.read(m).decode("utf-8", "replace")
                fmt = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 10: "Q", 11: "q", 12: "d"}.get(vtype)
                return None if fmt is None else struct.unpack("<" + fmt, f.read(_GGUF_SIZES[vtype]))[0]
    except (OSError, struct.error, ValueError):
        return None
    return None


def gguf_add_bos(path: str | Path) -> bool | None:
    """`tokenizer.ggml.add_bos_token` of a GGUF file, or None if it has no such key."""
    v = gguf_metadata_value(path, "tokenizer.ggml.add_bos_token")
    return v if isinstance(v, bool) else None


def _config_add_bos(folder: str | Path | None) -> bool | None:
    if folder is None:
        return None
    path = Path(folder) / "tokenizer_config.json"
    try:
        value = json.loads(path.read_text(encoding="utf-8")).get("add_bos_token")
    except (OSError, ValueError, AttributeError):
        return None
    return value if isinstance(value, bool) else None


def bos_id(tokenizer) -> int | None:
    i = getattr(tokenizer, "bos_token_id", None)
    return i if isinstance(i, int) else None


def _tokenizer_adds_bos(tokenizer) -> bool:
    b = bos_id(tokenizer)
    if b is None:
        return False
    try:
        ids = tokenizer("a", add_special_tokens=True)["input_ids"]
    except Exception:  # noqa: BLE001 - tokenizers without a __call__ (test stand-ins)
        try:
            ids = tokenizer.encode("a", add_special_tokens=True)
        except Exception:  # noqa: BLE001
            return False
    return bool(ids) and ids[0] == b


def decide_bos(tokenizer, gguf: str | Path | None = None, folder: str | Path | None = None) -> tuple[bool, str]:
    """(whether a raw-text stream starts with BOS, the evidence used). See the module docstring."""
    if bos_id(tokenizer) is None:
        return False, "tokenizer has no bos token"
    if gguf is not None:
        v = gguf_add_bos(gguf)
        if v is not None:
            return v, f"gguf tokenizer.ggml.add_bos_token={str(v).lower()}"
    v = _config_add_bos(folder)
    if v is not None:
        return v, f"tokenizer_config.json add_bos_token={str(v).lower()}"
    if _tokenizer_adds_bos(tokenizer):
        return True, "the tokenizer prepends its bos token"
    return False, "no metadata asks for a bos token"


def record_bos(tokenizer, add_bos: bool, source: str = "") -> None:
    """Store the load-time decision on the tokenizer (the one place every path reads it from)."""
    setattr(tokenizer, _BOS_ATTR, bool(add_bos))
    setattr(tokenizer, _BOS_SOURCE_ATTR, source)


def bos_source(tokenizer) -> str:
    return getattr(tokenizer, _BOS_SOURCE_ATTR, "") or "decided from the tokenizer (not loaded by load_model)"


def wants_bos(tokenizer, override: bool | None = None) -> bool:
    """Whether a raw-text stream starts with BOS: `override` if given (--bos / --no-bos), else the
    decision recorded at load time, else `decide_bos` on the tokenizer alone (and recorded)."""
    if override is not None:
        if override and bos_id(tokenizer) is None:
            from ..errors import UserError

            raise UserError("--bos: this tokenizer has no bos token")
        return bool(override)
    recorded = getattr(tokenizer, _BOS_ATTR, None)
    if recorded is None:
        recorded, source = decide_bos(tokenizer)
        try:
            record_bos(tokenizer, recorded, source)
        except AttributeError:  # a tokenizer that refuses attributes: decide again next time
            pass
    return bool(recorded)


def stream_prefix(tokenizer, override: bool | None = None) -> list[int]:
    """The ids a raw-text stream starts with: [bos id] or []."""
    return [bos_id(tokenizer)] if wants_bos(tokenizer, override) else []


def stream_ids(tokenizer, text: str, override: bool | None = None, start: bool = True) -> list[int]:
    """Token ids of `text` as a raw-text stream: without any special token the tokenizer would add,
    BOS first when this is the stream's start (`start`) and the rule says so."""
    ids = list(tokenizer.encode(text, add_special_tokens=False))
    return (stream_prefix(tokenizer, override) if start else []) + ids


def bos_choice_label(tokenizer, override: bool | None = None) -> dict:
    """What result files record about the stream start: {"bos": bool, "bos_rule": "..."}."""
    used = wants_bos(tokenizer, override)
    rule = ("--bos" if override else "--no-bos") if override is not None else f"model rule: {bos_source(tokenizer)}"
    return {"bos": used, "bos_rule": rule}


def add_bos_arguments(p) -> None:
    """--bos / --no-bos (default: the model's rule), for the verbs that start raw-text streams."""
    g = p.add_mutually_exclusive_group()
    g.add_argument("--bos", dest="bos", action="store_const", const=True, default=None,
                   help="start the stream with the BOS token (default: as the model's tokenizer metadata says)")
    g.add_argument("--no-bos", dest="bos", action="store_const", const=False,
                   help="start the stream without the BOS token")


# ---- what ends a turn --------------------------------------------------------------------------
def _as_ids(x) -> list[int]:
    if x is None:
        return []
    if isinstance(x, int):
        return [x]
    return [int(i) for i in x]


def end_of_turn_ids(tokenizer) -> list[int]:
    """Ids of the known end-of-turn tokens present in the vocabulary, in `END_OF_TURN_TOKENS` order.
    Looked up token by token (a token the vocabulary lacks maps to the unknown token, whose text
    differs), not through `get_vocab()`, which builds the whole vocabulary as a dict: the server
    asks at every turn, and that copy cost the default model ~5% of a core at 8 sessions."""
    ids = []
    for t in END_OF_TURN_TOKENS:
        i = tokenizer.convert_tokens_to_ids(t)
        if isinstance(i, int) and tokenizer.convert_ids_to_tokens(i) == t:
            ids.append(i)
    return ids


def stop_ids(model, tokenizer) -> list[int]:
    """The ids that end a turn (generation stops on any of them): the tokenizer's eos, the model's
    generation eos ids and the known end-of-turn tokens, as far as they are special tokens (a model
    config's default eos id may be an ordinary token); if none is special, the tokenizer's eos."""
    tok_eos = _as_ids(getattr(tokenizer, "eos_token_id", None))
    if not hasattr(tokenizer, "get_vocab"):  # a byte stand-in: its eos is all there is
        return sorted(set(tok_eos))
    special = set(getattr(tokenizer, "all_special_ids", []) or []) | set(getattr(tokenizer, "added_tokens_decoder", {}) or {})
    gen = getattr(model, "generation_config", None)
    candidates = tok_eos + _as_ids(getattr(gen, "eos_token_id", None)) + end_of_turn_ids(tokenizer)
    ids = sorted({i for i in candidates if i in special})
    return ids or sorted(set(tok_eos))


def generation_eos_ids(model, tokenizer) -> list[int]:
    """The converted model's generation eos ids: the GGUF's single eos id plus the end-of-turn
    tokens of the vocabulary (what `load_model` writes into the generation config)."""
    ids = _as_ids(getattr(model.generation_config, "eos_token_id", None))
    for i in end_of_turn_ids(tokenizer):
        if i not in ids:
            ids.append(i)
    return ids


def turn_end(tokenizer, stops: list[int]) -> tuple[int, str, str]:
    """(token id, its text, the text the template writes after it) that closes an assistant turn,
    found by rendering a one-exchange conversation with the chat template. ChatML: (<|im_end|> id,
    "<|im_end|>", "\\n"); Gemma: (<end_of_turn> id, "<end_of_turn>", "\\n"). Falls back to the first
    of `stops` when the template writes none of them."""
    from ..errors import UserError

    conv = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": _MARK}]
    try:
        rendered = tokenizer.apply_chat_template(conv, tokenize=False, add_generation_prompt=False)
    except Exception as e:  # noqa: BLE001 - jinja errors
        raise UserError(f"the chat template rejected the conversation: {e}") from e
    suffix = rendered.rsplit(_MARK, 1)[-1]
    for tok in tokenizer.encode(suffix, add_special_tokens=False):
        if tok in stops:
            text = tokenizer.decode([tok], skip_special_tokens=False)
            after = suffix.split(text, 1)[1] if text in suffix else ""
            return tok, text, after
    if not stops:
        raise UserError("cannot tell which token ends a chat turn: the tokenizer has no eos token")
    tok = stops[0]
    return tok, tokenizer.decode([tok], skip_special_tokens=False), ""


def chat_stream_start(tokenizer, ids: list[int]) -> list[int]:
    """The first ids of a chat stream (the rendered template, encoded without special tokens) with
    BOS exactly once at the front when the model's rule asks for it; as rendered otherwise."""
    b = bos_id(tokenizer)
    ids = list(ids)
    if b is None or not wants_bos(tokenizer):
        return ids
    k = 0
    while k < len(ids) and ids[k] == b:
        k += 1
    return [b] + ids[k:]
