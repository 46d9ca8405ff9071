"""The retrieval evaluations (`reproduce passkey`, `reproduce streameval`, issue 15) on tiny models:
prompt builders, the exact-match parser, both experiments end to end through the CLI (result files
and plots), and equivalences (a window that holds everything answers exactly as dense)."""

from __future__ import annotations

import json
import re
from types import SimpleNamespace

import pytest

from streaming_llm.errors import UserError
from streaming_llm.eval import passkey as pk
from streaming_llm.eval import retrieval as rt
from streaming_llm.eval import streameval as se
from tiny_models import tiny_model, tiny_tokenizer

TEXT = "\n".join(f"Line {i} of a long and quiet book about rivers, hills and the weather." for i in range(400))


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


@pytest.mark.parametrize("variant", list(pk.VARIANTS))
@pytest.mark.parametrize("depth", [0.0, 0.3, 0.9, 1.0])
def test_passkey_prompt_has_the_asked_length_and_depth(tok, variant, depth):
    p = pk.build_prompt(tok, variant, 400, depth, trial=1, seed=3, corpus_text=TEXT, prefix=[tok.bos_token_id])
    ids = p.body + p.question
    assert p.tokens == len(ids) == 400 and ids[0] == tok.bos_token_id
    a, b = p.key_span
    assert tok.decode(ids[a:b]) == pk.KEY_SENTENCE.format(key=p.key)
    assert abs(p.depth_actual - depth) <= 12 / p.filler_tokens  # snapped to a word start (words here: < 12 bytes)
    assert tok.decode(p.question) == pk.QUESTIONS[pk.VARIANTS[variant][2]]
    assert p.key_distance() == 400 - (b - 1)
    fmt = pk.VARIANTS[variant][1]
    assert re.fullmatch(pk.KEY_PATTERNS[fmt][0], p.key)
    # the filler around the key is the source text, cut at a word start
    if pk.VARIANTS[variant][0] == "repeat":
        assert "The grass is green." in tok.decode(ids) or "The sky is blue." in tok.decode(ids)
    else:
        assert "rivers, hills" in tok.decode(ids)
    if 0 < p.filler_before < p.filler_tokens:
        assert tok.decode(ids[a : a + 1]).startswith(" ") and tok.decode(ids[b : b + 1])[:1].isspace()


def test_passkey_prompts_are_reproducible_and_differ_per_trial(tok):
    a = pk.build_prompt(tok, "base", 300, 0.5, 0, corpus_text=TEXT)
    b = pk.build_prompt(tok, "base", 300, 0.5, 0, corpus_text=TEXT)
    c = pk.build_prompt(tok, "base", 300, 0.5, 1, corpus_text=TEXT)
    assert a.body == b.body and a.key == b.key and a.key != c.key


def test_passkey_prompt_bad_inputs(tok):
    with pytest.raises(UserError, match="cannot hold"):
        pk.build_prompt(tok, "base", 50, 0.5, 0, corpus_text=TEXT)
    with pytest.raises(UserError, match="variant"):
        pk.build_prompt(tok, "nope", 300, 0.5, 0, corpus_text=TEXT)
    with pytest.raises(UserError, match="corpus"):
        pk.build_prompt(tok, "base", 300, 0.5, 0, corpus_text=None)


def test_exact_match_parser():
    digits, code = pk.KEY_PATTERNS["digits"][0], pk.KEY_PATTERNS["code"][0]
    assert rt.exact_match(" 71432.", digits, "71432") == ("71432", True)
    assert rt.exact_match(" 714320", digits, "71432") == ("714320", False)  # a longer number is no match
    assert rt.exact_match(" the key is 7 or 71432", digits, "71432") == ("7", False)  # the first answer counts
    assert rt.exact_match(" a key that opens doors", digits, "71432") == (None, False)
    assert rt.exact_match(" The pass key is Tovami-Kelupa.", code, "tovami-kelupa", ignore_case=True) == \
        ("Tovami-Kelupa", True)
    assert rt.exact_match(" tovami", code, "tovami-kelupa", True) == (None, False)
    assert rt.exact_match(" <12345>", se.ANSWER_PATTERN, "12345") == ("12345", True)
    assert rt.exact_match(" <1234>", se.ANSWER_PATTERN, "12345") == ("1234", False)
    stop = pk.stop_rule("digits")
    assert not stop(" 7143") and stop(" 71432.") and stop(" a key.") and not stop("\n") and stop("\nab\n")


