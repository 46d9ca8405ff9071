"""The chat session (multi-turn on one stream) and the `streaming-llm chat` command, on tiny models."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
import torch

from streaming_llm.core.config import StreamingConfig
from streaming_llm.core.engine import StreamingLLM
from streaming_llm.errors import UserError
from streaming_llm.core.sampling import SamplingParams
from streaming_llm.chat.session import ChatSession
from tiny_models import save_tiny_model

GREEDY = SamplingParams(temperature=0)
SRC = str(Path(__file__).resolve().parents[1] / "src")


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("tiny") / "llama")


@pytest.fixture(scope="module")
def tiny(tiny_dir):
    import transformers as tf

    return tf.AutoModelForCausalLM.from_pretrained(tiny_dir).eval(), tf.AutoTokenizer.from_pretrained(tiny_dir)


def make_session(tiny, system="be brief", **config):
    model, tok = tiny
    config = {"sinks": 4, "window": 60, "chunk_size": 16, **config}
    return ChatSession(StreamingLLM(model, tok, StreamingConfig(**config)), system=system)


def record_feeds(session):
    """Wrap the engine's feed: returns the list every fed token id is appended to."""
    fed, calls, orig = [], [], session.engine.feed

    def feed(ids, logits="all"):
        ids = torch.as_tensor(ids).reshape(-1).tolist()
        fed.extend(ids)
        calls.append(len(ids))
        return orig(ids, logits)

    session.engine.feed = feed
    return fed, calls


def scripted_sampler(monkeypatch, ids_per_turn):
    """Make generation emit the given ids (per turn, in order) whatever the logits."""
    import streaming_llm.core.engine as engine_mod

    turns = iter(ids_per_turn)

    class Scripted:
        def __init__(self, params, device="cpu"):
            self.ids = iter(next(turns))

        def sample(self, logits, previous=None):
            return next(self.ids)

    monkeypatch.setattr(engine_mod, "Sampler", Scripted)


def transcript_text(session):
    """What the stream must hold: the rendered conversation, up to the last end-of-turn token."""
    text = session.render(session.messages, add_generation_prompt=False)
    assert text.endswith(session.eot_text + session.eot_separator)
    return text[: len(text) - len(session.eot_separator)]


# ---- session ---------------------------------------------------------------------------------


def test_each_turn_prefills_only_the_new_tokens(tiny):
    s = make_session(tiny, window=4000)
    fed, calls = record_feeds(s)
    for i, n in enumerate([7, 3, 12]):
        before = len(fed)
        out = list(s.reply(f"message number {i}", max_new_tokens=n, sampling=GREEDY))
        assert len(out) == n and out[-1].finish_reason == "length"
        turn = s.turns[-1]
        assert calls[-(n + 2)] == turn.prompt_tokens  # one prefill call, n decode feeds, one end-of-turn feed
        new_text = s.tokenizer.decode(fed[before : before + turn.prompt_tokens], skip_special_tokens=False)
        assert new_text.endswith(f"<|im_start|>user\nmessage number {i}<|im_end|>\n<|im_start|>assistant\n")
        if i:  # only the new turn, not the conversation again
            assert new_text == f"\n<|im_start|>user\nmessage number {i}<|im_end|>\n<|im_start|>assistant\n"
    # The stream is exactly the rendered conversation, fed once.
    assert s.tokenizer.decode(fed, skip_special_tokens=False) == transcript_text(s)
    assert s.engine.tokens_seen == len(fed)
    assert [m["role"] for m in s.messages] == ["system", "user", "assistant"] * 1 + ["user", "assistant"] * 2


def test_reply_stops_on_end_of_turn_and_feeds_it(tiny, monkeypatch):
    s = make_session(tiny)
    eot = s.eot_id
    a, b = s.encode("ab"), s.encode("xyz")
    scripted_sampler(monkeypatch, [a + [eot, 70, 71], b + [eot]])
    fed, _ = record_feeds(s)
    out = list(s.reply("hi", max_new_tokens=10))
    assert [t.id for t in out] == a + [eot] and out[-1].finish_reason == "stop" and out[-1].text == ""
    assert "".join(t.text for t in out) == "ab" == s.messages[-1]["content"]
    assert s.turns[-1].generated_tokens == 3 and s.turns[-1].finish_reason == "stop"
    list(s.reply("again", max_new_tokens=10))
    assert s.messages[-1] == {"role": "assistant", "content": "xyz"}
    assert s.tokenizer.decode(fed, skip_special_tokens=False) == transcript_text(s)


