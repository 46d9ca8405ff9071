"""Replicas sharing sessions through a real Redis: `redis-server` on a loopback port and two
`streaming-llm serve` processes on a tiny random model. Turns of one conversation alternate
between the replicas and continue exactly; a session never runs on both at once (409
session_busy); a replica killed with SIGKILL mid-reply loses only that reply, and its lease expires.
Skipped, with the reason, where the redis-server binary or the redis client is missing.
"""

from __future__ import annotations

import shutil
import signal
import time

import httpx
import pytest

from test_server import MODEL, converse, free_port, run_redis, turn
from test_server_ops import one_thread, start_serve, stream_some, tiny  # noqa: F401 (fixtures used by name)

REDIS = shutil.which("redis-server")
pytestmark = pytest.mark.skipif(REDIS is None, reason="redis-server is not installed (apt-get install redis-server)")
redis = pytest.importorskip("redis", reason="the redis client is not installed (pip install '.[server]')")
LEASE_MS = 1500


@pytest.fixture(scope="module")
def redis_url(tmp_path_factory):
    yield from run_redis(REDIS, tmp_path_factory.mktemp("redis"))


@pytest.fixture(scope="module")
def replicas(tiny, redis_url):  # noqa: F811
    ports = [free_port(), free_port()]
    procs = [start_serve(tiny[0], port, "--store", redis_url, "--lease-ms", str(LEASE_MS)) for port in ports]
    yield [f"http://127.0.0.1:{port}" for port in ports], procs
    for proc in procs:
        proc.kill()
        proc.wait(10)


def test_redis_store_roundtrip(redis_url):
    from streaming_llm.server.redis_store import LeaseLost, RedisStore
    from streaming_llm.server.store import SessionRecord

    store = RedisStore(redis_url, prefix="unit:", chunk_bytes=1000)
    blob = bytes(range(256)) * 20  # 5120 bytes: 6 chunks
    record = SessionRecord("u1", "chat", MODEL, {"w": 1}, [{"role": "user", "content": "é"}], blob, 1, {"k": 2})
    with pytest.raises(LeaseLost):
        store.put(record)  # no lease: refused
    assert store.acquire_lease("u1", 5000) and not RedisStore(redis_url, prefix="unit:").acquire_lease("u1", 5000)
    store.put(record)
    got = store.get("u1")
    assert (got.snapshot, got.messages, got.meta, got.turns, got.version) == (blob, record.messages, {"k": 2}, 1, 1)
    store.put(SessionRecord("u1", "chat", MODEL, {"w": 1}, [], blob[:10], 2, {}))
    assert store.get("u1").snapshot == blob[:10] and store.version("u1") == 2
    assert len(list(store.r.scan_iter("unit:c:u1:*"))) == 1  # the old generation's chunks are gone
    assert store.stats()["stored_sessions"] == 1 and [s["id"] for s in store.list()] == ["u1"]
    store.release_lease("u1")
    assert store.acquire_lease("u1", 100)
    time.sleep(0.2)  # expired; another replica takes it over: our late write is refused
    other = RedisStore(redis_url, prefix="unit:")
    assert other.acquire_lease("u1", 5000)
    with pytest.raises(LeaseLost):
        store.put(record)
    assert store.get("u1").turns == 2 and not store.renew_lease("u1", 5000)
    store.release_lease("u1")  # not ours: a no-op
    assert other.r.get("unit:lease:u1") is not None
    other.release_lease("u1")
    assert store.delete("u1") and store.get("u1") is None and not list(store.r.scan_iter("unit:*"))


def test_turns_alternate_between_replicas_and_continue_exactly(replicas):
    (a, b), _ = replicas
    texts = ["Remember: apples.", "What fruit?", "Say it again.", "Once more."]
    reference, _ = converse([a], "ref", texts)
    got, infos = converse([a, b], "alt", texts)
    assert got == reference
    assert [i["loaded_from"] for i in infos] == ["new", "snapshot", "snapshot", "snapshot"]  # each replica reloads
    assert [i["turns"] for i in infos] == [1, 2, 3, 4] and not any(i["rebuilt"] for i in infos)
    for url in (a, b):  # A's copy in memory is from turn 3: it reads the store's
        assert httpx.get(url + "/v1/sessions/alt").json()["turns"] == 4


