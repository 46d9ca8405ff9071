"""Durable session storage: a small interface and its embedded SQLite implementation.

A `SessionRecord` is everything needed to continue a session on any server: its transcript, a
snapshot of the streaming state (bytes; bounded, because the state is at most sinks+window cache
entries) and a little metadata. The store knows nothing about models or HTTP: it maps a session id
to the record of the session's last completed turn. `put` is atomic and durable when it returns
(one SQLite transaction in WAL mode with synchronous=FULL), so a crash loses at most the turn in
flight. Another backend (Redis, PostgreSQL) only has to implement `SessionStore` to let several
server replicas share sessions (`redis_store.RedisStore` is one).

Bounded disk: after every write the SQLite WAL is checkpointed and truncated (`journal_size_limit`
caps what is left), and `prune` removes sessions older than a TTL and the least recently updated
ones beyond a count. `check_sqlite` validates a database file (writable, a database, passing
`PRAGMA quick_check`) in well under a second, before any model is loaded. A row that cannot be
decoded raises `CorruptRecord` naming the session and the field; other rows are unaffected.
This module does not decide when to prune (the session manager does) nor touch model state.

Deltas (`snapshots.py` decides and computes them). A stored session is a chain: the record with
its full snapshot and the transcript as of that snapshot, then zero or more deltas in order, each
one turn's state delta (bytes) and transcript delta (`transcript_delta`). `put` stores a full
snapshot and drops the chain; `put_delta(record, state, transcript, seq)` appends delta number
`seq` (0-based) only if the stored chain is still the one the writer extends (the same `base`
token, `seq` deltas so far), else raises `StaleChain`; both are one transaction (SQLite) or one
MULTI/EXEC (Redis), so a reader sees every completed turn or the one before, never half a turn.
`get` returns the record with the full transcript and the deltas to apply (`record.deltas`).
Deleting or pruning a session removes its deltas too. A database written before deltas has no
`chain`/`deltas` rows: its sessions load as full snapshots, and their next turn is stored whole.

Calls block; the server runs them on its I/O thread, never on the event loop.
"""

from __future__ import annotations

import json
import sqlite3
import tempfile
import threading
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Protocol, runtime_checkable

from ..errors import UserError

SCHEMA_VERSION = 2  # 2: the chain and deltas tables
DEFAULT_MAX_DELTAS = 64  # deltas a chain may hold before compaction (snapshots.DeltaPolicy; here: no torch import)
WAL_SIZE_LIMIT = 8 << 20  # bytes a truncated WAL may keep between checkpoints (journal_size_limit)
# SQLite's largest page: a snapshot blob is a chain of overflow pages, each a WAL frame of its own; a put
# of 5 / 20 / 47 MB took 29-40 / 137-166 / 363-370 ms with the default 4 KiB pages against 15-17 / 74-88
# / 213-214 ms (benchmarks/store_wal.py; docs/server.md "Bounded disk")
PAGE_SIZE = 65536


class StaleChain(Exception):
    """put_delta refused: the stored chain is not the one the delta extends (written elsewhere)."""


def transcript_delta(old: list, new: list) -> dict:
    """{"keep": k, "add": new[k:]}, k the length of the longest common prefix of old and new."""
    k = 0
    for a, b in zip(old, new):
        if a != b:
            break
        k += 1
    return {"keep": k, "add": list(new[k:])}


def apply_transcript(old: list, delta: dict) -> list:
    return list(old[: delta["keep"]]) + list(delta["add"])


class CorruptRecord(Exception):
    """A stored session exists but cannot be read (e.g. its transcript is not JSON)."""

    def __init__(self, session_id: str, what: str):
        super().__init__(f"session {session_id!r} is stored but unreadable: {what}; "
                         f"DELETE /v1/sessions/{session_id} removes it")
        self.session_id = session_id


@dataclass
class SessionRecord:
    session_id: str
    kind: str  # "chat" (messages) or "text" (a raw stream continued by /v1/completions)
    model: str
    config: dict  # StreamingConfig.to_dict() the snapshot was made with
    messages: list[dict]  # chat: [{"role", "content"}]; text: [{"prompt", "completion"}] per turn
    snapshot: bytes | None  # serialized streaming state (see sessions.pack_state); None: replay
    turns: int = 0
    meta: dict = field(default_factory=dict)  # counters and anything else JSON-serializable
    updated: float = field(default_factory=time.time)
    version: int = 0  # a shared store's write counter for the session (0: not tracked)
    base: str = ""  # token of the full snapshot a delta chain builds on ("" none: written before deltas)
    deltas: list[bytes] = field(default_factory=list)  # state deltas after `snapshot`, in order (get)