def test_non_prefix_stable_template_falls_back_to_the_new_turn(tiny, monkeypatch):
    s = make_session(tiny)
    other = s.encode("!")[0]
    s.stop_ids = s.stop_ids + [other]  # a stop token the template does not write: stream != rendering
    scripted_sampler(monkeypatch, [s.encode("ok") + [other], s.encode("fine") + [s.eot_id]])
    fed, _ = record_feeds(s)
    list(s.reply("one", max_new_tokens=5))
    assert s.messages[-1]["content"] == "ok"
    list(s.reply("two", max_new_tokens=5))
    text = s.tokenizer.decode(fed, skip_special_tokens=False)
    # the end-of-turn token is fed after the odd stop token, then only the new turn
    assert text.endswith("ok!<|im_end|>\n<|im_start|>user\ntwo<|im_end|>\n<|im_start|>assistant\nfine<|im_end|>")
    assert text.count("<|im_start|>user\none") == 1


def test_interrupted_reply_leaves_a_consistent_session(tiny):
    s = make_session(tiny, window=4000)
    fed, _ = record_feeds(s)
    it = s.reply("tell me a long story", max_new_tokens=50, sampling=GREEDY)
    got = [next(it) for _ in range(5)]  # the caller stops iterating (keeps `it` alive)
    s.stats()  # any next call settles the interrupted reply
    assert s.turns[-1].finish_reason == "interrupted" and s.turns[-1].generated_tokens == 5
    assert s.messages[-1] == {"role": "assistant", "content": s.tokenizer.decode([t.id for t in got], skip_special_tokens=True)}
    assert fed[-1] == s.eot_id and s.engine.tokens_seen == len(fed)
    with pytest.raises(StopIteration):
        next(it)
    # the conversation goes on, and the stream is still exactly the transcript
    for tok in s.reply("go on", max_new_tokens=4, sampling=GREEDY):
        break  # a `for ... break` settles on the next call as well
    list(s.reply("and?", max_new_tokens=3, sampling=GREEDY))
    assert [m["role"] for m in s.messages[1:]] == ["user", "assistant"] * 3
    assert s.tokenizer.decode(fed, skip_special_tokens=False) == transcript_text(s)


def test_save_and_load_continue_token_for_token(tiny, tmp_path):
    a = make_session(tiny, window=40)
    for msg in ["first", "second"]:
        list(a.reply(msg, max_new_tokens=12, sampling=GREEDY))
    a.save(tmp_path / "s.pt")
    snapshot = a.state_dict()  # in memory (what the server stores), a copy
    b = make_session(tiny, system=None, window=999)  # other settings: load adopts the saved ones
    b.load(tmp_path / "s.pt")
    assert b.engine.config == a.engine.config and b.messages == a.messages
    c = make_session(tiny)
    for msg in ["third", "fourth, a little longer than the others"]:
        sampling = SamplingParams(temperature=1.0, seed=3)
        ta = [t.id for t in a.reply(msg, max_new_tokens=15, sampling=sampling)]
        tb = [t.id for t in b.reply(msg, max_new_tokens=15, sampling=sampling)]
        assert ta == tb
    c.load_state_dict(snapshot)  # taken before a went on: unchanged by it
    for msg in ["third", "fourth, a little longer than the others"]:
        list(c.reply(msg, max_new_tokens=15, sampling=SamplingParams(temperature=1.0, seed=3)))
    assert c.messages == a.messages
    assert a.stats().tokens_seen == b.stats().tokens_seen == c.stats().tokens_seen and a.engine.evicted > 0
    with pytest.raises(UserError, match="no saved session"):
        b.load(tmp_path / "missing.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a session")
    with pytest.raises(UserError, match="not a saved chat session"):
        b.load(tmp_path / "junk.pt")


