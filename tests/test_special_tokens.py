"""The special-token rules of a stream (models/special_tokens.py) on tiny models: BOS first exactly
when the tokenizer metadata asks for it, on every raw-text path; one end-of-turn rule."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from streaming_llm.cli import main
from streaming_llm.core.config import StreamingConfig
from streaming_llm.core.engine import StreamingLLM
from streaming_llm.errors import UserError
from streaming_llm.models import special_tokens as st
from streaming_llm.models.loading import load_model
from tiny_models import CHATML, save_tiny_model, tiny_tokenizer

TEXT = "It is a truth universally acknowledged, that a single man in possession of a good fortune. " * 4


def bos_tokenizer():
    """tiny_tokenizer whose post-processor prepends BOS (like Gemma's converted tokenizer)."""
    from tokenizers import processors

    tok = tiny_tokenizer()
    b = tok.bos_token_id
    tok.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single="<|endoftext|> $A", pair="<|endoftext|> $A <|endoftext|> $B", special_tokens=[("<|endoftext|>", b)]
    )
    return tok


def save_bos_model(path, config_flag=None):
    """A tiny model folder whose tokenizer prepends BOS; `config_flag` writes an explicit add_bos_token."""
    save_tiny_model(path)
    tok = bos_tokenizer()
    tok.save_pretrained(path)
    if config_flag is not None:
        cfg = path / "tokenizer_config.json"
        data = json.loads(cfg.read_text())
        data["add_bos_token"] = config_flag
        cfg.write_text(json.dumps(data))
    return str(path)


@pytest.fixture(scope="module")
def plain_dir(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("plain") / "m")


@pytest.fixture(scope="module")
def bos_dir(tmp_path_factory):
    return save_bos_model(tmp_path_factory.mktemp("bos") / "m")


def write_gguf(path, add_bos):
    import gguf

    w = gguf.GGUFWriter(str(path), "llama")
    w.add_array("tokenizer.ggml.tokens", ["a", "bb", "ccc"] * 50)  # an array before the key: skipped
    if add_bos is not None:
        w.add_bool("tokenizer.ggml.add_bos_token", add_bos)
    w.add_uint32("tokenizer.ggml.bos_token_id", 7)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


# ---- the decision --------------------------------------------------------------------------------
def test_gguf_metadata_is_read_from_the_header(tmp_path):
    assert st.gguf_add_bos(write_gguf(tmp_path / "t.gguf", True)) is True
    assert st.gguf_add_bos(write_gguf(tmp_path / "f.gguf", False)) is False
    assert st.gguf_add_bos(write_gguf(tmp_path / "n.gguf", None)) is None
    assert st.gguf_metadata_value(tmp_path / "t.gguf", "tokenizer.ggml.bos_token_id") == 7
    (tmp_path / "bad.gguf").write_bytes(b"not a gguf")
    assert st.gguf_add_bos(tmp_path / "bad.gguf") is None


def test_decide_bos_evidence_order(tmp_path):
    plain, pre = tiny_tokenizer(), bos_tokenizer()
    assert st.decide_bos(plain)[0] is False
    assert st.decide_bos(pre) == (True, "the tokenizer prepends its bos token")
    # a GGUF's flag wins over what the tokenizer does, both ways
    assert st.decide_bos(pre, gguf=write_gguf(tmp_path / "f.gguf", False))[0] is False
    assert st.decide_bos(plain, gguf=write_gguf(tmp_path / "t.gguf", True))[0] is True
    # an explicit tokenizer_config flag wins over the post-processor
    folder = tmp_path / "cfg"
    folder.mkdir()
    (folder / "tokenizer_config.json").write_text(json.dumps({"add_bos_token": True}))
    assert st.decide_bos(plain, folder=folder) == (True, "tokenizer_config.json add_bos_token=true")
    # no bos token at all: never
    class NoBos:
        bos_token_id = None

    assert st.decide_bos(NoBos(), gguf=tmp_path / "t.gguf")[0] is False


