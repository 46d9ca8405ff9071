"""A `SessionStore` on a Redis server, shared by several server replicas, with per-session leases.

Layout (prefix `sllm:` by default), per session id S:
- `sllm:s:S`        hash: kind, model, config, messages (JSON), turns, meta, updated, version,
                    gen, chunks, bytes: the record of the last completed turn, minus the snapshot;
- `sllm:c:S:G:I`    the snapshot of generation G as chunks I = 0..chunks-1 of `chunk_bytes` (1 MiB)
                    each, so that a later change can rewrite only the chunks a turn changed;
- `sllm:d:S:G:K:N`  delta K (0-based) of the chain on generation G, written with nonce N: a hash
                    {state, transcript}; the session hash's `base` (the chain's token), `deltas`
                    (how many) and `dK` (delta K's nonce) say which keys are part of the session;
- `sllm:lease:S`    the replica token holding the session while a turn runs (`SET NX PX`);
- `sllm:index`      a sorted set of session ids by last update (listing, TTL, LRU).

A `put` writes the new generation's chunks first, then switches the hash to it in one MULTI/EXEC
that only runs while this replica still holds the session's lease (WATCH on the lease key), then
deletes the previous generation: a reader sees either the old turn or the new one, never a mix,
and a replica whose lease expired (it stalled, or another replica took over) cannot overwrite
the newer turn (`LeaseLost`). Durability is Redis's: run it with `appendonly yes` and
`appendfsync always` for the SQLite store's guarantee (see docs/server.md).
`put_delta` writes its delta key first, then, in one MULTI/EXEC under WATCH of the lease and the
session hash, checks that the stored chain is still the one it extends, bumps `deltas` and the
turn's fields: a crash before EXEC leaves an unreferenced key (overwritten by the next delta of
that position, removed with the generation), never half a turn. The nonce makes every delta
key its writer's own, so a writer that lost its lease or raced another can never overwrite a
delta that is already part of the session. A full `put` (compaction)
removes the previous generation's deltas with its chunks.
This module knows nothing about models or HTTP; the lease protocol is used by `replicas.py`.
"""

from __future__ import annotations

import json
import os
import socket
import time
import uuid

from ..errors import UserError
from .store import CorruptRecord, SessionRecord, StaleChain, _summary, _victims, apply_transcript

CHUNK_BYTES = 1 << 20

_RENEW = "if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('pexpire', KEYS[1], ARGV[2]) else return 0 end"
_RELEASE = "if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('del', KEYS[1]) else return 0 end"


class LeaseLost(Exception):
    """This replica no longer holds the session's lease: its write was refused."""