def test_methods_and_recall_specs():
    assert rt.parse_recall("4x32") == (4, 32) and rt.recall_list("4x32, 8X16") == [(4, 32), (8, 16)]
    assert rt.recall_list("none") == []
    for bad in ("4", "4x", "0x32", "ax3"):
        with pytest.raises(UserError, match="KxB"):
            rt.parse_recall(bad)
    labels = [m.label for m in rt.method_list([124], [(4, 32)], with_window=True)]
    assert labels == ["dense", "window 0+128", "streaming 4+124", "streaming 4+124 + recall 4x32"]
    ms = rt.method_list([124], [(4, 32)], with_window=True)
    assert [m.config().cache_size for m in ms[1:]] == [128, 128, 256]
    assert ms[2].in_window(124) and not ms[2].in_window(125) and ms[1].in_window(128) and ms[0].in_window(10**9)
    with pytest.raises(UserError):
        rt.method_list([], [])



def test_recall_specs_name_the_selection():
    """'4x32h': per-KV-head selection, side by side with '4x32' (one choice per layer)."""
    assert rt.recall_list("4x32,4x32h, 8X16H") == [(4, 32), (4, 32, "head"), (8, 16, "head")]
    ms = rt.method_list([124], rt.recall_list("4x32,4x32h"))
    assert [m.label for m in ms] == ["dense", "streaming 4+124", "streaming 4+124 + recall 4x32",
                                     "streaming 4+124 + recall 4x32h"]
    assert [m.config().recall_select for m in ms] == ["layer", "layer", "layer", "head"]
    assert ms[3].config().cache_size == ms[2].config().cache_size == 256
    for bad in ("4x32x", "4x32hh", "h4x32", "4x32e0", "4x32e"):
        with pytest.raises(UserError, match="KxB"):
            rt.parse_recall(bad)
    every = rt.method_list([124], rt.recall_list("4x32e4,4x32he8,4x32e1"))[2:]  # 'eN': a choice lasts N decode steps
    assert [m.label for m in every] == ["streaming 4+124 + recall 4x32e4", "streaming 4+124 + recall 4x32he8",
                                        "streaming 4+124 + recall 4x32"]
    assert [(m.config().recall_every, m.config().recall_select) for m in every] == [(4, "layer"), (8, "head"), (1, "layer")]
    mean = rt.method_list([124], rt.recall_list("8x32m,8x32me4,4x32hm"))[2:]  # 'm': blocks scored by their mean key
    assert [m.label for m in mean] == ["streaming 4+124 + recall 8x32m", "streaming 4+124 + recall 8x32me4",
                                       "streaming 4+124 + recall 4x32hm"]
    assert [(m.config().recall_score, m.config().recall_every, m.config().recall_select) for m in mean] == [
        ("mean", 1, "layer"), ("mean", 4, "layer"), ("mean", 1, "head")]
    assert rt.method_list([124], [(4, 32)])[2].config().recall_score == "bound"
    both = rt.method_list([124], rt.recall_list("16x32be4,4x32hB"))[2:]  # 'b': the bound and the mean key in turn
    assert [m.label for m in both] == ["streaming 4+124 + recall 16x32be4", "streaming 4+124 + recall 4x32hb"]
    assert [(m.config().recall_score, m.config().recall_every, m.config().recall_select) for m in both] == [
        ("both", 4, "layer"), ("both", 1, "head")]
    for bad in ("4x32mm", "4x32mh", "4x32em4", "4x32mb", "4x32bm"):
        with pytest.raises(UserError, match="KxB"):
            rt.parse_recall(bad)


def test_target_rule():
    assert rt.target(1.0, 0.0, 0.8, True) == {"counts": True, "met": True, "recall_over_dense": 0.8}
    assert rt.target(1.0, 0.0, 0.75, True)["met"] is False
    assert rt.target(1.0, 0.25, 1.0, True)["met"] is False  # streaming is not near 0
    assert rt.target(0.25, 0.0, 0.0, True) == {"counts": False, "met": None}  # dense does not answer
    assert rt.target(1.0, 1.0, 1.0, False)["counts"] is False  # the key was not evicted


def test_streameval_schedule_and_values():
    assert se.schedule(20, 3) == [(20, 0), (30, 10), (40, 20)]
    v = se.values(20, 3, 0)
    assert len(v) == 41 and v == se.values(20, 3, 0) and v != se.values(20, 3, 1)
    assert all(10000 <= x <= 99999 for x in v)


