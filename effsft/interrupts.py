"""SIGINT / SIGTERM to a job's driver (Ctrl-C, ``kill``, ``ray job stop``, a scheduler's
pre-emption): the job stops where it is, its workers are stopped, ``<out>.partial/`` is kept
for a re-run to resume, and the process exits 130 (SIGINT) or 143 (SIGTERM).

SIGINT already raises ``KeyboardInterrupt`` in the main thread; :func:`install` makes SIGTERM
raise :class:`Terminated` the same way, so ``finally`` blocks run (output locks are released,
temp files removed) instead of the process dying mid-write.
"""
from __future__ import annotations

import signal
import threading

EXIT_CODES = {"SIGINT": 130, "SIGTERM": 143}


class Terminated(BaseException):
    """SIGTERM arrived (a BaseException, like KeyboardInterrupt: ``except Exception`` passes it)."""

    signal_name = "SIGTERM"


def _raise_terminated(signum, frame):
    # once is enough: a second SIGTERM while cleaning up must not interrupt the clean-up
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    raise Terminated()


def install() -> None:
    """Make SIGTERM raise :class:`Terminated` in the main thread (no-op elsewhere)."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _raise_terminated)
        signal.signal(signal.SIGINT, signal.default_int_handler)


def exit_code(e: BaseException) -> int:
    return EXIT_CODES["SIGTERM"] if isinstance(e, Terminated) else EXIT_CODES["SIGINT"]


def stop_workers() -> None:
    """Stop this driver's Ray work: an embedded local Ray shuts down with its workers; on a
    cluster, disconnecting ends the driver's tasks, actors and Ray Train worker groups."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # do not interrupt the shutdown itself
    try:
        import sys

        if "ray" in sys.modules:
            import ray

            if ray.is_initialized():
                ray.shutdown()
    finally:
        signal.signal(signal.SIGINT, signal.default_int_handler)
