"""benchmarks/load_test.py end to end on a tiny model: a real `serve` process, levels in rounds,
each level with sessions of its own, the medians table."""

from __future__ import annotations

import importlib.util
import json
import time
from pathlib import Path


def load_bench():
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "load_test.py"
    spec = importlib.util.spec_from_file_location("load_test", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    return bench


def test_rounds_give_each_level_its_own_sessions_and_a_median(tiny_dir, tmp_path, capsys):
    out = tmp_path / "load.json"
    argv = ["--serve", str(tiny_dir), "--serve-arg=--threads=1", "--sessions", "1,2", "--rounds", "2", "--turns", "2",
            "--max-tokens", "3", "--time-cap-s", "120", "--out", str(out)]
    assert load_bench().main(argv) == 0
    result = json.loads(out.read_text())
    levels = result["levels"]
    assert [lv["sessions"] for lv in levels] == [1, 2, 1, 2] and all(lv["failed"] == 0 for lv in levels)
    # no level continues another's conversations: nothing rebuilt, every later turn prefills only its own
    assert levels[-1]["server"]["rebuilt"] == 0
    assert levels[-1]["server"]["turns"] == 1 + 2 * (1 + 2 + 1 + 2)  # the warm-up request, then 2 turns each
    medians = result["medians"]
    assert set(medians) == {"1", "2"} and all(len(m["tokens_per_s"]) == 2 for m in medians.values())
    assert medians["1"]["median_over_first"] == 1.0
    assert "median tok/s" in capsys.readouterr().out
    assert levels[0]["server"]["batch"]["ride_chunks"] is False  # the default: chunks apart


def test_a_count_repeated_in_the_list_also_gets_its_median_and_serve_flags_reach_the_server(tiny_dir, tmp_path):
    out = tmp_path / "load.json"
    argv = ["--serve", str(tiny_dir), "--serve-arg=--threads=1", "--serve-arg=--ride-chunks", "--sessions", "1,2,2,1",
            "--turns", "1", "--max-tokens", "2", "--time-cap-s", "120", "--pause-s", "1", "--out", str(out)]
    t0 = time.monotonic()
    assert load_bench().main(argv) == 0
    result = json.loads(out.read_text())
    levels_s = sum(lv["wall_s"] for lv in result["levels"])
    assert time.monotonic() - t0 >= 3 + levels_s  # a pause before each level after the first, in no level's time
    assert result["levels"][0]["server"]["batch"]["ride_chunks"] is True  # `serve --ride-chunks` reached the scheduler
    medians = result["medians"]
    assert set(medians) == {"1", "2"} and all(len(m["tokens_per_s"]) == 2 for m in medians.values())
