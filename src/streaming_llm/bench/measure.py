"""What runs inside one fresh `streaming-llm bench` subprocess: load the model, prefill, decode, time.

`measure(spec)` times one (method, cache size); `measure_long(spec)` streams a long run at one
size, recording latency and RSS every K tokens. `run_worker(spec)` starts the subprocess (so peak
RSS is per configuration) and returns its result; `worker_main` is the subprocess's entry point,
reading the spec from argv and printing the result JSON as its last stdout line. Decoders:
- `_EngineDecoder`: the engine's `feed([tok], logits="last")` for streaming, window, dense, recompute
  and recall (streaming with `recall_blocks` blocks of `block_size` evicted tokens recalled per
  forward; `recall_fill` tokens, of a corpus or random, are streamed through chunked prefill first,
  so the memory holds them when the window is filled and the decode timed);
  dense is cropped back (untimed) before each step so every step attends over exactly `size` tokens;
- `_HFDecoder`: plain transformers, eager attention, default DynamicCache (same cropping);
- method `llamacpp` is measured by `llamacpp.measure_llamacpp`, in a worker without torch.
This module measures and returns dicts; it prints only progress lines to stderr.
"""

from __future__ import annotations

import gc
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from ..models import DEFAULT_DTYPE
from ..errors import UserError

HF_DTYPE = DEFAULT_DTYPE  # float32: the baseline is plain transformers: always float32, eager attention
PROFILE_ROWS = 25
FILL_CHECKPOINT = 12_500  # tokens in the recall memory between RSS checkpoints of a fill
SEED = 0

def _sync(device: str) -> None:
    import torch

    if str(device).startswith("cuda"):
        torch.cuda.synchronize(device)


class _EngineDecoder:
    """streaming / window / dense / recompute through the engine's `feed`."""

    def __init__(self, model, method: str, size: int, sinks: int, chunk: int, recall: dict | None = None):
        from ..core.config import StreamingConfig
        from ..core.engine import StreamingLLM

        sinks = 0 if method == "window" else sinks
        config = StreamingConfig(method="streaming" if method == "recall" else method, sinks=sinks, window=size - sinks,
                                 chunk_size=chunk, **(_recall_fields(recall) if method == "recall" else {}))
        self.engine = StreamingLLM(model, None, config)
        self.method, self.size, self.sinks = method, size, sinks
        # dense keeps size-1 tokens before a step (streaming holds `size` with the new token)
        self.prefill_len = size - 1 if method == "dense" else size

    @property
    def cache(self):
        return self.engine.cache

    def prefill(self, ids) -> None:
        self.engine.feed(ids, logits="none")

    def before_step(self) -> None:
        if self.method == "dense":
            _crop(self.engine.cache, self.size - 1)

    def step(self, tok: int) -> int:
        return int(self.engine.feed([tok], logits="last").argmax())

    def state(self) -> dict:
        e = self.engine
        out = {"cache_tokens": e.cache_tokens, "tokens_seen": e.tokens_seen, "evicted": max(e.evicted, 0)}
        memories = [m for m in e.cache.memories if m is not None] if self.method == "recall" else []
        if memories:
            out.update(recall_layers=len(memories), recall_stored_tokens=memories[0].stored_tokens,
                       recall_gathers=sum(m.gathers for m in memories))
        return out


def _recall_fields(recall: dict) -> dict:
    """The `StreamingConfig` recall fields of a bench spec's `recall` entry."""
    return {"recall_blocks": recall["blocks"], "block_size": recall["block_size"],
            "recall_memory_tokens": recall["memory_tokens"], "recall_dtype": recall["dtype"],
            "recall_every": recall.get("every", 1)}


