"""`streaming-llm bench` runs and writes well-formed results on a tiny model; bad input fails clearly.

No timing is asserted anywhere: benchmarks are commands with recorded outputs (BENCHMARKS.md).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from streaming_llm.bench import runner as bench
from streaming_llm.bench.report import plot_file
from streaming_llm.cli import main
from streaming_llm.errors import UserError
from tiny_models import save_tiny_model

REQUIRED = {
    "method": str, "cache_size": int, "ms_per_token_p50": float, "ms_per_token_p90": float, "peak_rss_mb": float,
    "rss_increase_mb": float, "baseline_rss_mb": float, "decode_rss_increase_mb": float, "tokens_per_s": float, "steps": int, "dtype": str,
    "threads": int, "cache_tokens": int, "kv_cache_mb": float, "weight_mb": float, "samples_ms": list,
}
MACHINE = ("cpu", "logical_cpus", "torch", "torch_threads", "dtype", "model")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("tiny") / "llama")


def _summary(capsys) -> dict:
    out = capsys.readouterr().out.strip().splitlines()
    return json.loads(out[-1])  # the one-line JSON summary comes last


def _check_rows(data: dict, methods, sizes) -> None:
    rows = {(r["method"], r["cache_size"]): r for r in data["results"]}
    assert set(rows) == {(m, s) for m in methods for s in sizes}
    for r in rows.values():
        for key, kind in REQUIRED.items():
            assert isinstance(r[key], kind) or (kind is float and isinstance(r[key], int)), (key, r[key])
        assert 0 < r["ms_per_token_p50"] <= r["ms_per_token_p90"]
        assert r["peak_rss_mb"] >= r["baseline_rss_mb"] > 0
        assert len(r["samples_ms"]) == r["steps"]
        assert r["cache_tokens"] == r["cache_size"]  # measured at exactly `size` cached tokens
    for key in MACHINE:
        assert key in data["machine"]


def test_contract_command_form(tiny, tmp_path, capsys, monkeypatch):
    """The issue's command form, with fresh subprocesses per configuration."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # workers inherit it: no thread contention on a busy CI box
    out = tmp_path / "out.json"
    rc = main(["bench", "--model", tiny, "--cache-sizes", "16,32", "--methods", "streaming,dense", "--json", str(out)])
    assert rc == 0
    data = json.loads(out.read_text())
    _check_rows(data, ["streaming", "dense"], [16, 32])
    stream = [r for r in data["results"] if r["method"] == "streaming"]
    assert all(r["evicted"] > 0 for r in stream)  # the cache was full: eviction on every step
    assert set(data["ratios"]) == {"16", "32"}
    assert "streaming_over_dense" in data["ratios"]["16"]
    summary = _summary(capsys)
    assert summary["json"] == str(out) and "streaming@16" in summary["p50_ms"]


def test_every_method_floor_profile_and_plot(tiny, tmp_path, capsys):
    out, png = tmp_path / "all.json", tmp_path / "all.png"
    argv = ["bench", "--model", tiny, "--cache-sizes", "12", "--methods", "streaming,window,dense,recompute,hf",
            "--steps", "4", "--warmup", "1", "--recompute-steps", "2", "--floor", "--profile", "--in-process",
            "--json", str(out), "--plot", str(png)]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "profile: streaming @ cache 12" in printed and "Self CPU" in printed
    data = json.loads(out.read_text())
    _check_rows(data, ["streaming", "window", "dense", "recompute", "hf"], [12])
    rows = {r["method"]: r for r in data["results"]}
    assert rows["hf"]["dtype"] == "float32" and rows["recompute"]["kv_cache_mb"] == 0
    assert rows["streaming"]["floor_ms"] > 0 and rows["streaming"]["x_floor"] > 0
    assert data["machine"]["bandwidth"]["read_gb_s"] > 0
    assert set(data["ratios"]["12"]) == {"streaming_vs_recompute_speedup", "streaming_over_dense", "hf_over_streaming"}
    assert png.stat().st_size > 10_000


