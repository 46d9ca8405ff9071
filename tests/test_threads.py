"""The thread policy of the loading layer (models/threads.py): explicit, environment, auto."""

import os

import pytest
import torch

from streaming_llm.errors import UserError
from streaming_llm.models import threads


@pytest.fixture
def clean_env(monkeypatch):
    monkeypatch.delenv(threads.ENV, raising=False)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.delenv(threads.BUSY_ENV, raising=False)
    return monkeypatch


def test_free_cores_decide_the_count(clean_env):
    clean_env.setenv(threads.BUSY_ENV, "fewer")
    n = os.cpu_count()
    assert threads.pick_threads(limit=n, busy=0.0).threads == n
    assert threads.pick_threads(limit=n, busy=float(n)).threads == 1  # never fewer than one
    assert threads.pick_threads(limit=1, busy=0.0).threads == 1  # never more than the limit
    if n >= 2:
        assert threads.pick_threads(limit=n, busy=n - 1.2).threads == 1
        assert threads.pick_threads(limit=n, busy=0.4).threads == n
    choice = threads.pick_threads(limit=n, busy=1.0)
    assert choice.policy == "auto" and "1.0 of" in choice.reason and choice.busy_cores == 1.0


def test_default_busy_mode_is_the_measured_one(clean_env):
    assert threads.busy_mode() == threads.BUSY_MODE == "fewer"
    quiet = threads.pick_threads(limit=2, busy=0.0)
    assert quiet.threads == 2 and quiet.wait_policy is None  # quiet: spin, all cores


def test_busy_cores_samples_the_machine():
    busy = threads.busy_cores(0.05)
    assert busy is None or 0.0 <= busy <= os.cpu_count() + 0.5


def test_resolve_order(clean_env):
    assert threads.resolve(3) == threads.ThreadChoice(3, "explicit", "asked for")
    clean_env.setenv(threads.ENV, "torch")
    assert threads.resolve(None).threads is None
    clean_env.setenv(threads.ENV, "2")
    assert threads.resolve(None).threads == 2 and threads.resolve(1).threads == 1
    clean_env.setenv(threads.ENV, "many")
    with pytest.raises(UserError, match="'auto' or 'torch'"):
        threads.resolve(None)
    with pytest.raises(UserError, match=">= 1"):
        threads.resolve(0)
    clean_env.delenv(threads.ENV)
    clean_env.setenv("OMP_NUM_THREADS", "1")
    assert threads.resolve(None).policy == "torch"  # the user's OpenMP setting is left alone
    clean_env.delenv("OMP_NUM_THREADS")
    assert threads.resolve(None).policy == "auto"


def test_apply_sets_torch_threads(clean_env):
    n = torch.get_num_threads()
    try:
        assert threads.apply(1).threads == 1 and torch.get_num_threads() == 1
        clean_env.setenv(threads.ENV, "torch")
        assert threads.apply(None).threads is None and torch.get_num_threads() == 1  # untouched
    finally:
        torch.set_num_threads(n)


def test_busy_mode_passive_keeps_the_threads_and_sleeps(clean_env):
    n = os.cpu_count()
    clean_env.delenv("OMP_WAIT_POLICY", raising=False)
    clean_env.setenv(threads.BUSY_ENV, "passive")
    choice = threads.pick_threads(limit=n, busy=float(n))
    assert choice.threads == n and choice.wait_policy == "PASSIVE"
    assert choice.child_env({})["OMP_WAIT_POLICY"] == "PASSIVE"
    assert threads.pick_threads(limit=n, busy=float(n), passive_ok=False).wait_policy is None  # torch loaded: fewer
    assert threads.pick_threads(limit=n, busy=float(n), passive_ok=False).threads == 1
    clean_env.setenv("OMP_WAIT_POLICY", "ACTIVE")  # the user's setting is never changed
    assert threads.pick_threads(limit=n, busy=float(n)).wait_policy is None
    assert threads.ThreadChoice(2, "auto", "", None, "PASSIVE").child_env({"OMP_WAIT_POLICY": "ACTIVE"}) == {
        "OMP_WAIT_POLICY": "ACTIVE"}
    clean_env.setenv(threads.BUSY_ENV, "sometimes")
    with pytest.raises(UserError, match="fewer, passive"):
        threads.pick_threads(limit=n, busy=float(n))


def test_single_threaded_limits_only_the_calling_thread():
    import threading

    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        seen = {}

        def helper():
            threads.single_threaded()
            seen["helper"] = torch.get_num_threads()

        t = threading.Thread(target=helper)
        t.start()
        t.join()
        assert seen["helper"] == 1
        assert torch.get_num_threads() == 2  # the calling thread and torch's own count are untouched
        later = {}
        t = threading.Thread(target=lambda: later.update(n=torch.get_num_threads()))
        t.start()
        t.join()
        assert later["n"] == 2  # threads started afterwards still get torch's count
    finally:
        torch.set_num_threads(before)


def test_run_in_passing_thread_returns_and_raises_on_the_caller():
    import threading

    assert threads.run_in_passing_thread(lambda x, y=1: (x + y, threading.current_thread().name), 2, y=3)[0] == 5
    assert threads.run_in_passing_thread(lambda: threading.current_thread()) is not threading.current_thread()
    with pytest.raises(ValueError, match="boom"):
        threads.run_in_passing_thread(lambda: (_ for _ in ()).throw(ValueError("boom")))
