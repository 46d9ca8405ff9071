"""Operating the server: clean shutdown on signals, bounded disk, store checks, hostile sampling
values, the OpenAPI document (schemathesis) and /metrics.

Real processes where it matters (signals and start-up checks run `streaming-llm serve` as a
subprocess); the rest runs the app under uvicorn in a thread, on a tiny random model.
"""

from __future__ import annotations

import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from streaming_llm.server.store import SQLiteStore
from test_server import MODEL, SRC, Server, chat, free_port, one_thread, serve_cmd, start_serve, tiny  # noqa: F401 - fixtures


def stream_some(url, body, n_events=3):
    """Open a streaming request and return (response context, event iterator) after n events."""
    cm = httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=30)
    r = cm.__enter__()
    assert r.status_code == 200, r.read()
    events = (line for line in r.iter_lines() if line)
    for _ in range(n_events):
        next(events)
    return cm, events


# ---- 1. signals --------------------------------------------------------------------------------
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_mid_reply_shuts_down_cleanly(tiny, tmp_path, sig):
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = start_serve(tiny[0], port, "--data-dir", str(tmp_path), "--shutdown-grace", "0.5")
    try:
        first = httpx.post(url + "/v1/chat/completions", timeout=30, json={
            "model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, "session_id": "k"}).json()
        reply = first["choices"][0]["message"]["content"]
        body = {"model": MODEL, "stream": True, "max_tokens": 2000, "session_id": "k", "temperature": 0,
                "messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": reply},
                             {"role": "user", "content": "go on"}]}
        cm, events = stream_some(url, body)
        t0 = time.time()
        proc.send_signal(sig)
        rest = []
        try:  # the stream ends: finished within the grace, or cut off after it (aborted, rolled back)
            rest.extend(events)
        except httpx.RemoteProtocolError:
            pass
        cm.__exit__(None, None, None)
        rc = proc.wait(30)
        took = time.time() - t0
        out = proc.stdout.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    assert rc == 0, out
    assert f"{signal.Signals(sig).name}: shut down cleanly" in out, out
    assert took < 15, took
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sessions.sqlite3"]  # no -wal, no -shm
    record = SQLiteStore(tmp_path / "sessions.sqlite3").get("k")
    finished = bool(rest) and rest[-1] == "data: [DONE]"
    assert record.turns == (2 if finished else 1) and len(record.messages) == 2 * record.turns


# ---- 2. bounded disk ---------------------------------------------------------------------------
def wait_for(pred, timeout=10.0, what="condition"):
    deadline = time.time() + timeout
    while not pred():
        assert time.time() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def test_max_stored_sessions_and_ttl_and_wal_bounded(tiny, tmp_path):
    _, model, tokenizer = tiny
    with Server(model, tokenizer, tmp_path / "cap", max_stored_sessions=2) as srv:
        client = srv.client()
        for sid in ["a", "b", "c"]:
            chat(client, [{"role": "user", "content": f"hello {sid}"}], sid, n=4)
            time.sleep(0.01)
        chat(client, [{"role": "user", "content": "hello b"}], "b", n=4)  # b used again: a, then c are oldest
        chat(client, [{"role": "user", "content": "hello d"}], "d", n=4)
        ids = lambda: sorted(s["id"] for s in httpx.get(srv.url + "/v1/sessions").json()["data"])  # noqa: E731
        wait_for(lambda: ids() == ["b", "d"], what="pruning to 2 sessions")
        health = httpx.get(srv.url + "/health").json()
        assert health["stored_sessions"] == 2 and health["expired"] == 2 and health["store_bytes"] > 0
        assert httpx.get(srv.url + "/v1/sessions/a").status_code == 404
        wal = tmp_path / "cap" / "sessions.sqlite3-wal"
        assert not wal.exists() or wal.stat().st_size == 0  # checkpointed and truncated after every write
    with Server(model, tokenizer, tmp_path / "ttl", session_ttl=1.0) as srv:
        chat(srv.client(), [{"role": "user", "content": "short-lived"}], "t", n=4)
        assert httpx.get(srv.url + "/health").json()["stored_sessions"] == 1
        # no further request: the periodic janitor expires it
        wait_for(lambda: httpx.get(srv.url + "/health").json()["stored_sessions"] == 0, 10, "the TTL")
        assert httpx.get(srv.url + "/v1/sessions/t").status_code == 404


# ---- 3. the data directory is checked before the model loads -------------------------------------
def _damaged_db(path: Path) -> None:
    db = sqlite3.connect(path)
    db.execute("CREATE TABLE t (x BLOB)")
    db.executemany("INSERT INTO t VALUES (?)", [(os.urandom(3000),) for _ in range(40)])
    db.commit()
    db.close()
    with open(path, "r+b") as f:  # scribble over the middle of the b-tree pages
        f.seek(4096 * 3 + 100)
        f.write(b"\xff" * 3000)
        f.seek(4096 * 0 + 100)
        f.write(b"\x00\x07" * 8)


