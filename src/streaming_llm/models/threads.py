"""The CPU thread policy of a process that decodes: how many torch threads it uses.

Decoding one token runs hundreds of small parallel regions. On a quiet machine, one thread per
core with OpenMP's default wait policy (idle threads spin a while) is fastest; on a machine where
other processes already keep cores busy, threads that spin or wait for a core that is not free
make every region late (measured in BENCHMARKS.md, "Thread policy"). So the default policy
("auto") looks at how busy the CPUs are when the model is loaded and uses as many threads as there
are free cores, at least one and at most torch's own default (one per physical core).

- `busy_cores(sample_s)`: CPUs kept busy by the whole machine (all processes) over a short sample of
  /proc/stat; the 1-minute load average where /proc/stat cannot be read.
- `pick_threads(limit)`: the thread count for the free cores, with the reason.
- `resolve(requested)`: an explicit count wins; else `$STREAMING_LLM_THREADS` (a count, `auto`, or
  `torch` for torch's own default); else torch's default where `OMP_NUM_THREADS` is set; else `auto`.
- `apply(requested)`: resolve and set it with `torch.set_num_threads`.

The decision is made once, at start: it does not follow the load as it changes later, it does not
change OpenMP's wait policy (read once, when torch loads; set `OMP_WAIT_POLICY` yourself), and it
imports torch only in `apply`.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

ENV = "STREAMING_LLM_THREADS"
SAMPLE_S = 0.2  # long enough to see a busy core, short enough not to delay a chat's start
_IDLE_FIELDS = (3, 4)  # idle, iowait in a /proc/stat cpu line (after the label)


@dataclass(frozen=True)
class ThreadChoice:
    threads: int | None  # None: leave torch's default alone
    policy: str  # "explicit", "auto" or "torch"
    reason: str
    busy_cores: float | None = None

    def as_dict(self) -> dict:
        return {"threads": self.threads, "thread_policy": self.policy, "thread_reason": self.reason,
                "busy_cores_at_start": self.busy_cores}


def _cpu_times() -> tuple[int, int] | None:
    """(busy, total) jiffies of all CPUs together, or None where /proc/stat is not readable."""
    try:
        with open("/proc/stat") as f:
            fields = f.readline().split()
    except OSError:
        return None
    if not fields or fields[0] != "cpu":
        return None
    values = [int(v) for v in fields[1:9]]  # user nice system idle iowait irq softirq steal (guest is inside user)
    idle = sum(values[i] for i in _IDLE_FIELDS)
    return sum(values) - idle, sum(values)


def cpu_count() -> int:
    """CPUs this process may run on."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def default_limit() -> int:
    """torch's own default thread count: one per physical core this process may use."""
    n = cpu_count()
    try:
        import psutil

        physical = psutil.cpu_count(logical=False)
    except ImportError:
        physical = None
    return max(1, min(n, physical or n))


def busy_cores(sample_s: float = SAMPLE_S) -> float | None:
    """How many CPUs the machine keeps busy (all processes; this one sleeps while sampling)."""
    a = _cpu_times()
    if a is not None:
        time.sleep(sample_s)
        b = _cpu_times()
        if b is not None and b[1] > a[1]:
            return round((b[0] - a[0]) / (b[1] - a[1]) * (os.cpu_count() or 1), 2)
    if hasattr(os, "getloadavg"):
        return round(os.getloadavg()[0], 2)
    return None


def pick_threads(limit: int | None = None, busy: float | None = None, sample_s: float = SAMPLE_S) -> ThreadChoice:
    """As many threads as free cores (rounded), between 1 and `limit` (torch's default)."""
    limit = limit or default_limit()
    busy = busy_cores(sample_s) if busy is None else busy
    if busy is None:
        return ThreadChoice(limit, "auto", "CPU load unknown: one thread per core", None)
    free = (os.cpu_count() or 1) - busy
    threads = max(1, min(limit, int(free + 0.5)))
    return ThreadChoice(threads, "auto", f"{busy:.1f} of {os.cpu_count()} CPUs busy at start", busy)


def resolve(requested: int | str | None = None) -> ThreadChoice:
    """The thread choice for an explicit request, else `$STREAMING_LLM_THREADS`, else auto."""
    if requested is None:
        requested = os.environ.get(ENV, "").strip()
    if requested is None or requested == "":
        if os.environ.get("OMP_NUM_THREADS", "").strip():  # the user's OpenMP setting wins over auto
            return ThreadChoice(None, "torch", "OMP_NUM_THREADS is set")
        requested = "auto"
    text = str(requested).strip().lower()
    if text == "auto":
        return pick_threads()
    if text == "torch":
        return ThreadChoice(None, "torch", "torch's default")
    try:
        threads = int(text)
    except ValueError:
        from ..errors import UserError

        raise UserError(f"threads must be a number, 'auto' or 'torch' (got {requested!r}; see ${ENV})") from None
    if threads < 1:
        from ..errors import UserError

        raise UserError(f"threads must be >= 1 (got {threads})")
    return ThreadChoice(threads, "explicit", "asked for")


def apply(requested: int | str | None = None) -> ThreadChoice:
    """Resolve the thread choice and give it to torch. Returns what was chosen and why."""
    choice = resolve(requested)
    if choice.threads is not None:
        import torch

        if torch.get_num_threads() != choice.threads:
            torch.set_num_threads(choice.threads)
    return choice