class _HFDecoder:
    """Plain transformers: eager attention, default DynamicCache, no engine involved."""

    def __init__(self, model, size: int, chunk: int):
        import inspect

        from transformers.cache_utils import DynamicCache

        model.set_attn_implementation("eager")
        self.model, self.size, self.chunk = model, size, chunk
        self.cache = DynamicCache(config=model.config)
        self.cache_kw = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
        self.device = next(model.parameters()).device
        self.prefill_len, self.seen = size - 1, 0

    def _forward(self, ids):
        import torch

        with torch.no_grad():  # as `generate` runs
            out = self.model(input_ids=ids.to(self.device)[None, :], use_cache=True, logits_to_keep=1,
                             **{self.cache_kw: self.cache})
        self.seen += ids.numel()
        return out.logits[0, -1]

    def prefill(self, ids) -> None:
        for lo in range(0, ids.numel(), self.chunk):
            self._forward(ids[lo : lo + self.chunk])

    def before_step(self) -> None:
        _crop(self.cache, self.size - 1)

    def step(self, tok: int) -> int:
        import torch

        return int(self._forward(torch.tensor([tok])).argmax())

    def state(self) -> dict:
        return {"cache_tokens": self.cache.get_seq_length(), "tokens_seen": self.seen, "evicted": 0}


def _crop(cache, keep: int) -> None:
    extra = cache.get_seq_length() - keep
    if extra > 0:
        cache.crop(-extra)


def _pct(samples: list[float], q: float) -> float:
    s = sorted(samples)
    return s[min(len(s) - 1, max(0, round(q * (len(s) - 1))))]


def _load(spec: dict):
    """(model, tokenizer, dtype, quant, seconds): the engine's model as the flags say; hf: plain float32."""
    from types import SimpleNamespace

    import torch

    from ..cliargs import load_model_from_args
    from ..models.special_tokens import stream_prefix

    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    torch.manual_seed(SEED)
    hf = spec["method"] == "hf"
    dtype, quant = (HF_DTYPE, "none") if hf else (spec["dtype"], spec.get("quant", "none"))
    t0 = time.perf_counter()
    model, tokenizer = load_model_from_args(SimpleNamespace(model=spec["model"], dtype=dtype, device=spec["device"], quant=quant,
                                                            threads=spec.get("threads")))
    model.streaming_llm_stream_start = stream_prefix(tokenizer)  # the BOS rule, for `_prompt`
    with torch.no_grad():  # page in memory-mapped weights now, so RSS increases measure the cache
        for t in list(model.parameters()) + list(model.buffers()):
            if t.numel():
                t.sum()
    quant = getattr(model.config, "streaming_llm_quant", "none")  # what "auto" resolved to
    return model, tokenizer, dtype, quant, time.perf_counter() - t0


def _decoder(model, spec: dict):
    if spec.get("batch_size", 1) > 1:
        from .batched import BatchDecoder

        return BatchDecoder(model, spec["method"], spec["cache_size"], spec["sinks"], spec["chunk_size"], spec["batch_size"])
    if spec["method"] == "hf":
        return _HFDecoder(model, spec["cache_size"], spec["chunk_size"])
    return _EngineDecoder(model, spec["method"], spec["cache_size"], spec["sinks"], spec["chunk_size"], spec.get("recall"))


def _prompt(model, n: int):
    """n random token ids (seeded), the first one BOS when the model's rule starts a stream with it."""
    import torch

    vocab = model.config.get_text_config(decoder=True).vocab_size
    ids = torch.randint(0, vocab, (max(n, 1),), generator=torch.Generator().manual_seed(SEED))
    start = getattr(model, "streaming_llm_stream_start", [])
    if start:
        ids[: len(start)] = torch.as_tensor(start[: ids.numel()])
    return ids


def _fill_ids(model, tokenizer, source: str, n: int):
    """The first n token ids of corpus `source` (`eval.data.load_corpus`), or n random ones for "random"."""
    import torch

    if source == "random":
        return _prompt(model, n)
    from ..eval.data import load_corpus, tokenize_corpus

    ids, _ = tokenize_corpus(load_corpus(source), tokenizer)
    if len(ids) < n:
        raise UserError(f"--recall-fill-text {source}: {len(ids)} tokens, fewer than the {n} needed (fill + cache)")
    return torch.as_tensor(ids[:n], dtype=torch.long)


