"""Durable session storage: a small interface and its embedded SQLite implementation.

A `SessionRecord` is everything needed to continue a session on any server: its transcript, a
snapshot of the streaming state (bytes; bounded, because the state is at most sinks+window cache
entries) and a little metadata. The store knows nothing about models or HTTP: it maps a session id
to the record of the session's last completed turn. `put` is atomic and durable when it returns
(one SQLite transaction in WAL mode with synchronous=FULL), so a crash loses at most the turn in
flight. Another backend (Redis, PostgreSQL) only has to implement `SessionStore` to let several
server replicas share sessions.

Calls block; the server runs them on its I/O thread, never on the event loop.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol, runtime_checkable

SCHEMA_VERSION = 1


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


@runtime_checkable
class SessionStore(Protocol):
    """Maps a session id to the record of its last completed turn."""

    def get(self, session_id: str) -> SessionRecord | None: ...

    def put(self, record: SessionRecord) -> None:
        """Store atomically and durably (replaces the previous record)."""

    def delete(self, session_id: str) -> bool: ...

    def list(self, limit: int = 1000) -> list[dict]:
        """Summaries (no snapshots) of the most recently updated sessions."""

    def close(self) -> None: ...


class MemoryStore:
    """A non-durable store for tests and for `--data-dir none` (sessions die with the process)."""

    def __init__(self):
        self._records: dict[str, SessionRecord] = {}
        self._lock = threading.Lock()

    def get(self, session_id):
        with self._lock:
            return self._records.get(session_id)

    def put(self, record):
        with self._lock:
            self._records[record.session_id] = record

    def delete(self, session_id):
        with self._lock:
            return self._records.pop(session_id, None) is not None

    def list(self, limit=1000):
        with self._lock:
            recs = sorted(self._records.values(), key=lambda r: r.updated, reverse=True)[:limit]
        return [_summary(r.session_id, r.kind, r.model, r.turns, r.updated, len(r.snapshot or b"")) for r in recs]

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
        self._db = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None, timeout=30)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
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
        self._db.execute("CREATE TABLE IF NOT EXISTS info (key TEXT PRIMARY KEY, value TEXT)")
        self._db.execute("INSERT OR IGNORE INTO info VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),))

    def get(self, session_id):
        with self._lock:
            row = self._db.execute(
                "SELECT id, kind, model, config, messages, snapshot, turns, meta, updated FROM sessions WHERE id = ?",
                (session_id,),
            ).fetchone()
        if row is None:
            return None
        sid, kind, model, config, messages, snapshot, turns, meta, updated = row
        return SessionRecord(
            sid, kind, model, json.loads(config), json.loads(messages),
            None if snapshot is None else bytes(snapshot), turns, json.loads(meta), updated,
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
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise

    def delete(self, session_id):
        with self._lock:
            cur = self._db.execute("DELETE FROM sessions WHERE id = ?", (session_id,))
        return cur.rowcount > 0

    def list(self, limit=1000):
        with self._lock:
            rows = self._db.execute(
                "SELECT id, kind, model, turns, updated, length(snapshot) FROM sessions ORDER BY updated DESC LIMIT ?",
                (limit,),
            ).fetchall()
        return [_summary(*row[:5], row[5] or 0) for row in rows]

    def close(self):
        with self._lock:
            self._db.close()


def open_store(data_dir: str | None) -> SessionStore:
    """`SQLiteStore` in `data_dir/sessions.sqlite3`, or a `MemoryStore` for None / "none"."""
    if data_dir is None or str(data_dir).lower() in ("", "none", ":memory:"):
        return MemoryStore()
    return SQLiteStore(Path(data_dir) / "sessions.sqlite3")
