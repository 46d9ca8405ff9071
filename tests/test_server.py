"""The HTTP server, end to end: a real uvicorn server on a loopback port, a tiny random model.

Most tests run the server in a background thread (one model load for the module); the CLI tests
start `streaming-llm serve` as a subprocess (the API-key refusal, and a SIGKILL mid-reply).
Replies are compared with greedy sampling against the same requests run another way (sequential,
uninterrupted): a session must answer exactly as if nothing else happened.
"""

from __future__ import annotations

import concurrent.futures as cf
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Iterator

import httpx
import openai
import pytest
import uvicorn

from streaming_llm.core.config import StreamingConfig
from streaming_llm.server.serve import build, resolve_api_key
from streaming_llm.server.store import SQLiteStore
from tiny_models import save_tiny_model

MODEL = "tiny"
SRC = str(Path(__file__).resolve().parents[1] / "src")
CONFIG = StreamingConfig(sinks=4, window=48)  # capacity 52: a few turns outgrow it


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """The real app under uvicorn, in a thread, on a free loopback port."""

    def __init__(self, model, tokenizer, data_dir, **kw):
        self.app, self.manager = build(model, tokenizer, CONFIG, model_name=MODEL, data_dir=data_dir, **kw)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(self.app, host="127.0.0.1", port=self.port, log_level="error"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self):
        self.thread.start()
        deadline = time.time() + 20
        while not self.server.started:
            assert time.time() < deadline and self.thread.is_alive(), "server did not start"
            time.sleep(0.02)
        return self

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(10)
        self.manager.shutdown()

    def client(self, key="unused", **kw) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.url + "/v1", api_key=key, max_retries=0, timeout=30, **kw)


def turn(url, sid, messages, n=8, **kw):
    body = {"model": MODEL, "messages": messages, "max_tokens": n, "temperature": 0, "session_id": sid, **kw}
    return httpx.post(url + "/v1/chat/completions", json=body, timeout=60)


def converse(urls, sid, texts, messages=None, n=8):
    """One conversation at temperature 0, turn i on urls[i % len(urls)] (one server: a list of one);
    returns (replies, session infos)."""
    messages = [] if messages is None else messages
    replies, infos = [], []
    for i, text in enumerate(texts):
        messages.append({"role": "user", "content": text})
        r = turn(urls[i % len(urls)], sid, messages, n)
        assert r.status_code == 200, r.text
        reply = r.json()["choices"][0]["message"]["content"]
        messages.append({"role": "assistant", "content": reply})
        replies.append(reply)
        infos.append(r.json()["session"])
    return replies, infos


def run_redis(binary: str, folder) -> Iterator[str]:
    """The body of a redis fixture: start a real `redis-server` on a loopback port (no persistence,
    its files in `folder`), yield its URL once it answers, stop it afterwards."""
    import redis

    port = free_port()
    proc = subprocess.Popen([binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                             "--dir", str(folder)], stdout=subprocess.DEVNULL)
    client, deadline = redis.Redis(port=port), time.time() + 20
    while True:
        try:
            client.ping()
            break
        except redis.ConnectionError:
            assert time.time() < deadline and proc.poll() is None, "redis-server did not start"
            time.sleep(0.05)
    yield f"redis://127.0.0.1:{port}/0"
    proc.terminate()
    proc.wait(10)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Server, clients and model share this process: one torch thread avoids OpenMP spin contention."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = save_tiny_model(tmp_path_factory.mktemp("tiny") / "model")
    return path, AutoModelForCausalLM.from_pretrained(path), AutoTokenizer.from_pretrained(path)


@pytest.fixture(scope="module")
def server(tiny, tmp_path_factory):
    _, model, tokenizer = tiny
    with Server(model, tokenizer, tmp_path_factory.mktemp("data"), max_tokens_limit=4096) as s:
        yield s


def chat(client, messages, sid=None, n=12, **kw):
    extra = {"session_id": sid} if sid else None
    r = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=n, temperature=0, extra_body=extra, **kw)
    return r.choices[0].message.content, r


