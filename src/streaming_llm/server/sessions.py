"""In-memory session manager: per-session locks, an LRU cap, the model thread and persistence.

Scheduling. The model runs on ONE worker thread (`ModelWorker`) fed by a FIFO queue. A reply is
a generator stepped one token per queued job, so concurrent replies on different sessions
interleave token by token (round robin in arrival order) instead of one reply holding the model
until it ends; a prompt's prefill is one job. One thread because the engine is not thread-safe,
its cache hand-off is thread-local, and on CPU parallel forwards only fight over the same cores.
Store I/O (serializing snapshots, SQLite) runs on a second thread so it never stalls decoding.

Sessions. Requests on the same session are serialised by an asyncio lock held from `open_turn`
to `Turn.close`. At most `max_sessions` idle sessions stay in memory; the least recently used are
dropped, which costs nothing because every completed turn is already in the store, and are
reloaded (snapshot, or replay of the transcript if the snapshot is unusable) on demand.
After each completed turn the store is pruned in the background (`session_ttl`,
`max_stored`: least recently updated first, never a session with a request in progress).
A turn that does not complete (client gone, error) is rolled back by dropping the in-memory
session: the next request reloads the last completed turn from the store.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import AsyncIterator, Callable

import torch

from ..core.config import StreamingConfig
from ..core.engine import Token
from ..errors import UserError
from ..core.sampling import SamplingParams
from .conversations import TextConversation, pack_state, unpack_state
from .store import SessionRecord, SessionStore

log = logging.getLogger("streaming_llm.server")


class SessionConflict(Exception):
    """The named session exists with another kind (chat vs text)."""


class ModelWorker:
    """A single thread that runs every model call, in submission order."""

    def __init__(self, name: str = "model"):
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix=name)
        self.pending = 0

    async def call(self, fn: Callable, *args):
        self.pending += 1
        try:
            return await asyncio.wrap_future(self._pool.submit(fn, *args))
        finally:
            self.pending -= 1

    def submit(self, fn: Callable, *args):
        """Queue without waiting (used for cleanup when the caller cannot await)."""
        return self._pool.submit(fn, *args)

    def shutdown(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)


@dataclass
class Live:
    """A session held in memory."""

    sid: str
    conv: object  # TextConversation | ChatConversation
    turns: int = 0
    source: str = "new"  # how it got into memory: new | snapshot | replay
    meta: dict = field(default_factory=dict)


class SessionManager:
    def __init__(
        self,
        model,
        tokenizer,
        config: StreamingConfig,
        model_name: str,
        store: SessionStore,
        max_sessions: int = 64,
        snapshot_dtype: torch.dtype | None = None,
        chat_factory: Callable | None = None,
        session_ttl: float | None = None,
        max_stored: int | None = None,
    ):
        self.model, self.tokenizer, self.config = model, tokenizer, config
        self.model_name = model_name
        self.store = store
        self.max_sessions = max_sessions
        self.snapshot_dtype = snapshot_dtype
        self.chat_factory = chat_factory  # () -> ChatConversation
        self.model_dtype = getattr(model, "dtype", None) or next(model.parameters()).dtype  # the KV cache's dtype
        self.device = next(model.parameters()).device
        self.worker = ModelWorker("model")
        self.io = ModelWorker("store-io")
        self.live: OrderedDict[str, Live] = OrderedDict()
        self._locks: dict[str, tuple[asyncio.Lock, int]] = {}
        self.session_ttl, self.max_stored = session_ttl, max_stored
        self._background: set[asyncio.Task] = set()  # referenced until done (asyncio keeps weak refs)
        self.counters = {"turns": 0, "aborted": 0, "evicted": 0, "reloaded": 0, "rebuilt": 0, "expired": 0}

    # ---- conversations -----------------------------------------------------------------------
    def new_conversation(self, kind: str):
        if kind == "text":
            return TextConversation(self.model, self.tokenizer, self.config)
        if self.chat_factory is None:
            raise UserError("this model's tokenizer has no chat template; use /v1/completions")
        return self.chat_factory()

    def _restore(self, record: SessionRecord) -> Live:
        """(model thread) A record back into a live conversation: snapshot, else replay."""
        conv = self.new_conversation(record.kind)
        source = "replay"
        if record.snapshot is not None and record.model == self.model_name and record.config == self.config.to_dict():
            try:
                conv.restore(unpack_state(record.snapshot, self.model_dtype, self.device), record.messages)
                source = "snapshot"
            except Exception as e:  # a corrupt or incompatible snapshot: the transcript still has it all
                log.warning("session %s: snapshot unusable (%s); replaying its transcript", record.session_id, e)
        if source == "replay":
            conv.replay(record.messages)
        return Live(record.session_id, conv, record.turns, source, dict(record.meta))

    # ---- locking -----------------------------------------------------------------------------
    async def _acquire(self, sid: str) -> None:
        lock, users = self._locks.get(sid, (None, 0))
        if lock is None:
            lock = asyncio.Lock()
        self._locks[sid] = (lock, users + 1)
        try:
            await lock.acquire()
        except BaseException:
            self._release_ref(sid)
            raise

    def _release(self, sid: str) -> None:
        self._locks[sid][0].release()
        self._release_ref(sid)

    def _release_ref(self, sid: str) -> None:
        lock, users = self._locks[sid]
        if users <= 1:
            del self._locks[sid]
        else:
            self._locks[sid] = (lock, users - 1)

    def busy(self, sid: str) -> bool:
        return sid in self._locks

    # ---- turns -------------------------------------------------------------------------------
    async def open_turn(self, sid: str | None, kind: str, payload, max_new_tokens: int, sampling: SamplingParams) -> "Turn":
        """Lock the session, bring it into memory, prefill and sample the first token. The caller
        must `await turn.close()` whatever happens."""
        if sid is None:
            turn = Turn(self, Live("", await self.worker.call(self.new_conversation, kind)), stateless=True)
        else:
            await self._acquire(sid)
            turn = None
            try:
                live = await self._get_live(sid, kind)
                turn = Turn(self, live, stateless=False)
            finally:
                if turn is None:
                    self._release(sid)
        try:
            await self.worker.call(turn.start, payload, max_new_tokens, sampling)
        except BaseException:
            await turn.close()
            raise
        return turn

    async def _get_live(self, sid: str, kind: str) -> Live:
        live = self.live.get(sid)
        if live is None:
            record = await self.io.call(self.store.get, sid)
            if record is None:
                live = Live(sid, await self.worker.call(self.new_conversation, kind))
            else:
                if record.kind != kind:
                    raise SessionConflict(f"session {sid!r} is a {record.kind} session; it cannot serve a {kind} request")
                live = await self.worker.call(self._restore, record)
                self.counters["reloaded"] += 1
            self.live[sid] = live
        elif live.conv.kind != kind:
            raise SessionConflict(f"session {sid!r} is a {live.conv.kind} session; it cannot serve a {kind} request")
        self.live.move_to_end(sid)
        return live

    def drop(self, sid: str) -> None:
        self.live.pop(sid, None)

    def evict_idle(self) -> None:
        """Drop least recently used idle sessions beyond the cap (their last turn is stored)."""
        for sid in list(self.live):
            if len(self.live) <= self.max_sessions:
                break
            if not self.busy(sid):
                del self.live[sid]
                self.counters["evicted"] += 1

    async def persist(self, live: Live) -> int:
        """Store the session's completed turn durably; returns the snapshot size in bytes."""
        state, transcript = await self.worker.call(lambda: (live.conv.state(), live.conv.transcript()))
        meta = dict(live.meta, tokens_seen=live.conv.tokens_seen)

        def write():
            blob = pack_state(state, self.snapshot_dtype)
            self.store.put(
                SessionRecord(live.sid, live.conv.kind, self.model_name, self.config.to_dict(), transcript, blob, live.turns, meta)
            )
            return len(blob)

        return await self.io.call(write)

    async def prune(self) -> list[str]:
        """Apply the TTL and the stored-session cap; pruned idle sessions leave memory too."""
        if not self.session_ttl and self.max_stored is None:
            return []
        try:
            gone = await self.io.call(self.store.prune, self.session_ttl, self.max_stored, frozenset(self._locks))
        except Exception as e:  # never fail a request over housekeeping
            log.warning("pruning the session store failed: %s", e)
            return []
        for sid in gone:
            if not self.busy(sid):
                self.live.pop(sid, None)
        self.counters["expired"] += len(gone)
        return gone

    async def delete(self, sid: str) -> bool:
        await self._acquire(sid)
        try:
            self.live.pop(sid, None)
            return await self.io.call(self.store.delete, sid)
        finally:
            self._release(sid)

    async def describe(self, sid: str) -> dict | None:
        """Stats and transcript of a session (from memory if live, else from the store)."""
        live = self.live.get(sid)
        if live is not None:
            transcript = live.conv.transcript()
            return {"id": sid, "kind": live.conv.kind, "in_memory": True, "turns": live.turns,
                    "tokens_seen": live.conv.tokens_seen, "messages": transcript}
        record = await self.io.call(self.store.get, sid)
        if record is None:
            return None
        return {"id": sid, "kind": record.kind, "in_memory": False, "turns": record.turns,
                "tokens_seen": record.meta.get("tokens_seen"), "messages": record.messages}

    def shutdown(self) -> None:
        self.worker.shutdown()
        self.io.shutdown()
        self.store.close()


