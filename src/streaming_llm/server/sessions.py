"""In-memory session manager: per-session locks, an LRU cap, the model thread and persistence.

Scheduling. Continuous batching (`scheduler.py`): while a turn runs, its session's stream sits
in a row of one `StreamBatch`, and one model thread runs, each round, a single batched decode
forward for every reply waiting for its next token, then at most one prefill chunk of a new
prompt. A reply is a generator stepped on a pool of turn threads (sampling and text decoding
run there; its forwards go to the model thread). At most `max_batch` turns run at once; more
wait for a row. Methods without a batched path (dense, recompute, recall) and `max_batch` 1 use the
one-thread worker instead: replies interleave token by token, one forward each. Session loads,
replays and state capture run on a second model-call thread (`ModelWorker`); store I/O
(serializing snapshots, SQLite) on a third, so neither stalls decoding.

Sessions. Requests on the same session are serialised by an asyncio lock held from `open_turn`
to `Turn.close`. At most `max_sessions` idle sessions stay in memory; the least recently used are
dropped, which costs nothing because every completed turn is already in the store, and are
reloaded (snapshot, or replay of the transcript if the snapshot is unusable) on demand.
After each completed turn the store is pruned in the background (`session_ttl`,
`max_stored`: least recently updated first, never a session with a request in progress).
A turn that does not complete (client gone, error) is rolled back by dropping the in-memory
session: the next request reloads the last completed turn from the store. A completed turn is
stored as a delta on the session's stored chain or as a full snapshot (`snapshots.store_turn`
decides, `DeltaPolicy` bounds the chain); a reload applies the chain (`snapshots.apply_delta`).

Stop sequences (`stops.py`). The turn's tokens pass through `cut_at_stops`; when a stop sequence
fires, the stream must hold only what the client received. The stream is put back where the turn
started and the turn's prompt plus the visible reply (plus end-of-turn, chat) are fed again
(`Turn._cut`): batched, the row is refilled from the engine's own cache without copying the row
back (the engine's cache is left untouched while attached, so it is the turn-start state) and the
re-feed is a prefill request to the scheduler like any other; unbatched, the stream is restored
from a copy taken at the turn's start (only for requests that have `stop`).
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import AsyncIterator, Callable

import torch

from ..core.config import StreamingConfig
from ..core.engine import StreamingLLM, Token
from ..errors import UserError
from ..models import threads
from ..core.sampling import SamplingParams
from .conversations import TextConversation, unpack_state
from .scheduler import DEFAULT_RIDE_CHUNKS, Scheduler
from .snapshots import Chain, DeltaPolicy, apply_delta, chain_of, layer_shapes, store_turn
from .stops import cut_at_stops
from .store import SessionRecord, SessionStore

log = logging.getLogger("streaming_llm.server")


class SessionConflict(Exception):
    """The named session exists with another kind (chat vs text)."""


class ModelWorker:
    """A single thread that runs every model call, in submission order."""

    def __init__(self, name: str = "model", single_threaded: bool = False):
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix=name,
                                        initializer=threads.single_threaded if single_threaded else None)
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
    chain: Chain | None = None  # the stored delta chain the next turn extends (snapshots.py)


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
        *,
        max_batch: int,
        deltas: DeltaPolicy | None = None,
        ride_chunks: bool = DEFAULT_RIDE_CHUNKS,
    ):
        self.model, self.tokenizer, self.config = model, tokenizer, config
        self.model_name = model_name
        self.store = store
        self.max_sessions = max_sessions
        self.snapshot_dtype = snapshot_dtype
        self.deltas = deltas or DeltaPolicy()  # per-turn snapshot deltas and their compaction
        self.chat_factory = chat_factory  # () -> ChatConversation
        self.model_dtype = getattr(model, "dtype", None) or next(model.parameters()).dtype  # the KV cache's dtype
        self.device = next(model.parameters()).device
        # recall sessions (one memory per stream) run unbatched, like dense and recompute
        batched = config.method in ("streaming", "window") and not config.recall_blocks and max_batch > 1
        # only the thread that runs the forwards keeps torch's thread count (models/threads.py: one
        # OpenMP team per process); batched, that is the scheduler's, else the model worker's
        self.worker = ModelWorker("model", single_threaded=batched)
        self.io = ModelWorker("store-io", single_threaded=True)
        self.scheduler = (Scheduler(StreamingLLM(model, tokenizer, config), max_batch, ride_chunks=ride_chunks)
                          if batched else None)
        # one producer per running reply, plus starts and clean-ups of others
        self.turn_pool = ThreadPoolExecutor(max_workers=2 * max_batch + 2, thread_name_prefix="turn",
                                            initializer=threads.single_threaded) if batched else None
        self.max_batch = max_batch
        self._rows = asyncio.Semaphore(max_batch) if batched else None
        self.live: OrderedDict[str, Live] = OrderedDict()
        self._locks: dict[str, tuple[asyncio.Lock, int]] = {}
        self.session_ttl, self.max_stored = session_ttl, max_stored
        self._background: set[asyncio.Task] = set()  # referenced until done (asyncio keeps weak refs)
        self.counters = {"turns": 0, "aborted": 0, "evicted": 0, "reloaded": 0, "rebuilt": 0, "expired": 0,
                         "snapshots_full": 0, "snapshots_delta": 0, "snapshot_bytes_written": 0}

    # ---- running turns ------------------------------------------------------------------------
    async def step(self, fn: Callable, *args):
        """Run a turn's step (its generator's next token, its start, its settling): on a turn
        thread when batching (its forwards go to the scheduler), else on the model worker."""
        if self.scheduler is None:
            return await self.worker.call(fn, *args)
        return await asyncio.get_running_loop().run_in_executor(self.turn_pool, fn, *args)

    def step_later(self, fn: Callable, *args) -> None:
        """Queue a turn step without waiting (cleanup when the caller cannot await)."""
        (self.turn_pool or self.worker).submit(fn, *args)

    def batch_info(self) -> dict:
        """Continuous batching at a glance (for /health): rows in use, queue, forwards so far."""
        if self.scheduler is None:
            return {"enabled": False, "max_batch": 1}
        s = self.scheduler
        return {"enabled": True, "max_batch": self.max_batch, "ride_chunks": s.ride_chunks, "active_rows": s.active_rows,
                "queued_requests": s.queue_length,
                **{k: round(v, 3) if isinstance(v, float) else v for k, v in s.stats.items()}}

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
        source, chain = "replay", None
        if record.snapshot is not None and record.model == self.model_name and self.config.matches(record.config):
            try:
                state = unpack_state(record.snapshot, self.model_dtype, self.device)
                for delta in record.deltas:  # the chain of turns stored since the full snapshot
                    state = apply_delta(state, unpack_state(delta, self.model_dtype, self.device))
                conv.restore(state, record.messages)
                chain = chain_of(record, state)
                source = "snapshot"
            except Exception as e:  # a corrupt or incompatible snapshot: the transcript still has it all
                log.warning("session %s: snapshot unusable (%s); replaying its transcript", record.session_id, e)
        if source == "replay":
            conv.replay(record.messages)
        return Live(record.session_id, conv, record.turns, source, dict(record.meta), chain)

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
    async def open_turn(self, sid: str | None, kind: str, payload, max_new_tokens: int, sampling: SamplingParams,
                        stop: tuple[str, ...] = (), logprobs: int | None = None) -> "Turn":
        """Lock the session, bring it into memory, prefill and sample the first token. The caller
        must `await turn.close()` whatever happens. `stop`: stop sequences; `logprobs`: report
        that many top alternatives per token (None: no logprobs)."""
        if self._rows is not None:
            await self._rows.acquire()  # a batch row for this turn; released by Turn.close
        try:
            return await self._open_turn(sid, kind, payload, max_new_tokens, sampling, tuple(stop), logprobs)
        except BaseException:
            if self._rows is not None:
                self._rows.release()
            raise

    async def _open_turn(self, sid, kind, payload, max_new_tokens, sampling, stop, logprobs) -> "Turn":
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
            await self.step(turn.start, payload, max_new_tokens, sampling, stop, logprobs)
        except BaseException:
            await turn.close(release_row=False)
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

    async def persist(self, live: Live, whole: bool = False) -> tuple[int, str]:
        """Store the session's completed turn durably: a delta on its stored chain, or a full
        snapshot (`whole`, or as `snapshots.store_turn` decides). Returns (bytes, "delta" | "full")."""
        # views of the stream, not copies: the session stays locked until the store has them
        state, transcript, shapes = await self.worker.call(
            lambda: (live.conv.state(copy=False), live.conv.transcript(), layer_shapes(live.conv)))
        meta = dict(live.meta, tokens_seen=live.conv.tokens_seen)
        record = SessionRecord(live.sid, live.conv.kind, self.model_name, self.config.to_dict(), transcript, None,
                               live.turns, meta)
        chain, size, kind = await self.io.call(store_turn, self.store, record, state, live.chain, shapes, self.deltas,
                                               self.snapshot_dtype, whole)
        live.chain = chain  # only once stored: a failed write rolls the turn back (the session is dropped)
        self.counters["snapshots_" + kind] += 1
        self.counters["snapshot_bytes_written"] += size
        return size, kind

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
        if self.turn_pool is not None:
            self.turn_pool.shutdown(wait=True, cancel_futures=True)
        if self.scheduler is not None:
            self.scheduler.stop()
        self.worker.shutdown()
        self.io.shutdown()
        self.store.close()


def _clone(x):
    """A copy of a state dict whose tensors share nothing with the live stream."""
    if isinstance(x, torch.Tensor):
        return x.clone()
    if isinstance(x, dict):
        return {k: _clone(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return type(x)(_clone(v) for v in x)
    return x


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
        self.snapshot_kind = None  # "delta" | "full" once stored
        self.persist_ms = 0.0
        self.loaded_from = live.source  # new | memory | snapshot | replay
        self._stepping = threading.Lock()  # one step of this turn at a time, on whichever thread
        self.starts: list[int] = []  # where each token's text began in the reply (stops.py)
        self.cut = False  # a stop sequence ended the reply
        self._start_state: dict | None = None  # unbatched turns with stop sequences: the turn-start stream

    def start(self, payload, max_new_tokens: int, sampling: SamplingParams, stop: tuple[str, ...] = (),
              logprobs: int | None = None) -> None:
        """(model thread) Reuse or rebuild the conversation, prefill and sample the first token, so
        that a failure here is still an HTTP error rather than an event in a started stream."""
        before = self.live.conv.tokens_seen
        kind = self.live.conv.kind
        fresh = lambda: self.m.new_conversation(kind)  # noqa: E731
        conv, self.rebuilt, gen = self.live.conv.reply(payload, max_new_tokens, sampling, fresh, logprobs=logprobs)
        self.live.conv = conv
        self.reused_tokens = 0 if self.rebuilt else before
        if self.m.scheduler is not None:  # the stream moves into a batch row for this turn
            self.m.scheduler.attach(conv.engine)
        elif stop:  # nothing of this turn is in the stream yet (the generator has not run)
            self._start_state = _clone(conv.engine.state_dict())
        self.gen = cut_at_stops(gen, stop, self._cut, self.starts)
        self._next = self.next_token()

    def _cut(self, visible: str) -> None:
        """(turn thread, inside a step) A stop sequence fired and the reply has settled: put the
        stream back where the turn started, then feed the turn's prompt and `visible` again."""
        engine = self.live.conv.engine
        if self.m.scheduler is not None:
            self.m.scheduler.rewind(engine)  # the row is refilled from the engine's own cache: the turn start
        else:
            engine.load_state_dict(self._start_state)
            self._start_state = None
        self.live.conv.cut_last_reply(visible)
        self.cut = True

    def next_token(self) -> Token | None:
        """(turn thread) The reply's next token, None when it is done."""
        with self._stepping:
            return next(self.gen, None)

    def settle(self, aborted: bool) -> None:
        """(turn thread) Close the reply (an aborted one feeds its end of turn) and move the stream
        out of its batch row."""
        with self._stepping:
            if aborted and self.gen is not None:
                self.gen.close()
            if self.m.scheduler is not None:
                self.m.scheduler.detach(self.live.conv.engine)
            self._start_state = None

    async def tokens(self) -> AsyncIterator[Token]:
        """The reply's tokens (call once). Unbatched: one model-thread job per token. Batched: a
        turn thread runs the reply ahead of the client, so its next forward request reaches the
        scheduler at once instead of after an HTTP round trip; leaving early stops it."""
        first, self._next = self._next, None
        source = self._unbatched(first) if self.m.scheduler is None else self._produced(first)
        async for tok in source:
            self.completion_tokens += 1
            if tok.finish_reason:
                self.finish_reason = tok.finish_reason
            yield tok
        self.prompt_tokens = self.live.conv.last_prompt_tokens

    async def _unbatched(self, tok):
        while tok is not None:
            yield tok
            tok = await self.m.step(self.next_token)

    async def _produced(self, tok):
        loop, queue, done = asyncio.get_running_loop(), asyncio.Queue(), object()
        stop = threading.Event()

        def produce(tok):
            try:
                while tok is not None and not stop.is_set():
                    loop.call_soon_threadsafe(queue.put_nowait, tok)
                    tok = self.next_token()
                if tok is None:  # the reply ended: the stream leaves its batch row now
                    self.settle(False)
            except BaseException as e:  # noqa: BLE001 - re-raised on the event loop
                loop.call_soon_threadsafe(queue.put_nowait, e)
            finally:
                loop.call_soon_threadsafe(queue.put_nowait, done)

        job = loop.run_in_executor(self.m.turn_pool, produce, tok)
        try:
            while (item := await queue.get()) is not done:
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            stop.set()  # the client left (or an error): the producer stops before its next token
        await job

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
            "snapshot_kind": self.snapshot_kind,
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
            self.snapshot_bytes, self.snapshot_kind = await self.m.persist(self.live, whole=self.rebuilt)
            self.persist_ms = round(1000 * (time.perf_counter() - t0), 1)
        self.committed = True
        self.live.source = "memory"
        return self.info()

    async def close(self, release_row: bool = True) -> None:
        """Release the session; a turn that did not commit is rolled back (see module doc)."""
        if self.closed:
            return
        self.closed = True
        rows = self.m._rows if release_row else None
        if not self.committed:
            self.m.counters["aborted"] += 1
            loop = asyncio.get_running_loop()

            def settle_then_release():
                try:
                    self.settle(True)
                finally:
                    if rows is not None:  # the row is free only once the stream left it
                        loop.call_soon_threadsafe(rows.release)

            self.m.step_later(settle_then_release)  # after any step still running
            if not self.stateless:
                self.m.drop(self.live.sid)
        elif rows is not None:
            rows.release()
        if not self.stateless:
            self.m._release(self.live.sid)
            self.m.evict_idle()
            if self.committed:
                task = asyncio.ensure_future(self.m.prune())
                self.m._background.add(task)
                task.add_done_callback(self.m._background.discard)