def test_long_stream_writes_checkpoints_and_plot(tiny, tmp_path, capsys):
    out, png = tmp_path / "long.json", tmp_path / "long.png"
    argv = ["bench", "--model", tiny, "--cache-sizes", "10", "--methods", "streaming", "--long-stream", "60",
            "--every", "20", "--long-window", "20", "--warmup", "2", "--in-process", "--json", str(out), "--plot", str(png)]
    assert main(argv) == 0
    long = json.loads(out.read_text())["long_stream"]
    assert [c["tokens_decoded"] for c in long["checkpoints"]] == [20, 40, 60]
    assert all(c["cache_tokens"] == 10 for c in long["checkpoints"])  # constant cache while streaming
    for key in ("p50_first_ms", "p50_last_ms", "p50_last_over_first", "rss_growth_pct", "latency_flat", "memory_flat"):
        assert key in long
    assert png.stat().st_size > 10_000
    assert _summary(capsys)["tokens_decoded"] == 60
    assert main(["bench", "--plot-from", str(out), "--markdown"]) == 0
    assert "| streaming | 10 | 60 |" in capsys.readouterr().out


def test_plot_from_json_only(tmp_path, capsys):
    rows = [
        {"method": m, "cache_size": s, "ms_per_token_p50": p, "ms_per_token_p90": p * 1.1, "peak_rss_mb": 600.0 + s / 100,
         "rss_increase_mb": s / 100, "dtype": "float32"}
        for m, k in (("streaming", 1.0), ("dense", 0.9), ("recompute", 50.0)) for s in (256, 1024) for p in [k * s / 100]
    ]
    path = tmp_path / "r.json"
    path.write_text(json.dumps({"results": rows, "machine": {"cpu": "test"}, "ratios": {}}))
    assert main(["bench", "--plot-from", str(path), "--markdown"]) == 0
    assert (tmp_path / "r.png").stat().st_size > 10_000
    printed = capsys.readouterr().out
    assert "| streaming | float32 | 256 | 2.56 |" in printed and "2.6 (-)" in printed and "| dense | float32 | 1024 |" in printed
    assert main(["bench", "--plot-from", str(path)]) == 0
    assert _summary(capsys)["plot"] == str(tmp_path / "r.png")
    assert plot_file(str(path), str(tmp_path / "x" / "other.png")).endswith("other.png")


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--methods", "streaming,fast"], "unknown method 'fast'"),
        (["--methods", ","], "--methods is empty"),
        (["--cache-sizes", "256,12x"], "'12x' is not an integer"),
        (["--cache-sizes", "4"], "must be greater than --sinks (4)"),
        (["--cache-sizes", ""], "--cache-sizes is empty"),
        (["--steps", "0"], "--steps must be >= 1"),
        (["--long-stream", "1"], "--long-stream must be at least 2"),
    ],
)
def test_bad_inputs_fail_clearly_before_loading(argv, message, capsys):
    assert main(["bench", "--model", "/nonexistent/never-loaded", *argv]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_plot_from_bad_files(tmp_path, capsys):
    assert main(["bench", "--plot-from", str(tmp_path / "missing.json")]) == 2
    assert "results file not found" in capsys.readouterr().err
    bad = tmp_path / "bad.json"
    bad.write_text('{"something": 1}')
    assert main(["bench", "--plot-from", str(bad)]) == 2
    assert "not written by streaming-llm bench" in capsys.readouterr().err


def test_worker_errors_surface_as_user_errors(tmp_path, capsys):
    assert main(["bench", "--model", str(tmp_path / "no-such-model"), "--cache-sizes", "16", "--methods", "dense"]) == 2
    assert "no such file or folder" in capsys.readouterr().err


def test_ratios_per_size():
    rows = [
        {"method": "streaming", "cache_size": 256, "ms_per_token_p50": 10.0},
        {"method": "dense", "cache_size": 256, "ms_per_token_p50": 9.0},
        {"method": "recompute", "cache_size": 256, "ms_per_token_p50": 1500.0},
        {"method": "hf", "cache_size": 256, "ms_per_token_p50": 25.0},
        {"method": "streaming", "cache_size": 512, "ms_per_token_p50": 11.0},
    ]
    rows.append({"method": "llamacpp", "cache_size": 256, "ms_per_token_p50": 12.5})
    r = bench.compute_ratios(rows)
    assert r == {"256": {"streaming_vs_recompute_speedup": 150.0, "streaming_over_dense": 1.111, "hf_over_streaming": 2.5,
                         "streaming_over_llamacpp": 0.8}}
    assert bench.parse_sizes("1024, 256,256", 4) == [256, 1024]
    with pytest.raises(UserError):
        bench.parse_methods("streaming,nope")


def test_quantized_engine_reads_fewer_weight_bytes(tiny, tmp_path):
    out = tmp_path / "q.json"
    base = ["bench", "--model", tiny, "--cache-sizes", "12", "--methods", "streaming,hf", "--steps", "3", "--warmup", "1",
            "--in-process", "--json", str(out)]
    assert main(base + ["--quant", "int8"]) == 0
    rows = {r["method"]: r for r in json.loads(out.read_text())["results"]}
    assert rows["streaming"]["quant"] == "int8" and "int8" in rows["streaming"]["weight_dtypes"]
    assert rows["hf"]["quant"] == "none" and rows["hf"]["dtype"] == "float32"  # the baseline stays plain
    assert rows["streaming"]["weight_mb"] < rows["hf"]["weight_mb"]


# ---- llama.cpp as a peer (bench/llamacpp.py) ---------------------------------------------------
def test_llamacpp_is_skipped_with_one_line_when_missing(tiny, tmp_path, capsys, monkeypatch):
    from streaming_llm.bench import llamacpp

    monkeypatch.setattr(llamacpp, "available", lambda: False)
    out = tmp_path / "skip.json"
    argv = ["bench", "--model", tiny, "--cache-sizes", "12", "--methods", "streaming,llamacpp", "--steps", "2",
            "--warmup", "1", "--in-process", "--json", str(out)]
    assert main(argv) == 0
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if "skipping llamacpp" in ln]
    assert len(lines) == 1 and "llama-cpp-python is not installed" in lines[0] and "pip install" in lines[0]
    assert [r["method"] for r in json.loads(out.read_text())["results"]] == ["streaming"]
    assert main(["bench", "--model", tiny, "--methods", "llamacpp", "--cache-sizes", "12"]) == 2
    assert "nothing to measure: llamacpp skipped" in capsys.readouterr().err


