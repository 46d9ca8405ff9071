"""Evaluation driver, experiments and plots on tiny models: exactness, resume, bad inputs, plotting."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from streaming_llm.eval import ppl as ppl_mod
from streaming_llm.core.config import StreamingConfig
from streaming_llm.core.engine import StreamingLLM
from tiny_models import tiny_model, tiny_tokenizer

METHODS = ["streaming", "window", "dense", "recompute"]


def ids_for(n, seed=3, vocab=96):
    return torch.randint(0, vocab, (n,), generator=torch.Generator().manual_seed(seed))


def engine(model, **kw):
    return StreamingLLM(model, None, StreamingConfig(**kw))


@pytest.mark.parametrize("method", METHODS)
def test_chunked_evaluation_equals_token_by_token(method):
    model, ids = tiny_model("llama"), ids_for(45)
    ref = list(ppl_mod.token_nlls(engine(model, method=method, sinks=2, window=9, chunk_size=1), ids))
    got = list(ppl_mod.token_nlls(engine(model, method=method, sinks=2, window=9, chunk_size=16), ids))
    assert [i for i, _, _ in got] == list(range(1, 45)) == [i for i, _, _ in ref]
    assert [t for _, t, _ in got] == ids[1:].tolist()
    assert max(abs(a[2] - b[2]) for a, b in zip(got, ref)) < 1e-4


def test_evaluate_totals_and_books():
    model, ids = tiny_model("llama"), ids_for(60)
    res = ppl_mod.evaluate(engine(model, sinks=2, window=9, chunk_size=8), ids, [("a", 0), ("b", 25), ("c", 99)],
                           keep_nll=True)
    nll = res["nll"]
    assert res["predicted"] == 59 and math.isclose(res["ppl"], math.exp(nll.astype(np.float64).mean()), rel_tol=1e-6)
    a, b = res["per_book"]  # "c" starts past the end: dropped
    assert (a["predicted"], b["predicted"]) == (24, 35)
    assert math.isclose(b["ppl"], math.exp(nll[24:].astype(np.float64).mean()), rel_tol=1e-6)


class Stop(Exception):
    pass


@pytest.mark.parametrize("method", ["streaming", "dense"])
def test_resume_after_interruption_gives_identical_results(tmp_path, method):
    model, ids = tiny_model("llama"), ids_for(100)
    kw = dict(method=method, sinks=2, window=9, chunk_size=8)
    full = ppl_mod.evaluate(engine(model, **kw), ids, [("x", 0), ("y", 50)], tmp_path / "full.jsonl", keep_nll=True)
    calls = []

    def interrupt(totals, done):
        calls.append(done)
        if len(calls) == 2:
            raise Stop  # as if the process were killed right after the second checkpoint

    out, ck = tmp_path / "run.jsonl", tmp_path / "run.ckpt"
    with pytest.raises(Stop):
        ppl_mod.evaluate(engine(model, **kw), ids, [("x", 0), ("y", 50)], out, ck, checkpoint_every=20,
                         on_checkpoint=interrupt, fingerprint="f")
    with open(out, "a") as f:
        f.write('{"i": 999, "garbage": true}\n')  # lines written after the checkpoint are dropped on resume
    res = ppl_mod.evaluate(engine(model, **kw), ids, [("x", 0), ("y", 50)], out, ck, checkpoint_every=20,
                           resume=True, keep_nll=True, fingerprint="f")
    assert calls[1] < 99
    assert res["ppl"] == full["ppl"] and res["per_book"] == full["per_book"] and res["curve"] == full["curve"]
    assert np.array_equal(res["nll"], full["nll"])
    assert out.read_text() == (tmp_path / "full.jsonl").read_text()


def test_resume_refuses_another_runs_checkpoint(tmp_path):
    from streaming_llm.errors import UserError

    model, ids = tiny_model("llama"), ids_for(50)
    ck = tmp_path / "c.ckpt"
    with pytest.raises(Stop):
        ppl_mod.evaluate(engine(model, chunk_size=8, window=9), ids, checkpoint=ck, checkpoint_every=10,
                         fingerprint="a", on_checkpoint=lambda *a: (_ for _ in ()).throw(Stop()))
    with pytest.raises(UserError, match="another run"):
        ppl_mod.evaluate(engine(model, chunk_size=8, window=9), ids, checkpoint=ck, resume=True, fingerprint="b")


def test_ppl_cli_text_contract_and_corpus_books(tiny_dir, tmp_path, cli):
    text = tmp_path / "t.txt"
    text.write_text("the quick brown fox jumps over the lazy dog. " * 20)
    per = tmp_path / "nll.jsonl"
    rc, out, _ = cli("ppl", "--model", tiny_dir, "--text", str(text), "--window", "20", "--sinks", "4",
                      "--max-tokens", "300", "--per-token-out", str(per), "--no-progress", "--chunk-size", "64")
    assert rc == 0 and "perplexity:" in out
    summary = json.loads(out.strip().splitlines()[-1])
    lines = [json.loads(x) for x in per.read_text().splitlines()]
    assert [x["i"] for x in lines] == list(range(1, 300)) and set(lines[0]) == {"i", "token", "nll"}
    assert math.isclose(summary["ppl"], math.exp(sum(x["nll"] for x in lines) / 299), rel_tol=1e-6)
    folder = tmp_path / "books"
    folder.mkdir()
    (folder / "a.txt").write_text("alpha beta gamma. " * 10)
    (folder / "b.txt").write_text("delta epsilon. " * 10)
    rc, out, _ = cli("ppl", "--model", tiny_dir, "--corpus", str(folder), "--window", "20",
                      "--no-progress", "--out", str(tmp_path / "r.json"))
    summary = json.loads(out.strip().splitlines()[-1])
    assert rc == 0 and [t for t, _ in summary["per_book_ppl"]] == ["a", "b"]
    assert json.loads((tmp_path / "r.json").read_text())["per_book"][1]["token_start"] > 0


@pytest.mark.parametrize("argv,match", [
    (["--text", "/nonexistent/x.txt"], "not found"),
    (["--text", "EMPTY"], "empty"),
    (["--text", "OK", "--max-tokens", "0"], "at least 2"),
    (["--corpus", "EMPTYDIR"], "no .txt files|empty"),
    (["--corpus", "BLANKDIR"], "empty"),
])
def test_ppl_bad_inputs_are_clear_errors(tiny_dir, tmp_path, cli, argv, match):
    (tmp_path / "empty.txt").write_text("  \n")
    (tmp_path / "ok.txt").write_text("hello world")
    (tmp_path / "ed").mkdir()
    (tmp_path / "bd").mkdir()
    (tmp_path / "bd" / "x.txt").write_text("\n\n")
    subst = {"EMPTY": str(tmp_path / "empty.txt"), "OK": str(tmp_path / "ok.txt"), "EMPTYDIR": str(tmp_path / "ed"),
             "BLANKDIR": str(tmp_path / "bd")}
    rc, _, err = cli("ppl", "--model", tiny_dir, *[subst.get(a, a) for a in argv])
    assert rc == 2 and "error:" in err
    import re

    assert re.search(match, err), err


def _runner(n=200):
    from streaming_llm.eval.experiments import Runner

    tok = tiny_tokenizer()
    model = tiny_model("llama", vocab_size=len(tok))
    ids = ids_for(n, vocab=250)
    return Runner("tiny", "test", None, chunk=32, progress=False, model=model, tokenizer=tok, ids=ids,
                  books=[("one", 0), ("two", 120)])


def test_runner_caches_runs_and_recompute_matches_engine(tmp_path, monkeypatch):
    monkeypatch.setenv("STREAMING_LLM_CACHE", str(tmp_path))
    r = _runner(90)
    a = r.nll("streaming", 2, 14)
    assert len(r.log) == 1 and "seconds" in r.log[0]
    b = r.nll("streaming", 2, 14, n=60)  # served from the cached longer run
    assert np.array_equal(a[:59], b) and "cached" in r.log[1]
    assert np.array_equal(r.nll("window", 0, 16), r.nll("streaming", 0, 16))
    eng = StreamingLLM(r.model, None, StreamingConfig(method="recompute", sinks=2, window=14, chunk_size=32))
    full = np.array([v for _, _, v in ppl_mod.token_nlls(eng, r.ids)], dtype=np.float32)
    pos = [5, 16, 40, 89]
    assert np.abs(r.recompute(pos, cache=16) - full[np.array(pos) - 1]).max() < 1e-4


def test_experiments_write_results_and_plots_render(tmp_path, monkeypatch):
    from streaming_llm.eval import experiments as ex
    from streaming_llm.eval.plots import plot

    monkeypatch.setenv("STREAMING_LLM_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(ex, "CACHE", 16)
    r = _runner(260)
    args = SimpleNamespace(recompute_stride=50, reference_tokens=40, checkpoint_every=64, window_tokens=100,
                           caches=[16, 32], windows=[12, 28])
    ex.exp_fig3(r, tmp_path / "fig3", args)
    ex.exp_positions(r, tmp_path / "positions", args)
    ex.exp_throughput(r, tmp_path / "throughput", args)
    ex.exp_fig5(r, tmp_path / "fig5", args)
    ex.exp_table2(r, tmp_path / "table2", args)
    ex.exp_table6(r, tmp_path / "table6", args)
    th = json.loads((tmp_path / "throughput" / "result.json").read_text())
    assert th["nll_max_abs_diff"] < 1e-4 and th["token_by_token"]["tokens"] == 40
    f5 = json.loads((tmp_path / "fig5" / "result.json").read_text())
    assert f5["complete"] and [b["title"] for b in f5["per_book"]] == ["one", "two"]
    assert len(json.loads((tmp_path / "table2" / "results.json").read_text())["rows"]) == 12
    ex.exp_table6(r, tmp_path / "table6", SimpleNamespace(windows=[20]))  # fills in one more row
    assert [x["window"] for x in json.loads((tmp_path / "table6" / "results.json").read_text())["rows"]] == [12, 20, 28]
    for name in ("fig3", "positions", "throughput", "fig5", "table2", "table6"):
        paths = plot(name, tmp_path / name)
        assert paths and all(p.stat().st_size > 1000 for p in paths)


def test_table_plots_render_from_small_result_files(tmp_path):
    from streaming_llm.eval.plots import plot

    rows2 = [{"cache": c, "sinks": s, "sink_tokens": "text", "tokens": 9, "ppl_after_fill": 30 - s, "ppl_all": 20}
             for c in (1024, 2048) for s in (0, 1, 2, 4, 8)]
    rows2 += [{"cache": c, "sinks": 4, "sink_tokens": "4x newline", "ppl_after_fill": 27, "ppl_all": 20} for c in (1024, 2048)]
    (tmp_path / "table2").mkdir()
    (tmp_path / "table2" / "results.json").write_text(json.dumps({"rows": rows2, "tokens": 4096, "model": "m"}))
    rows6 = [{"cache": f"4+{w}", "window": w, "ppl_after_fill": 25 - w / 1000, "tokens": 6144, "ppl_1024_2048": 21, "ppl_all": 20}
             for w in (252, 508, 1020)]
    (tmp_path / "table6").mkdir()
    (tmp_path / "table6" / "results.json").write_text(json.dumps({"rows": rows6, "tokens": 6144, "ppl_1024_2048": 21, "model": "m"}))
    assert plot("table2", tmp_path / "table2") and plot("table6", tmp_path / "table6")


def test_reproduce_and_plot_bad_inputs(tmp_path, cli):
    rc, _, err = cli("plot", "fig3", "--results", str(tmp_path / "nothing"))
    assert rc == 2 and "no result files" in err
    rc, _, err = cli("reproduce", "fig3", "--tokens", "0")
    assert rc == 2 and "at least 2" in err


def test_attention_map_on_tiny_model(tiny_dir, tmp_path, cli):
    text = tmp_path / "t.txt"
    text.write_text("one two three four five six seven eight nine ten. " * 10)
    out = tmp_path / "am"
    rc, stdout, _ = cli("attention-map", "--model", tiny_dir, "--text", str(text), "--tokens", "64",
                         "--samples", "2", "--layers", "0,1", "--out", str(out))
    assert rc == 0
    summary = json.loads(stdout.strip().splitlines()[-1])
    z = np.load(out / "attention.npz")
    assert z["maps"].shape == (2, 64, 64) and np.allclose(z["maps"].sum(-1), 1, atol=1e-4)
    assert z["first_share"].shape[0] == 2 and len(summary["first_token_share"]) == 2
    assert (out / "attention_maps.png").is_file() and (out / "sink_share.png").is_file()
