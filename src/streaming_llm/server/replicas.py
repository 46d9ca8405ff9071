"""Sessions shared by several server replicas through a shared store (`redis_store.RedisStore`).

`SharedSessionManager` is the `SessionManager` plus two rules, so that any replica can serve any
session and no session ever runs on two replicas at once:
- Lease. Before a request touches a session, the replica takes the session's lease in the
  store (`SET NX PX --lease-ms`), renews it every third of its lifetime while the request runs,
  and releases it when the request ends. A replica that finds the lease taken answers 409
  `session_busy` at once (it does not wait): the client retries, or its load balancer sends it
  elsewhere. A replica that dies holding a lease blocks its session for at most `--lease-ms`.
  The store refuses a write from a replica whose lease was lost (`LeaseLost`: that turn fails
  and is rolled back), so an expired lease can never overwrite a newer turn.
- Freshness. A session still in this replica's memory is used only if the store's version of it
  is the one this replica last read or wrote; otherwise another replica has served it since,
  and it is reloaded from the store.
This module does not change how a turn is generated or stored; `sessions.py` does that.
"""

from __future__ import annotations

import asyncio
import logging

from .sessions import Live, ModelWorker, SessionConflict, SessionManager

log = logging.getLogger("streaming_llm.server")


class SessionBusy(SessionConflict):
    """The session's lease is held by another replica."""


class SharedSessionManager(SessionManager):
    lease_ms = 10_000

    def __init__(self, *args, **kw):
        super().__init__(*args, **kw)
        self.leases = ModelWorker("leases")  # never queued behind a large snapshot write on the I/O thread
        self._renewers: dict[str, asyncio.Task] = {}
        self.counters["busy"] = 0

    async def _acquire(self, sid: str) -> None:
        await super()._acquire(sid)
        try:
            ok = await self.leases.call(self.store.acquire_lease, sid, self.lease_ms)
        except BaseException:
            super()._release(sid)
            raise
        if not ok:
            super()._release(sid)
            self.counters["busy"] += 1
            raise SessionBusy(f"session {sid!r} has a request in progress on another replica; retry when it ends "
                              f"(a replica that died holds it for at most {self.lease_ms} ms)")
        self._renewers[sid] = asyncio.ensure_future(self._renew(sid))

    async def _renew(self, sid: str) -> None:
        while True:
            await asyncio.sleep(self.lease_ms / 3000)
            try:
                if not await self.leases.call(self.store.renew_lease, sid, self.lease_ms):
                    log.warning("session %s: lease lost; this turn will not be stored", sid)
                    return
            except Exception as e:  # the store is unreachable: the write will fail, and say so
                log.warning("session %s: lease renewal failed: %s", sid, e)

    def _release(self, sid: str) -> None:
        task = self._renewers.pop(sid, None)
        if task is not None:
            task.cancel()
        self.leases.submit(self.store.release_lease, sid)  # after the turn's write: commit awaited it
        super()._release(sid)

    def _restore(self, record) -> Live:
        live = super()._restore(record)
        live.store_version = record.version
        return live

    async def _get_live(self, sid: str, kind: str) -> Live:
        live = self.live.get(sid)
        if live is not None:
            version = await self.io.call(self.store.version, sid)
            if version != getattr(live, "store_version", None):  # served elsewhere since (or deleted)
                self.live.pop(sid, None)
        return await super()._get_live(sid, kind)

    async def describe(self, sid: str) -> dict | None:
        live = self.live.get(sid)
        if live is not None and not self.busy(sid):
            if await self.io.call(self.store.version, sid) != getattr(live, "store_version", None):
                self.live.pop(sid, None)  # stale: describe the stored record instead
        return await super().describe(sid)

    async def persist(self, live: Live, whole: bool = False) -> tuple[int, str]:
        size = await super().persist(live, whole)
        live.store_version = await self.io.call(self.store.version, live.sid)  # ours: we hold the lease
        return size

    def shutdown(self) -> None:
        self.leases.shutdown()  # queued releases go out before the store closes
        super().shutdown()