def test_a_session_never_runs_on_both_replicas(replicas):
    (a, b), _ = replicas
    messages = [{"role": "user", "content": "tell me a long story"}]
    cm, events = stream_some(a, {"model": MODEL, "messages": messages, "max_tokens": 2000, "stream": True,
                                 "session_id": "busy", "temperature": 0})  # greedy: no early end
    try:
        r = turn(b, "busy", messages)
        assert r.status_code == 409 and r.json()["error"]["code"] == "session_busy", r.text
        assert httpx.delete(b + "/v1/sessions/busy").status_code == 409
        assert turn(b, "other", messages).status_code == 200  # other sessions are not held up
        rest = list(events)
        assert rest[-1] == "data: [DONE]"
    finally:
        cm.__exit__(None, None, None)
    r = turn(b, "busy", messages + [{"role": "assistant", "content": "x"}, {"role": "user", "content": "more"}])
    assert r.status_code == 200 and r.json()["session"]["turns"] == 2
    assert httpx.get(a + "/metrics").text.count("streaming_llm_requests_total") > 0


def test_redis_prune_spares_leased_sessions(redis_url):
    from streaming_llm.server.redis_store import RedisStore
    from streaming_llm.server.store import SessionRecord

    store = RedisStore(redis_url, prefix="prune:")
    for i, sid in enumerate(["old", "mid", "new"]):
        assert store.acquire_lease(sid, 5000)
        store.put(SessionRecord(sid, "text", MODEL, {}, [], b"x" * 10, 1, {}, updated=1000.0 + i))
        store.release_lease(sid)
    assert store.acquire_lease("old", 5000)  # a turn runs on "old" somewhere
    assert store.prune(None, 1) == ["mid"]
    store.release_lease("old")
    assert store.prune(None, 1) == ["old"] and [s["id"] for s in store.list()] == ["new"]
    assert store.prune(60.0, None) == ["new"] and store.stats() == {"stored_sessions": 0, "store_bytes": 0}
    assert not list(store.r.scan_iter("prune:*"))


def test_concurrent_appends_on_both_replicas_lose_nothing(replicas):
    """Four clients append to one session through both replicas at once: every 200 is a distinct
    turn number, and the stored session holds exactly those turns (no two ran from one state)."""
    import concurrent.futures as cf

    (a, b), _ = replicas

    def client(url, k):
        out = []
        for i in range(3):
            r = turn(url, "race", [{"role": "user", "content": f"{k}-{i}"}], n=4, session_append=True)
            out.append((r.status_code, r.json()))
        return out

    with cf.ThreadPoolExecutor(4) as pool:
        results = [x for f in [pool.submit(client, url, k) for k, url in enumerate([a, b, a, b])] for x in f.result()]
    ok = [body["session"]["turns"] for status, body in results if status == 200]
    assert all(status in (200, 409) for status, _ in results)
    assert all(body["error"]["code"] == "session_busy" for status, body in results if status == 409)
    assert sorted(ok) == list(range(1, len(ok) + 1)) and ok
    stored = httpx.get(a + "/v1/sessions/race").json()
    assert stored["turns"] == len(ok) and len(stored["messages"]) == 2 * len(ok)
    sent = {f"{k}-{i}" for k in range(4) for i in range(3)}
    assert {m["content"] for m in stored["messages"] if m["role"] == "user"} <= sent


# last: it kills replica A
def test_replica_killed_mid_reply_loses_only_that_reply(replicas):
    (a, b), procs = replicas
    texts = ["one", "two", "three"]
    messages = []
    acknowledged, _ = converse([a, b], "kill", texts[:2], messages)
    messages.append({"role": "user", "content": texts[2]})
    cm, events = stream_some(a, {"model": MODEL, "messages": messages, "max_tokens": 2000, "stream": True,
                                 "session_id": "kill", "temperature": 0})
    procs[0].send_signal(signal.SIGKILL)
    procs[0].wait(10)
    killed_at = time.time()
    try:
        list(events)
    except httpx.HTTPError:
        pass
    cm.__exit__(None, None, None)
    r = turn(b, "kill", messages)
    if time.time() - killed_at < LEASE_MS / 1000 - 0.2:
        assert r.status_code == 409 and r.json()["error"]["code"] == "session_busy"  # the dead replica's lease
    while r.status_code == 409:
        assert time.time() - killed_at < LEASE_MS / 1000 + 5, "the lease did not expire"
        time.sleep(0.1)
        r = turn(b, "kill", messages)
    assert r.status_code == 200, r.text
    info = r.json()["session"]
    # B served turn 2 and the killed turn 3 never reached the store: B's copy is still current
    assert info["turns"] == 3 and not info["rebuilt"] and info["loaded_from"] == "memory"
    stored = httpx.get(b + "/v1/sessions/kill").json()
    assert [m["content"] for m in stored["messages"]] == [
        "one", acknowledged[0], "two", acknowledged[1], "three", r.json()["choices"][0]["message"]["content"]]
