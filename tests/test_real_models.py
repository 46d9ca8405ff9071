"""The engine on the two real offline models: exact against the literal paper reference, and the
`ppl` command's contract. Slower than the tiny-model tests (seconds to a minute each)."""

from __future__ import annotations

import json

import pytest
import torch

from reference import PaperReference
from streaming_llm.cli import main
from streaming_llm.core.config import StreamingConfig
from streaming_llm.core.engine import StreamingLLM
from streaming_llm.models.loading import load_model
from streaming_llm.core.rope import find_rotary_module

pytestmark = pytest.mark.real_model

TEXT = (
    "It is a truth universally acknowledged, that a single man in possession of a good fortune, "
    "must be in want of a wife. However little known the feelings or views of such a man may be "
    "on his first entering a neighbourhood, this truth is so well fixed in the minds of the "
    "surrounding families, that he is considered the rightful property of some one or other of "
    "their daughters."
)


def nlls(logits, ids):
    return -torch.log_softmax(logits[:-1].double(), -1).gather(1, ids[1:, None])[:, 0]


@pytest.mark.parametrize("name", ["smollm2-135m-instruct", "gemma3-270m"])
def test_real_model_matches_literal_paper_reference(name):
    model, tokenizer = load_model(name)
    ids = torch.tensor(tokenizer(TEXT, add_special_tokens=False)["input_ids"][:32])
    sinks, window = 4, 10  # eviction from token 14 on (Gemma3's sliding layers keep their 512)
    ref = PaperReference(model, sinks, window, find_rotary_module(model)).feed(ids)
    for chunk in (1, 32):
        out = StreamingLLM(model, tokenizer, StreamingConfig(sinks=sinks, window=window, chunk_size=chunk)).feed(ids)
        assert (nlls(out, ids) - nlls(ref, ids)).abs().max() < 1e-4


def test_ppl_command_contract(tmp_path, capsys):
    text = tmp_path / "book.txt"
    text.write_text(TEXT * 8, encoding="utf-8")
    out = tmp_path / "nll.jsonl"
    argv = ["ppl", "--model", "smollm2-135m-instruct", "--text", str(text), "--method", "streaming", "--sinks", "4",
            "--window", "60", "--max-tokens", "300", "--per-token-out", str(out)]
    assert main(argv) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["i"] for r in rows] == list(range(1, 300))
    assert set(rows[0]) == {"i", "token", "nll"} and all(r["nll"] >= 0 for r in rows)
    stdout = capsys.readouterr().out.strip().splitlines()
    summary = json.loads(stdout[-1])
    mean = sum(r["nll"] for r in rows) / len(rows)
    assert abs(summary["nll_mean"] - mean) < 1e-9 and summary["predicted"] == 299
    assert stdout[-2].startswith("perplexity:")
    # the slow token-by-token path (--reference) gives the same numbers
    short = ["--max-tokens", "100", "--no-progress"]
    fast_out, ref_out = tmp_path / "fast.jsonl", tmp_path / "ref.jsonl"
    assert main(argv[:-4] + short + ["--per-token-out", str(fast_out)]) == 0
    assert main(argv[:-4] + short + ["--per-token-out", str(ref_out), "--reference"]) == 0
    fast = [json.loads(x)["nll"] for x in fast_out.read_text().splitlines()]
    ref = [json.loads(x)["nll"] for x in ref_out.read_text().splitlines()]
    assert len(fast) == len(ref) == 99 and max(abs(a - b) for a, b in zip(fast, ref)) < 1e-4


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--model", "no-such-model"], "unknown model"),
        (["--text", "/nonexistent.txt"], "not found"),
        (["--window", "0"], "--window"),
        (["--sinks", "-1"], "--sinks"),
    ],
)
def test_ppl_bad_input_is_a_clear_error(tmp_path, capsys, argv, message):
    text = tmp_path / "t.txt"
    text.write_text(TEXT, encoding="utf-8")
    base = {"--model": "smollm2-135m-instruct", "--text": str(text)}
    base.update(dict(zip(argv[::2], argv[1::2])))
    assert main(["ppl", *[x for kv in base.items() for x in kv]]) == 2
    err = capsys.readouterr().err
    assert message.lower() in err.lower() and "Traceback" not in err


def test_ppl_rejects_empty_short_and_non_utf8_text(tmp_path, capsys):
    for content, message in [(b"", "empty"), (b"\xff\xfe\x00bad", "UTF-8"), (b"a", "at least 2")]:
        f = tmp_path / "x.txt"
        f.write_bytes(content)
        assert main(["ppl", "--text", str(f)]) == 2
        assert message in capsys.readouterr().err


