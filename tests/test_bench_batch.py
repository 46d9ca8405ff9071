"""`streaming-llm bench --batch-sizes`: one row per batch size with batch_size and aggregate
tokens_per_s, every row's caches full; bad batch sizes fail clearly. No timing is asserted."""

from __future__ import annotations

import json

import pytest

from streaming_llm.cli import main
from streaming_llm.errors import UserError
from streaming_llm.bench.runner import parse_batch_sizes
from tiny_models import save_tiny_model


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("tiny") / "llama")


def test_batch_sizes_give_one_row_each_with_aggregate_tokens_per_s(tiny, tmp_path, capsys):
    out, png = tmp_path / "b.json", tmp_path / "b.png"
    argv = ["bench", "--model", tiny, "--cache-sizes", "16", "--methods", "streaming", "--batch-sizes", "1,3",
            "--steps", "4", "--warmup", "1", "--in-process", "--json", str(out), "--plot", str(png), "--markdown"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    data = json.loads(out.read_text())
    rows = {r["batch_size"]: r for r in data["results"]}
    assert set(rows) == {1, 3}
    for b, r in rows.items():
        assert r["tokens_per_s"] == pytest.approx(1000 * b / r["ms_per_token_p50"], rel=1e-3)
        assert r["cache_tokens"] == 16 and r["evicted"] > 0  # full caches: every step evicts
    assert "streaming_batch3_over_batch1_tokens_per_s" in data["ratios"]["16"]
    assert "| streaming x3 |" in printed and png.is_file()
    assert "streaming@16x3" in json.loads(printed.strip().splitlines()[-1])["p50_ms"]


def test_bad_batch_sizes_are_user_errors():
    for bad in ("0", "x", ""):
        with pytest.raises(UserError):
            parse_batch_sizes(bad, ["streaming"])
    with pytest.raises(UserError, match="streaming and window only"):
        parse_batch_sizes("1,4", ["streaming", "dense"])
    assert parse_batch_sizes("8, 1,2,2", ["streaming"]) == [1, 2, 8]
