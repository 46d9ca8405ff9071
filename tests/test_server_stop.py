"""Stop sequences and logprobs over the real server (tiny random model, official openai client).

Stop strings are picked from a greedy reply generated first, so they really occur, and span
several tokens (the tiny tokenizer is byte-level: one token per byte). Each server test runs
batched (the default) and unbatched (`--max-batch 1`): the two restore the session's stream in
different ways (`sessions.Turn._cut`). The strongest check: after a stop, the session's stream
gives the same per-token logits, and the next turn the same reply, as a fresh session fed the
history the client saw.
"""

from __future__ import annotations

import time

import httpx
import pytest
import torch

from streaming_llm.core.engine import StreamingLLM
from streaming_llm.models.special_tokens import chat_stream_start
from streaming_llm.server.stops import StopMatcher
from test_server import CONFIG, MODEL, Server, chat, one_thread, tiny  # noqa: F401 - fixtures

USER = [{"role": "user", "content": "abc"}]  # prompts whose greedy replies have stop-able text
PROMPT = "xyz"


@pytest.fixture(scope="module", params=[16, 1], ids=["batched", "unbatched"])
def server(request, tiny, tmp_path_factory):  # noqa: F811
    _, model, tokenizer = tiny
    with Server(model, tokenizer, tmp_path_factory.mktemp("data"), max_batch=request.param) as s:
        yield s


def pick_stop(text: str, length: int = 3, after: int = 3, quiet: bool = False) -> str | None:
    """A substring of `text` of `length` characters (several tokens: the tokenizer is byte-level)
    whose first occurrence is at `after` or later, without U+FFFD (the random model's output is
    mostly bytes that are not UTF-8)."""
    for i in range(after, len(text) - length):
        s = text[i : i + length]
        if "\ufffd" not in s and text.find(s) >= after:
            return s
    if not quiet:
        raise AssertionError(f"no usable stop string in {text!r}: pick another prompt")


# ---- the matcher alone --------------------------------------------------------------------------
def test_stop_matcher_holds_back_only_what_could_become_a_stop():
    m = StopMatcher(["abc", "xy"])
    assert m.add("12a") == ("12", False)  # "a" could start "abc"
    assert m.add("b") == ("", False)
    assert m.add("d x") == ("abd ", False)  # "abd" cannot: released; "x" could start "xy"
    assert m.add("yz") == ("", True) and m.visible == "12abd "
    m = StopMatcher(["llo w"])
    assert m.add("hel") == ("he", False) and m.add("lo world") == ("", True) and m.visible == "he"
    assert StopMatcher(["o w", "ll"]).add("hello world") == ("he", True)  # the earliest occurrence wins
    m = StopMatcher(["abc"])
    assert m.add("ab") == ("", False) and m.flush() == "ab" and m.visible == "ab"


# ---- chat -----------------------------------------------------------------------------------------
def test_chat_stop_spanning_tokens_streaming_and_not(server):
    client = server.client()
    full, r = chat(client, USER, n=32)
    assert r.choices[0].finish_reason == "length" and len(full) > 10
    stop = pick_stop(full)
    expected = full[: full.find(stop)]
    text, r = chat(client, USER, n=32, stop=[stop, "\x00never"])
    assert (text, r.choices[0].finish_reason) == (expected, "stop")
    stream = client.chat.completions.create(model=MODEL, messages=USER, max_tokens=32, temperature=0, stream=True,
                                            stop=stop)
    chunks = [c for c in stream if c.choices]
    pieces = [c.choices[0].delta.content or "" for c in chunks]
    assert "".join(pieces) == expected  # nothing of the stop string was sent, not even held back parts
    assert chunks[-1].choices[0].finish_reason == "stop"
    assert sum(1 for p in pieces if p) > 1  # streamed as it went, not all at the end
    # a stop string that never occurs changes nothing
    assert chat(client, USER, n=32, stop="\x01\x02")[0] == full


def _engine_copy(server, sid):
    conv = server.manager.live[sid].conv
    engine = StreamingLLM(conv.engine.model, conv.engine.tokenizer, CONFIG)
    engine.load_state_dict(conv.engine.state_dict())
    return engine