def _args(**kw):
    base = dict(model="tiny", variants=None, lengths=None, depths=None, trials=1, windows=None, recall=None, seed=0,
                bos=None, no_progress=True, chunk_size=32, distances=None, queries=None, corpus=None)
    return SimpleNamespace(**{**base, **kw})


def test_window_that_holds_everything_answers_as_dense(tmp_path, tok, monkeypatch):
    """Passkey and StreamEval: streaming 4+W with W beyond every prompt gives dense's replies, token for
    token (the tiny model's replies are random text, so any difference in the attended tokens shows)."""
    model = tiny_model("llama", vocab_size=len(tok))
    corpus = tmp_path / "book.txt"
    corpus.write_text(TEXT)
    a = _args(variants="base,code-key", lengths=[300, 340], depths=[0.2, 0.8], windows=[4000], recall="none",
              corpus=str(corpus), loaded=(model, tok))
    res = pk.run(a, tmp_path / "pk")
    rows = list(_csv(tmp_path / "pk" / "trials.csv"))
    dense = [r["reply"] for r in rows if r["method"] == "dense"]
    stream = [r["reply"] for r in rows if r["method"] == "streaming 4+4000"]
    assert len(dense) == 8 and dense == stream and not any(r["evicted"] == "True" for r in rows)
    assert res["accuracy"]["dense"] == res["accuracy"]["streaming 4+4000"]
    b = _args(distances=[2, 4], queries=3, windows=[6000], recall="none", loaded=(model, tok))
    se.run(b, tmp_path / "se")
    q = list(_csv(tmp_path / "se" / "queries.csv"))
    assert [r["reply"] for r in q if r["method"] == "dense"] == [r["reply"] for r in q if r["method"] == "streaming 4+6000"]
    assert len(q) == 3 * 2 * 3  # dense, window, streaming (no recall); 2 distances; 3 queries


def test_small_window_answers_differ_from_dense(tmp_path, tok):
    """The equivalence above can fail: a window far shorter than the prompt changes the replies."""
    model = tiny_model("llama", vocab_size=len(tok))
    a = _args(variants="repeat-filler", lengths=[400], depths=[0.1, 0.5], windows=[16], recall="2x16", loaded=(model, tok))
    pk.run(a, tmp_path / "pk")
    rows = list(_csv(tmp_path / "pk" / "trials.csv"))
    dense = [r["reply"] for r in rows if r["method"] == "dense"]
    assert dense != [r["reply"] for r in rows if r["method"] == "streaming 4+16"]
    assert all(r["evicted"] == "True" for r in rows if r["method"] != "dense")


def _csv(path):
    import csv

    with open(path) as f:
        yield from csv.DictReader(f)


def test_both_experiments_end_to_end_through_the_cli(tiny_dir, tmp_path, cli, monkeypatch):
    monkeypatch.setenv("STREAMING_LLM_THREADS", "1")
    corpus = tmp_path / "book.txt"
    corpus.write_text(TEXT)
    out = tmp_path / "results"
    rc, stdout, err = cli("reproduce", "passkey", "--model", tiny_dir, "--corpus", str(corpus),
                           "--lengths", "300,360", "--depths", "0.1,0.9", "--windows", "24,40", "--recall", "2x16",
                           "--out", str(out), "--no-progress", "--plot")
    assert rc == 0, err
    summary = json.loads(stdout.strip().splitlines()[-1])
    d = out / "passkey_tiny"
    assert summary["experiment"] == "passkey" and summary["complete"] and summary["prompts"] == 2 * 2 * 4
    res = json.loads((d / "results.json").read_text())
    assert res["methods"] == ["dense", "streaming 4+24", "streaming 4+24 + recall 2x16", "streaming 4+40",
                              "streaming 4+40 + recall 2x16"]
    assert len(res["cells"]) == 2 * 2 * 5 and set(res["by_variant"]) == set(pk.VARIANTS)
    assert len(list(_csv(d / "trials.csv"))) == 16 * 5 and len(list(_csv(d / "cells.csv"))) == 20
    assert json.loads((d / "run.json").read_text())["command"].startswith("streaming-llm reproduce passkey")
    assert res["target"]["checks"] and all(0 <= c["dense"] <= 1 for c in res["target"]["checks"])
    for name in ("passkey_heatmap.png", "passkey_length.png", "passkey_variants.png"):
        assert (d / name).stat().st_size > 1000
    assert "length depth" in stdout

    rc, stdout, err = cli("reproduce", "streameval", "--model", tiny_dir, "--distances", "2,5",
                           "--queries", "2", "--windows", "30", "--recall", "2x16", "--out", str(out),
                           "--no-progress", "--plot")
    assert rc == 0, err
    d = out / "streameval_tiny"
    res = json.loads((d / "results.json").read_text())
    assert res["methods"] == ["dense", "window 0+34", "streaming 4+30", "streaming 4+30 + recall 2x16"]
    assert set(res["accuracy"]["dense"]) == {"2", "5"} and res["complete"]
    rows = list(_csv(d / "queries.csv"))
    assert len(rows) == 4 * 2 * 2 and {r["line"] for r in rows} == {"0", "10"}
    assert all(r["evicted"] == "False" for r in rows if r["method"] == "dense")
    assert len(list(_csv(d / "table.csv"))) == 8 and (d / "streameval.png").stat().st_size > 1000
    rc, stdout, _ = cli("plot", "streameval", "--results", str(tmp_path / "nothing"))
    assert rc == 2


