"""Snapshots proportional to the turn: what a completed turn changed, stored as a delta.

A session's stored state is a chain: one full snapshot (`conversations.pack_state` of the whole
state) followed by deltas, one per completed turn, each holding only what the turn changed:
- per cache layer, the ring slots its tokens were written to (`changed_slots`: the one place
  that knows the ring arithmetic), the layer's sink slots of `keys` (the sink view, re-rotated as
  the stream advances: `s` slots per layer), and the whole sink region only while the stream is
  still writing its sinks;
- every other field of the state (counters `seen`, `sink_shift`, `view_delta`, `pos_shift`,
  `tokens_seen`; a chat's messages, turn stats and fed text) as a structural diff (`diff`):
  unchanged fields are left out, grown lists and strings store only what was appended;
- the transcript's delta (`store.transcript_delta`), kept by the store next to the state delta.
Restoring is the full snapshot with every delta applied in order (`apply_delta`); each delta
names the counters of the state it applies to, and a chain that does not fit raises (the
session manager then replays the transcript).

When a turn is stored whole instead (`Snapshotter.plan`): no chain yet (new, reloaded by replay
or from a store written before deltas), a chat rebuilt from the client's messages, a rebase
(`pos_shift` changed: the whole ring was re-rotated), a layer that received at least `window`
tokens (every ring slot changed), a state with fields this module does not know (e.g. recall
memory: stored whole, never diffed), and compaction: the chain already holds `max_deltas`
deltas, or its bytes with this delta would exceed `max_ratio` times the last full snapshot. So a
session's stored bytes stay below (1 + max_ratio) full snapshots, a restore reads at most that
much, and the full snapshot is rewritten roughly once per `window` tokens of the stream.

This module decides and computes; it runs no model and does no I/O of its own (the store does:
`SessionStore.put` writes a full snapshot and drops the chain, `put_delta` appends one delta).
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass

import torch

from .conversations import pack_state
from .store import DEFAULT_MAX_DELTAS, StaleChain, transcript_delta

DELTA_FORMAT, DELTA_VERSION = "sllm-delta", 1
DEFAULT_MAX_RATIO = 1.0
_ENGINE_KEYS = {"config", "tokens_seen", "history", "cache"}
_CACHE_KEYS = {"pos_shift", "layers"}
_LAYER_KEYS = {"keys", "values", "sink_keys", "seen", "sink_shift", "view_delta"}
_TENSORS = ("keys", "values", "sink_keys")


def changed_slots(a: int, b: int, sinks: int, window: int) -> list[int] | None:
    """Ring slots of a layer (sinks s, window w) written by its stream tokens [a, b): token
    u >= s sits in slot s + (u - s) % w. None: every ring slot (b - max(a, s) >= w). The sink
    slots (token u < s in slot u) are not listed: they change only while a < s."""
    lo = max(a, sinks)
    if b - lo >= window:
        return None
    return [sinks + (u - sinks) % window for u in range(lo, b)]


def _cache(state) -> dict | None:
    """The cache part of a conversation state, if this module knows every field around it."""
    eng = state.get("engine") if isinstance(state, dict) else None
    if not isinstance(eng, dict) or set(eng) != _ENGINE_KEYS:
        return None
    cache = eng["cache"]
    if not isinstance(cache, dict) or set(cache) != _CACHE_KEYS:
        return None
    for layer in cache["layers"]:
        if not isinstance(layer, dict) or set(layer) != _LAYER_KEYS or layer["keys"] is None:
            return None
    return cache


def _has_tensor(x) -> bool:
    if isinstance(x, torch.Tensor):
        return True
    if isinstance(x, dict):
        return any(_has_tensor(v) for v in x.values())
    if isinstance(x, (list, tuple)):
        return any(_has_tensor(v) for v in x)
    return False


def _copy(x):
    if isinstance(x, dict):
        return {k: _copy(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_copy(v) for v in x]
    return x


def strip(state) -> dict | None:
    """The state without its cache tensors (a small tree of plain values), or None when it
    holds anything this module does not understand (then it is only ever stored whole)."""
    if _cache(state) is None:
        return None
    rest = {k: v for k, v in state.items() if k != "engine"}
    eng = dict(state["engine"])
    eng["cache"] = {"pos_shift": eng["cache"]["pos_shift"],
                    "layers": [{k: v for k, v in layer.items() if k not in _TENSORS} for layer in eng["cache"]["layers"]]}
    rest["engine"] = eng
    if _has_tensor(rest):
        return None
    return _copy(rest)


def diff(old, new):
    """A structural delta from `old` to `new` (plain values): {} unchanged keys left out."""
    if isinstance(old, dict) and isinstance(new, dict) and old.keys() == new.keys():
        return {"d": {k: diff(old[k], new[k]) for k in new if old[k] != new[k]}}
    if isinstance(old, list) and isinstance(new, list):
        if len(old) == len(new):
            return {"i": {i: diff(o, n) for i, (o, n) in enumerate(zip(old, new)) if o != n}}
        if len(new) > len(old) and new[: len(old)] == old:
            return {"a": new[len(old):]}
    if isinstance(old, str) and isinstance(new, str) and len(new) > len(old) and new.startswith(old):
        return {"a": new[len(old):]}
    return {"s": new}


def patch(old, d):
    """`new` from `old` and `diff(old, new)`."""
    if "d" in d:
        out = dict(old)
        for k, v in d["d"].items():
            out[k] = patch(old[k], v)
        return out
    if "i" in d:
        out = list(old)
        for i, v in d["i"].items():
            out[i] = patch(old[i], v)
        return out
    if "a" in d:
        return old + d["a"]
    return d["s"]


def _counters(rest: dict) -> list:
    cache = rest["engine"]["cache"]
    return [cache["pos_shift"]] + [[l["seen"], l["sink_shift"], l["view_delta"]] for l in cache["layers"]]


def make_delta(state: dict, rest: dict, base_rest: dict, shapes: list[tuple[int, int]]) -> dict | None:
    """The delta from the stored state (`base_rest`, its non-tensor part) to `state` (whose
    non-tensor part is `rest`), or None when only a full snapshot will do (see the module doc).
    `shapes`: (sinks, window) per layer, as the cache holds them."""
    cache, old = state["engine"]["cache"], base_rest["engine"]["cache"]
    if cache["pos_shift"] != old["pos_shift"] or not len(cache["layers"]) == len(old["layers"]) == len(shapes):
        return None  # a rebase re-rotated the whole ring
    layers = []
    for layer, prev, (s, w) in zip(cache["layers"], old["layers"], shapes):
        a, b = prev["seen"], layer["seen"]
        if b < a or layer["keys"].shape[-2] < s + w:
            return None
        slots = changed_slots(a, b, s, w)
        if slots is None:
            return None  # every ring slot changed
        idx = torch.tensor(slots, dtype=torch.long, device=layer["keys"].device)
        entry = {"ring": idx.cpu(), "keys": layer["keys"][:, :, idx], "values": layer["values"][:, :, idx],
                 "sink_view": layer["keys"][:, :, :s].clone()}  # clones: torch.save would write a view's whole storage
        if a < s:  # the sinks are still being written
            entry["sink_values"], entry["sink_keys"] = layer["values"][:, :, :s].clone(), layer["sink_keys"].clone()
        layers.append(entry)
    return {"format": DELTA_FORMAT, "version": DELTA_VERSION, "from": _counters(base_rest),
            "rest": diff(base_rest, rest), "layers": layers}


@torch.inference_mode()
def apply_delta(state: dict, delta: dict) -> dict:
    """The state after one stored turn: `state` (an unpacked full snapshot or an earlier
    result, modified in place) with `delta` applied. Raises ValueError if they do not fit."""
    if not isinstance(delta, dict) or (delta.get("format"), delta.get("version")) != (DELTA_FORMAT, DELTA_VERSION):
        raise ValueError("not a snapshot delta of this version")
    rest = strip(state)
    if rest is None or _counters(rest) != delta["from"] or len(delta["layers"]) != len(rest["engine"]["cache"]["layers"]):
        raise ValueError("the snapshot delta does not follow the stored state (chain out of order)")
    new = patch(rest, delta["rest"])
    for layer, st, d in zip(new["engine"]["cache"]["layers"], state["engine"]["cache"]["layers"], delta["layers"]):
        keys, values, sink_keys = st["keys"], st["values"], st["sink_keys"]
        idx = d["ring"].to(keys.device)
        keys[:, :, idx] = d["keys"].to(keys.dtype)
        values[:, :, idx] = d["values"].to(values.dtype)
        keys[:, :, : d["sink_view"].shape[-2]] = d["sink_view"].to(keys.dtype)
        if "sink_keys" in d:
            s = d["sink_keys"].shape[-2]
            values[:, :, :s] = d["sink_values"].to(values.dtype)
            sink_keys.copy_(d["sink_keys"].to(sink_keys.dtype))
        layer.update(keys=keys, values=values, sink_keys=sink_keys)
    return new


@dataclass
class Chain:
    """What a live session knows of its stored chain (the base a next delta builds on)."""

    base: str  # the store's token of the chain's full snapshot
    rest: dict  # the stored state's non-tensor part
    transcript: list  # the stored transcript
    deltas: int = 0  # deltas after the full snapshot
    delta_bytes: int = 0
    full_bytes: int = 0


@dataclass(frozen=True)
class DeltaPolicy:
    """When to store deltas and when to compact (see the module doc). enabled=False: every turn whole."""

    enabled: bool = True
    max_deltas: int = DEFAULT_MAX_DELTAS
    max_ratio: float = DEFAULT_MAX_RATIO

    def compact(self, chain: Chain, delta_bytes: int) -> bool:
        return chain.deltas >= self.max_deltas or chain.delta_bytes + delta_bytes > self.max_ratio * chain.full_bytes


def layer_shapes(conv) -> list[tuple[int, int]] | None:
    """(sinks, window) per cache layer of a conversation's stream (None: not a sink cache)."""
    layers = getattr(getattr(conv.engine, "cache", None), "layers", None)
    if not layers or not all(hasattr(l, "sinks") and hasattr(l, "window") for l in layers):
        return None
    return [(l.sinks, l.window) for l in layers]


