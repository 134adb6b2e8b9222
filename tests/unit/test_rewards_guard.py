"""User reward functions run in a worker process with a time limit: a hang, ``os._exit`` or ``sys.exit`` stops
with an error naming the function instead of hanging or ending training silently."""

from __future__ import annotations

import os
import sys
import time

import pytest

from tunelab.errors import TunelabError
from tunelab.rewards.functions import RewardSet
from tunelab.rewards.guard import Worker, WorkerError, WorkerStopped

MODULE = '''
import os, sys, time

CALLS = []

def hangs(completions, prompts, **fields):
    time.sleep(3600)

def exits_0(completions, prompts, **fields):
    os._exit(0)

def sys_exit_3(completions, prompts, **fields):
    raise SystemExit(3)

def counts(completions, prompts, *, bonus=0.0, **fields):
    CALLS.append(len(completions))  # module state lives in the worker, between calls
    return [len(CALLS) + bonus + float(a == c) for c, a in zip(completions, fields["answer"])]

def where(completions, prompts, **fields):
    return [float(os.getpid())] * len(completions)
'''


@pytest.fixture
def guarded(tmp_path, monkeypatch):
    (tmp_path / "guarded_rewards.py").write_text(MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "guarded_rewards", raising=False)
    return "guarded_rewards"


def test_a_hanging_reward_is_stopped_at_its_time_limit(guarded):
    rewards = RewardSet([{"fn": "exact_match"}, {"fn": f"{guarded}:hangs"}], timeout=1)
    started = time.monotonic()
    with pytest.raises(TunelabError, match=rf"reward '{guarded}:hangs' did not return within 1 s.*recipe.reward_timeout"):
        rewards.check(["a", "b"], ["p", "q"], {"answer": ["a", "c"]})
    assert time.monotonic() - started < 15
    rewards.close()


@pytest.mark.parametrize(("fn", "message"), [
    ("exits_0", r"ended its process \(exit status 0\) instead of returning: it called os._exit\(\) or crashed"),
    ("sys_exit_3", r"raised SystemExit: sys.exit\(3\) was called on example 0"),
])
def test_a_reward_that_exits_stops_naming_itself(guarded, fn, message):
    rewards = RewardSet([{"fn": f"{guarded}:{fn}"}], timeout=30)
    with pytest.raises(TunelabError, match=rf"reward '{guarded}:{fn}' {message}"):
        rewards.dry_run(None, ["p", "q"], {"answer": ["a", "b"]})
    rewards.close()


def test_user_rewards_run_in_one_worker_that_keeps_state_and_restarts(guarded):
    rewards = RewardSet([{"fn": f"{guarded}:counts", "bonus": 0.5}, {"fn": f"{guarded}:where"}, {"fn": "exact_match"}])
    fields = {"answer": ["a", "b"]}
    first = rewards.check(["a", "x"], ["p", "q"], fields)
    assert first[f"{guarded}:counts"] == [2.5, 1.5] and first["exact_match"] == [1.0, 0.0]
    assert rewards.check(["a", "x"], ["p", "q"], fields)[f"{guarded}:counts"] == [3.5, 2.5]
    pid = first[f"{guarded}:where"][0]
    assert pid != os.getpid() and rewards.check(["a"], ["p"], {"answer": ["a"]})[f"{guarded}:where"] == [pid]
    rewards.close()
    assert rewards.check(["a"], ["p"], {"answer": ["a"]})[f"{guarded}:counts"] == [2.5]  # a fresh worker


def test_the_worker_reports_what_the_function_raised(guarded):
    worker = Worker()
    try:
        with pytest.raises(WorkerError, match="No module named 'no_such_module_xyz'") as raised:
            worker.call("no_such_module_xyz:f", (), {}, timeout=30)
        assert raised.value.kind == "ModuleNotFoundError" and "Traceback" in raised.value.details
        with pytest.raises(WorkerStopped) as stopped:
            worker.call(f"{guarded}:exits_0", ([], []), {}, timeout=30)
        assert not stopped.value.timed_out
        assert worker.call("os:getpid", (), {}, timeout=30) != os.getpid()  # restarted after it ended
    finally:
        worker.close()


def test_a_timeout_must_be_positive():
    with pytest.raises(TunelabError, match="recipe.reward_timeout"):
        RewardSet([{"fn": "exact_match"}], timeout=0)


def test_the_worker_start_does_not_count_against_the_first_call(monkeypatch):
    """A loaded machine can take seconds to boot the worker's interpreter; the first call's limit starts after."""
    import tunelab.rewards.guard as guard

    monkeypatch.setattr(guard, "_BOOT", "import time; time.sleep(2); " + guard._BOOT)
    worker = Worker()
    try:
        assert worker.call("os.path:join", ("a", "b"), {}, 1.0) == os.path.join("a", "b")
    finally:
        worker.close()