def test_load_model_records_the_rule(plain_dir, bos_dir, tmp_path):
    _, tok = load_model(plain_dir)
    assert st.wants_bos(tok) is False and "no metadata" in st.bos_source(tok)
    _, tok = load_model(bos_dir)
    assert st.wants_bos(tok) is True
    _, tok = load_model(save_bos_model(tmp_path / "off", config_flag=False))
    assert st.wants_bos(tok) is False and "tokenizer_config.json" in st.bos_source(tok)


def test_stream_ids_and_overrides(bos_dir, plain_dir):
    _, tok = load_model(bos_dir)
    b = tok.bos_token_id
    text_ids = tok(TEXT, add_special_tokens=False)["input_ids"]
    assert st.stream_ids(tok, TEXT) == [b] + text_ids  # BOS once, then the text
    assert st.stream_ids(tok, TEXT, start=False) == text_ids  # a continuation: no BOS
    assert st.stream_ids(tok, TEXT, override=False) == text_ids
    _, plain = load_model(plain_dir)
    assert st.stream_ids(plain, TEXT) == text_ids
    assert st.stream_ids(plain, TEXT, override=True) == [b] + text_ids
    assert st.bos_choice_label(plain, True) == {"bos": True, "bos_rule": "--bos"}

    class NoBos:
        bos_token_id = None

    with pytest.raises(UserError, match="no bos token"):
        st.wants_bos(NoBos(), True)


# ---- every raw-text path -------------------------------------------------------------------------
@pytest.fixture
def fed(monkeypatch):
    """The ids of each StreamingLLM.feed call, in order."""
    calls: list[list[int]] = []
    orig = StreamingLLM.feed

    def spy(self, ids, *a, **k):
        calls.append(torch.as_tensor(ids).flatten().tolist())
        return orig(self, ids, *a, **k)

    monkeypatch.setattr(StreamingLLM, "feed", spy)
    return calls