def test_server_flow_extends_a_matching_conversation(tiny):
    s = make_session(tiny, system=None)
    list(s.reply("hello", max_new_tokens=5, sampling=GREEDY))
    conv = s.messages + [{"role": "user", "content": "and now?"}]
    assert s.matches_prefix(conv) and s.matches_prefix(s.messages)
    assert not s.matches_prefix([{"role": "user", "content": "something else"}] + conv[1:])
    assert not s.matches_prefix(conv[:1])
    s.extend(conv[len(s.messages) :])
    list(s.generate(max_new_tokens=4, sampling=GREEDY))
    assert s.turns[-1].prompt_tokens < 30 and len(s.messages) == 4
    s.reset()
    s.extend([{"role": "system", "content": "sys"}, {"role": "user", "content": "x"}])
    list(s.generate(max_new_tokens=2, sampling=GREEDY))
    assert s.system == "sys" and s.engine.tokens_seen == s.turns[-1].prompt_tokens + 2 + 1
    with pytest.raises(UserError):
        s.extend([{"role": "user"}])


def test_long_messages_and_every_method_stay_within_the_cache(tiny):
    for method in ("streaming", "window", "dense", "recompute"):
        s = make_session(tiny, method=method, window=30)
        seen = []
        for i in range(3):
            for tok in s.reply("a long message " * 8, max_new_tokens=6, sampling=GREEDY):
                seen.append(tok.cache_tokens)
        st = s.stats()
        assert st.tokens_seen > 3 * 100 and st.turns == 3
        if method == "dense":
            assert st.capacity is None and st.cache_tokens == st.tokens_seen and "unbounded" in st.line()
        else:
            assert max(seen) <= s.engine.config.cache_size == st.capacity
            assert st.evicted == st.tokens_seen - st.cache_tokens > 0


def test_status_line_reports_the_recall_memory(tiny):
    plain = make_session(tiny, window=30)
    s = make_session(tiny, window=30, recall_blocks=2, block_size=8)
    for session in (plain, s):
        for _ in range(3):
            list(session.reply("a long message " * 8, max_new_tokens=6, sampling=GREEDY))
    st = s.stats()
    memory = s.engine.cache.memories[0]
    assert st.recall_tokens == memory.stored_tokens > 0 and st.recalled_tokens == 2 * 8
    assert f"recall memory {st.recall_tokens:,} (16 recalled)" in st.line()
    assert plain.stats().recall_tokens is None and "recall" not in plain.stats().line()


def test_reset_and_bad_arguments(tiny):
    s = make_session(tiny)
    list(s.reply("hi", max_new_tokens=3, sampling=GREEDY))
    s.reset("new system")
    assert s.messages == [{"role": "system", "content": "new system"}] and s.engine.tokens_seen == 0
    assert s.stats().turns == 0
    with pytest.raises(UserError):
        s.reply("hi", max_new_tokens=0)
    model, _ = tiny
    with pytest.raises(UserError, match="chat template"):
        ChatSession(StreamingLLM(model, None, StreamingConfig()))


# ---- the `chat` command: scripted mode -------------------------------------------------------

KEYS = {"turn", "user", "assistant", "prompt_tokens", "generated_tokens", "total_tokens_seen", "cache_tokens", "ms_per_token"}


def run_cli(argv):
    from streaming_llm.cli import main

    return main(["chat", *map(str, argv)])


def test_scripted_mode_end_to_end(tiny_dir, tmp_path, capsys):
    msgs = ["hello there", "", "what is a cache?", "x" * 150, "ünïcödé ✓", "and finally, the last one"]
    script = tmp_path / "turns.txt"
    script.write_bytes("\n".join(msgs).encode() + b"\nbad \xff\xfe bytes\n")
    out = tmp_path / "out.jsonl"
    rc = run_cli(["--model", tiny_dir, "--window", 40, "--script", script, "--transcript", out,
                  "--max-new-tokens", 7, "--seed", 5, "--no-progress"])
    assert rc == 0
    rows = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    users = [m for m in msgs if m] + ["bad \ufffd\ufffd bytes"]
    assert [r["turn"] for r in rows] == list(range(1, len(users) + 1)) and [r["user"] for r in rows] == users
    seen = [r["total_tokens_seen"] for r in rows]
    for r in rows:
        assert KEYS <= set(r)
        assert 0 < r["cache_tokens"] <= 44 and 1 <= r["generated_tokens"] <= 7 and r["ms_per_token"] > 0
        assert r["prompt_tokens"] > 0 and isinstance(r["assistant"], str)
    assert seen == sorted(seen) and len(set(seen)) == len(seen) and seen[-1] > 200
    assert rows[2]["prompt_tokens"] > 150  # a message longer than the cache is chunk-prefilled
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["turns"] == len(users) and summary["max_cache_tokens"] == 44 and summary["capacity"] == 44
    # the same seed gives the same conversation
    out2 = tmp_path / "out2.jsonl"
    run_cli(["--model", tiny_dir, "--window", 40, "--script", script, "--transcript", out2,
             "--max-new-tokens", 7, "--seed", 5, "--no-progress"])
    assert [json.loads(line)["assistant"] for line in out2.read_text(encoding="utf-8").splitlines()] == [
        r["assistant"] for r in rows]


