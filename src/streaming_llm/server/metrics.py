"""Prometheus metrics of one server process (`GET /metrics`, the Prometheus text format).

Each app has its own `CollectorRegistry`, so several apps in one process (the tests) never mix
their numbers. What is measured: HTTP requests by route template, method and status (a pure-ASGI
middleware, so 401s, 413s and unknown routes count too); generated and prefilled tokens and
turns by outcome; time to first token (request received -> first token sampled) and the time
between tokens as the reply is consumed; snapshot size, persist time and kind (delta | full) per stored turn; and,
read at scrape time, active sessions (a request in progress), sessions in memory, stored
sessions, store bytes, the model queue and the batch size of the last batched decode forward
(1 without continuous batching). Names are prefixed `streaming_llm_`. This module only counts; it
never changes what a request does.
"""

from __future__ import annotations

import time

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from starlette.routing import Match

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
TOKEN_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
BYTES_BUCKETS = (1e4, 1e5, 1e6, 4e6, 1.6e7, 3.2e7, 6.4e7, 1.28e8, 2.56e8)
CONTENT_TYPE = CONTENT_TYPE_LATEST


class Metrics:
    def __init__(self, manager):
        self.manager = manager
        r = self.registry = CollectorRegistry()
        p = "streaming_llm_"
        self.requests = Counter(p + "requests", "HTTP requests by route template, method and status",
                                ["route", "method", "status"], registry=r)
        self.generated = Counter(p + "generated_tokens", "tokens generated (aborted replies included)", registry=r)
        self.prefilled = Counter(p + "prefilled_tokens", "prompt tokens prefilled", registry=r)
        self.turns = Counter(p + "turns", "replies by outcome (completed: stored; aborted: rolled back)",
                             ["outcome"], registry=r)
        self.ttft = Histogram(p + "time_to_first_token_seconds", "request received -> first token sampled",
                              buckets=LATENCY_BUCKETS, registry=r)
        self.itl = Histogram(p + "inter_token_latency_seconds", "time between two tokens of a reply",
                             buckets=TOKEN_BUCKETS, registry=r)
        self.snapshot_bytes = Histogram(p + "snapshot_bytes", "size of a stored turn's snapshot",
                                        buckets=BYTES_BUCKETS, registry=r)
        self.snapshots = Counter(p + "snapshots", "stored turns by kind (delta: the turn's changes; full: compaction)",
                                 ["kind"], registry=r)
        self.persist = Histogram(p + "persist_seconds", "state capture + serialization + durable write of a turn",
                                 buckets=LATENCY_BUCKETS, registry=r)
        Gauge(p + "active_sessions", "sessions with a request in progress", registry=r).set_function(
            lambda: len(manager._locks))
        Gauge(p + "sessions_in_memory", "sessions held in memory", registry=r).set_function(lambda: len(manager.live))
        Gauge(p + "queue_length", "model jobs and batched forward requests waiting", registry=r).set_function(
            lambda: manager.worker.pending + (manager.scheduler.queue_length if manager.scheduler else 0))
        Gauge(p + "batch_size", "streams in the last batched decode forward (1 without batching)", registry=r).set_function(
            lambda: manager.scheduler.stats["last_batch_size"] if manager.scheduler else 1)
        Gauge(p + "active_batch_rows", "replies holding a batch row now", registry=r).set_function(
            lambda: manager.scheduler.active_rows if manager.scheduler else 0)
        self.stored = Gauge(p + "stored_sessions", "sessions in the store", registry=r)
        self.store_bytes = Gauge(p + "store_bytes", "bytes used by the store (SQLite: database + WAL)", registry=r)

    async def render(self) -> bytes:
        stats = await self.manager.io.call(self.manager.store.stats)
        self.stored.set(stats["stored_sessions"])
        self.store_bytes.set(stats["store_bytes"])
        return generate_latest(self.registry)

    async def tokens(self, turn):
        """`turn.tokens()`, timing the gap between tokens."""
        last = time.perf_counter()
        async for tok in turn.tokens():
            now = time.perf_counter()
            if turn.completion_tokens > 1:
                self.itl.observe(now - last)
            last = now
            yield tok
            last = time.perf_counter()  # the consumer's own time (sending) is not the model's

    def committed(self, info: dict) -> None:
        if info.get("id"):
            self.snapshot_bytes.observe(info["snapshot_bytes"])
            self.persist.observe(info["persist_ms"] / 1000)
            self.snapshots.labels(info.get("snapshot_kind") or "full").inc()

    def closed(self, turn) -> None:
        self.generated.inc(turn.completion_tokens)
        self.prefilled.inc(turn.prompt_tokens or getattr(turn.live.conv, "last_prompt_tokens", 0) or 0)
        self.turns.labels("completed" if turn.committed else "aborted").inc()


class RequestCounter:
    """Pure-ASGI middleware: counts every HTTP response by route template and status."""

    def __init__(self, app, metrics: Metrics, routes):
        self.app, self.metrics, self.routes = app, metrics, routes

    def _route(self, scope) -> str:
        partial = None
        for route in self.routes:
            match = route.matches(scope)[0]
            if match == Match.FULL:
                return getattr(route, "path", "other")
            if match == Match.PARTIAL and partial is None:  # the path exists, not the method
                partial = getattr(route, "path", "other")
        return partial or "unmatched"

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def counting_send(message):
            if message["type"] == "http.response.start":
                self.metrics.requests.labels(self._route(scope), scope["method"], str(message["status"])).inc()
            await send(message)

        return await self.app(scope, receive, counting_send)