def store_turn(store, record, state: dict, chain: Chain | None, shapes, policy: DeltaPolicy,
               dtype=None, force_full: bool = False) -> tuple[Chain | None, int, str]:
    """(I/O thread) Store one completed turn: a delta on `chain` when the policy allows, else a
    full snapshot (which replaces the chain). `record` carries the full transcript and the
    metadata. Returns (the new chain, bytes written for the state, "delta" | "full")."""
    rest = strip(state) if policy.enabled else None
    if rest is not None and chain is not None and shapes is not None and not force_full:
        delta = make_delta(state, rest, chain.rest, shapes)
        if delta is not None:
            blob = pack_state(delta, dtype)
            if not policy.compact(chain, len(blob)):
                record.base = chain.base
                try:
                    store.put_delta(record, blob, transcript_delta(chain.transcript, record.messages), chain.deltas)
                except StaleChain:  # another writer changed the stored session: store it whole
                    pass
                else:
                    new = Chain(chain.base, rest, list(record.messages), chain.deltas + 1,
                                chain.delta_bytes + len(blob), chain.full_bytes)
                    return new, len(blob), "delta"
    blob = pack_state(state, dtype)
    record.snapshot, record.base = blob, uuid.uuid4().hex if rest is not None else ""
    store.put(record)
    new = Chain(record.base, rest, list(record.messages), 0, 0, len(blob)) if rest is not None else None
    return new, len(blob), "full"


def chain_of(record, state: dict) -> Chain | None:
    """The chain a record restored into `state` continues (None: the next turn is stored whole)."""
    rest = strip(state)
    if not record.base or rest is None:
        return None
    return Chain(record.base, rest, list(record.messages), len(record.deltas),
                 sum(len(d) for d in record.deltas), len(record.snapshot or b""))