@runtime_checkable
class SessionStore(Protocol):
    """Maps a session id to the record of its last completed turn."""

    def get(self, session_id: str) -> SessionRecord | None: ...

    def put(self, record: SessionRecord) -> None:
        """Store atomically and durably (replaces the previous record)."""

    def put_delta(self, record: SessionRecord, state: bytes, transcript: dict, seq: int) -> None:
        """Append delta `seq` to the chain `record.base` (atomically and durably), with the record's
        turns, meta and updated; raise StaleChain if the stored chain is another one."""

    def delete(self, session_id: str) -> bool: ...

    def list(self, limit: int = 1000) -> list[dict]:
        """Summaries (no snapshots) of the most recently updated sessions."""

    def prune(self, ttl_s: float | None, max_sessions: int | None, keep=frozenset()) -> list[str]:
        """Delete sessions not updated for `ttl_s` seconds, then the least recently updated beyond
        `max_sessions` (never those in `keep`); returns the deleted ids."""

    def stats(self) -> dict:
        """{"stored_sessions": n, "store_bytes": bytes used}."""

    def close(self) -> None: ...


def _victims(rows, ttl_s, max_sessions, keep, now) -> list[str]:
    """rows: (id, updated) most recent first -> ids to prune (see SessionStore.prune)."""
    out = [sid for sid, updated in rows if ttl_s and updated < now - ttl_s and sid not in keep]
    if max_sessions is not None:
        left = [sid for sid, _ in rows if sid not in out]
        # beyond the N most recent, oldest first; a kept (busy) one stays, over the cap until it ends
        out += [sid for sid in reversed(left[max_sessions:]) if sid not in keep]
    return out


class MemoryStore:
    """A non-durable store for tests and for `--data-dir none` (sessions die with the process)."""

    def __init__(self):
        self._records: dict[str, SessionRecord] = {}
        self._chains: dict[str, list[tuple[bytes, dict]]] = {}  # deltas after the record's snapshot
        self._lock = threading.Lock()

    def get(self, session_id):
        with self._lock:
            r = self._records.get(session_id)
            chain = list(self._chains.get(session_id, ()))
        if r is None:
            return None
        messages = r.messages
        for _, t in chain:
            messages = apply_transcript(messages, t)
        return replace(r, messages=list(messages), deltas=[d for d, _ in chain])

    def put(self, record):
        with self._lock:
            self._records[record.session_id] = replace(record, deltas=[])
            self._chains.pop(record.session_id, None)

    def put_delta(self, record, state, transcript, seq):
        with self._lock:
            old, chain = self._records.get(record.session_id), self._chains.setdefault(record.session_id, [])
            if old is None or not old.base or old.base != record.base or len(chain) != seq:
                raise StaleChain(record.session_id)
            chain.append((bytes(state), transcript))
            self._records[record.session_id] = replace(old, turns=record.turns, meta=record.meta, updated=record.updated)

    def delete(self, session_id):
        with self._lock:
            self._chains.pop(session_id, None)
            return self._records.pop(session_id, None) is not None

    def list(self, limit=1000):
        with self._lock:
            recs = sorted(self._records.values(), key=lambda r: r.updated, reverse=True)[:limit]
            return [_summary(r.session_id, r.kind, r.model, r.turns, r.updated, len(r.snapshot or b"") + self._dbytes(r.session_id))
                    for r in recs]

    def _dbytes(self, sid):
        return sum(len(d) for d, _ in self._chains.get(sid, ()))

    def prune(self, ttl_s, max_sessions, keep=frozenset()):
        with self._lock:
            rows = sorted(((r.session_id, r.updated) for r in self._records.values()), key=lambda x: -x[1])
            gone = _victims(rows, ttl_s, max_sessions, keep, time.time())
            for sid in gone:
                del self._records[sid]
                self._chains.pop(sid, None)
        return gone

    def stats(self):
        with self._lock:
            return {"stored_sessions": len(self._records),
                    "store_bytes": sum(len(r.snapshot or b"") + len(str(r.messages)) + self._dbytes(r.session_id)
                                       for r in self._records.values())}

    def close(self):
        pass


def _summary(sid, kind, model, turns, updated, snapshot_bytes) -> dict:
    return {"id": sid, "kind": kind, "model": model, "turns": turns, "updated": updated, "snapshot_bytes": snapshot_bytes}


