"""A reward function that raises or hangs: the call is cut at reward.timeout_s, its batch scores
0, the error is reported, and the other reward functions' columns are untouched."""
from __future__ import annotations

import sys
import textwrap
import time

import pytest

from effsft.grpo.reward_guard import call_with_timeout
from effsft.grpo.rollout import score, score_task


@pytest.fixture
def reward_module(tmp_path, monkeypatch):
    (tmp_path / "my_rewards.py").write_text(textwrap.dedent("""
        import time

        def length(prompts, completions, **kw):
            return [float(len(c)) for c in completions]

        def boom(prompts, completions, **kw):
            raise ZeroDivisionError("bad reward")

        def hang(prompts, completions, **kw):
            time.sleep(30)
            return [1.0] * len(completions)

        def short(prompts, completions, **kw):
            return [1.0]
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    yield "my_rewards"
    sys.modules.pop("my_rewards", None)


def test_call_with_timeout():
    assert call_with_timeout(lambda: 3, timeout_s=5) == (3, None)
    v, err = call_with_timeout(lambda: 1 / 0, timeout_s=5)
    assert v is None and err.startswith("ZeroDivisionError")
    t0 = time.monotonic()
    v, err = call_with_timeout(time.sleep, (30,), timeout_s=0.2)
    assert v is None and "timed out after 0.2 s" in err and time.monotonic() - t0 < 5


def test_failing_and_hanging_rewards_score_zero_and_are_reported(reward_module):
    comps = ["a", "bbb"]
    for fn, match in (("boom", "ZeroDivisionError: bad reward"), ("hang", "timed out"),
                      ("short", "returned 1 values for 2")):
        values, err = score_task(f"{reward_module}:{fn}", ["p", "p"], comps, {}, timeout_s=0.5)
        assert values == [0.0, 0.0] and match in err
    errors: list = []
    t0 = time.monotonic()
    total, per = score([f"{reward_module}:length", f"{reward_module}:hang"], [1.0, 1.0], ["p", "p"], comps, {},
                       mode="inline", timeout_s=0.5, errors=errors)
    assert time.monotonic() - t0 < 10
    assert per[:, 0].tolist() == [1.0, 3.0] and per[:, 1].tolist() == [0.0, 0.0]
    assert total.tolist() == [1.0, 3.0]
    assert [f for f, _ in errors] == [f"{reward_module}:hang"] and "reward.timeout_s" in errors[0][1]


def test_task_mode_reports_a_raising_function(ray_session):
    errors: list = []
    # time:sleep called as a reward function raises TypeError inside the Ray task
    total, per = score(["time:sleep", "math_exact_match"], [1.0, 1.0], ["p"], ["4"], {"answer": ["4"]},
                       mode="task", timeout_s=10, errors=errors)
    assert per[0].tolist() == [0.0, 1.0] and [f for f, _ in errors] == ["time:sleep"]
    assert "TypeError" in errors[0][1]
