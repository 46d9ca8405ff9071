"""The CPU thread policy of a process that decodes: how many torch threads it uses.

Decoding one token runs hundreds of small parallel regions. On a quiet machine, one thread per
core with OpenMP's default wait policy (idle threads spin a while) is fastest; on a machine where
other processes already keep cores busy, threads that spin or wait for a core that is not free
make every region late (measured in BENCHMARKS.md, "Thread policy"). So the default policy
("auto") looks at how busy the CPUs are when the model is loaded: on a quiet machine it uses torch's
own default (one thread per physical core, OpenMP's default wait policy); on a busy one it does
what `BUSY_MODE` says (`$STREAMING_LLM_BUSY_THREADS` overrides it):
- "fewer": as many threads as there are free cores, at least one;
- "passive": all the threads, with `OMP_WAIT_POLICY=PASSIVE` (idle threads sleep at once). OpenMP
  reads that once, when torch loads, so it is only chosen where torch is not loaded yet (or for a
  child process, with `child_env`); elsewhere "fewer" is used instead.

- `busy_cores(sample_s)`: CPUs kept busy by the whole machine (all processes) over a short sample of
  /proc/stat; the 1-minute load average where /proc/stat cannot be read.
- `pick_threads(limit)`: the thread count for the free cores, with the reason.
- `resolve(requested)`: an explicit count wins; else `$STREAMING_LLM_THREADS` (a count, `auto`, or
  `torch` for torch's own default); else torch's default where `OMP_NUM_THREADS` is set; else `auto`.
- `apply(requested)`: resolve and set it with `torch.set_num_threads`.

The decision is made once, at start: it does not follow the load as it changes later; an
`OMP_WAIT_POLICY` the user set is never changed; torch is imported only in `apply`.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

ENV = "STREAMING_LLM_THREADS"
BUSY_ENV = "STREAMING_LLM_BUSY_THREADS"
BUSY_MODES = ("fewer", "passive")
BUSY_MODE = "fewer"  # what auto does on a busy machine; chosen by benchmarks/thread_policy.py (BENCHMARKS.md)
SAMPLE_S = 0.2  # long enough to see a busy core, short enough not to delay a chat's start
_IDLE_FIELDS = (3, 4)  # idle, iowait in a /proc/stat cpu line (after the label)


@dataclass(frozen=True)
class ThreadChoice:
    threads: int | None  # None: leave torch's default alone
    policy: str  # "explicit", "auto" or "torch"
    reason: str
    busy_cores: float | None = None
    wait_policy: str | None = None  # "PASSIVE": OMP_WAIT_POLICY for a process whose torch is not loaded yet

    def as_dict(self) -> dict:
        return {"threads": self.threads, "thread_policy": self.policy, "thread_reason": self.reason,
                "busy_cores_at_start": self.busy_cores, "omp_wait_policy": self.wait_policy}

    def child_env(self, env: dict | None = None) -> dict:
        """The environment for a child process that should run with this choice."""
        env = dict(os.environ if env is None else env)
        if self.wait_policy and not env.get("OMP_WAIT_POLICY"):
            env["OMP_WAIT_POLICY"] = self.wait_policy
        return env


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


def busy_mode() -> str:
    mode = os.environ.get(BUSY_ENV, "").strip().lower() or BUSY_MODE
    if mode not in BUSY_MODES:
        from ..errors import UserError

        raise UserError(f"${BUSY_ENV} must be one of {', '.join(BUSY_MODES)} (got {mode!r})")
    return mode


def pick_threads(limit: int | None = None, busy: float | None = None, sample_s: float = SAMPLE_S,
                 passive_ok: bool = True) -> ThreadChoice:
    """`limit` threads (torch's default) on a quiet machine; on a busy one, as `busy_mode()` says:
    one per free core (rounded, at least 1), or `limit` with the PASSIVE wait policy where
    `passive_ok` (torch not loaded yet, or the choice is for child processes)."""
    limit = limit or default_limit()
    busy = busy_cores(sample_s) if busy is None else busy
    if busy is None:
        return ThreadChoice(limit, "auto", "CPU load unknown: one thread per core", None)
    free = (os.cpu_count() or 1) - busy
    said = f"{busy:.1f} of {os.cpu_count()} CPUs busy at start"
    if free >= limit - 0.5:
        return ThreadChoice(limit, "auto", said, busy)
    if busy_mode() == "passive" and passive_ok and not os.environ.get("OMP_WAIT_POLICY"):
        return ThreadChoice(limit, "auto", said + ": passive wait policy", busy, "PASSIVE")
    return ThreadChoice(max(1, min(limit, int(free + 0.5))), "auto", said + ": one thread per free core", busy)


def resolve(requested: int | str | None = None, for_children: bool = False) -> ThreadChoice:
    """The thread choice for an explicit request, else `$STREAMING_LLM_THREADS`, else auto.
    `for_children`: the choice is for fresh child processes (they get `child_env()`)."""
    if requested is None:
        requested = os.environ.get(ENV, "").strip()
    if requested is None or requested == "":
        if os.environ.get("OMP_NUM_THREADS", "").strip():  # the user's OpenMP setting wins over auto
            return ThreadChoice(None, "torch", "OMP_NUM_THREADS is set")
        requested = "auto"
    text = str(requested).strip().lower()
    if text == "auto":
        import sys

        return pick_threads(passive_ok=for_children or "torch" not in sys.modules)
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
    """Resolve the thread choice and give it to torch (the wait policy first, before torch loads).
    Returns what was chosen and why."""
    choice = resolve(requested)
    if choice.wait_policy and not os.environ.get("OMP_WAIT_POLICY"):
        os.environ["OMP_WAIT_POLICY"] = choice.wait_policy  # read by OpenMP when torch loads, just below
    if choice.threads is not None:
        import torch

        if torch.get_num_threads() != choice.threads:
            torch.set_num_threads(choice.threads)
    return choice


# ---- one OpenMP team per process --------------------------------------------------------------
# libgomp keeps a team of worker threads for every thread that has run a parallel region, and once
# a process holds more OpenMP threads than there are CPUs it throttles every team's spin-wait to a
# few hundred iterations: a decode step then runs as if OMP_WAIT_POLICY were PASSIVE. Measured on
# the default model at cache 1024, 2 threads (`benchmarks/omp_teams.py`, output in
# benchmarks/results/omp_teams.txt, two runs): 20.8 / 21.9 ms per token on a second thread once the
# loading thread had exited, 43.9 / 42.8 ms on it while the main thread held a team too. So a process that decodes on a
# thread of its own
# (the server) loads the model on a thread that then exits (`run_in_passing_thread`), and its
# other threads, which only sample, copy and serialise, run torch single-threaded
# (`single_threaded`), so the decoding thread's team is the only one.


def run_in_passing_thread(fn, *args, **kwargs):
    """fn(*args, **kwargs) on a new thread that exits when it returns, so the OpenMP team it started
    is released with it (exceptions are re-raised here)."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="load") as pool:
        return pool.submit(fn, *args, **kwargs).result()


def single_threaded() -> None:
    """Make torch's parallel regions on the CALLING thread run on that thread alone (a thread-pool
    initializer): OpenMP's per-thread team size, set after torch has set it up for this thread, so
    torch's process-wide thread count, which later threads start from, is left as it is. A no-op
    where torch's OpenMP runtime cannot be reached."""
    import ctypes

    import torch

    torch.get_num_threads()  # torch's lazy per-thread set-up first, or it would override the call below
    try:
        ctypes.CDLL(None).omp_set_num_threads(1)
    except (OSError, AttributeError):
        pass
