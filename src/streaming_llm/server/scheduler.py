"""Continuous batching: one model thread steps every active session's stream in one forward.

While a session's turn runs, its engine is attached to a row of one `StreamBatch` (its stream
is copied in when the turn starts and back out when it ends, buffer to buffer and only the slots
it uses, so idle sessions hold no batch row). The turn's own code (sampling, stop rules, text
decoding) runs on the caller's thread as before; only its forwards come here, as requests
(`Row.feed`). The model thread loops:

1. Gather. After a forward, wait until every row that was decoding has asked for its next token,
   or `gather_ms` passed (a reply whose client reads slowly is then served in the next round).
2. Forward: ONE forward for every pending single-token request (decoding rows, in ascending
   order: contiguous rows are read in place), then ONE forward of prompt chunks: the next chunk
   (`prefill_chunk` tokens, at most the engine's chunk size) of the oldest multi-token request
   (a new prompt), beside the next chunks of later prompts while all fit in `prefill_chunk`
   tokens and every row stays exact (`_prefill`). A long prompt therefore delays each decode
   round by one chunk instead of stalling every other reply until it is done, and the decoding
   rows have their tokens before the chunk runs (their turn threads sample and stream while it
   does). With `ride_chunks` the oldest prompt's chunk rides
   in the decode forward instead, the rows' tokens laid end to end (`StreamBatch.feed_mixed`,
   `core/mixed.py`): vLLM's chunked prefill, one forward's fixed cost instead of two; only where
   that leaves every row's bits as alone (`StreamBatch.mixes_exactly`: on a quantized model,
   while the forward stays below the token count at which a wide copy of the weights takes
   over). Apart is the default: with the native int4 linears the server served 8 sessions
   faster so (docs/server_measurements.md, "The native int4/int8 linears").
Attach and detach run on the model thread too, between forwards, so nothing else ever touches
the batch. When streams leave from the middle, the highest rows move down into the holes before
the next decode (one row copy each), so the decoding rows stay contiguous and are read in place. Every row is exact (a row's logits equal the same stream alone; `core/batch.py`).

`rewind` puts a row back to the stream's state at attach (a turn cut by a stop sequence is then
fed again from its start, `sessions.Turn._cut`).

What it does NOT do: sampling, HTTP, locks per session, persistence (see `sessions.py`).
"""

from __future__ import annotations

import threading
import time
from collections import deque
from concurrent.futures import Future

import torch

from ..core.batch import StreamBatch
from ..core.engine import StreamingLLM

DEFAULT_GATHER_MS = 5.0
DEFAULT_RIDE_CHUNKS = False  # a prompt's chunk in a forward of its own after the decode (see step 2)


class _Request:
    __slots__ = ("handle", "ids", "logits", "future", "offset", "outs")

    def __init__(self, handle: "Row", ids: torch.Tensor, logits: str):
        self.handle, self.ids, self.logits = handle, ids, logits
        self.future: Future = Future()
        self.offset = 0
        self.outs: list[torch.Tensor] = []

    @property
    def row(self) -> int:  # read on the model thread only: compaction may move the stream
        return self.handle.row


class Row:
    """One attached stream's handle: what `StreamingLLM.attach` needs (a feeder)."""

    def __init__(self, scheduler: "Scheduler", row: int):
        self.scheduler, self.row = scheduler, row

    def feed(self, ids: torch.Tensor, logits: str):
        return self.scheduler.submit(self, ids, logits).result()

    @property
    def tokens_seen(self) -> int:
        return self.scheduler.batch.tokens_seen(self.row)

    @property
    def cache_tokens(self) -> int:
        return self.scheduler.batch.cache_tokens(self.row)

    def state(self) -> dict:
        return self.scheduler.call(lambda: self.scheduler.batch.state(self.row))