def test_chat_stream_after_a_stop_equals_a_fresh_session_of_the_visible_history(server, tiny):
    _, model, tokenizer = tiny
    client = server.client()
    full, _ = chat(client, USER, n=40)
    stop = pick_stop(full, after=8)
    visible, r = chat(client, USER, "cut", n=40, stop=[stop], stream=False)
    assert r.choices[0].finish_reason == "stop" and r.model_extra["session"]["turns"] == 1
    stored = httpx.get(server.url + "/v1/sessions/cut").json()
    assert stored["messages"][-1] == {"role": "assistant", "content": visible}
    # the stream is the prompt, the visible reply and end-of-turn: same logits as a fresh stream of them
    session_ids = lambda text: tokenizer(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    prompt = session_ids(tokenizer.apply_chat_template(USER, tokenize=False, add_generation_prompt=True))
    ids = chat_stream_start(tokenizer, prompt) + session_ids(visible) + [tokenizer.convert_tokens_to_ids("<|im_end|>")]
    fresh = StreamingLLM(model, tokenizer, CONFIG)
    fresh.feed(ids, logits="none")
    mine = _engine_copy(server, "cut")
    assert mine.tokens_seen == fresh.tokens_seen == r.model_extra["session"]["tokens_seen"]
    probe = session_ids("\n<|im_start|>user\nAnd then?<|im_end|>\n<|im_start|>assistant\n")
    torch.testing.assert_close(mine.feed(probe, logits="all"), fresh.feed(probe, logits="all"), rtol=0, atol=1e-5)
    # the next turn answers exactly as a fresh session given the history the client saw
    history = USER + [{"role": "assistant", "content": visible}, {"role": "user", "content": "And then?"}]
    again, r2 = chat(client, history, "cut", n=16)
    assert not r2.model_extra["session"]["rebuilt"] and r2.model_extra["session"]["reused_tokens"] == r.model_extra["session"]["tokens_seen"]
    assert again == chat(client, history, "cut-fresh", n=16)[0] == chat(client, history, n=16)[0]
    # streaming with a stop leaves the same state
    stream = client.chat.completions.create(model=MODEL, messages=USER, max_tokens=40, temperature=0, stream=True,
                                            stop=[stop], extra_body={"session_id": "cut-stream"})
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == visible
    fresh = StreamingLLM(model, tokenizer, CONFIG)
    fresh.feed(ids, logits="none")
    torch.testing.assert_close(_engine_copy(server, "cut-stream").feed(probe, logits="all"),
                               fresh.feed(probe, logits="all"), rtol=0, atol=1e-5)


# ---- completions ---------------------------------------------------------------------------------
def test_completions_stop_and_session_continues_as_fresh(server):
    client = server.client()
    prompt = PROMPT
    full = client.completions.create(model=MODEL, prompt=prompt, max_tokens=32, temperature=0).choices[0].text
    stop = pick_stop(full)
    expected = full[: full.find(stop)]
    r = client.completions.create(model=MODEL, prompt=prompt, max_tokens=32, temperature=0, stop=stop, user="tcut")
    assert (r.choices[0].text, r.choices[0].finish_reason) == (expected, "stop")
    parts = list(client.completions.create(model=MODEL, prompt=prompt, max_tokens=32, temperature=0, stop=[stop],
                                           stream=True))
    assert "".join(p.choices[0].text for p in parts if p.choices) == expected
    assert [p.choices[0].finish_reason for p in parts if p.choices][-1] == "stop"
    stored = httpx.get(server.url + "/v1/sessions/tcut").json()["messages"]
    assert stored == [{"prompt": prompt, "completion": expected}]
    # the text stream holds prompt + visible completion: continuing == one fresh prompt of it all
    more = client.completions.create(model=MODEL, prompt=" and then", max_tokens=12, temperature=0, user="tcut")
    assert more.model_extra["session"]["tokens_seen"] - 12 == len((prompt + expected + " and then").encode())
    ref = client.completions.create(model=MODEL, prompt=prompt + expected + " and then", max_tokens=12, temperature=0)
    assert more.choices[0].text == ref.choices[0].text


# ---- logprobs --------------------------------------------------------------------------------------
def _reference_logprobs(model, tokenizer, ids: list[int], steps: int, k: int):
    """Greedy continuation of `ids` by plain feeds: [(token id, its logprob, top-k pairs)]."""
    engine = StreamingLLM(model, tokenizer, CONFIG)
    logits = engine.feed(ids, logits="last")
    out = []
    for _ in range(steps):
        lp = torch.log_softmax(logits.float(), -1)
        tok = int(torch.argmax(lp))
        top = torch.topk(lp, k)
        out.append((tok, float(lp[tok]), list(zip(top.indices.tolist(), top.values.tolist()))))
        logits = engine.feed([tok], logits="last")
    return out


def test_chat_logprobs_match_the_models_distribution(server, tiny):
    _, model, tokenizer = tiny
    client = server.client()
    text, r = chat(client, USER, n=10, logprobs=True, top_logprobs=3)
    content = r.choices[0].logprobs.content
    assert r.choices[0].finish_reason == "length" and len(content) == 10 == r.usage.completion_tokens
    prompt = tokenizer(tokenizer.apply_chat_template(USER, tokenize=False, add_generation_prompt=True),
                       add_special_tokens=False)["input_ids"]
    ref = _reference_logprobs(model, tokenizer, chat_stream_start(tokenizer, prompt), 10, 3)
    for entry, (tok, lp, top) in zip(content, ref):
        assert entry.token == tokenizer.decode([tok]) and entry.bytes == list(entry.token.encode())
        assert entry.logprob == pytest.approx(lp, abs=1e-4)
        assert [t.token for t in entry.top_logprobs] == [tokenizer.decode([i]) for i, _ in top]
        assert [t.logprob for t in entry.top_logprobs] == pytest.approx([v for _, v in top], abs=1e-4)
    # streaming: the same entries, spread over the chunks
    stream = client.chat.completions.create(model=MODEL, messages=USER, max_tokens=10, temperature=0, stream=True,
                                            logprobs=True, top_logprobs=3)
    streamed = [e for c in stream if c.choices and c.choices[0].logprobs for e in c.choices[0].logprobs.content]
    assert [(e.token, round(e.logprob, 4)) for e in streamed] == [(e.token, round(e.logprob, 4)) for e in content]
    # without logprobs: none; top_logprobs 0: the tokens' own logprobs only
    assert chat(client, USER, n=4)[1].choices[0].logprobs is None
    zero = chat(client, USER, n=4, logprobs=True)[1].choices[0].logprobs.content
    assert len(zero) == 4 and all(e.top_logprobs == [] for e in zero)


def test_logprobs_with_a_stop_cover_only_the_visible_tokens(server):
    client = server.client()
    full, r = chat(client, USER, n=32, logprobs=True)
    stop = pick_stop(full)
    visible, r = chat(client, USER, n=32, logprobs=True, stop=stop)
    content = r.choices[0].logprobs.content
    all_entries = chat(client, USER, n=32, logprobs=True)[1].choices[0].logprobs.content
    assert content == all_entries[: len(content)] and r.choices[0].finish_reason == "stop"
    if full.isascii():  # one character per token: the reported tokens are exactly the visible text
        assert "".join(e.token for e in content) == visible


def test_completions_logprobs_legacy_shape(server, tiny):
    _, model, tokenizer = tiny
    client = server.client()
    r = client.completions.create(model=MODEL, prompt="abc", max_tokens=8, temperature=0, logprobs=2)
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == 8
    ref = _reference_logprobs(model, tokenizer, tokenizer("abc", add_special_tokens=False)["input_ids"], 8, 2)
    assert lp.token_logprobs == pytest.approx([v for _, v, _ in ref], abs=1e-4)
    assert [list(d) for d in lp.top_logprobs] == [[tokenizer.decode([i]) for i, _ in top] for _, _, top in ref]
    assert lp.text_offset[0] == 0 and lp.text_offset == sorted(lp.text_offset)
    parts = list(client.completions.create(model=MODEL, prompt="abc", max_tokens=8, temperature=0, logprobs=2,
                                           stream=True))
    streamed = [t for p in parts if p.choices and p.choices[0].logprobs for t in p.choices[0].logprobs.token_logprobs]
    assert streamed == pytest.approx(lp.token_logprobs, abs=1e-6)


# ---- bad input ------------------------------------------------------------------------------------
M = '"model": "tiny", "messages": [{"role": "user", "content": "hi"}]'
BAD = [
    ("/v1/chat/completions", "{" + M + ', "stop": ["a", "b", "c", "d", "e"]}', "stop"),
    ("/v1/chat/completions", "{" + M + ', "stop": 3}', "stop"),
    ("/v1/chat/completions", "{" + M + ', "stop": [1]}', "stop"),
    ("/v1/chat/completions", "{" + M + ', "logprobs": "yes"}', "logprobs"),
    ("/v1/chat/completions", "{" + M + ', "logprobs": true, "top_logprobs": 21}', "top_logprobs"),
    ("/v1/chat/completions", "{" + M + ', "top_logprobs": 2}', "top_logprobs"),
    ("/v1/completions", '{"model": "tiny", "prompt": "hi", "logprobs": 6}', "logprobs"),
    ("/v1/completions", '{"model": "tiny", "prompt": "hi", "logprobs": true}', "logprobs"),
]


@pytest.mark.parametrize("route,body,param", BAD)
def test_bad_stop_and_logprobs_get_400(server, route, body, param):
    r = httpx.post(server.url + route, content=body, headers={"Content-Type": "application/json"}, timeout=30)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param and err["type"] == "invalid_request_error"


# ---- LangChain ------------------------------------------------------------------------------------
def test_langchain_invoke_and_stream_with_stop(server):
    langchain_openai = pytest.importorskip("langchain_openai")
    client = server.client()
    full, _ = chat(client, USER, n=32)
    stop = pick_stop(full)
    expected = full[: full.find(stop)]
    llm = langchain_openai.ChatOpenAI(model=MODEL, base_url=server.url + "/v1", api_key="unused", temperature=0,
                                      max_tokens=32, max_retries=0)
    msg = llm.invoke("abc", stop=[stop])
    assert msg.content == expected and msg.response_metadata["finish_reason"] == "stop"
    assert "".join(c.content for c in llm.stream("abc", stop=[stop])) == expected


# ---- edges: a stop at the very start, a reload from the store, concurrent stops ----------------------
def test_stop_at_the_start_and_after_a_reload_from_the_store(server):
    client = server.client()
    full, _ = chat(client, USER, n=24)
    text, r = chat(client, USER, "edge0", n=24, stop=full[:3])
    assert (text, r.choices[0].finish_reason) == ("", "stop")
    history = USER + [{"role": "assistant", "content": ""}, {"role": "user", "content": "More"}]
    again, r = chat(client, history, "edge0", n=12)
    assert not r.model_extra["session"]["rebuilt"] and again == chat(client, history, n=12)[0]
    # a cut turn's stored snapshot continues like the live session and like a fresh one
    cut, _ = chat(client, USER, "edge", n=24, stop=[pick_stop(full)])
    server.manager.drop("edge")  # the next request reloads the stored snapshot of the cut turn
    history = USER + [{"role": "assistant", "content": cut}, {"role": "user", "content": "Again"}]
    again, r = chat(client, history, "edge", n=12)
    assert r.model_extra["session"]["loaded_from"] == "snapshot" and not r.model_extra["session"]["rebuilt"]
    assert again == chat(client, history, n=12)[0]


def test_concurrent_stops_match_sequential(server):
    import concurrent.futures as cf

    client = server.client()
    users = [[{"role": "user", "content": u}] for u in ("abc", "hi", "abc", "hi")]  # with stop-able replies
    fulls = [chat(client, u, n=32)[0] for u in users]
    stops = [[pick_stop(f, after=2 + i)] for i, f in enumerate(fulls)]
    expected = [f[: f.find(s[0])] for f, s in zip(fulls, stops)]

    def run(i):
        first, _ = chat(client, users[i], f"conc-{server.manager.max_batch}-{i}", n=32, stop=stops[i])
        history = users[i] + [{"role": "assistant", "content": first}, {"role": "user", "content": "ok"}]
        return first, chat(client, history, f"conc-{server.manager.max_batch}-{i}", n=12)[0], history

    with cf.ThreadPoolExecutor(4) as pool:
        results = list(pool.map(run, range(4)))
    assert [r[0] for r in results] == expected
    assert [r[1] for r in results] == [chat(client, r[2], n=12)[0] for r in results]


def test_disconnect_during_a_stop_request_still_rolls_back(server):
    client = server.client()
    sid = f"dc-stop-{server.manager.max_batch}"
    full, _ = chat(client, USER, n=24)
    first, _ = chat(client, USER, sid, n=24, stop=[pick_stop(full)])
    history = USER + [{"role": "assistant", "content": first}, {"role": "user", "content": "Go on"}]
    before = httpx.get(server.url + "/health").json()["aborted"]
    body = {"model": MODEL, "messages": history, "max_tokens": 2000, "stream": True, "temperature": 0,
            "session_id": sid, "stop": ["\x00\x01", "\x02"]}
    with httpx.stream("POST", server.url + "/v1/chat/completions", json=body, timeout=30) as r:
        events = (line for line in r.iter_lines() if line)
        for _ in range(3):
            assert next(events).startswith("data: ")
    deadline = time.time() + 10
    while httpx.get(server.url + "/health").json()["aborted"] == before:
        assert time.time() < deadline, "generation did not stop after the client left"
        time.sleep(0.05)
    assert httpx.get(server.url + f"/v1/sessions/{sid}").json()["turns"] == 1
    again, r = chat(client, history, sid, n=12)
    assert r.model_extra["session"]["turns"] == 2 and again == chat(client, history, n=12)[0]
