"""Pre-training variants (issue 5): tiny configs, a tiny local corpus, no downloads."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from streaming_llm.train import loop, model as tm
from streaming_llm.train.tokenizer import SINK_TOKEN, load_tokenizer, sink_token_id, train_tokenizer

TINY = tm.SIZES["tiny"]


@pytest.fixture(autouse=True)
def one_thread():
    # tiny models: threads only add sync overhead (and spin badly on a shared, busy CPU)
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _text(seed: int, words: int) -> str:
    rng = np.random.default_rng(seed)
    vocab = "the a king queen lord lady sword crown night day love death and of to in my thy".split()
    # a little structure so a few steps can learn something: word pairs repeat
    return " ".join(vocab[i] + " " + vocab[(i * 7 + 3) % len(vocab)] for i in rng.integers(0, len(vocab), words)) + "."


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer([_text(0, 3000)], vocab_size=TINY.vocab_size)


@pytest.fixture(scope="module")
def ids(tokenizer):
    return np.asarray(tokenizer.encode(_text(1, 4000), add_special_tokens=False), dtype=np.int32)


def test_tokenizer_has_sink_token_and_no_specials(tokenizer):
    sid = sink_token_id(tokenizer)
    assert tokenizer.convert_ids_to_tokens(sid) == SINK_TOKEN
    enc = tokenizer.encode("the king", add_special_tokens=False)
    assert sid not in enc and tokenizer.decode(enc) == "the king"
    assert len(tokenizer) <= TINY.vocab_size


@pytest.mark.parametrize("variant", tm.VARIANTS)
def test_each_variant_loss_decreases(variant, tokenizer, ids, tmp_path):
    m = tm.build_model(TINY, variant, seed=0, sink_token_id=sink_token_id(tokenizer))
    settings = loop.TrainSettings(steps=30, batch_size=8, lr=1e-2, seed=0)
    summary = loop.train_variant(m, ids, TINY.context, settings, tmp_path, sink_id=sink_token_id(tokenizer) if variant == "sink_token" else None, progress=False)
    losses = [c[1] for c in summary["loss_curve"]]
    assert summary["steps"] == 30
    assert np.mean(losses[-5:]) < np.mean(losses[:5]) - 0.3


def test_variants_share_init_and_data_order(tokenizer):
    a = tm.build_model(TINY, "vanilla", seed=3)
    b = tm.build_model(TINY, "softmax_off_by_one", seed=3)
    c = tm.build_model(TINY, "sink_token", seed=3, sink_token_id=1)
    for (na, pa), (_, pb), (_, pc) in zip(a.named_parameters(), b.named_parameters(), c.named_parameters()):
        assert torch.equal(pa, pb) and torch.equal(pa, pc), na
    o1 = loop.sample_offsets(10_000, 32, 4, seed=0, step=7)
    assert np.array_equal(o1, loop.sample_offsets(10_000, 32, 4, seed=0, step=7))
    assert not np.array_equal(o1, loop.sample_offsets(10_000, 32, 4, seed=0, step=8))


def test_sink_token_at_position_zero_of_every_sample(ids):
    sid = 1
    for step in range(5):
        offsets = loop.sample_offsets(len(ids), TINY.context, 8, seed=0, step=step)
        inputs, targets = loop.make_batch(ids, offsets, TINY.context, sink_id=sid)
        plain_in, plain_t = loop.make_batch(ids, offsets, TINY.context)
        assert inputs.shape == (8, TINY.context + 1)
        assert (inputs[:, 0] == sid).all() and not (inputs[:, 1:] == sid).any()
        # same text and the same scored targets as the other variants
        assert torch.equal(inputs[:, 1:], plain_in) and torch.equal(targets, plain_t)


def test_sink_token_is_used_in_training_loop(ids, tmp_path, monkeypatch):
    seen = []
    real = loop.lm_loss
    monkeypatch.setattr(loop, "lm_loss", lambda m, i, t: seen.append(i.clone()) or real(m, i, t))
    m = tm.build_model(TINY, "sink_token", seed=0, sink_token_id=1)
    loop.train_variant(m, ids, TINY.context, loop.TrainSettings(steps=3, batch_size=4), tmp_path, sink_id=1, progress=False)
    assert len(seen) == 3 and all((x[:, 0] == 1).all() for x in seen)


def _reference_off_by_one(q, k, v, scale):
    """Direct float64 softmax-off-by-one: exp(s_i) / (1 + sum_j exp(s_j)), causal."""
    q, k, v = q.double(), k.double(), v.double()
    t = q.shape[-2]
    s = (q @ k.transpose(-1, -2)) * scale
    s = s.masked_fill(~torch.ones(t, t, dtype=torch.bool).tril(), float("-inf"))
    e = torch.exp(s)
    return (e / (1.0 + e.sum(-1, keepdim=True))) @ v  # (B, H, T, D)


def test_off_by_one_attention_matches_reference():
    torch.manual_seed(0)
    b, h, t, d = 2, 3, 7, 8
    q, k, v = (torch.randn(b, h, t, d) * 2 for _ in range(3))
    module = torch.nn.Module()
    module.config = type("C", (), {"softmax_off_by_one": True})()
    ref = _reference_off_by_one(q, k, v, d**-0.5)
    out, _ = tm.sdpa_off_by_one(module, q, k, v, None, scaling=d**-0.5)
    assert torch.allclose(out.transpose(1, 2).double(), ref, atol=1e-5)
    out2, probs = tm.explicit_attention(module, q, k, v, None, scaling=d**-0.5)
    assert torch.allclose(out2.transpose(1, 2).double(), ref, atol=1e-5)
    assert (probs.sum(-1) < 1).all()  # some mass goes to "nothing"


def test_off_by_one_model_uses_it_and_differs_from_vanilla(tokenizer):
    ob = tm.build_model(TINY, "softmax_off_by_one", seed=0)
    va = tm.build_model(TINY, "vanilla", seed=0)
    assert ob.config._attn_implementation == tm.OFF_BY_ONE_ATTN and ob.config.softmax_off_by_one
    x = torch.randint(2, len(tokenizer), (1, 12))
    assert not torch.allclose(ob(x).logits, va(x).logits, atol=1e-4)
    # the explicit reference path gives the same logits as the training path
    ref_logits = ob(x).logits
    tm.register_attention()
    ob.set_attn_implementation(tm.EXPLICIT_ATTN)
    assert torch.allclose(ob(x).logits, ref_logits, atol=1e-4)


@pytest.mark.parametrize("variant", tm.VARIANTS)
def test_saved_model_reloads_with_identical_logits(variant, tokenizer, tmp_path):
    m = tm.build_model(TINY, variant, seed=1, sink_token_id=sink_token_id(tokenizer)).eval()
    m.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg.get("softmax_off_by_one", False) is (variant == "softmax_off_by_one")
    assert cfg.get("attention_sink_token_id") == (sink_token_id(tokenizer) if variant == "sink_token" else None)
    r = tm.load_trained(tmp_path)
    tok2 = load_tokenizer(tmp_path)
    x = torch.tensor([tok2.encode("the king and the queen", add_special_tokens=False)])
    with torch.no_grad():
        assert torch.equal(m(x).logits, r(x).logits)


def test_resume_after_interrupt_equals_uninterrupted(ids, tmp_path, monkeypatch):
    settings = loop.TrainSettings(steps=6, batch_size=4, seed=0)
    full = tm.build_model(TINY, "vanilla", seed=0)
    loop.train_variant(full, ids, TINY.context, settings, tmp_path / "full", progress=False)

    calls = []
    real = loop.lm_loss

    def interrupting(m, i, t):
        calls.append(1)
        if len(calls) == 4:
            raise KeyboardInterrupt  # Ctrl-C during step 4: steps 1-3 are checkpointed
        return real(m, i, t)

    monkeypatch.setattr(loop, "lm_loss", interrupting)
    with pytest.raises(KeyboardInterrupt):
        loop.train_variant(tm.build_model(TINY, "vanilla", seed=0), ids, TINY.context, settings, tmp_path / "b", progress=False)
    monkeypatch.setattr(loop, "lm_loss", real)
    resumed = tm.build_model(TINY, "vanilla", seed=0)
    summary = loop.train_variant(resumed, ids, TINY.context, settings, tmp_path / "b", progress=False)
    assert summary["steps"] == 6 and len(calls) == 4
    for pa, pb in zip(full.parameters(), resumed.parameters()):
        assert torch.allclose(pa, pb, atol=1e-6)


def test_checkpoint_with_other_settings_is_refused(ids, tmp_path):
    from streaming_llm.errors import UserError

    m = tm.build_model(TINY, "vanilla", seed=0)
    loop.train_variant(m, ids, TINY.context, loop.TrainSettings(steps=2, batch_size=2), tmp_path, progress=False)
    with pytest.raises(UserError, match="other settings"):
        loop.train_variant(m, ids, TINY.context, loop.TrainSettings(steps=2, batch_size=3), tmp_path, progress=False)


def test_pretrain_quick_like_end_to_end(tmp_path, monkeypatch, capsys):
    from streaming_llm.cli import main

    monkeypatch.setenv("STREAMING_LLM_CACHE", str(tmp_path / "cache"))
    books = tmp_path / "books"
    books.mkdir()
    for i in range(4):
        (books / f"book{i}.txt").write_text(_text(10 + i, 1500), encoding="utf-8")
    out = tmp_path / "run"
    argv = ["pretrain", "--quick", "--size", "tiny", "--corpus", str(books), "--val-books", "1", "--steps", "8",
            "--batch-size", "4", "--eval-tokens", "200", "--window", "16", "--out", str(out), "--no-progress",
            "--threads", "1"]
    assert main(argv) == 0
    results = json.loads((out / "results.json").read_text())
    assert set(results["variants"]) == set(tm.VARIANTS)
    for name, v in results["variants"].items():
        assert set(v["ppl_by_sinks"]) == {"0", "1", "2", "4"}
        assert all(np.isfinite(x) and x > 1 for x in v["ppl_by_sinks"].values())
        assert np.isfinite(v["val_loss"]) and np.isfinite(v["train_loss"])
        assert len(v["attention"]["first_position_share"]) == TINY.num_layers
        assert (out / name / "config.json").is_file() and (out / name / "tokenizer.json").is_file()
    assert "zero_slot_share" in results["variants"]["softmax_off_by_one"]["attention"]
    assert (out / "results.md").read_text().count("|") > 10
    assert (out / "results.png").stat().st_size > 1000
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert set(json.loads(last)) >= {"out", "vanilla", "sink_token", "softmax_off_by_one"}
    # a second run resumes: no training, same numbers
    assert main(argv) == 0
    again = json.loads((out / "results.json").read_text())
    for name in tm.VARIANTS:
        assert again["variants"][name]["ppl_by_sinks"] == results["variants"][name]["ppl_by_sinks"]


@pytest.mark.parametrize("variant", tm.VARIANTS)
def test_engine_with_large_window_matches_training_attention(variant, tokenizer):
    """The engine streams each variant as it was trained: window >= length == dense forward."""
    from streaming_llm.core.config import StreamingConfig
    from streaming_llm.core.engine import StreamingLLM

    m = tm.build_model(TINY, variant, seed=2, sink_token_id=sink_token_id(tokenizer)).eval()
    x = torch.randint(2, len(tokenizer), (24,))
    with torch.no_grad():
        dense = m(x[None]).logits[0]
    engine = StreamingLLM(m, tokenizer, StreamingConfig(method="streaming", sinks=4, window=64, chunk_size=5))
    assert torch.allclose(engine.feed(x, logits="all"), dense, atol=1e-4)