def _fill(dec, ids, chunk: int) -> tuple[float, list[dict]]:
    """Stream `ids` through the decoder's chunked prefill (progress on stderr): (seconds taken,
    RSS checkpoints against the tokens in the memory, about every FILL_CHECKPOINT tokens)."""
    from tqdm import tqdm

    from . import hardware

    t0, checkpoints, next_cp = time.perf_counter(), [], 0
    piece = max(chunk, 4096 // chunk * chunk)  # a few chunks per call: the engine chunks them itself
    with tqdm(total=ids.numel(), desc="bench recall fill", unit="tok", file=sys.stderr, leave=False) as bar:
        for lo in range(0, ids.numel(), piece):
            dec.prefill(ids[lo : lo + piece])
            bar.update(min(piece, ids.numel() - lo))
            stored = dec.state().get("recall_stored_tokens", 0)
            if stored >= next_cp or lo + piece >= ids.numel():
                checkpoints.append({"fed": min(lo + piece, ids.numel()), "stored_tokens": stored,
                                    "rss_mb": round(hardware.rss_mb(), 1), **hardware.rss_parts_mb()})
                next_cp = stored + FILL_CHECKPOINT
    return time.perf_counter() - t0, checkpoints


def measure(spec: dict) -> dict:
    """One (method, cache size): load, prefill, warm up, time `steps` decode steps."""
    import torch

    from . import hardware

    model, tokenizer, dtype, quant, load_s = _load(spec)
    device = spec["device"]
    cuda = str(device).startswith("cuda")
    gc.collect()
    base_rss = hardware.rss_mb()
    reset_ok = hardware.reset_peak_rss()
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
        base_gpu = torch.cuda.memory_allocated(device) / 2**20
    dec = _decoder(model, spec)
    recall = spec.get("recall") if spec["method"] == "recall" else None
    fill = recall["fill"] if recall else 0
    if fill:  # the memory first: `fill` tokens evicted, then the window filled and timed as for streaming
        ids = _fill_ids(model, tokenizer, recall["fill_text"], fill + dec.prefill_len)
        fill_s, fill_rss = _fill(dec, ids[:fill], spec["chunk_size"])
        ids = ids[fill:]
    else:
        ids = _prompt(model, dec.prefill_len)
    after_fill_rss = hardware.rss_mb()
    _sync(device)
    t0 = time.perf_counter()
    dec.prefill(ids)  # recompute only stores the ids: its prefill runs no forward
    _sync(device)
    prefill_s = time.perf_counter() - t0
    prefill_peak = hardware.peak_rss_mb()
    hardware.reset_peak_rss()  # from here on: the decode phase alone
    steps = spec["recompute_steps"] if spec["method"] == "recompute" else spec["steps"]
    warmup = min(spec["warmup"], 1) if spec["method"] == "recompute" else spec["warmup"]
    tok, samples = int(ids[-1]), []
    batch = spec.get("batch_size", 1)  # tokens per decode step
    gc.collect()
    before = dec.state()
    for i in range(warmup + steps):
        dec.before_step()
        _sync(device)
        t0 = time.perf_counter()
        tok = dec.step(tok)  # int(): waits for the device too
        dt = (time.perf_counter() - t0) * 1000
        if i >= warmup:
            samples.append(dt)
    decode_peak = hardware.peak_rss_mb()
    peak = max(prefill_peak, decode_peak)
    state = dec.state()
    w = hardware.weight_bytes(model)
    kv = hardware.kv_bytes(dec.cache)
    p50 = statistics.median(samples)
    row = {
        "method": spec["method"],
        "cache_size": spec["cache_size"],
        "ms_per_token_p50": round(p50, 4),
        "ms_per_token_p90": round(_pct(samples, 0.9), 4),
        "ms_per_token_mean": round(statistics.fmean(samples), 4),
        "ms_per_token_min": round(min(samples), 4),
        "ms_per_token_max": round(max(samples), 4),
        "batch_size": batch,
        "tokens_per_s": round(1000 * batch / p50, 2),  # aggregate over the batch's streams
        "steps": steps,
        "warmup": warmup,
        "peak_rss_mb": round(peak, 1),
        "baseline_rss_mb": round(base_rss, 1),
        "rss_increase_mb": round(peak - base_rss, 1),
        "decode_peak_rss_mb": round(decode_peak, 1),
        "decode_rss_increase_mb": round(decode_peak - base_rss, 1),
        "process_peak_rss_mb": round(hardware.process_peak_rss_mb(), 1),
        "peak_rss_reset": reset_ok,
        "prefill_tokens": int(ids.numel()) * batch,
        "prefill_s": round(prefill_s, 4),
        "prefill_tok_per_s": None if spec["method"] == "recompute" else round(ids.numel() * batch / prefill_s, 1),
        **state,
        **hardware.rss_parts_mb(),
        "sinks": spec["sinks"] if spec["method"] == "streaming" else 0,
        "kv_cache_mb": round(kv / 2**20, 3),
        "weight_mb": round(w["weight_bytes"] / 2**20, 3),
        "weight_dtypes": w["weight_dtypes"],
        "bytes_per_token": None if spec["method"] == "recompute" or batch > 1 else w["weight_bytes"] + kv,
        "dtype": dtype,
        "quant": quant,
        "threads": torch.get_num_threads(),
        "device": str(device),
        "load_s": round(load_s, 2),
        "load_avg_1m": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None,
        "samples_ms": [round(s, 3) for s in samples],
    }
    if recall:
        row.update(recall_blocks=recall["blocks"], block_size=recall["block_size"], recall_fill=fill,
                   recall_fill_text=recall["fill_text"] if fill else None, recall_dtype=recall["dtype"],
                   recall_memory_tokens=recall["memory_tokens"], recall_every=recall.get("every", 1),
                   rss_after_fill_mb=round(after_fill_rss, 1),
                   fill_s=round(fill_s, 2) if fill else None, fill_rss=fill_rss if fill else [],
                   recall_gathers_per_layer_step=round((state["recall_gathers"] - before["recall_gathers"])
                                                       / (state["recall_layers"] * (warmup + steps)), 4))
    if cuda:
        row["gpu_peak_mb"] = round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
        row["gpu_increase_mb"] = round(row["gpu_peak_mb"] - base_gpu, 1)
    if spec.get("profile"):
        row["profile_table"], row["profile_ops"] = _profile(dec, tok, spec)
    return row


def _profile(dec, tok: int, spec: dict) -> tuple[str, int]:
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if str(spec["device"]).startswith("cuda") else [])
    with profile(activities=acts) as prof:
        for _ in range(spec["profile_steps"]):
            dec.before_step()
            tok = dec.step(tok)
    averages = prof.key_averages()
    table = averages.table(sort_by="self_cpu_time_total", row_limit=PROFILE_ROWS)
    return table, sum(e.count for e in averages) // max(spec["profile_steps"], 1)


