"""The native kernels: `decode_attention.c` and `qlinear.c`, compiled on this machine into one
library and called through ctypes.

Why: decoding attends one query per row over that row's own keys. torch's CPU flash kernel spends
45-60 us on such a call over a few hundred keys (against about 10 us of arithmetic and memory),
and a batch of streams at different stages needs one call per row, so in a server's 8-row decode
step the attention took 12.8 of 38.6 ms (docs/server_measurements.md, "Where 8 sessions stop").
And torch's packed int4 kernel multiplies in float32, so its cost grows with the rows (3.9 ms per
token of the default model's linears for one row, 12.8 for eight): `qlinear.c` quantizes each
row's inputs to int8 per group of 32 (as llama.cpp does) and sums the byte products in integers
with AVX512-VNNI (64 per instruction) or, on CPUs without it, AVX2 (32 per instruction pair).

What: `decode(q, keys, values, lengths, scale)` returns the attention of q (B, Hq, 1, D) over
`keys[i, :, :lengths[i]]` (B, Hkv, N, D; grouped-query heads share them) as (B, Hq, 1, D), or None
where the kernel does not apply (not float32 on the CPU, more than one query, autograd, head
shapes past the C limits) or is not available; the caller then uses torch's SDPA.
`linear(x, weights, scales, mins, per_group, bits, out_features)` is a quantized linear in the
layout `models/quantize.py` packs (`linear_available()`: whether this build has a vector path,
AVX512-VNNI or AVX2; the caller uses torch's packed kernels where it has not). In both, a row's bits do not depend on the
other rows or the thread count: a stream alone and the same stream in a batch get the same bits.

Build: `$CC` (default `cc`) with `FLAGS` into `<cache>/native/native-<hash>.so`, the hash of the
sources, the flags, the compiler's version and this CPU's identity (`-march=native`), once per
machine (written under a temporary name, then renamed). Loaded after torch, so its OpenMP calls
run in torch's libgomp; if that would put a second OpenMP runtime in the process, it is not used.
Not available: not Linux, no compiler, a failed build, or `STREAMING_LLM_NATIVE=0` (both kernels
off: torch's SDPA and packed int4/int8 kernels); `status()` says which kernels run and why. The
choice is made once per process.

What it does NOT do: masks, bfloat16 caches, chunks of several queries, sink rotation (the
callers in `core/attention.py` keep torch for those); linears on CPUs with neither AVX512-VNNI nor
AVX2 (with FMA and F16C); any
Windows/macOS build.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import torch

SOURCES = tuple(Path(__file__).with_name(n) for n in ("decode_attention.c", "qlinear.c"))
FLAGS = ("-O3", "-march=native", "-fopenmp", "-fno-math-errno", "-shared", "-fPIC")
ENV = "STREAMING_LLM_NATIVE"  # "0": never build or use the kernels
BUILD_TIMEOUT_S = 120
_OPENMP_LIBS = ("libgomp", "libiomp", "libomp")


@functools.lru_cache(maxsize=None)
def _library() -> tuple[ctypes.CDLL | None, str]:
    """(the loaded library, or None; why), decided once per process."""
    if os.environ.get(ENV, "1") == "0":
        return None, f"torch SDPA ({ENV}=0)"
    if not sys.platform.startswith("linux"):
        return None, f"torch SDPA (no native build on {sys.platform})"
    cc = os.environ.get("CC", "cc")
    try:
        version = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=30).stdout.splitlines()[0]
    except (OSError, subprocess.SubprocessError, IndexError):
        return None, f"torch SDPA (no C compiler: {cc!r} not found)"
    maps_before = _openmp_runtimes()
    try:
        lib, path = _load(cc, version)
    except (OSError, subprocess.SubprocessError) as e:
        return None, f"torch SDPA (building or loading the native kernels failed: {str(e).strip()[:300]})"
    if len(_openmp_runtimes() | maps_before) > 1:
        return None, "torch SDPA (the native build would run a second OpenMP runtime beside torch's)"
    lib.decode_attention.restype = ctypes.c_int
    P, L, I = ctypes.c_void_p, ctypes.c_long, ctypes.c_int  # noqa: N806, E741
    lib.decode_attention.argtypes = [P, L, L, P, P, L, L, L, P, I, I, I, I, ctypes.c_float, I, P]
    lib.qlinear.restype = lib.qlinear_fast.restype = ctypes.c_int
    lib.qlinear.argtypes = [P, L, L, L, P, P, P, I, I, L, P, I, I]
    return lib, f"native ({path.name}, {version})"


def _cached_path(cc: str, version: str) -> Path:
    """Where this machine's build lives: named by the source, flags, compiler and CPU it depends on."""
    from .calibrate import cpu_identity
    from .loading import cache_dir

    key = json.dumps({"sources": [hashlib.sha256(p.read_bytes()).hexdigest() for p in SOURCES], "flags": FLAGS,
                      "cc": version, "machine": platform.machine(), "cpu": cpu_identity()}, sort_keys=True)
    return cache_dir() / "native" / f"native-{hashlib.sha256(key.encode()).hexdigest()[:16]}.so"