class RedisStore:
    shared = True  # several replicas: the session manager takes leases and checks versions

    def __init__(self, url: str, prefix: str = "sllm:", chunk_bytes: int = CHUNK_BYTES, timeout_s: float = 5.0):
        import redis

        self.url, self.p, self.chunk_bytes = url, prefix, chunk_bytes
        self.token = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"  # this replica
        self.r = redis.Redis.from_url(url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s)
        try:
            self.r.ping()
        except redis.RedisError as e:
            raise UserError(f"cannot reach the Redis store {url}: {e}") from None
        self._renew, self._release = self.r.register_script(_RENEW), self.r.register_script(_RELEASE)

    # ---- keys ----------------------------------------------------------------------------------
    def _h(self, sid):
        return f"{self.p}s:{sid}"

    def _c(self, sid, gen, i):
        return f"{self.p}c:{sid}:{gen}:{i}"

    def _d(self, sid, gen, k, nonce):
        return f"{self.p}d:{sid}:{gen}:{k}:{nonce.decode() if isinstance(nonce, bytes) else nonce}"

    def _lease(self, sid):
        return f"{self.p}lease:{sid}"

    @property
    def _index(self):
        return f"{self.p}index"

    # ---- SessionStore --------------------------------------------------------------------------
    def get(self, session_id):
        for _ in range(3):  # a put may switch generations between the two reads: read again
            h = self.r.hgetall(self._h(session_id))
            if not h:
                return None
            h = {k.decode(): v for k, v in h.items()}
            gen, n, nd = int(h["gen"]), int(h["chunks"]), int(h.get("deltas") or 0)
            pipe = self.r.pipeline(transaction=False)
            pipe.mget([self._c(session_id, gen, i) for i in range(n)] or [self._c(session_id, gen, 0)])
            for k in range(nd):
                pipe.hmget(self._d(session_id, gen, k, h.get(f"d{k}") or "-"), ["state", "transcript"])
            parts, *deltas = pipe.execute()
            parts = parts if n else []
            if all(p is not None for p in parts) and all(d[0] is not None for d in deltas):
                break
        else:
            parts, deltas = None, []  # unusable snapshot: the transcript is replayed
        snapshot = b"".join(parts) if parts else None
        try:
            messages = json.loads(h["messages"])
            for _, t in deltas:
                messages = apply_transcript(messages, json.loads(t))
        except ValueError as e:
            raise CorruptRecord(session_id, f"its transcript is not valid JSON ({e})") from None
        try:
            config, meta = json.loads(h["config"]), json.loads(h["meta"])
        except ValueError as e:
            raise CorruptRecord(session_id, f"its config or meta is not valid JSON ({e})") from None
        return SessionRecord(session_id, h["kind"].decode(), h["model"].decode(), config, messages, snapshot,
                             int(h["turns"]), meta, float(h["updated"]), int(h["version"]),
                             base=(h.get("base") or b"").decode() if parts else "", deltas=[d for d, _ in deltas])

    def put(self, record):
        import redis

        sid = record.session_id
        old_gen, old_n, old_d = self.r.hmget(self._h(sid), ["gen", "chunks", "deltas"])
        old_gen, old_n, old_d = int(old_gen or 0), int(old_n or 0), int(old_d or 0)
        nonces = self.r.hmget(self._h(sid), [f"d{k}" for k in range(old_d)]) if old_d else []
        gen = old_gen + 1
        blob = record.snapshot or b""
        chunks = [blob[i:i + self.chunk_bytes] for i in range(0, len(blob), self.chunk_bytes)]
        pipe = self.r.pipeline(transaction=False)
        for i, chunk in enumerate(chunks):
            pipe.set(self._c(sid, gen, i), chunk)
        pipe.execute()
        fields = {"kind": record.kind, "model": record.model, "config": json.dumps(record.config),
                  "messages": json.dumps(record.messages, ensure_ascii=False), "turns": record.turns,
                  "meta": json.dumps(record.meta), "updated": record.updated, "gen": gen, "chunks": len(chunks),
                  "bytes": len(blob), "base": record.base, "deltas": 0}
        fields["bytes"] += len(fields["messages"])
        with self.r.pipeline() as pipe:
            try:
                pipe.watch(self._lease(sid))
                holder = pipe.get(self._lease(sid))
                if holder is None or holder.decode() != self.token:
                    raise LeaseLost(f"session {sid!r}: this replica's lease expired before its turn was stored")
                pipe.multi()
                pipe.hset(self._h(sid), mapping=fields)
                pipe.hincrby(self._h(sid), "version", 1)
                pipe.zadd(self._index, {sid: record.updated})
                pipe.execute()
            except redis.WatchError:
                raise LeaseLost(f"session {sid!r}: its lease changed hands while its turn was stored") from None
            except BaseException:
                if chunks:  # the new generation never became visible
                    self.r.delete(*[self._c(sid, gen, i) for i in range(len(chunks))])
                raise
        old = [self._c(sid, old_gen, i) for i in range(old_n)] + [self._d(sid, old_gen, k, n) for k, n in enumerate(nonces) if n]
        if old:
            self.r.delete(*old)

    def put_delta(self, record, state, transcript, seq):
        sid = record.session_id
        gen = self.r.hget(self._h(sid), "gen")
        if gen is None:
            raise StaleChain(sid)
        nonce = uuid.uuid4().hex[:12]
        key = self._d(sid, int(gen), seq, nonce)
        self.r.hset(key, mapping={"state": state, "transcript": json.dumps(transcript, ensure_ascii=False)})
        try:
            self._switch_delta(record, state, gen, seq, nonce)
        except BaseException:
            self.r.delete(key)  # never referenced: it is this writer's own
            raise

    def _switch_delta(self, record, state, gen, seq, nonce):
        import redis

        sid = record.session_id
        with self.r.pipeline() as pipe:
            try:
                pipe.watch(self._lease(sid), self._h(sid))
                holder = pipe.get(self._lease(sid))
                if holder is None or holder.decode() != self.token:
                    raise LeaseLost(f"session {sid!r}: this replica's lease expired before its turn was stored")
                g, base, n, size = pipe.hmget(self._h(sid), ["gen", "base", "deltas", "bytes"])
                if g != gen or (base or b"").decode() != record.base or not record.base or int(n or 0) != seq:
                    raise StaleChain(sid)
                pipe.multi()
                pipe.hset(self._h(sid), mapping={"turns": record.turns, "meta": json.dumps(record.meta),
                                                 "updated": record.updated, "deltas": seq + 1, f"d{seq}": nonce,
                                                 "bytes": int(size or 0) + len(state)})
                pipe.hincrby(self._h(sid), "version", 1)
                pipe.zadd(self._index, {sid: record.updated})
                pipe.execute()
            except redis.WatchError:
                raise LeaseLost(f"session {sid!r}: its lease or record changed while its turn was stored") from None

    def delete(self, session_id):
        keys = [self._h(session_id)] + [k for what in "cd" for k in
                                        self.r.scan_iter(match=f"{self.p}{what}:{session_id}:*", count=1000)]
        pipe = self.r.pipeline()
        pipe.delete(*keys)
        pipe.zrem(self._index, session_id)
        removed, _ = pipe.execute()
        return removed > 0

    def list(self, limit=1000):
        ids = [sid.decode() for sid in self.r.zrevrange(self._index, 0, limit - 1)]
        pipe = self.r.pipeline(transaction=False)
        for sid in ids:
            pipe.hmget(self._h(sid), ["kind", "model", "turns", "updated", "bytes"])
        out = []
        for sid, (kind, model, turns, updated, size) in zip(ids, pipe.execute()):
            if kind is not None:
                out.append(_summary(sid, kind.decode(), model.decode(), int(turns), float(updated), int(size or 0)))
        return out

    def prune(self, ttl_s, max_sessions, keep=frozenset()):
        rows = [(sid.decode(), score) for sid, score in self.r.zrevrange(self._index, 0, -1, withscores=True)]
        pipe = self.r.pipeline(transaction=False)
        for sid, _ in rows:
            pipe.exists(self._lease(sid))
        leased = {sid for (sid, _), held in zip(rows, pipe.execute()) if held}  # a turn runs somewhere
        gone = _victims(rows, ttl_s, max_sessions, set(keep) | leased, time.time())
        for sid in gone:
            self.delete(sid)
        return gone

    def stats(self):
        ids = [sid.decode() for sid in self.r.zrange(self._index, 0, -1)]
        pipe = self.r.pipeline(transaction=False)
        for sid in ids:
            pipe.hget(self._h(sid), "bytes")
        return {"stored_sessions": len(ids), "store_bytes": sum(int(b or 0) for b in pipe.execute())}

    def close(self):
        self.r.close()

    # ---- leases and versions (used by replicas.SharedSessionManager) ----------------------------
    def acquire_lease(self, session_id: str, ttl_ms: int) -> bool:
        return bool(self.r.set(self._lease(session_id), self.token, nx=True, px=ttl_ms))

    def renew_lease(self, session_id: str, ttl_ms: int) -> bool:
        return bool(self._renew(keys=[self._lease(session_id)], args=[self.token, ttl_ms]))

    def release_lease(self, session_id: str) -> None:
        self._release(keys=[self._lease(session_id)], args=[self.token])

    def version(self, session_id: str) -> int | None:
        """Incremented by every put; None once the session is gone."""
        v = self.r.hget(self._h(session_id), "version")
        return None if v is None else int(v)
