"""What the benchmark needs to know about the machine: who it is, how much memory a process holds,
how fast memory can be read, and how many bytes a decode step must read at the least.

- `machine_info()`: CPU model, cores, torch/transformers versions, threads, accelerator, the kernels
  of the decode attention and of the int4/int8 linears.
- `rss_mb()` / `peak_rss_mb()` / `reset_peak_rss()`: resident memory of this process (Linux
  /proc, psutil elsewhere); `rss_parts_mb()`: its anonymous and file-backed parts (Linux). Resetting the high-water mark (Linux >= 4.0, `/proc/self/clear_refs`)
  lets a measurement exclude the transient peak of model loading.
- `memory_bandwidth()`: best-of-N GB/s of a large tensor sum (read) and copy (read + write).
- `weight_bytes(model)` / `kv_bytes(cache)`: bytes one decode step reads, in their stored dtype.

It measures; it prints nothing and imports torch only inside the functions that need it.
"""

from __future__ import annotations

import os
import platform
import re
import resource
import sys
import time

_PROC_STATUS = "/proc/self/status"


def _proc_kb(field: str) -> float | None:
    try:
        with open(_PROC_STATUS) as f:
            m = re.search(rf"^{field}:\s+(\d+)\s+kB", f.read(), re.M)
        return float(m.group(1)) if m else None
    except OSError:
        return None


def rss_mb() -> float:
    """Current resident set size of this process, MiB."""
    kb = _proc_kb("VmRSS")
    if kb is None:
        import psutil

        return psutil.Process().memory_info().rss / 2**20
    return kb / 1024


def rss_parts_mb() -> dict:
    """Current RSS split into anonymous memory and file-backed pages (e.g. memory-mapped weights,
    which the kernel may drop and read again), MiB; empty where /proc does not say."""
    anon, file = _proc_kb("RssAnon"), _proc_kb("RssFile")
    if anon is None or file is None:
        return {}
    return {"rss_anon_mb": round(anon / 1024, 1), "rss_file_mb": round(file / 1024, 1)}


def peak_rss_mb() -> float:
    """Peak resident set size since the process started or since `reset_peak_rss()`, MiB."""
    kb = _proc_kb("VmHWM")
    if kb is None:  # ru_maxrss: KiB on Linux, bytes on macOS; never reset
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak / 2**20 if sys.platform == "darwin" else peak / 1024
    return kb / 1024


def process_peak_rss_mb() -> float:
    """Peak RSS over the whole life of the process (model loading included), MiB."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024


def reset_peak_rss() -> bool:
    """Reset the peak-RSS high-water mark to the current RSS. False where the OS cannot."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            m = re.search(r"^model name\s*:\s*(.+)$", f.read(), re.M)
        if m:
            return m.group(1).strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_flags() -> list[str]:
    """The vector extensions that matter for matmuls (subset of /proc/cpuinfo flags)."""
    wanted = ("avx2", "avx512f", "avx512_bf16", "avx512_vnni", "avx_vnni", "amx_bf16", "amx_int8", "fma")
    try:
        with open("/proc/cpuinfo") as f:
            m = re.search(r"^flags\s*:\s*(.+)$", f.read(), re.M)
        have = set(m.group(1).split()) if m else set()
    except OSError:
        have = set()
    return [w for w in wanted if w in have]


def machine_info(device: str = "cpu") -> dict:
    import torch
    import transformers

    info = {
        "cpu": cpu_model(),
        "cpu_flags": cpu_flags(),
        "logical_cpus": os.cpu_count(),
        "usable_cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "device": device,
        "load_avg_1m": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None,
    }
    if str(device) == "cpu":  # which kernels run attention and int4/int8 linears (models/native.py), as the children see it
        from ..models import native

        info["decode_attention"] = native.status()
        info["quantized_linear"] = native.linear_status()
    try:
        import psutil

        info["memory_total_gb"] = round(psutil.virtual_memory().total / 1e9, 1)
    except ImportError:
        pass
    if str(device).startswith("cuda") and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def _sync(device: str) -> None:
    import torch

    if str(device).startswith("cuda"):
        torch.cuda.synchronize(device)


def memory_bandwidth(size_mb: int = 512, repeats: int = 7, device: str = "cpu") -> dict:
    """Best-of-`repeats` bandwidth in GB/s (1e9 bytes/s) of reading (`x.sum()`) and copying
    (`y.copy_(x)`, counted as read + write) a float32 tensor of `size_mb` MiB, far above the
    last-level cache, with the current torch thread count."""
    import torch

    n = size_mb * 2**20 // 4
    x = torch.ones(n, dtype=torch.float32, device=device)
    y = torch.empty_like(x)
    nbytes = x.numel() * 4
    best_read = best_copy = float("inf")
    for _ in range(repeats):
        _sync(device)
        t0 = time.perf_counter()
        x.sum()
        _sync(device)
        best_read = min(best_read, time.perf_counter() - t0)
        t0 = time.perf_counter()
        y.copy_(x)
        _sync(device)
        best_copy = min(best_copy, time.perf_counter() - t0)
    del x, y
    return {
        "read_gb_s": round(nbytes / best_read / 1e9, 2),
        "copy_gb_s": round(2 * nbytes / best_copy / 1e9, 2),
        "buffer_mb": size_mb,
        "repeats": repeats,
        "threads": torch.get_num_threads(),
    }


def _tensor_bytes(t) -> int:
    return t.numel() * t.element_size()


def weight_bytes(model) -> dict:
    """Bytes of weights a decode step reads, in their stored dtype: every parameter and buffer
    once (tied tensors count once; int8/int4 packed weights held as buffers count as stored),
    except the input embedding table, of which a step reads one row, unless it is tied to the
    output head (then the head reads all of it). A quantized linear whose wide copy serves every
    input (`QuantLinear.wide_rows == 1`) counts that copy, 2 bytes a weight, instead of its buffers."""
    seen, total = set(), 0
    for m in model.modules():
        if getattr(m, "wide_rows", None) == 1 and getattr(m, "wide", None) is not None:
            seen.update(t.data_ptr() for t in m.buffers(recurse=False))  # a decode step does not read these
            total += 2 * m.in_features * m.out_features
    embed = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    embed_w = getattr(embed, "weight", None)
    head_w = getattr(head, "weight", None)
    tied = embed_w is not None and head_w is not None and embed_w.data_ptr() == head_w.data_ptr()
    skip = embed_w.data_ptr() if embed_w is not None and not tied else None
    for t in list(model.parameters()) + list(model.buffers()):
        ptr = t.data_ptr()
        if ptr in seen or ptr == skip or t.numel() == 0:
            continue
        seen.add(ptr)
        total += _tensor_bytes(t)
    if skip is not None:
        total += embed_w.shape[-1] * embed_w.element_size()  # the one row looked up
    dtypes = sorted({str(t.dtype).removeprefix("torch.") for t in list(model.parameters()) + list(model.buffers())})
    return {"weight_bytes": total, "weight_dtypes": dtypes, "tied_embeddings": tied}


def kv_bytes(cache) -> int:
    """Bytes of keys and values held by a transformers `Cache` (every layer reads all of them
    in a decode step at a full cache). 0 for no cache (recompute)."""
    if cache is None:
        return 0
    total = 0
    for layer in getattr(cache, "layers", []):
        for name in ("keys", "values"):
            t = getattr(layer, name, None)
            if t is not None and hasattr(t, "numel"):
                total += _tensor_bytes(t)
    return total