def _load(cc: str, version: str) -> tuple[ctypes.CDLL, Path]:
    """This machine's build, built first if it is not in the cache (or cannot be loaded from it)."""
    path = _cached_path(cc, version)
    if path.exists():
        try:
            return ctypes.CDLL(str(path)), path
        except OSError:  # a damaged file: build it again
            path.unlink(missing_ok=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.{os.getpid()}"
    try:
        done = subprocess.run([cc, *FLAGS, *map(str, SOURCES), "-o", str(tmp), "-lm"], capture_output=True, text=True,
                              timeout=BUILD_TIMEOUT_S)
        if done.returncode != 0:
            raise OSError(done.stderr or f"{cc} exited with {done.returncode}")
        os.replace(tmp, path)  # whole or not at all, also with another process building beside this one
    finally:
        tmp.unlink(missing_ok=True)
    return ctypes.CDLL(str(path)), path


def _openmp_runtimes() -> set[str]:
    """The OpenMP runtimes mapped into this process (Linux /proc/self/maps), by file name."""
    try:
        with open("/proc/self/maps") as f:
            names = {Path(line.split()[-1]).name for line in f if "/" in line}
    except OSError:
        return set()
    return {n for n in names if n.startswith(_OPENMP_LIBS)}


def status() -> str:
    """Which kernel decodes in this process, and why (e.g. "native (...)", "torch SDPA (no C compiler ...)")."""
    return _library()[1]


def linear_status() -> str:
    """Which kernel runs the int4/int8 linears in this process, and why."""
    lib, why = _library()
    if lib is None:
        return "torch packed kernels" + why[len("torch SDPA"):]
    return {2: "native (AVX512-VNNI)", 1: "native (AVX2)"}.get(lib.qlinear_fast(),
                                                              "torch packed kernels (this CPU has neither AVX512-VNNI nor AVX2)")


def linear_available() -> bool:
    """Whether `linear` runs here (the native library with its AVX512-VNNI or AVX2 path)."""
    lib = _library()[0]
    return lib is not None and bool(lib.qlinear_fast())


def linear(x: torch.Tensor, weights: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor, per_group: bool,
           bits: int, out_features: int, portable: bool = False) -> torch.Tensor:
    """x (..., K) @ the packed weights (`qlinear.c`'s layout) -> (..., out_features) float32 (a 2-D
    x's rows may be strided: they are read in place). `portable`: the plain-C path (the same bits;
    slow: for tests). Raises where it cannot run: callers check `linear_available()` once, when
    they pack."""
    lib = _library()[0]
    if lib is None:
        raise RuntimeError(f"the native kernels are not available: {status()}")
    shape = x.shape
    x = x if x.dim() == 2 else x.reshape(-1, shape[-1])
    x = x if x.dtype == torch.float32 and x.stride(-1) == 1 else x.float().contiguous()
    m, k = x.shape
    y = torch.empty(*shape[:-1], out_features, dtype=torch.float32)  # the caller's shape: no view after
    if m == 0:  # no rows (as torch's kernels allow)
        return y
    rc = lib.qlinear(x.data_ptr(), m, k, x.stride(0), weights.data_ptr(), scales.data_ptr(), mins.data_ptr(),
                     int(per_group), bits, out_features, y.data_ptr(), torch.get_num_threads(), int(portable))
    if rc != 0:
        raise RuntimeError(f"qlinear failed ({rc}) for x {tuple(x.shape)}, {bits} bits, {out_features} outputs")
    return y


def decode(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, lengths, scale: float) -> torch.Tensor | None:
    """Attention of q (B, Hq, 1, D) over keys/values[i, :, :lengths[i]] (B, Hkv, N, D), as
    (B, Hq, 1, D); None where the kernel does not apply or is not available (see the module doc)."""
    if q.dim() != 4 or q.shape[2] != 1 or keys.dim() != 4 or len(lengths) != q.shape[0]:
        return None
    if any(t.dtype != torch.float32 or t.device.type != "cpu" or t.stride(-1) != 1 for t in (q, keys, values)):
        return None
    if keys.stride() != values.stride() or keys.shape != values.shape or (torch.is_grad_enabled() and q.requires_grad):
        return None
    if min(lengths) < 1 or max(lengths) > keys.shape[2]:
        return None
    lib = _library()[0]
    if lib is None:
        return None
    b, hq, _, d = q.shape
    out = torch.empty(b, hq, 1, d, dtype=torch.float32)
    lens = (ctypes.c_long * b)(*lengths)
    rc = lib.decode_attention(q.data_ptr(), q.stride(0), q.stride(1), keys.data_ptr(), values.data_ptr(),
                              keys.stride(0), keys.stride(1), keys.stride(2), lens, b, hq, keys.shape[1], d,
                              float(scale), torch.get_num_threads(), out.data_ptr())
    return out if rc == 0 else None