class Turn:
    """One request's reply on one session. Iterate it for tokens, then `commit`, then `close`."""

    def __init__(self, manager: SessionManager, live: Live, stateless: bool):
        self.m, self.live, self.stateless = manager, live, stateless
        self.gen = None
        self._next: Token | None = None
        self.prompt_tokens = 0
        self.reused_tokens = 0
        self.completion_tokens = 0
        self.rebuilt = False
        self.finish_reason: str | None = None
        self.committed = False
        self.closed = False
        self.snapshot_bytes = 0
        self.persist_ms = 0.0
        self.loaded_from = live.source  # new | memory | snapshot | replay

    def start(self, payload, max_new_tokens: int, sampling: SamplingParams) -> None:
        """(model thread) Reuse or rebuild the conversation, prefill and sample the first token, so
        that a failure here is still an HTTP error rather than an event in a started stream."""
        before = self.live.conv.tokens_seen
        kind = self.live.conv.kind
        fresh = lambda: self.m.new_conversation(kind)  # noqa: E731
        conv, self.rebuilt, self.gen = self.live.conv.reply(payload, max_new_tokens, sampling, fresh)
        self.live.conv = conv
        self.reused_tokens = 0 if self.rebuilt else before
        self._next = next(self.gen, None)

    async def tokens(self) -> AsyncIterator[Token]:
        """The reply's tokens, one model-thread job per token after the first (call once)."""
        tok, self._next = self._next, None
        while tok is not None:
            self.completion_tokens += 1
            if tok.finish_reason:
                self.finish_reason = tok.finish_reason
            yield tok
            tok = await self.m.worker.call(next, self.gen, None)
        self.prompt_tokens = self.live.conv.last_prompt_tokens

    def info(self) -> dict:
        conv = self.live.conv
        return {
            "id": self.live.sid or None,
            "kind": conv.kind,
            "turns": self.live.turns,
            "prefilled_tokens": self.prompt_tokens,
            "reused_tokens": self.reused_tokens,
            "rebuilt": self.rebuilt,
            "loaded_from": self.loaded_from,
            "tokens_seen": conv.tokens_seen,
            "cache_tokens": conv.engine.cache_tokens,
            "capacity": conv.engine.capacity,
            "snapshot_bytes": self.snapshot_bytes,
            "persist_ms": self.persist_ms,  # state capture + serialization + durable SQLite write
        }

    async def commit(self) -> dict:
        """The reply is complete: count the turn and store it durably (named sessions)."""
        self.live.turns += 1
        if self.rebuilt:
            self.m.counters["rebuilt"] += 1
        self.m.counters["turns"] += 1
        if not self.stateless:
            t0 = time.perf_counter()
            self.snapshot_bytes = await self.m.persist(self.live)
            self.persist_ms = round(1000 * (time.perf_counter() - t0), 1)
        self.committed = True
        self.live.source = "memory"
        return self.info()

    async def close(self) -> None:
        """Release the session; a turn that did not commit is rolled back (see module doc)."""
        if self.closed:
            return
        self.closed = True
        if not self.committed:
            self.m.counters["aborted"] += 1
            if self.gen is not None:
                self.m.worker.submit(self.gen.close)  # after any step still running; no forward
            if not self.stateless:
                self.m.drop(self.live.sid)
        if not self.stateless:
            self.m._release(self.live.sid)
            self.m.evict_idle()
            if self.committed:
                task = asyncio.ensure_future(self.m.prune())
                self.m._background.add(task)
                task.add_done_callback(self.m._background.discard)