def conversation(client, sid, user_texts, n=12, messages=None):
    """Run a multi-turn conversation the OpenAI way (full history each request); returns replies.
    `messages` (a list, extended in place) continues an earlier conversation."""
    messages, replies = [] if messages is None else messages, []
    for text in user_texts:
        messages.append({"role": "user", "content": text})
        reply, _ = chat(client, messages, sid, n)
        messages.append({"role": "assistant", "content": reply})
        replies.append(reply)
    return replies


# ---- store and snapshots (no server) ----------------------------------------------------------------
def test_sqlite_store_and_snapshot_roundtrip(tmp_path, tiny):
    import torch

    from streaming_llm.server.conversations import ChatConversation, pack_state, unpack_state
    from streaming_llm.server.store import SessionRecord, SessionStore

    store = SQLiteStore(tmp_path / "s.sqlite3")
    assert isinstance(store, SessionStore)
    assert store._db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    conv = ChatConversation(tiny[1], tiny[2], CONFIG)
    list(conv.reply({"messages": [{"role": "user", "content": "hi"}]}, 5, None)[2])
    state = conv.state()
    full = len(pack_state(state))
    store.put(SessionRecord("a", "chat", MODEL, CONFIG.to_dict(), conv.transcript(), pack_state(state), 1, {"x": 1}))
    record = store.get("a")
    assert record.messages == conv.transcript() and record.meta == {"x": 1} and store.get("b") is None
    back = unpack_state(record.snapshot, torch.float32, "cpu")
    for mine, theirs in zip(state["engine"]["cache"]["layers"], back["engine"]["cache"]["layers"]):
        assert torch.equal(mine["keys"], theirs["keys"]) and torch.equal(mine["values"], theirs["values"])
    raw = sum(t.numel() * 4 for layer in state["engine"]["cache"]["layers"] for t in (layer["keys"], layer["values"]))
    assert full < 0.75 * raw  # a cache not yet full is stored without its empty slots
    assert len(pack_state(state, torch.bfloat16)) < full  # half-size snapshots on request
    assert [r["id"] for r in store.list()] == ["a"] and store.delete("a") and not store.delete("a")
    store.close()


# ---- OpenAI client: chat, completions, models ------------------------------------------------------
def test_models_health_and_chat_stream_equals_nonstream(server):
    client = server.client()
    assert [m.id for m in client.models.list().data] == [MODEL]
    health = httpx.get(server.url + "/health").json()
    assert health["status"] == "ok" and health["decode_attention"].startswith(("native (", "torch SDPA ("))
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello!"}]
    text, full = chat(client, messages, n=16)
    assert full.object == "chat.completion" and full.choices[0].finish_reason in ("stop", "length")
    assert full.usage.total_tokens == full.usage.prompt_tokens + full.usage.completion_tokens > 0
    stream = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=16, temperature=0, stream=True,
                                            stream_options={"include_usage": True})
    chunks = list(stream)
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == text
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == full.usage.completion_tokens
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == full.choices[0].finish_reason
    # the raw stream is SSE ending with [DONE]
    body = {"model": MODEL, "messages": messages, "max_tokens": 4, "stream": True}
    raw = httpx.post(server.url + "/v1/chat/completions", json=body, timeout=30).text
    assert raw.startswith("data: {") and raw.rstrip().endswith("data: [DONE]")


def test_completions_stream_and_nonstream(server):
    client = server.client()
    r = client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=10, temperature=0)
    assert r.object == "text_completion" and r.usage.completion_tokens == 10 and r.choices[0].finish_reason == "length"
    parts = list(client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=10, temperature=0, stream=True))
    assert "".join(p.choices[0].text for p in parts if p.choices) == r.choices[0].text
    # a text session continues one stream: the second prompt is appended, only it is prefilled
    a = client.completions.create(model=MODEL, prompt="abc", max_tokens=5, temperature=0, user="text-1")
    b = client.completions.create(model=MODEL, prompt="def", max_tokens=5, temperature=0, user="text-1")
    assert b.model_extra["session"]["prefilled_tokens"] == 3 and b.usage.prompt_tokens == 3
    assert b.model_extra["session"]["reused_tokens"] == a.model_extra["session"]["tokens_seen"]


