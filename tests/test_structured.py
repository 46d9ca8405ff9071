"""`response_format` (JSON mode, JSON schema, the openai client's `.parse()`) and litellm, against a
real server on a tiny random model, batched (max_batch 4) and unbatched (max_batch 1).

A random model makes these tests strong: without the grammar mask its output is never valid JSON
(`test_without_response_format_not_json` checks that), so every parse below is the constraint's doing.
"""

from __future__ import annotations

import json
from typing import Literal

import httpx
import pytest
from pydantic import BaseModel, Field

from test_server import MODEL, Server, one_thread, tiny  # noqa: F401 - fixtures used by name

pytest.importorskip("xgrammar")

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 6},
        "ok": {"type": "boolean"},
        "color": {"type": "string", "enum": ["red", "green", "blue"]},
        "n": {"type": "integer", "minimum": 0, "maximum": 99},
    },
    "required": ["name", "ok", "color", "n"],
    "additionalProperties": False,
}
JSON_SCHEMA = {"type": "json_schema", "json_schema": {"name": "thing", "schema": SCHEMA, "strict": True}}


class Thing(BaseModel):
    name: str = Field(max_length=6)
    ok: bool
    color: Literal["red", "green", "blue"]


@pytest.fixture(scope="module", params=[4, 1], ids=["batched", "unbatched"])
def server(tiny, tmp_path_factory, request):
    _, model, tokenizer = tiny
    with Server(model, tokenizer, tmp_path_factory.mktemp("data"), max_batch=request.param) as s:
        yield s


def ask(client, fmt, seed=0, n=96, temperature=1.0, stream=False, **kw):
    """(text, finish_reason) of one chat request."""
    args = dict(model=MODEL, messages=[{"role": "user", "content": "Give me JSON."}], max_tokens=n,
                temperature=temperature, seed=seed, **kw)
    if fmt is not None:
        args["response_format"] = fmt
    if not stream:
        r = client.chat.completions.create(**args)
        return r.choices[0].message.content, r.choices[0].finish_reason
    text, finish = "", None
    for chunk in client.chat.completions.create(stream=True, **args):
        if chunk.choices:
            text += chunk.choices[0].delta.content or ""
            finish = chunk.choices[0].finish_reason or finish
    return text, finish


def check_schema(obj):
    try:
        import jsonschema
    except ImportError:  # by hand
        assert set(obj) == set(SCHEMA["required"]) and isinstance(obj["ok"], bool) and obj["color"] in ("red", "green", "blue")
        assert isinstance(obj["name"], str) and len(obj["name"]) <= 6 and 0 <= obj["n"] <= 99
        return
    jsonschema.validate(obj, SCHEMA)


def test_without_response_format_not_json(server):
    client = server.client()
    for seed in range(3):
        text, _ = ask(client, None, seed=seed, n=24)
        with pytest.raises(ValueError):
            json.loads(text)


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "sse"])
def test_json_object(server, stream):
    client = server.client()
    finished = 0
    for seed in range(4):
        text, finish = ask(client, {"type": "json_object"}, seed=seed, n=64, stream=stream)
        if finish == "stop":
            assert isinstance(json.loads(text), dict), text
            finished += 1
        else:  # "length": a prefix of a JSON object, as with OpenAI
            assert finish == "length" and text.startswith("{")
    assert finished >= 1  # a random model closes some objects within 64 tokens


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "sse"])
@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_json_schema(server, stream, temperature):
    client = server.client()
    for seed in range(3):
        text, finish = ask(client, JSON_SCHEMA, seed=seed, temperature=temperature, stream=stream)
        assert finish == "stop", text
        check_schema(json.loads(text))


def test_completions_json_schema(server):
    r = httpx.post(server.url + "/v1/completions", json={"model": MODEL, "prompt": "{", "max_tokens": 96, "seed": 1,
                                                          "response_format": JSON_SCHEMA}, timeout=30)
    assert r.status_code == 200, r.text
    check_schema(json.loads(r.json()["choices"][0]["text"]))


def test_parse_with_pydantic(server):
    client = server.client()
    parse = getattr(client.chat.completions, "parse", None) or client.beta.chat.completions.parse
    for seed in range(2):
        r = parse(model=MODEL, messages=[{"role": "user", "content": "A thing?"}], response_format=Thing,
                  max_tokens=96, seed=seed, temperature=0.8)
        thing = r.choices[0].message.parsed
        assert isinstance(thing, Thing) and len(thing.name) <= 6, r.choices[0].message.content


def test_session_holds_constrained_reply(server):
    client = server.client()
    sid = f"json-{server.manager.max_batch}"
    text, finish = ask(client, JSON_SCHEMA, seed=3, extra_body={"session_id": sid})
    assert finish == "stop"
    info = httpx.get(f"{server.url}/v1/sessions/{sid}", timeout=10).json()
    assert info["messages"][-1] == {"role": "assistant", "content": text}
    ask(client, None, seed=4, n=8, extra_body={"session_id": sid})  # the session goes on as usual


@pytest.mark.parametrize("fmt,param", [
    ("json", "response_format"),
    ({"type": "yaml"}, "response_format.type"),
    ({"type": "json_schema"}, "response_format.json_schema"),
    ({"type": "json_schema", "json_schema": {"schema": SCHEMA}}, "response_format.json_schema.name"),
    ({"type": "json_schema", "json_schema": {"name": "bad name!", "schema": SCHEMA}}, "response_format.json_schema.name"),
    ({"type": "json_schema", "json_schema": {"name": "x", "schema": [1]}}, "response_format.json_schema.schema"),
    ({"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "frob"}}}, "response_format.json_schema.schema"),
    ({"type": "json_schema", "json_schema": {"name": "x", "schema": {"$ref": "#/nope"}}}, "response_format.json_schema.schema"),
    ({"type": "json_schema", "json_schema": {"name": "x", "schema": SCHEMA, "strict": "yes"}}, "response_format.json_schema.strict"),
])
def test_bad_response_format(server, fmt, param):
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, "response_format": fmt}
    r = httpx.post(server.url + "/v1/chat/completions", json=body, timeout=30)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param and err["type"] == "invalid_request_error" and err["message"]


def test_text_format_unchanged(server):
    client = server.client()
    plain = ask(client, None, seed=5, n=12, temperature=0)
    assert ask(client, {"type": "text"}, seed=5, n=12, temperature=0) == plain


# ---- litellm ---------------------------------------------------------------------------------
@pytest.mark.parametrize("stream", [False, True], ids=["whole", "sse"])
def test_litellm(server, stream, monkeypatch):
    monkeypatch.setenv("LITELLM_LOCAL_MODEL_COST_MAP", "True")  # no download of the cost map
    litellm = pytest.importorskip("litellm")
    args = dict(model=f"openai/{MODEL}", api_base=server.url + "/v1", api_key="x", max_tokens=8, temperature=0,
                messages=[{"role": "user", "content": "Hello"}])
    r = server.client().chat.completions.create(**{k: v for k, v in args.items() if k not in ("api_base", "api_key", "model")},
                                                 model=MODEL)
    expected = r.choices[0].message.content
    if not stream:
        r = litellm.completion(**args)
        assert r.choices[0].message.content == expected
        assert r.usage.completion_tokens >= 1
    else:
        text = "".join(c.choices[0].delta.content or "" for c in litellm.completion(stream=True, **args) if c.choices)
        assert text == expected
    r = litellm.completion(**dict(args, max_tokens=96, temperature=0.5), response_format=JSON_SCHEMA)
    check_schema(json.loads(r.choices[0].message.content))