def test_llamacpp_needs_a_gguf(tiny, monkeypatch):
    from streaming_llm.bench import llamacpp

    monkeypatch.setattr(llamacpp, "available", lambda: True)
    assert "needs a GGUF model" in llamacpp.skip_reason(tiny)
    assert llamacpp._quant_name(Path("SmolLM2-135M-Instruct.Q4_1.gguf")) == "Q4_1"
    assert llamacpp._quant_name(Path("gemma-3-270m-q4_k_m.gguf")) == "Q4_K_M"
    meta = {"general.architecture": "llama", "llama.block_count": "30", "llama.attention.head_count": "9",
            "llama.attention.head_count_kv": "3", "llama.embedding_length": "576"}
    assert llamacpp._kv_bytes(meta, 1024) == 30 * 1024 * 3 * 128 * 2


def test_llamacpp_smoke_on_the_default_gguf(tmp_path, capsys):
    """Only where llama-cpp-python and the default model's package are installed (not in CI)."""
    pytest.importorskip("llama_cpp")
    from streaming_llm.bench import llamacpp

    if llamacpp.skip_reason("smollm2-135m-instruct"):
        pytest.skip(llamacpp.skip_reason("smollm2-135m-instruct"))
    out = tmp_path / "llama.json"
    argv = ["bench", "--methods", "llamacpp", "--cache-sizes", "16,32", "--steps", "3", "--warmup", "1",
            "--threads", "1", "--json", str(out)]
    assert main(argv) == 0
    data = json.loads(out.read_text())
    _check_rows(data, ["llamacpp"], [16, 32])
    r = data["results"][0]
    assert r["quant"] == "Q4_1" and r["threads"] == 1 and r["n_ctx"] >= 16 and r["prefill_tokens"] == 15
    assert "llamacpp@16" in _summary(capsys)["p50_ms"]


def test_busy_machine_runs_beside_and_is_recorded(tiny, tmp_path, monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.delenv("STREAMING_LLM_THREADS", raising=False)
    monkeypatch.setenv("OMP_WAIT_POLICY", "unset-by-this-test")  # recorded, so that what bench sets is undone
    monkeypatch.delenv("OMP_WAIT_POLICY")
    out = tmp_path / "busy.json"
    argv = ["bench", "--model", tiny, "--cache-sizes", "12", "--methods", "streaming", "--steps", "2", "--warmup", "1",
            "--busy", "1", "--in-process", "--json", str(out)]
    assert main(argv) == 0
    machine = json.loads(out.read_text())["machine"]
    assert machine["busy_threads"] == 1 and machine["thread_policy"] == "auto" and machine["threads"] >= 1
    assert machine["busy_cores_at_start"] is not None
