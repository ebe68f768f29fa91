"""A reward function that raises or hangs must not stop a GRPO run.

Each call of a reward function (one function over one rollout batch) runs with a time limit
(``reward.timeout_s``): a call that raises or does not return in time counts as reward 0 for
every completion of the batch, and the error is recorded (``reward_errors`` in the step's
metrics row and one line per failed call in ``<out>/reward_errors.jsonl``). Pure Python: a
daemon thread per call (a hung function is abandoned, not killed: it cannot block the job or
the process's exit); in ``reward.mode: task`` the Ray task applies the same rule, and the
driver cancels a task that outlives ``timeout_s`` plus a grace period.
"""
from __future__ import annotations

import threading
import traceback
from typing import Callable

FAILED_REWARD = 0.0
GRACE_S = 30.0   # task mode: extra time for the task itself (start-up, the function's import)


def call_with_timeout(fn: Callable, args: tuple = (), kwargs: dict | None = None,
                      timeout_s: float | None = None) -> tuple[object, str | None]:
    """``(value, None)``, or ``(None, error)`` when ``fn`` raised or ran past ``timeout_s``."""
    box: dict = {}

    def run():
        try:
            box["value"] = fn(*args, **(kwargs or {}))
        except BaseException as e:  # noqa: BLE001 - user code: report whatever it raised
            box["error"] = f"{type(e).__name__}: {e}"[:500]
            box["trace"] = traceback.format_exc(limit=5)[-2000:]

    if timeout_s is None:
        run()
    else:
        t = threading.Thread(target=run, name="effsft-reward", daemon=True)
        t.start()
        t.join(timeout_s)
        if t.is_alive():
            return None, f"timed out after {timeout_s:g} s (reward.timeout_s)"
    if "error" in box:
        return None, box["error"]
    return box["value"], None


def failed_rewards(n: int) -> list[float]:
    return [FAILED_REWARD] * n