class Scheduler:
    """The model thread and its batch of `slots` rows (see the module docstring)."""

    def __init__(self, engine: StreamingLLM, slots: int, prefill_chunk: int | None = None,
                 gather_ms: float = DEFAULT_GATHER_MS, ride_chunks: bool = DEFAULT_RIDE_CHUNKS):
        self.batch = StreamBatch(engine, slots)
        self.ride_chunks = ride_chunks
        self.prefill_chunk = prefill_chunk or engine.config.chunk_size
        self.gather_s = gather_ms / 1000
        self._cv = threading.Condition()
        self._pending: deque[_Request] = deque()
        self._calls: deque[tuple] = deque()
        self._decoding: set[int] = set()  # rows whose last request was a decode step
        self._handles: dict[int, Row] = {}  # row -> the attached stream's handle
        self._last_forward = 0.0
        self._running = True
        self.stats = {"forwards": 0, "decode_steps": 0, "decode_tokens": 0, "prefill_chunks": 0,
                      "prefill_tokens": 0, "last_batch_size": 0, "max_batch_size": 0, "row_moves": 0,
                      "mixed_steps": 0, "decode_s": 0.0, "prefill_s": 0.0, "mixed_s": 0.0, "calls_s": 0.0,
                      "gather_s": 0.0, "gather_cutoffs": 0, "prefill_shared": 0}
        # (model-thread seconds by kind of forward: decode rows only, a prefill chunk only, both;
        # gather_s: waiting for decoding rows' next requests after a forward, gather_cutoffs: rounds
        # that went ahead without some of them because gather_ms passed; prefill_shared: prompt
        # chunks that ran in a forward with another prompt's)
        self._thread = threading.Thread(target=self._loop, name="batch-model", daemon=True)
        self._thread.start()

    # ---- API (any thread) --------------------------------------------------------------------
    @property
    def queue_length(self) -> int:
        return len(self._pending)

    @property
    def active_rows(self) -> int:
        return self.batch.slots - len(self.batch._free)

    def attach(self, engine: StreamingLLM) -> Row:
        """Move `engine`'s stream into a free row; its feeds come here until `detach`."""
        row = self.call(self._add, engine)
        engine.attach(row)
        return row

    def detach(self, engine: StreamingLLM) -> None:
        """Copy the stream back into `engine` and free its row (no-op if not attached here)."""
        row = engine.feeder
        if not isinstance(row, Row) or row.scheduler is not self:
            return
        self.batch.make_room(engine, row.row)  # here, not on the model thread (allocation, page faults)
        self.call(lambda: self._out(row.row, engine))
        engine.detach(load=False)  # the model thread has just put the row's stream there

    def rewind(self, engine: StreamingLLM) -> None:
        """Put `engine`'s row back to the state the stream had when attached, which is the
        engine's own cache (untouched while attached): the row is freed WITHOUT copying it back
        and the engine is attached again. For a turn that must be redone from its start (a stop
        sequence fired); its feeds keep coming here."""
        row = engine.feeder
        if not isinstance(row, Row) or row.scheduler is not self:
            raise RuntimeError("rewind: this stream is not attached to this scheduler")
        engine.detach(load=False)
        self.call(lambda: self._free(row.row))
        self.attach(engine)  # the turn still holds its batch-row permit, so a row is free

    def submit(self, handle: Row, ids: torch.Tensor, logits: str) -> Future:
        req = _Request(handle, ids.reshape(-1), logits)
        with self._cv:
            if not self._running:
                req.future.set_exception(RuntimeError("the model thread has stopped"))
                return req.future
            self._pending.append(req)
            self._cv.notify()
        return req.future

    def call(self, fn, *args):
        """Run fn(*args) on the model thread between forwards; return its result."""
        fut: Future = Future()
        with self._cv:
            if not self._running:
                raise RuntimeError("the model thread has stopped")
            self._calls.append((fn, args, fut))
            self._cv.notify()
        return fut.result()

    def stop(self) -> None:
        with self._cv:
            self._running = False
            self._cv.notify()
        self._thread.join(timeout=30)

    # ---- the model thread --------------------------------------------------------------------
    def _add(self, engine: StreamingLLM) -> Row:
        handle = Row(self, self.batch.add_from(engine))
        self._handles[handle.row] = handle
        return handle

    def _out(self, row: int, engine: StreamingLLM) -> None:
        self.batch.copy_out(row, engine)
        self._free(row)

    def _free(self, row: int) -> None:
        self._decoding.discard(row)
        self._handles.pop(row, None)
        self.batch.remove(row)

    def _compact(self) -> None:
        """Move the highest active rows into the holes below them (between forwards)."""
        while True:
            active = self.batch.active
            holes = sorted(set(range(len(active))) - set(active))
            if not holes:
                return
            src, dst = active[-1], holes[0]
            self.batch.move(src, dst)
            self.stats["row_moves"] += 1
            handle = self._handles.pop(src)
            handle.row = dst  # its requests follow (they read handle.row)
            self._handles[dst] = handle
            if src in self._decoding:
                self._decoding.discard(src)
                self._decoding.add(dst)

    def _take(self):
        """(calls, decode requests, the waiting prompts oldest first), waiting as the policy says."""
        with self._cv:
            while self._running and not self._pending and not self._calls:
                self._cv.wait()
            deadline = self._last_forward + self.gather_s
            t0 = time.perf_counter()
            while self._running and not self._calls:
                waiting = {r.row for r in self._pending}
                missing = self._decoding - waiting
                left = deadline - time.perf_counter()
                if not missing or left <= 0:
                    self.stats["gather_cutoffs"] += bool(missing)
                    break
                self._cv.wait(left)
            self.stats["gather_s"] += time.perf_counter() - t0
            calls = list(self._calls)
            self._calls.clear()
            if calls:  # attach/detach first; requests wait for the next round
                return calls, [], []
            decodes = [r for r in self._pending if r.ids.numel() == 1]
            prompts = [r for r in self._pending if r.ids.numel() > 1]
            for r in decodes:
                self._pending.remove(r)
            return calls, decodes, prompts

    def _loop(self) -> None:
        while True:
            calls, decodes, prompts = self._take()
            if not self._running and not calls and not decodes and not prompts:
                break
            t0 = time.perf_counter()
            for fn, args, fut in calls:
                try:
                    fut.set_result(fn(*args))
                except BaseException as e:  # noqa: BLE001 - handed to the caller
                    fut.set_exception(e)
            t1 = time.perf_counter()
            try:
                if decodes:
                    self._compact()
                rides = self.ride_chunks and decodes and prompts
                chunk = self._next_chunk(prompts[0], self._mixed_chunk) if rides else None
                if chunk is not None and self.batch.mixes_exactly([(len(decodes), 1, "last"),
                                                                  (1, chunk[1] - chunk[0], chunk[2])]):
                    self._timed("mixed", self._mixed, decodes, prompts[0], chunk)  # every row stays exact
                else:
                    if decodes:
                        self._timed("decode", self._decode, decodes)
                    if prompts:
                        self._timed("prefill", self._prefill, prompts)
            finally:
                self.stats["calls_s"] += t1 - t0
                self._last_forward = time.perf_counter()
        with self._cv:
            for r in self._pending:
                r.future.set_exception(RuntimeError("the model thread has stopped"))
            self._pending.clear()

    def _timed(self, kind: str, step, *args) -> None:
        t0 = time.perf_counter()
        try:
            step(*args)
        finally:
            self.stats[kind + "_s"] += time.perf_counter() - t0

    def _decode(self, reqs: list[_Request]) -> None:
        reqs.sort(key=lambda r: r.row)
        rows = [r.row for r in reqs]
        try:
            logits = self.batch.feed(rows, torch.stack([r.ids for r in reqs]), logits="last")  # (B, V)
        except BaseException as e:  # noqa: BLE001
            for r in reqs:
                r.future.set_exception(e)
            return
        self.stats["forwards"] += 1
        self._decoded(reqs, logits)

    def _prefill(self, prompts: list[_Request]) -> None:
        """The next chunk of the oldest prompt, and of every later one whose next chunk still fits:
        at most `prefill_chunk` tokens in all, in ONE forward while that leaves every row's bits
        as alone (`StreamBatch.mixes_exactly`). A prompt's chunks start at multiples of
        `prefill_chunk` from its start whatever runs beside it (so its stream gets the same bits
        as when it runs by itself); short prompts that arrive together (a burst of new sessions)
        share one forward's fixed cost instead of queueing one per forward."""
        parts, used = [], 0
        for req in prompts:
            lo, hi, mode = self._next_chunk(req, self.prefill_chunk)
            more = parts + [(req, lo, hi, mode)]
            if parts and (used + hi - lo > self.prefill_chunk or any(h - l > self._mixed_chunk for _, l, h, _ in more)
                          or not self.batch.mixes_exactly([(1, h - l, m) for _, l, h, m in more])):
                continue
            parts, used = more, used + hi - lo
        for req, *_ in parts:
            self._decoding.discard(req.row)
        try:
            if len(parts) == 1:
                req, lo, hi, mode = parts[0]
                outs = [self.batch.feed([req.row], req.ids[lo:hi][None], logits=mode)]
            else:
                outs = self.batch.feed_mixed([([req.row], req.ids[lo:hi][None], mode) for req, lo, hi, mode in parts])
                self.stats["prefill_shared"] += len(parts)
        except BaseException as e:  # noqa: BLE001
            for req, *_ in parts:
                self._fail(req, e)
            return
        self.stats["forwards"] += 1
        for (req, _, hi, _), out in zip(parts, outs):
            self._chunked(req, hi, out)

    def _mixed(self, reqs: list[_Request], req: _Request, chunk: tuple[int, int, str]) -> None:
        """The decode requests and `req`'s next chunk (lo, hi, logits mode) in ONE forward
        (`StreamBatch.feed_mixed`)."""
        reqs.sort(key=lambda r: r.row)
        lo, hi, mode = chunk
        self._decoding.discard(req.row)
        try:
            logits, out = self.batch.feed_mixed([([r.row for r in reqs], torch.stack([r.ids for r in reqs]), "last"),
                                                 ([req.row], req.ids[lo:hi][None], mode)])
        except BaseException as e:  # noqa: BLE001
            for r in reqs:
                r.future.set_exception(e)
            self._fail(req, e)
            return
        self.stats["forwards"] += 1
        self.stats["mixed_steps"] += 1
        self._decoded(reqs, logits)
        self._chunked(req, hi, out)

    def _decoded(self, reqs: list[_Request], logits: torch.Tensor) -> None:
        """Hand each decode request its row of `logits` (B, V)."""
        rows = [r.row for r in reqs]
        self._decoding = set(rows)
        s = self.stats
        s["decode_steps"] += 1
        s["decode_tokens"] += len(rows)
        s["last_batch_size"] = len(rows)
        s["max_batch_size"] = max(s["max_batch_size"], len(rows))
        for i, r in enumerate(reqs):
            r.future.set_result(self._shape(logits[i : i + 1], r.logits))

    @property
    def _mixed_chunk(self) -> int:
        return min(self.prefill_chunk, self.batch.engine.config.chunk_size)

    @staticmethod
    def _next_chunk(req: _Request, size: int) -> tuple[int, int, str]:
        """(lo, hi, logits mode) of `req`'s next chunk of at most `size` tokens."""
        lo, hi = req.offset, min(req.offset + size, req.ids.numel())
        last = hi == req.ids.numel()
        return lo, hi, "all" if req.logits == "all" else ("last" if last and req.logits == "last" else "none")

    def _chunked(self, req: _Request, hi: int, out) -> None:
        """`req`'s chunk up to `hi` is in (its logits `out`, (1, ...) or None); answer it when done."""
        self.stats["prefill_chunks"] += 1
        self.stats["prefill_tokens"] += hi - req.offset
        if out is not None:
            req.outs.append(out[0])
        req.offset = hi
        if hi == req.ids.numel():
            with self._cv:
                self._pending.remove(req)
            if req.logits == "all":
                req.future.set_result(torch.cat(req.outs))
            else:
                req.future.set_result(None if req.logits == "none" else req.outs[-1])

    def _fail(self, req: _Request, e: BaseException) -> None:
        with self._cv:
            self._pending.remove(req)
        req.future.set_exception(e)

    @staticmethod
    def _shape(logits: torch.Tensor, mode: str):
        """(1, V) logits of a single-token request, as `StreamingLLM.feed(..., logits=mode)` returns them."""
        if mode == "none":
            return None
        return logits if mode == "all" else logits[0]