@pytest.mark.parametrize("method", ["dense", "window"])
def test_scripted_baselines_run(tiny_dir, tmp_path, capsys, method):
    script = tmp_path / "t.txt"
    script.write_text("one message\nanother message here\na third\n")
    rc = run_cli(["--model", tiny_dir, "--method", method, "--window", 30, "--script", script,
                  "--max-new-tokens", 5, "--temperature", 0])
    assert rc == 0
    out = capsys.readouterr().out
    summary = json.loads(out.strip().splitlines()[-1])
    assert ">>> another message here" in out  # without --transcript the conversation is printed
    if method == "dense":
        assert summary["capacity"] is None and summary["max_cache_tokens"] == summary["total_tokens_seen"]
    else:
        assert summary["sinks"] == 0 and summary["max_cache_tokens"] == 30 < summary["total_tokens_seen"]


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--script", "/nonexistent/turns.txt"], "script file not found"),
        (["--script", "{script}", "--transcript", "/nonexistent/dir/out.jsonl"], "cannot write transcript"),
        (["--script", "{empty}"], "has no messages"),
        (["--temperature", "-1"], "temperature"),
        (["--max-new-tokens", "0"], "max-new-tokens"),
        (["--window", "0"], "window"),
    ],
)
def test_bad_arguments_fail_clearly_before_loading(tmp_path, capsys, argv, message):
    (tmp_path / "s.txt").write_text("hi\n")
    (tmp_path / "e.txt").write_text("\n  \n")
    argv = [a.format(script=tmp_path / "s.txt", empty=tmp_path / "e.txt") for a in argv]
    rc = run_cli(["--model", "/nonexistent/model", *argv])  # the model is never reached
    err = capsys.readouterr().err
    assert rc == 2 and message in err and "model" not in err.split("error:", 1)[1].replace("max-new-tokens", "")


# ---- the `chat` command: interactive, through a pseudo-terminal ------------------------------

STATUS = r"\[tokens seen [\d,]+ \| cache [\d,]+/44 \| evicted [\d,]+ \| prefill [\d,]+ tok/s \| gen [\d,.]+ tok/s\]"


def spawn_chat(tiny_dir, *extra):
    pexpect = pytest.importorskip("pexpect")
    env = {**os.environ, "PYTHONPATH": SRC, "TERM": "dumb", "NO_COLOR": "1"}
    argv = ["-m", "streaming_llm.cli", "chat", "--model", tiny_dir, "--window", "40", "--temperature", "0", *extra]
    child = pexpect.spawn(sys.executable, argv, env=env, encoding="utf-8", codec_errors="replace", timeout=60)
    child.expect_exact("Type /help for commands")
    child.expect_exact(">>> ")
    return child