def test_bad_data_dir_is_a_one_line_error_before_loading(tmp_path):
    (tmp_path / "a-file").write_text("x")
    garbage = tmp_path / "garbage"
    garbage.mkdir()
    (garbage / "sessions.sqlite3").write_bytes(b"this is not a database" * 100)
    damaged = tmp_path / "damaged"
    damaged.mkdir()
    _damaged_db(damaged / "sessions.sqlite3")
    cases = [(["--data-dir", str(tmp_path / "a-file" / "sub")], "cannot create"),
             (["--data-dir", str(garbage)], "not a usable SQLite database"),
             (["--data-dir", str(damaged)], "session store"),
             (["--store", "postgres://x"], "--store must be"),
             (["--store", f"redis://127.0.0.1:{free_port()}/0"], "cannot reach the Redis store")]
    env = {**os.environ, "PYTHONPATH": SRC}
    for extra, needle in cases:
        t0 = time.time()
        r = subprocess.run(serve_cmd(tmp_path / "no-such-model", free_port(), *extra), env=env, capture_output=True,
                           text=True, timeout=60)
        took = time.time() - t0
        assert r.returncode == 2 and needle in r.stderr, (extra, r.stderr)
        assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr, r.stderr
        assert "no such" not in r.stderr  # the model was never looked at
        assert took < 5, (extra, took)  # a process start included; the check itself is milliseconds


def test_corrupt_row_is_a_clear_409_and_others_unaffected(tiny, tmp_path):
    _, model, tokenizer = tiny
    with Server(model, tokenizer, tmp_path) as srv:
        client = srv.client()
        good, _ = chat(client, [{"role": "user", "content": "good"}], "good", n=4)
        chat(client, [{"role": "user", "content": "bad"}], "bad", n=4)
        db = sqlite3.connect(tmp_path / "sessions.sqlite3")
        db.execute("UPDATE sessions SET messages = '{not json' WHERE id = 'bad'")
        db.commit()
        db.close()
        srv.manager.live.clear()  # force both to be read back from the store
        body = {"model": MODEL, "messages": [{"role": "user", "content": "bad"}], "max_tokens": 4, "session_id": "bad"}
        for r in (httpx.post(srv.url + "/v1/chat/completions", json=body, timeout=30), httpx.get(srv.url + "/v1/sessions/bad")):
            assert r.status_code == 409, r.text
            err = r.json()["error"]
            assert err["code"] == "session_corrupt" and "'bad'" in err["message"] and "transcript" in err["message"]
        again, r = chat(client, [{"role": "user", "content": "good"}, {"role": "assistant", "content": good},
                                 {"role": "user", "content": "more"}], "good", n=4)
        assert r.model_extra["session"]["loaded_from"] == "snapshot" and r.model_extra["session"]["turns"] == 2
        assert httpx.delete(srv.url + "/v1/sessions/bad").status_code == 200
        assert httpx.post(srv.url + "/v1/chat/completions", json=body, timeout=30).status_code == 200
        assert httpx.get(srv.url + "/health").json()["status"] == "ok"




def test_store_failure_is_a_503_not_a_500(tiny, tmp_path):
    _, model, tokenizer = tiny
    with Server(model, tokenizer, tmp_path) as srv:
        real_get = srv.manager.store.get

        def broken(sid):
            raise sqlite3.OperationalError("disk I/O error")

        srv.manager.store.get = broken
        r = httpx.post(srv.url + "/v1/chat/completions", timeout=30, json={
            "model": MODEL, "messages": [{"role": "user", "content": "x"}], "max_tokens": 2, "session_id": "s"})
        assert r.status_code == 503 and r.json()["error"]["code"] == "store_unavailable", r.text
        srv.manager.store.get = real_get
        assert chat(srv.client(), [{"role": "user", "content": "x"}], "s", n=2)[1].model_extra["session"]["turns"] == 1


# ---- 4. hostile input never causes a 500; the OpenAPI document matches -----------------------------
@pytest.fixture(scope="module")
def server(tiny, tmp_path_factory):
    _, model, tokenizer = tiny
    with Server(model, tokenizer, tmp_path_factory.mktemp("data"), max_tokens_limit=4, default_max_tokens=4) as s:
        yield s


@pytest.mark.parametrize("extra, status", [
    ({"temperature": 1e-40}, 200),  # tiny temperature = greedy
    ({"temperature": 0.7, "repetition_penalty": 1e-300}, 400),
    ({"temperature": 0.7, "repetition_penalty": 0.01}, 200),
    ({"seed": 2 ** 70}, 400),
    ({"seed": 2 ** 64 - 1}, 200),
    ({"seed": -(2 ** 63)}, 200),
])
def test_extreme_sampling_values_are_handled(server, extra, status):
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3, **extra}
    r = httpx.post(server.url + "/v1/chat/completions", json=body, timeout=30)
    assert r.status_code == status, r.text
    if status == 400:
        assert r.json()["error"]["param"] in extra
    if extra.get("temperature") == 1e-40:
        greedy = httpx.post(server.url + "/v1/chat/completions", json={**body, "temperature": 0}, timeout=30)
        assert r.json()["choices"][0]["message"]["content"] == greedy.json()["choices"][0]["message"]["content"]
    r = httpx.post(server.url + "/v1/completions", content='{"model": "tiny", "prompt": "x", "temperature": NaN}', timeout=30)
    assert r.status_code == 400


