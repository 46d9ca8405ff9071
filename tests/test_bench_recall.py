"""`streaming-llm bench` with method recall on a tiny model: the row exists beside streaming's, the
fill is honoured (the memory holds the tokens streamed into it first), bad recall flags fail clearly.

No timing is asserted: the cost of recall is a command with recorded output (BENCHMARKS.md).
"""

from __future__ import annotations

import json

import pytest

from streaming_llm.bench.report import load_results, markdown, plot_data
from streaming_llm.cli import main
from tiny_models import save_tiny_model

S, SIZE, K, B = 4, 36, 2, 4  # window 32; recall attends to 8 more tokens


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("tiny") / "llama")


def _bench(tiny, *extra) -> list[str]:
    return ["bench", "--model", tiny, "--cache-sizes", str(SIZE), "--steps", "4", "--warmup", "1", "--threads", "1",
            "--recall-blocks", str(K), "--block-size", str(B), "--recall-fill-text", "random", *extra]


def test_recall_rows_beside_streaming_and_the_fill_is_honoured(tiny, tmp_path, capsys):
    out = tmp_path / "recall.json"
    assert main(_bench(tiny, "--methods", "streaming,recall", "--recall-fill", "0,300", "--markdown",
                       "--json", str(out))) == 0
    data = json.loads(out.read_text())
    rows = {(r["method"], r.get("recall_fill")): r for r in data["results"]}
    assert set(rows) == {("streaming", None), ("recall", 0), ("recall", 300)}
    stream, empty, filled = rows["streaming", None], rows["recall", 0], rows["recall", 300]
    for r in (empty, filled):
        assert (r["recall_blocks"], r["block_size"], r["cache_size"]) == (K, B, SIZE)
        assert r["cache_tokens"] == stream["cache_tokens"]  # the same window: recall adds the K*B recalled on top
        assert r["recall_layers"] > 0 and r["recall_gathers_per_layer_step"] >= 0
        assert r["rss_anon_mb"] > 0 and r["rss_file_mb"] >= 0
    # every token but the sinks and the window ends up in the memory, in whole blocks
    for r, fill in ((empty, 0), (filled, 300)):
        evicted = fill + SIZE + r["warmup"] + r["steps"] - SIZE
        assert r["recall_stored_tokens"] == evicted // B * B
        assert r["tokens_seen"] == fill + SIZE + r["warmup"] + r["steps"]
    assert filled["recall_fill"] == 300 and filled["fill_s"] > 0 and filled["fill_rss"]
    assert filled["fill_rss"][-1]["stored_tokens"] == (300 - SIZE) // B * B and filled["fill_rss"][-1]["fed"] == 300
    ratios = data["ratios"][str(SIZE)]
    assert set(ratios) == {f"streaming+recall{K}x{B}_over_streaming", f"streaming+recall{K}x{B} fill 300_over_streaming"}
    text = capsys.readouterr().out
    assert f"streaming+recall{K}x{B} fill 300" in text and "(target <= 1.5)" in text
    summary = json.loads(text.strip().splitlines()[-1])
    assert f"streaming+recall{K}x{B}@{SIZE}" in summary["p50_ms"]
    md = markdown(load_results(str(out)))
    assert "| tokens in memory | RSS | anon | file |" in md and f"| streaming+recall{K}x{B} | {SIZE} | {SIZE + K * B} |" in md
    assert plot_data(data, str(tmp_path / "recall.png"))


def test_fill_from_a_corpus_file(tiny, tmp_path):
    text = tmp_path / "book.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 40)
    out = tmp_path / "corpus.json"
    argv = _bench(tiny, "--methods", "recall", "--recall-fill", "100", "--in-process", "--json", str(out))
    argv[argv.index("random")] = str(text)
    assert main(argv) == 0
    (row,) = json.loads(out.read_text())["results"]
    assert row["recall_fill_text"] == str(text) and row["recall_stored_tokens"] >= 100 // B * B


@pytest.mark.parametrize("extra, message", [
    (["--methods", "recall", "--recall-blocks", "0"], "method recall needs --recall-blocks"),
    (["--methods", "streaming"], "add recall to --methods"),
    (["--methods", "recall", "--recall-fill", "1k"], "--recall-fill: '1k' is not a comma list"),
    (["--methods", "recall", "--recall-fill", "-5"], "--recall-fill needs integers >= 0"),
    (["--methods", "recall", "--recall-memory-tokens", "2"], "--recall-memory-tokens must be"),
    (["--methods", "recall", "--recall-fill", "50", "--recall-fill-text", "/nonexistent/corpus"], "corpus source not found"),
])
def test_bad_recall_flags_fail_clearly(tiny, extra, message, capsys):
    assert main(_bench(tiny, *extra)) == 2  # a flag given twice: the later one wins
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