# ---- sessions ----------------------------------------------------------------------------------
def test_session_prefills_only_new_tokens_and_stays_bounded(server, tiny):
    client = server.client()
    tokenizer = tiny[2]
    messages = [{"role": "user", "content": "First question?"}]
    reply, r1 = chat(client, messages, "cont")
    s1 = r1.model_extra["session"]
    assert s1["prefilled_tokens"] == r1.usage.prompt_tokens == len(tokenizer.apply_chat_template(messages, add_generation_prompt=True)["input_ids"])
    messages += [{"role": "assistant", "content": reply}, {"role": "user", "content": "And a second one?"}]
    _, r2 = chat(client, messages, "cont")
    s2 = r2.model_extra["session"]
    new_text = "\n<|im_start|>user\nAnd a second one?<|im_end|>\n<|im_start|>assistant\n"
    new_tokens = len(tokenizer(new_text, add_special_tokens=False)["input_ids"])
    assert (s2["prefilled_tokens"], s2["reused_tokens"], s2["rebuilt"], s2["turns"]) == (new_tokens, s1["tokens_seen"], False, 2)
    assert r2.usage.prompt_tokens_details.cached_tokens == s1["tokens_seen"]
    # a conversation that does not extend the session rebuilds it, and answers like a fresh one
    other = [{"role": "user", "content": "Something else"}]
    text, r3 = chat(client, other, "cont")
    assert r3.model_extra["session"]["rebuilt"] and text == chat(client, other)[0]
    # appending (no full history resent) == resending the history; the cache never outgrows sinks+window
    replies = conversation(client, "full", ["one", "two", "three", "four"])
    appended = []
    for t in ["one", "two", "three", "four"]:
        body = {"model": MODEL, "messages": [{"role": "user", "content": t}], "max_tokens": 12, "temperature": 0,
                "session_id": "appended", "session_append": True}
        out = httpx.post(server.url + "/v1/chat/completions", json=body, timeout=30).json()
        appended.append(out["choices"][0]["message"]["content"])
        assert out["session"]["cache_tokens"] <= out["session"]["capacity"] == CONFIG.cache_size
    assert appended == replies and out["session"]["tokens_seen"] > CONFIG.cache_size


def test_concurrent_sessions_match_sequential(tiny, tmp_path):
    _, model, tokenizer = tiny
    prompts = {f"c{i}": [f"Hi {i}", f"Tell me about {'xyz'[i % 3]}", "ok", "bye"] for i in range(4)}
    # max_sessions=2 < 4 sessions: sessions are evicted and reloaded from the store between turns
    with Server(model, tokenizer, tmp_path, max_sessions=2) as srv:
        client = srv.client()
        expected = {sid: conversation(client, "seq-" + sid, texts) for sid, texts in prompts.items()}
        histories = {sid: [] for sid in prompts}
        with cf.ThreadPoolExecutor(4) as pool:
            futures = {sid: pool.submit(conversation, srv.client(), sid, texts[:3], 12, histories[sid])
                       for sid, texts in prompts.items()}
            got = {sid: f.result(timeout=60) for sid, f in futures.items()}
        reloaded = httpx.get(srv.url + "/health").json()["reloaded"]
        for sid, texts in prompts.items():  # one more turn each, in turn: at least two must come back from the store
            got[sid] += conversation(client, sid, texts[3:], 12, histories[sid])
        # two requests at once on one session are served one after the other, both kept
        def append(text):
            body = {"model": MODEL, "messages": [{"role": "user", "content": text}], "max_tokens": 8,
                    "session_id": "same", "session_append": True}
            return httpx.post(srv.url + "/v1/chat/completions", json=body, timeout=30).status_code
        with cf.ThreadPoolExecutor(2) as pool:
            assert list(pool.map(append, ["first", "second"])) == [200, 200]
        same = httpx.get(srv.url + "/v1/sessions/same").json()
        assert same["turns"] == 2 and [m["role"] for m in same["messages"]] == ["user", "assistant"] * 2
        health = httpx.get(srv.url + "/health").json()
        batched = srv.manager.scheduler.stats["max_batch_size"]
    assert got == expected
    assert batched > 1  # the concurrent replies really shared forwards
    assert health["reloaded"] >= reloaded + 2 and health["rebuilt"] == 0 and health["sessions_in_memory"] <= 2