def test_openapi_matches_the_server(server):
    doc = httpx.get(server.url + "/openapi.json").json()
    assert "422" not in str({p: {m: list(op["responses"]) for m, op in ops.items()} for p, ops in doc["paths"].items()})
    chat_op = doc["paths"]["/v1/chat/completions"]["post"]
    assert chat_op["requestBody"]["content"]["application/json"]["schema"]["$ref"].endswith("ChatCompletionRequest")
    assert {"400", "404", "409", "413"} <= set(chat_op["responses"])
    assert "requestBody" in doc["paths"]["/v1/completions"]["post"]
    r = httpx.put(server.url + "/v1/models")
    assert r.status_code == 405 and r.headers["allow"] == "GET" and r.json()["error"]["code"] == "method_not_allowed"


def test_schemathesis_finds_no_5xx_and_no_schema_violation(server, tmp_path):
    st = shutil.which("schemathesis") or str(Path(sys.executable).parent / "schemathesis")
    if not Path(st).exists():
        pytest.skip("schemathesis is not installed (pip install '.[test]')")
    checks = ("not_a_server_error,status_code_conformance,content_type_conformance,response_headers_conformance,"
              "response_schema_conformance,negative_data_rejection,unsupported_method")
    cmd = [st, "run", server.url + "/openapi.json", "--checks", checks, "--max-examples", "20", "--seed", "1",
           "--phases", "examples,coverage,fuzzing", "--workers", "1", "--request-timeout", "30",
           "--generation-database", "none", "--no-color", "--max-time", "45",
           "--suppress-health-check", "all"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    print(r.stdout[-3000:])
    assert r.returncode == 0, r.stdout[-6000:] + r.stderr[-2000:]
    assert httpx.get(server.url + "/health").json()["status"] == "ok"


# ---- 5. /metrics ---------------------------------------------------------------------------------
def scrape(url) -> dict:
    from prometheus_client.parser import text_string_to_metric_families

    r = httpx.get(url + "/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in text_string_to_metric_families(r.text) for s in fam.samples}


def test_metrics_scrape(server):
    before = scrape(server.url)
    chat(server.client(), [{"role": "user", "content": "count me"}], "metrics-1", n=3)
    body = {"model": MODEL, "messages": [{"role": "user", "content": "and me"}], "max_tokens": 3, "stream": True,
            "temperature": 0}
    assert httpx.post(server.url + "/v1/chat/completions", json=body, timeout=30).text.rstrip().endswith("[DONE]")
    httpx.post(server.url + "/v1/chat/completions", content="{bad", timeout=30)
    m = scrape(server.url)
    get = lambda name, **labels: m.get((name, tuple(sorted(labels.items()))), 0)  # noqa: E731
    was = lambda name, **labels: before.get((name, tuple(sorted(labels.items()))), 0)  # noqa: E731
    route = {"route": "/v1/chat/completions", "method": "POST"}
    assert get("streaming_llm_requests_total", **route, status="200") - was("streaming_llm_requests_total", **route, status="200") == 2
    assert get("streaming_llm_requests_total", **route, status="400") - was("streaming_llm_requests_total", **route, status="400") == 1
    assert get("streaming_llm_generated_tokens_total") - was("streaming_llm_generated_tokens_total") == 6
    assert get("streaming_llm_prefilled_tokens_total") > was("streaming_llm_prefilled_tokens_total")
    assert get("streaming_llm_turns_total", outcome="completed") - was("streaming_llm_turns_total", outcome="completed") == 2
    assert get("streaming_llm_time_to_first_token_seconds_count") - was("streaming_llm_time_to_first_token_seconds_count") == 2
    assert get("streaming_llm_inter_token_latency_seconds_count") - was("streaming_llm_inter_token_latency_seconds_count") == 4
    assert get("streaming_llm_snapshot_bytes_count") - was("streaming_llm_snapshot_bytes_count") == 1  # the named session
    assert get("streaming_llm_persist_seconds_count") >= 1 and get("streaming_llm_snapshot_bytes_sum") > 0
    assert get("streaming_llm_stored_sessions") >= 1 and get("streaming_llm_store_bytes") > 0
    assert get("streaming_llm_batch_size") == 1 and get("streaming_llm_queue_length") == 0
    assert ("streaming_llm_active_sessions", ()) in m and get("streaming_llm_sessions_in_memory") >= 1