def measure_long(spec: dict) -> dict:
    """Stream `long_stream` decoded tokens at one cache size; record latency and RSS every K."""
    import torch

    from . import hardware

    model, _, dtype, quant, _ = _load(spec)
    device, every = spec["device"], spec["every"]
    cuda = str(device).startswith("cuda")
    dec = _decoder(model, spec)
    ids = _prompt(model, dec.prefill_len)
    dec.prefill(ids)
    tok, samples, checkpoints, block = int(ids[-1]), [], [], []
    start = time.perf_counter()
    for i in range(spec["long_stream"]):
        dec.before_step()
        _sync(device)
        t0 = time.perf_counter()
        tok = dec.step(tok)
        block.append((time.perf_counter() - t0) * 1000)
        if len(block) == every or i == spec["long_stream"] - 1:
            samples.extend(block)
            checkpoints.append({
                "tokens_decoded": i + 1, **dec.state(),
                "p50_ms": round(statistics.median(block), 4), "p90_ms": round(_pct(block, 0.9), 4),
                "max_ms": round(max(block), 3), "rss_mb": round(hardware.rss_mb(), 1),
                "elapsed_s": round(time.perf_counter() - start, 1),
                **({"gpu_mb": round(torch.cuda.memory_allocated(device) / 2**20, 1)} if cuda else {}),
            })
            print(f"bench long-stream: {i + 1}/{spec['long_stream']} tokens, p50 {checkpoints[-1]['p50_ms']:.2f} ms, "
                  f"RSS {checkpoints[-1]['rss_mb']:.0f} MB", file=sys.stderr, flush=True)
            block = []
    skip = min(spec["warmup"], len(samples) // 4)
    win = max(1, min(spec["long_window"], (len(samples) - skip) // 2))
    first, last = statistics.median(samples[skip : skip + win]), statistics.median(samples[-win:])
    rss0 = checkpoints[0]["rss_mb"]
    rss_max = max(c["rss_mb"] for c in checkpoints)
    return {
        "method": spec["method"], "cache_size": spec["cache_size"], "dtype": dtype, "quant": quant,
        "device": str(device),
        "tokens_decoded": len(samples), "prefill_tokens": int(ids.numel()), "window_tokens": win,
        "p50_first_ms": round(first, 4), "p50_last_ms": round(last, 4), "p50_last_over_first": round(last / first, 4),
        "latency_flat": last / first <= 1.10,
        "rss_first_mb": rss0, "rss_max_mb": rss_max, "rss_end_mb": checkpoints[-1]["rss_mb"],
        "rss_growth_pct": round((rss_max - rss0) / rss0 * 100, 3), "memory_flat": (rss_max - rss0) / rss0 < 0.05,
        "process_peak_rss_mb": round(hardware.process_peak_rss_mb(), 1),
        "checkpoints": checkpoints,
    }


def worker_main() -> None:
    """Entry point of a measurement subprocess: spec JSON in argv[1], result JSON last on stdout."""
    spec = json.loads(sys.argv[1])
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # this process only: one bar per configuration is noise
    try:
        result = _measure_any(spec)
    except UserError as e:
        print(json.dumps({"error": str(e)}))
        sys.exit(2)
    print(json.dumps(result))


def _measure_any(spec: dict) -> dict:
    if spec["method"] == "llamacpp":  # no torch in this process: llama.cpp brings its own OpenMP runtime
        if spec.get("long_stream") or spec.get("profile"):
            raise UserError("--long-stream and --profile measure the engine only; drop llamacpp from --methods")
        from .llamacpp import measure_llamacpp

        return measure_llamacpp(spec)
    return measure_long(spec) if spec.get("long_stream") else measure(spec)


def run_worker(spec: dict, in_process: bool = False) -> dict:
    if in_process:
        return _measure_any(spec)
    src = str(Path(__file__).resolve().parents[1])
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([src, os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep))
    code = "from streaming_llm.bench.measure import worker_main; worker_main()"
    proc = subprocess.run([sys.executable, "-c", code, json.dumps(spec)], stdout=subprocess.PIPE, text=True, env=env)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    result = json.loads(lines[-1]) if lines else {}
    if "error" in result:
        raise UserError(result["error"])
    if proc.returncode != 0 or not result:
        raise RuntimeError(f"bench worker for {spec['method']} @ {spec['cache_size']} failed (exit {proc.returncode})")
    return result