def test_restart_continues_identically(tiny, tmp_path):
    _, model, tokenizer = tiny
    texts = ["Remember the word banana.", "What did I say?", "Again?", "Last one."]
    with Server(model, tokenizer, tmp_path / "ref") as srv:
        reference = conversation(srv.client(), "s", texts)
    with Server(model, tokenizer, tmp_path / "data") as srv:
        first = conversation(srv.client(), "s", texts[:2])
    with Server(model, tokenizer, tmp_path / "data") as srv:  # a new process would see the same files
        client = srv.client()
        messages = []
        for t, r in zip(texts[:2], first):
            messages += [{"role": "user", "content": t}, {"role": "assistant", "content": r}]
        messages.append({"role": "user", "content": texts[2]})
        third, r = chat(client, messages, "s")
        info = r.model_extra["session"]
        assert info["loaded_from"] == "snapshot" and not info["rebuilt"] and info["turns"] == 3
        messages += [{"role": "assistant", "content": third}, {"role": "user", "content": texts[3]}]
        fourth, _ = chat(client, messages, "s")
    assert first + [third, fourth] == reference


# ---- disconnects ----------------------------------------------------------------------------
def test_client_disconnect_mid_stream_rolls_back(server):
    client = server.client()
    reference = conversation(client, "dc-ref", ["Start", "Go on forever"])
    messages = [{"role": "user", "content": "Start"}]
    reply, _ = chat(client, messages, "dc")
    messages += [{"role": "assistant", "content": reply}, {"role": "user", "content": "Go on forever"}]
    before = httpx.get(server.url + "/health").json()
    body = {"model": MODEL, "messages": messages, "max_tokens": 4000, "stream": True, "temperature": 0, "session_id": "dc"}
    with httpx.stream("POST", server.url + "/v1/chat/completions", json=body, timeout=30) as r:
        events = (line for line in r.iter_lines() if line)
        for _ in range(5):
            assert next(events).startswith("data: ")
    # generation stops (an aborted turn, no stored turn), and the session is usable again at once
    deadline = time.time() + 10
    while httpx.get(server.url + "/health").json()["aborted"] == before["aborted"]:
        assert time.time() < deadline, "generation did not stop after the client left"
        time.sleep(0.05)
    stored = httpx.get(server.url + "/v1/sessions/dc").json()
    assert stored["turns"] == 1 and len(stored["messages"]) == 2
    again, r = chat(client, messages, "dc")
    assert r.model_extra["session"]["turns"] == 2 and not r.model_extra["session"]["rebuilt"]
    assert [reply, again] == reference  # as if the interrupted reply never happened