@pytest.mark.parametrize("which, flag, expect_bos", [
    ("bos", [], True), ("plain", [], False), ("bos", ["--no-bos"], False), ("plain", ["--bos"], True),
])
def test_ppl_first_fed_id_is_bos_exactly_when_it_should_be(which, flag, expect_bos, bos_dir, plain_dir, tmp_path,
                                                           capsys, fed):
    text = tmp_path / "t.txt"
    text.write_text(TEXT, encoding="utf-8")
    model_dir = bos_dir if which == "bos" else plain_dir
    out = tmp_path / "r.json"
    assert main(["ppl", "--model", model_dir, "--text", str(text), "--window", "16", "--no-progress",
                 "--out", str(out), *flag]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    _, tok = load_model(model_dir)
    b = tok.bos_token_id
    assert (fed[0][0] == b) is expect_bos
    assert sum(x == b for c in fed for x in c) == int(expect_bos)  # never twice
    assert summary["bos"] is expect_bos and json.loads(out.read_text())["bos"] is expect_bos
    assert summary["bos_rule"].startswith("--" if flag else "model rule")


def test_resumed_ppl_refuses_another_bos_choice(bos_dir, tmp_path, capsys):
    text = tmp_path / "t.txt"
    text.write_text(TEXT * 3, encoding="utf-8")
    out = tmp_path / "nll.jsonl"
    base = ["ppl", "--model", bos_dir, "--text", str(text), "--window", "16", "--no-progress", "--chunk-size", "16",
            "--per-token-out", str(out), "--checkpoint-every", "32"]
    # leave a checkpoint behind: interrupt after the first one
    import streaming_llm.eval.ppl as ppl_mod

    orig = ppl_mod._save_atomic

    def save_then_stop(obj, path):
        orig(obj, path)
        raise KeyboardInterrupt

    ppl_mod._save_atomic = save_then_stop
    try:
        assert main(base) != 0  # the CLI reports the interruption
    finally:
        ppl_mod._save_atomic = orig
    assert (tmp_path / "nll.jsonl.ckpt").is_file()
    assert main(base + ["--resume", "--no-bos"]) == 2
    err = capsys.readouterr().err
    assert "bos" in err and "Traceback" not in err
    assert main(base + ["--resume"]) == 0  # the same choice resumes


def test_tokenize_corpus_puts_bos_once_at_the_stream_start():
    from streaming_llm.eval.data import Corpus, tokenize_corpus

    text = "first book text.\n\nsecond book text."
    corpus = Corpus(text, [("a", 0, 16), ("b", 18, len(text))])
    plain, pre = tiny_tokenizer(), bos_tokenizer()
    ids0, starts0 = tokenize_corpus(corpus, plain, cache=False)
    ids1, starts1 = tokenize_corpus(corpus, pre, cache=False)
    assert ids1[0] == pre.bos_token_id and ids1[1:].tolist() == ids0.tolist()
    assert [s for _, s in starts1] == [s + 1 for _, s in starts0]
    assert int((ids1 == pre.bos_token_id).sum()) == 1  # not per book
    ids2, starts2 = tokenize_corpus(corpus, pre, cache=False, bos=False)
    assert ids2.tolist() == ids0.tolist() and starts2 == starts0


def test_reproduce_fig5_and_attention_map_record_bos(bos_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("STREAMING_LLM_CACHE", str(tmp_path / "cache"))
    book = tmp_path / "book.txt"
    book.write_text(TEXT * 6, encoding="utf-8")
    assert main(["reproduce", "fig5", "--model", bos_dir, "--corpus", str(book), "--tokens", "120", "--out",
                 str(tmp_path / "res"), "--no-progress", "--chunk-size", "32"]) == 0
    res = json.loads((tmp_path / "res" / "fig5" / "result.json").read_text())
    assert res["bos"] is True and res["complete"]
    assert main(["attention-map", "--model", bos_dir, "--text", str(book), "--tokens", "24", "--samples", "2",
                 "--out", str(tmp_path / "att")]) == 0
    summary = json.loads((tmp_path / "att" / "summary.json").read_text())
    assert summary["bos"] is True
    assert main(["attention-map", "--model", bos_dir, "--text", str(book), "--tokens", "24", "--samples", "2",
                 "--out", str(tmp_path / "att2"), "--no-bos"]) == 0
    assert json.loads((tmp_path / "att2" / "summary.json").read_text())["bos"] is False
    capsys.readouterr()


def test_attention_map_samples_start_with_bos(bos_dir, tmp_path, monkeypatch):
    import streaming_llm.eval.attention_map as am

    seen = []
    orig = am.attention_stats

    def spy(model, samples, *a, **k):
        seen.extend(np.asarray(s).tolist() for s in samples)
        return orig(model, samples, *a, **k)

    monkeypatch.setattr(am, "attention_stats", spy)
    book = tmp_path / "book.txt"
    book.write_text(TEXT * 6, encoding="utf-8")
    assert main(["attention-map", "--model", bos_dir, "--text", str(book), "--tokens", "24", "--samples", "3",
                 "--out", str(tmp_path / "att")]) == 0
    _, tok = load_model(bos_dir)
    assert len(seen) == 3 and all(s[0] == tok.bos_token_id and s.count(tok.bos_token_id) == 1 and len(s) == 24
                                  for s in seen)


def test_text_conversation_starts_with_bos_once(bos_dir, plain_dir, fed):
    from streaming_llm.core.sampling import SamplingParams
    from streaming_llm.server.conversations import TextConversation

    greedy = SamplingParams(temperature=0)
    for d, expect in ((bos_dir, True), (plain_dir, False)):
        fed.clear()
        model, tok = load_model(d)
        conv = TextConversation(model, tok, StreamingConfig(sinks=4, window=32, chunk_size=16))
        for prompt in ("Once upon a time", " and then"):
            _, _, it = conv.reply(prompt, 3, greedy)
            list(it)
        all_ids = [x for c in fed for x in c]
        assert (all_ids[0] == tok.bos_token_id) is expect
        assert all_ids.count(tok.bos_token_id) == int(expect)


# ---- chat: the template's BOS exactly once ---------------------------------------------------------
def test_chat_stream_starts_with_bos_exactly_once(tmp_path, fed):
    from streaming_llm.chat.session import ChatSession
    from streaming_llm.core.sampling import SamplingParams

    greedy = SamplingParams(temperature=0)
    writes_bos = "{{ bos_token }}" + CHATML
    cases = [  # (tokenizer prepends BOS?, template), expected BOS count at the start
        (True, writes_bos, 1),  # the template writes it: kept, not doubled
        (True, CHATML, 1),  # the template does not: added
        (False, CHATML, 0),  # the rule says none: none
    ]
    for k, (rule, template, expected) in enumerate(cases):
        d = save_bos_model(tmp_path / f"m{k}") if rule else save_tiny_model(tmp_path / f"m{k}")
        model, tok = load_model(d)
        tok.chat_template = template
        fed.clear()
        s = ChatSession(StreamingLLM(model, tok, StreamingConfig(sinks=4, window=60, chunk_size=16)))
        list(s.reply("hi", max_new_tokens=2, sampling=greedy))
        list(s.reply("again", max_new_tokens=2, sampling=greedy))
        ids = [x for c in fed for x in c]
        b = tok.bos_token_id
        lead = next((i for i, x in enumerate(ids) if x != b), len(ids))
        assert lead == expected, (rule, template[:20], ids[:4])
        assert ids.count(b) == expected  # and nowhere later either


# ---- what ends a turn ------------------------------------------------------------------------------
def test_one_end_of_turn_rule_for_loading_chat_and_server(plain_dir):
    from streaming_llm.chat.session import ChatSession
    from streaming_llm.server.conversations import TextConversation

    model, tok = load_model(plain_dir)
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    rule = st.stop_ids(model, tok)
    assert im_end in rule
    session = ChatSession(StreamingLLM(model, tok, StreamingConfig(sinks=4, window=60)))
    assert session.stop_ids == rule and session.eot_id == im_end and session.eot_text == "<|im_end|>"
    assert session.eot_separator == "\n"
    assert TextConversation(model, tok, StreamingConfig(sinks=4, window=60)).stop == rule
    assert im_end in st.generation_eos_ids(model, tok)
    # an eos id that is an ordinary token is not a stop token
    model.generation_config.eos_token_id = [5]
    assert 5 not in st.stop_ids(model, tok)


def test_turn_end_falls_back_to_eos_without_template_marker():
    tok = tiny_tokenizer()
    tok.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    assert st.turn_end(tok, [tok.eos_token_id])[0] == tok.eos_token_id
    with pytest.raises(UserError, match="ends a chat turn"):
        st.turn_end(tok, [])


def test_chat_conversation_persists_through_session_state_dict(plain_dir):
    from streaming_llm.core.sampling import SamplingParams
    from streaming_llm.server.conversations import ChatConversation, pack_state, unpack_state

    model, tok = load_model(plain_dir)
    cfg = StreamingConfig(sinks=4, window=60, chunk_size=16)
    a = ChatConversation(model, tok, cfg)
    msgs = [{"role": "user", "content": "hi"}]
    list(a.reply({"messages": msgs}, 3, SamplingParams(temperature=0))[2])
    state = a.state()
    assert state == {**state, **{k: state[k] for k in ("format", "version", "fed_text", "engine")}}
    b = ChatConversation(model, tok, cfg)
    b.restore(unpack_state(pack_state(state), torch.float32, "cpu"), a.transcript())
    assert b.session._fed_text == a.session._fed_text and b.transcript() == a.transcript()
    with pytest.raises(UserError):
        b.restore({"engine": {}}, a.transcript())  # an old-format snapshot: the manager replays instead


def test_pretraining_evaluation_stream_follows_the_rule():
    from streaming_llm.train.evaluate import stream_for
    from streaming_llm.train.tokenizer import sink_token_id, train_tokenizer

    tok = train_tokenizer(["the quick brown fox jumps over the lazy dog. " * 50], 300)
    assert st.stream_prefix(tok) == []  # the project's own tokenizers add no BOS, so its models start without one
    val = np.arange(10, 30)
    stream, first = stream_for(val, 12, None, st.stream_prefix(tok))
    assert stream.tolist() == val[:12].tolist() and first == 0
    s = sink_token_id(tok)
    stream, first = stream_for(val, 12, s, [tok.bos_token_id])  # were there a BOS: BOS, <sink>, text
    assert stream[:2].tolist() == [tok.bos_token_id, s] and first == 2 and stream[first + 1] == val[1]