# ---- how a stream begins on the two offline models (models/special_tokens.py) ---------------------
def test_smollm2_streams_without_bos_and_its_ids_are_unchanged():
    from streaming_llm.models import special_tokens as st

    model, tok = load_model("smollm2-135m-instruct")
    assert st.wants_bos(tok) is False and "add_bos_token=false" in st.bos_source(tok)
    assert st.stream_ids(tok, TEXT) == tok(TEXT, add_special_tokens=False)["input_ids"]  # as before BOS handling
    # chat: the ChatML template writes no BOS, and none is added
    from streaming_llm.chat.session import ChatSession
    from streaming_llm.core.sampling import SamplingParams

    fed = []
    engine = StreamingLLM(model, tok, StreamingConfig(sinks=4, window=200))
    orig = engine.feed
    engine.feed = lambda ids, *a, **k: (fed.append(torch.as_tensor(ids).flatten().tolist()), orig(ids, *a, **k))[1]
    s = ChatSession(engine)
    list(s.reply("hi", max_new_tokens=2, sampling=SamplingParams(temperature=0)))
    ids = [x for c in fed for x in c]
    rendered = tok(s.render([{"role": "user", "content": "hi"}], True), add_special_tokens=False)["input_ids"]
    assert ids[: len(rendered)] == rendered and ids[0] == tok.convert_tokens_to_ids("<|im_start|>")


def test_gemma3_streams_start_with_one_bos(tmp_path, capsys):
    from streaming_llm.models import special_tokens as st

    model, tok = load_model("gemma3-270m")
    b = tok.bos_token_id
    assert tok.convert_ids_to_tokens(b) == "<bos>"
    # the converted tokenizer lost add_bos_token (it reports False); the GGUF's flag decides
    assert st.wants_bos(tok) is True and "add_bos_token=true" in st.bos_source(tok)
    ids = st.stream_ids(tok, TEXT)
    assert ids[0] == b and ids.count(b) == 1
    # ppl feeds exactly one BOS, first, and records it
    text = tmp_path / "book.txt"
    text.write_text(TEXT * 2, encoding="utf-8")
    out = tmp_path / "r.json"
    assert main(["ppl", "--model", "gemma3-270m", "--text", str(text), "--window", "60", "--max-tokens", "80",
                 "--no-progress", "--out", str(out)]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["bos"] is True and summary["bos_rule"].startswith("model rule: gguf")
    # a base model without a chat template: chat refuses with a clear message
    from streaming_llm.chat.session import ChatSession
    from streaming_llm.errors import UserError

    with pytest.raises(UserError, match="no chat template"):
        ChatSession(StreamingLLM(model, tok, StreamingConfig()))
    # were a Gemma chat template (which writes {{ bos_token }}) applied, BOS would still be there once
    tok.chat_template = ("{{ bos_token }}{% for m in messages %}<start_of_turn>{{ m['role'] }}\n{{ m['content'] }}"
                         "<end_of_turn>\n{% endfor %}{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}")
    try:
        s = ChatSession(StreamingLLM(model, tok, StreamingConfig(sinks=4, window=200)))
        fed = []
        orig = s.engine.feed
        s.engine.feed = lambda ids, *a, **k: (fed.append(torch.as_tensor(ids).flatten().tolist()), orig(ids, *a, **k))[1]
        from streaming_llm.core.sampling import SamplingParams

        list(s.reply("hi", max_new_tokens=2, sampling=SamplingParams(temperature=0)))
        list(s.reply("again", max_new_tokens=2, sampling=SamplingParams(temperature=0)))
        all_ids = [x for c in fed for x in c]
        assert all_ids[0] == b and all_ids.count(b) == 1
        assert s.eot_text == "<end_of_turn>" and s.eot_id in st.stop_ids(model, tok)
    finally:
        tok.chat_template = None


def test_quant_auto_keeps_the_default_chats_greedy_answer():
    """Whatever `--quant auto` calibrates on this machine (packed kernels, the wide copy from its
    row count, the KV ring dtype), the default chat's greedy answer stays right after a prompt
    longer than any wide-copy threshold. A guard, not a reproduction: on 2026-12-04 `make chat`
    with the bfloat16 wide copy calibration had chosen on an AVX512-BF16 EPYC gave garbage here;
    that setting forced by hand (int4, bfloat16 from 32 rows) answers right in this test."""
    from streaming_llm.chat.session import ChatSession
    from streaming_llm.core.sampling import SamplingParams
    from streaming_llm.models.quantize import quantize_linears

    model, tok = load_model("smollm2-135m-instruct")
    quantize_linears(model, "auto")
    s = ChatSession(StreamingLLM(model, tok, StreamingConfig(sinks=4, window=1020)))
    question = "I am planning a trip to Europe next spring and I would like to know one simple fact first. What is the capital of France?"
    assert len(tok(question)["input_ids"]) > 24
    text = "".join(t.text for t in s.reply(question, max_new_tokens=24, sampling=SamplingParams(temperature=0)))
    assert "Paris" in text, (text, model.config.streaming_llm_kv_ring)