# ---- bad input --------------------------------------------------------------------------------
M = '"messages": [{"role": "user", "content": "hi"}]'
BAD = [
    ("/v1/chat/completions", "{not json", 400, None),
    ("/v1/chat/completions", "[1, 2]", 400, None),
    ("/v1/chat/completions", "", 400, None),
    ("/v1/chat/completions", '{"model": "tiny"}', 400, "messages"),
    ("/v1/chat/completions", '{"model": "tiny", "messages": []}', 400, "messages"),
    ("/v1/chat/completions", '{"model": "tiny", "messages": "hi"}', 400, "messages"),
    ("/v1/chat/completions", '{"model": "tiny", "messages": [{"role": "robot", "content": "hi"}]}', 400, "messages.0.role"),
    ("/v1/chat/completions", '{"model": "tiny", "messages": [{"role": "user"}]}', 400, "messages.0.content"),
    ("/v1/chat/completions", '{"model": "tiny", "messages": [{"role": "assistant", "content": "x"}]}', 400, "messages.0.role"),
    ("/v1/chat/completions", '{"model": "gpt-9", ' + M + "}", 404, "model"),
    ("/v1/chat/completions", '{"model": 5, ' + M + "}", 400, "model"),
    ("/v1/chat/completions", '{"model": "tiny", "max_tokens": -1, ' + M + "}", 400, "max_tokens"),
    ("/v1/chat/completions", '{"model": "tiny", "max_tokens": 0, ' + M + "}", 400, "max_tokens"),
    ("/v1/chat/completions", '{"model": "tiny", "max_tokens": 10000000, ' + M + "}", 400, "max_tokens"),
    ("/v1/chat/completions", '{"model": "tiny", "max_tokens": "12", ' + M + "}", 400, "max_tokens"),
    ("/v1/chat/completions", '{"model": "tiny", "temperature": 2.5, ' + M + "}", 400, "temperature"),
    ("/v1/chat/completions", '{"model": "tiny", "top_p": 0, ' + M + "}", 400, "top_p"),
    ("/v1/chat/completions", '{"model": "tiny", "stream": "yes", ' + M + "}", 400, "stream"),
    ("/v1/chat/completions", '{"model": "tiny", "n": 3, ' + M + "}", 400, "n"),
    ("/v1/chat/completions", '{"model": "tiny", "session_id": "a b", ' + M + "}", 400, "session_id"),
    ("/v1/completions", '{"model": "tiny", "prompt": ""}', 400, "prompt"),
    ("/v1/completions", '{"model": "tiny", "prompt": 42}', 400, "prompt"),
    ("/v1/completions", '{"model": "tiny", "prompt": "hi", "user": "chat-kind"}', 409, "session_id"),
]


def test_bad_inputs_get_openai_errors_and_server_stays_up(server):
    chat(server.client(), [{"role": "user", "content": "hi"}], "chat-kind", n=2)
    with httpx.Client(base_url=server.url, timeout=30) as http:
        for path, body, status, param in BAD:
            r = http.post(path, content=body, headers={"Content-Type": "application/json"})
            assert r.status_code == status, (body, r.text)
            err = r.json()["error"]
            assert set(err) == {"message", "type", "param", "code"} and err["message"], body
            assert err["param"] == param, (body, err)
        r = http.post("/v1/chat/completions", content=b"{" + b" " * (2 << 20) + b"}")
        assert r.status_code == 413 and "limit" in r.json()["error"]["message"]
        r = http.post("/v1/chat/completions", json={"model": MODEL, "messages": [{"role": "user", "content": "hi"}]},
                      headers={"X-Session-ID": "bad id!"})
        assert r.status_code == 400 and r.json()["error"]["param"] == "X-Session-ID"
        assert http.get("/v1/nothing").status_code == 404 and "error" in http.get("/v1/nothing").json()
        assert http.get("/health").json()["status"] == "ok"
    with pytest.raises(openai.NotFoundError):
        server.client().chat.completions.create(model="nope", messages=[{"role": "user", "content": "x"}])


# ---- API key ----------------------------------------------------------------------------------
def test_api_key_required_when_set(tiny, tmp_path):
    _, model, tokenizer = tiny
    with Server(model, tokenizer, tmp_path, api_key="sekrit") as srv:
        assert httpx.get(srv.url + "/health").status_code == 200
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "sekrit"}):
            r = httpx.get(srv.url + "/v1/models", headers=headers)
            assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        r = httpx.post(srv.url + "/v1/chat/completions", content="{bad")
        assert r.status_code == 401  # the key is checked before anything else
        with pytest.raises(openai.AuthenticationError):
            srv.client(key="wrong").models.list()
        assert chat(srv.client(key="sekrit"), [{"role": "user", "content": "hi"}], n=3)[0] is not None