@pytest.mark.parametrize("argv, match", [
    (["passkey", "--recall", "4y32"], "KxB"),
    (["passkey", "--depths", "1.5"], r"\[0, 1\]"),
    (["passkey", "--trials", "0"], "trials"),
    (["passkey", "--variants", "base,nope"], "variant"),
    (["streameval", "--queries", "0"], "queries"),
    (["streameval", "--distances", "0"], "distances"),
    (["streameval", "--windows", "0"], "windows"),
])
def test_bad_inputs_fail_clearly_before_loading(cli, argv, match):
    rc, _, err = cli("reproduce", *argv, "--model", "no-such-model")
    assert rc == 2 and re.search(match, err), err


def test_rerunning_one_variant_keeps_the_others(tmp_path, tok):
    model = tiny_model("llama", vocab_size=len(tok))
    a = _args(variants="repeat-filler,plain-question", lengths=[300], depths=[0.5], windows=[16], recall="none",
              loaded=(model, tok))
    pk.run(a, tmp_path)
    first = list(_csv(tmp_path / "trials.csv"))
    res = pk.run(_args(**{**vars(a), "variants": "plain-question"}), tmp_path)
    again = list(_csv(tmp_path / "trials.csv"))
    assert len(again) == len(first) == 4 and res["grid"]["variants"] == ["repeat-filler", "plain-question"]
    assert [r for r in again if r["variant"] == "repeat-filler"] == [r for r in first if r["variant"] == "repeat-filler"]
    assert res["earlier_run"]["kept_variants"] == ["repeat-filler"] and res["earlier_run"]["replaced_variants"] == ["plain-question"]
    assert res["by_variant"]["repeat-filler"] and res["prompts"] == 2
    other = pk.run(_args(**{**vars(a), "variants": "plain-question", "depths": [0.4]}), tmp_path)  # another grid: no merge
    assert "earlier_run" not in other and len(list(_csv(tmp_path / "trials.csv"))) == 2


def test_paired_target_counts_only_prompts_dense_answers_with_the_key_evicted():
    ms = rt.method_list([16], [(2, 8)])
    row = lambda m, t, ok, ev: {"method": m, "variant": "base", "length": 300, "depth": 0.5, "trial": t,  # noqa: E731
                                "correct": ok, "evicted": ev}
    rows = [row("dense", 0, True, False), row("dense", 1, True, False), row("dense", 2, False, False),
            row("dense", 3, True, False)]
    rows += [row("streaming 4+16", 0, False, True), row("streaming 4+16", 1, False, True),
             row("streaming 4+16", 2, False, True), row("streaming 4+16", 3, True, False)]
    rows += [row("streaming 4+16 + recall 2x8", t, ok, True) for t, ok in enumerate([True, False, True, True])]
    got = pk.paired_target(rows, ms, ["base"])
    assert got[0] == {"recall": "streaming 4+16 + recall 2x8", "streaming": "streaming 4+16", "variant": "all",
                      "prompts": 2, "streaming_accuracy": 0.0, "recall_accuracy": 0.5, "met": False}
    assert got[1]["variant"] == "base" and got[1]["prompts"] == 2