class SQLiteStore:
    """One table, one row per session; WAL journal, synchronous=FULL, one transaction per put.

    Thread-safe (one connection guarded by a lock). Several processes may open the same file:
    SQLite serialises the writers, and a row is always a complete turn."""

    def __init__(self, path: str | Path):
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._lock = threading.Lock()
        self._closed = False
        self._db = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None, timeout=30)
        # both take effect on a new file only (an existing one keeps its own), and the page size only before
        # auto_vacuum: pages of PAGE_SIZE, and deletions give their space back
        self._db.execute(f"PRAGMA page_size={PAGE_SIZE}")
        self._db.execute("PRAGMA auto_vacuum=INCREMENTAL")
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.execute(f"PRAGMA journal_size_limit={WAL_SIZE_LIMIT}")
        self._db.execute(
            """CREATE TABLE IF NOT EXISTS sessions (
                id TEXT PRIMARY KEY,
                kind TEXT NOT NULL,
                model TEXT NOT NULL,
                config TEXT NOT NULL,
                messages TEXT NOT NULL,
                snapshot BLOB,
                turns INTEGER NOT NULL,
                meta TEXT NOT NULL,
                updated REAL NOT NULL
            )"""
        )
        # the delta chain (snapshots.py): the base token of a session's full snapshot, its deltas in order
        self._db.execute("CREATE TABLE IF NOT EXISTS chain (id TEXT PRIMARY KEY, base TEXT NOT NULL)")
        self._db.execute("CREATE TABLE IF NOT EXISTS deltas (id TEXT NOT NULL, seq INTEGER NOT NULL, state BLOB NOT NULL,"
                         " transcript TEXT NOT NULL, PRIMARY KEY (id, seq))")
        self._db.execute("CREATE TABLE IF NOT EXISTS info (key TEXT PRIMARY KEY, value TEXT)")
        self._db.execute("INSERT OR REPLACE INTO info VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),))

    def get(self, session_id):
        with self._lock:
            row = self._db.execute(
                "SELECT id, kind, model, config, messages, snapshot, turns, meta, updated FROM sessions WHERE id = ?",
                (session_id,),
            ).fetchone()
            if row is None:
                return None
            base = self._db.execute("SELECT base FROM chain WHERE id = ?", (session_id,)).fetchone()
            deltas = self._db.execute("SELECT state, transcript FROM deltas WHERE id = ? ORDER BY seq",
                                      (session_id,)).fetchall() if base else []
        sid, kind, model, config, messages, snapshot, turns, meta, updated = row
        messages = _json(sid, "transcript", messages)
        for _, t in deltas:
            messages = apply_transcript(messages, _json(sid, "transcript delta", t))
        return SessionRecord(
            sid, kind, model, _json(sid, "config", config), messages,
            None if snapshot is None else bytes(snapshot), turns, _json(sid, "meta", meta), updated,
            base=base[0] if base else "", deltas=[bytes(d) for d, _ in deltas],
        )

    def put(self, record):
        values = (
            record.session_id, record.kind, record.model, json.dumps(record.config),
            json.dumps(record.messages, ensure_ascii=False), record.snapshot, record.turns,
            json.dumps(record.meta), record.updated,
        )
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                self._db.execute("INSERT OR REPLACE INTO sessions VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)", values)
                self._drop_chain(record.session_id)
                if record.base:
                    self._db.execute("INSERT INTO chain VALUES (?, ?)", (record.session_id, record.base))
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._checkpoint()

    def _drop_chain(self, sid):
        self._db.execute("DELETE FROM deltas WHERE id = ?", (sid,))
        self._db.execute("DELETE FROM chain WHERE id = ?", (sid,))

    def put_delta(self, record, state, transcript, seq):
        sid = record.session_id
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                base = self._db.execute("SELECT base FROM chain WHERE id = ?", (sid,)).fetchone()
                n = self._db.execute("SELECT count(*) FROM deltas WHERE id = ?", (sid,)).fetchone()[0]
                if base is None or base[0] != record.base or n != seq:
                    raise StaleChain(sid)
                self._db.execute("INSERT INTO deltas VALUES (?, ?, ?, ?)",
                                 (sid, seq, state, json.dumps(transcript, ensure_ascii=False)))
                self._db.execute("UPDATE sessions SET turns = ?, meta = ?, updated = ? WHERE id = ?",
                                 (record.turns, json.dumps(record.meta), record.updated, sid))
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._checkpoint()

    def _checkpoint(self):
        """Copy the WAL into the database and truncate it (a busy reader elsewhere: next time)."""
        self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")

    def delete(self, session_id):
        with self._lock:
            cur = self._db.execute("DELETE FROM sessions WHERE id = ?", (session_id,))
            self._drop_chain(session_id)
            self._db.execute("PRAGMA incremental_vacuum")
            self._checkpoint()
        return cur.rowcount > 0

    def prune(self, ttl_s, max_sessions, keep=frozenset()):
        with self._lock:
            rows = self._db.execute("SELECT id, updated FROM sessions ORDER BY updated DESC").fetchall()
            gone = _victims(rows, ttl_s, max_sessions, keep, time.time())
            if gone:
                self._db.executemany("DELETE FROM sessions WHERE id = ?", [(sid,) for sid in gone])
                for sid in gone:
                    self._drop_chain(sid)
                self._db.execute("PRAGMA incremental_vacuum")
                self._checkpoint()
        return gone

    def stats(self):
        with self._lock:
            n = self._db.execute("SELECT count(*) FROM sessions").fetchone()[0]
        size = sum(p.stat().st_size for p in (self.path, Path(f"{self.path}-wal")) if p.exists())
        return {"stored_sessions": n, "store_bytes": size}

    def list(self, limit=1000):
        with self._lock:
            rows = self._db.execute(
                "SELECT id, kind, model, turns, updated, length(snapshot) + coalesce((SELECT sum(length(state)) FROM"
                " deltas WHERE deltas.id = sessions.id), 0) FROM sessions ORDER BY updated DESC LIMIT ?",
                (limit,),
            ).fetchall()
        return [_summary(*row[:5], row[5] or 0) for row in rows]

    def close(self):
        with self._lock:
            if self._closed:
                return
            self._closed = True
            try:
                self._checkpoint()
            finally:
                self._db.close()  # the last connection: SQLite removes the -wal and -shm files


def _json(sid: str, what: str, text):
    try:
        return json.loads(text)
    except (TypeError, ValueError) as e:
        raise CorruptRecord(sid, f"its {what} is not valid JSON ({e})") from None


def check_sqlite(path: str | Path) -> None:
    """Raise UserError (one line) unless `path` can hold a session store: its folder writable,
    the file (if any) an SQLite database passing `PRAGMA quick_check`."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create the data directory {path.parent}: {e.strerror}") from None
    try:  # a real write: permission bits say nothing for root or on a read-only mount
        with tempfile.NamedTemporaryFile(dir=path.parent, prefix=".write-test-"):
            pass
        if path.exists():
            with open(path, "r+b"):
                pass
    except OSError as e:
        raise UserError(f"the session store {path} is not writable: {e.strerror}") from None
    if not path.exists():
        return
    try:
        db = sqlite3.connect(f"file:{path}?mode=rw", uri=True, timeout=5)
        try:
            rows = db.execute("PRAGMA quick_check").fetchall()
        finally:
            db.close()
    except sqlite3.DatabaseError as e:
        raise UserError(f"the session store {path} is not a usable SQLite database ({e}); move it away or pick "
                        f"another --data-dir") from None
    if rows != [("ok",)]:
        raise UserError(f"the session store {path} fails its integrity check ({rows[0][0]}); restore a backup, "
                        f"or move it away to start empty") from None


def open_store(data_dir: str | None) -> SessionStore:
    """`SQLiteStore` in `data_dir/sessions.sqlite3`, or a `MemoryStore` for None / "none"."""
    if data_dir is None or str(data_dir).lower() in ("", "none", ":memory:"):
        return MemoryStore()
    return SQLiteStore(Path(data_dir) / "sessions.sqlite3")


def parse_store_url(url: str | None, data_dir: str | None) -> tuple[str, str | None]:
    """`--store` (or `--data-dir` when it is None) -> (kind, target): ("memory", None),
    ("sqlite", file path) or ("redis", url)."""
    if url is None:
        if data_dir is None or str(data_dir).lower() in ("", "none", ":memory:"):
            return "memory", None
        return "sqlite", str(Path(data_dir) / "sessions.sqlite3")
    if url in ("memory", "none"):
        return "memory", None
    if url.startswith("sqlite:"):
        target = url[len("sqlite:"):]
        if not target:
            raise UserError("--store sqlite:PATH needs a file path")
        return "sqlite", target
    if url.startswith(("redis://", "rediss://", "unix://")):
        return "redis", url
    raise UserError(f"--store must be sqlite:PATH, redis://HOST:PORT/DB or memory (got {url!r})")


def open_store_url(kind: str, target: str | None, **redis_kw) -> SessionStore:
    if kind == "memory":
        return MemoryStore()
    if kind == "sqlite":
        return SQLiteStore(target)
    from .redis_store import RedisStore

    return RedisStore(target, **redis_kw)