def test_refuses_non_loopback_without_key(tmp_path):
    assert resolve_api_key("127.0.0.1", None) is None and resolve_api_key("::1", None) is None
    assert resolve_api_key("0.0.0.0", "k") == "k"
    env = {k: v for k, v in os.environ.items() if k != "STREAMING_LLM_API_KEY"}
    env["PYTHONPATH"] = SRC
    cmd = [sys.executable, "-m", "streaming_llm.cli", "serve", "--model", str(tmp_path / "no-such-model"), "--host", "0.0.0.0"]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "API key" in r.stderr and "no such" not in r.stderr  # refused before loading
    r = subprocess.run(cmd, env={**env, "STREAMING_LLM_API_KEY": "k"}, capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "no such" in r.stderr  # with a key it gets as far as loading


# ---- the CLI verb, killed mid-reply --------------------------------------------------------------
def serve_cmd(model_path, port, *extra):
    return [sys.executable, "-m", "streaming_llm.cli", "serve", "--model", str(model_path), "--served-model-name", MODEL,
            "--host", "127.0.0.1", "--port", str(port), "--sinks", "4", "--window", "48", "--threads", "1",
            "--log-level", "warning", *extra]


def start_serve(model_path, port, *extra, wait=60):
    env = {**os.environ, "PYTHONPATH": SRC, "OMP_WAIT_POLICY": "PASSIVE"}
    proc = subprocess.Popen(serve_cmd(model_path, port, *extra), env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + wait
    while True:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return proc
        except httpx.TransportError:
            pass
        if proc.poll() is not None or time.time() > deadline:
            proc.kill()
            raise AssertionError(f"serve did not start: {proc.stdout.read()}")
        time.sleep(0.1)



def test_cli_serve_killed_mid_reply_loses_only_that_reply(tiny, tmp_path):
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = start_serve(tiny[0], port, "--data-dir", str(tmp_path))
    try:
        client = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0)
        reply, _ = chat(client, [{"role": "user", "content": "hello"}], "k")
        body = {"model": MODEL, "messages": [{"role": "user", "content": "hello"}, {"role": "assistant", "content": reply},
                                             {"role": "user", "content": "go"}],
                "max_tokens": 2000, "stream": True, "session_id": "k", "temperature": 0}  # greedy: no early end
        with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=30) as r:
            assert r.status_code == 200
            events = (line for line in r.iter_lines() if line)
            next(events), next(events)
            proc.send_signal(signal.SIGKILL)
            proc.wait(10)
    finally:
        proc.kill()
        proc.wait(10)
    # SQLite has exactly the completed turn; a server on the same --data-dir continues from it
    record = SQLiteStore(tmp_path / "sessions.sqlite3").get("k")
    assert record.turns == 1 and [m["content"] for m in record.messages] == ["hello", reply]
    with Server(tiny[1], tiny[2], tmp_path) as srv:
        again, r = chat(srv.client(), body["messages"], "k")
    info = r.model_extra["session"]
    assert info["loaded_from"] == "snapshot" and info["turns"] == 2 and not info["rebuilt"]


@pytest.mark.parametrize("ride", [False, True])
def test_eight_batched_sessions_are_exact_and_isolated(tiny, tmp_path, ride):
    """Eight sessions with distinct content stream at once (sharing forwards): each reply equals
    the same request on a server that runs it alone, and no session sees another's tokens; with
    prompts' chunks apart (the default) or riding in the decode forwards (`--ride-chunks`)."""
    _, model, tokenizer = tiny
    prompts = {f"iso{i}": [f"Session {i} says {'abcdefgh'[i] * (i + 2)}", "and then?"] for i in range(8)}
    with Server(model, tokenizer, tmp_path / "alone", max_batch=1) as srv:
        assert srv.manager.scheduler is None
        alone = {sid: conversation(srv.client(), sid, texts, 16) for sid, texts in prompts.items()}
    with Server(model, tokenizer, tmp_path / "batched", max_batch=8, **({"ride_chunks": True} if ride else {})) as srv:
        assert srv.manager.scheduler.ride_chunks == ride
        with cf.ThreadPoolExecutor(8) as pool:
            futures = {sid: pool.submit(conversation, srv.client(), sid, texts, 16) for sid, texts in prompts.items()}
            got = {sid: f.result(timeout=120) for sid, f in futures.items()}
        stats = srv.manager.scheduler.stats
        stored = {sid: httpx.get(f"{srv.url}/v1/sessions/{sid}").json()["messages"] for sid in prompts}
    assert got == alone
    assert stats["max_batch_size"] >= 2
    for sid, texts in prompts.items():  # each stored transcript holds its own turns only
        assert [m["content"] for m in stored[sid] if m["role"] == "user"] == texts