def test_repl_messages_commands_and_bad_input(tiny_dir, tmp_path):
    child = spawn_chat(tiny_dir, "--max-new-tokens", "6")
    child.sendline("hello, who are you?")
    child.expect(STATUS)
    child.expect_exact(">>> ")
    child.sendline("")  # an empty line does nothing
    child.expect_exact(">>> ")
    child.sendline("/stats")
    child.expect(r"turns 1 \| messages 2 \| streaming, sinks 4, window 40")
    child.expect(STATUS)
    child.expect_exact(">>> ")
    child.sendline("/frobnicate")
    child.expect_exact("unknown command: /frobnicate")
    child.expect_exact("/quit")  # the help follows
    child.expect_exact(">>> ")
    os.write(child.child_fd, b"bad \xff\xfe bytes\r")  # not UTF-8: must not crash
    child.expect(STATUS)
    child.expect_exact(">>> ")
    save = tmp_path / "chat.pt"
    child.sendline(f"/save {save}")
    child.expect_exact("saved 2 turns")
    child.sendline("/reset")
    child.expect_exact("(new conversation)")
    child.sendline(f"/load {save}")
    child.expect_exact("loaded 2 turns")
    child.expect(STATUS)
    child.sendline("/load /nonexistent/chat.pt")
    child.expect_exact("error: no saved session")
    child.expect_exact(">>> ")
    child.sendintr()  # Ctrl-C at the prompt exits cleanly
    child.expect(pexpect_eof())
    child.close()
    assert child.exitstatus == 0


def test_repl_ctrl_c_stops_a_reply_and_keeps_the_session(tiny_dir):
    child = spawn_chat(tiny_dir, "--max-new-tokens", "100000")
    child.sendline("tell me a very long story")
    child.expect_exact("tell me a very long story")
    child.expect(r"\S")  # the reply is streaming
    child.sendintr()
    child.expect_exact("[interrupted]")
    child.expect(STATUS)
    child.expect_exact(">>> ")
    child.sendline("/stats")
    child.expect(r"turns 1 \| messages 2")
    child.expect_exact(">>> ")
    child.sendline("another one")
    child.expect_exact("another one")
    child.expect(r"\S")
    child.sendintr()
    child.expect_exact("[interrupted]")
    child.expect(STATUS)
    child.expect_exact(">>> ")
    child.sendeof()  # Ctrl-D exits
    child.expect(pexpect_eof())
    child.close()
    assert child.exitstatus == 0


def pexpect_eof():
    import pexpect

    return pexpect.EOF


def test_long_chat_benchmark_runs_on_a_tiny_model(tiny_dir, tmp_path):
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "long_chat.py"
    spec = importlib.util.spec_from_file_location("long_chat", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    argv = ["--model", tiny_dir, "--turns", "6", "--window", "30", "--max-new-tokens", "5",
            "--min-times-context", "0", "--score-prompts", "--out", str(tmp_path)]
    threads = torch.get_num_threads()
    try:
        assert bench.main(argv) == 0
    finally:
        torch.set_num_threads(threads)  # the benchmark sets it for the whole process
    rows = [json.loads(line) for line in (tmp_path / "streaming_transcript.jsonl").read_text().splitlines()]
    summary = json.loads((tmp_path / "streaming_summary.json").read_text())
    assert len(rows) == 6 and KEYS <= set(rows[0]) and summary["max_cache_tokens"] == 34
    assert all(r["prompt_nll"] > 0 for r in rows) and summary["prompt_nll_by_tokens_seen"]
    assert summary["checks"]["cache_never_above_sinks_plus_window"]
    assert len((tmp_path / "turns.txt").read_text().splitlines()) == 6
    assert "Sample replies" in (tmp_path / "streaming_summary.md").read_text()


def test_text_decoder_pieces_add_up_to_the_full_decode():
    """Incremental decoding (O(1) per token) emits exactly the text of decoding all ids at once,
    never a partial UTF-8 character, including multi-byte characters split over byte tokens."""
    from streaming_llm.core.sampling import TextDecoder
    from tests.tiny_models import tiny_tokenizer

    tok = tiny_tokenizer()
    text = "Grüße, 世界! naïve café 🙂 <|im_end|> end"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    rng = __import__("random").Random(0)
    ids = ids + [rng.randrange(len(tok)) for _ in range(200)]  # random bytes: invalid UTF-8 too
    dec = TextDecoder(tok)
    pieces, held = [], []
    for i in ids:
        pieces.append(dec.add(i))
        held.append(len(dec.ids))
    pieces.append(dec.flush())
    n_text = len(tok(text, add_special_tokens=False)["input_ids"])
    assert max(held[:n_text]) <= 8  # decodes only the last piece and the new ids: constant work per token
    assert "".join(pieces) == tok.decode(ids, skip_special_tokens=True)
    assert all("\ufffd" not in p for p in pieces[: len(text) // 2])  # the valid prefix: whole characters only
    assert len(dec.ids) == 0
