"""SIGINT / SIGTERM to a job's driver (Ctrl-C, ``kill``, ``ray job stop``, a scheduler's
pre-emption): the job stops where it is, its workers are stopped, ``<out>.partial/`` is kept
for a re-run to resume, and the process exits 130 (SIGINT) or 143 (SIGTERM).

SIGINT already raises ``KeyboardInterrupt`` in the main thread; :func:`install` makes SIGTERM
raise :class:`Terminated` the same way, so ``finally`` blocks run (output locks are released,
temp files removed) instead of the process dying mid-write.

Python runs a signal handler only when the main thread is back in the interpreter; a driver
blocked inside Ray (a ``fit()`` waiting on its controller) may not be for minutes. So a watcher
thread also learns of the signal (``signal.set_wakeup_fd``): if the main thread has not finished
its own clean stop within ``GRACE_S``, the watcher stops the workers (``ray.shutdown``), releases
the output locks, reports, and ends the process with the same exit code.
"""
from __future__ import annotations

import os
import signal
import socket
import sys
import threading

GRACE_S = 3.0
RECEIVED: list[str] = []          # the signals that arrived ("SIGTERM" / "SIGINT")
HANDLED = threading.Event()       # the main thread has finished handling the interruption
_WATCHER: list = []

EXIT_CODES = {"SIGINT": 130, "SIGTERM": 143}


class Terminated(BaseException):
    """SIGTERM arrived (a BaseException, like KeyboardInterrupt: ``except Exception`` passes it)."""

    signal_name = "SIGTERM"


def _raise_terminated(signum, frame):
    # once is enough: a second SIGTERM while cleaning up must not interrupt the clean-up
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    raise Terminated()


def install(on_stuck=None) -> None:
    """Make SIGTERM raise :class:`Terminated` in the main thread (no-op elsewhere), and start the
    watcher thread; ``on_stuck(signal_name)`` is its clean-up when the main thread is blocked."""
    if threading.current_thread() is not threading.main_thread():
        return
    signal.signal(signal.SIGTERM, _raise_terminated)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    if on_stuck is not None and not _WATCHER:
        r, w = socket.socketpair()
        r.setblocking(True)
        w.setblocking(False)
        signal.set_wakeup_fd(w.fileno(), warn_on_full_buffer=False)
        t = threading.Thread(target=_watch, args=(r, on_stuck), name="effsft-signals", daemon=True)
        _WATCHER.append((t, r, w))
        t.start()
    elif _WATCHER:  # re-installed after ray.init: point the wakeup fd at the watcher again
        signal.set_wakeup_fd(_WATCHER[0][2].fileno(), warn_on_full_buffer=False)


def _watch(r: socket.socket, on_stuck) -> None:
    names = {int(signal.SIGTERM): "SIGTERM", int(signal.SIGINT): "SIGINT"}
    while True:
        data = r.recv(64)
        if not data:
            return
        got = [names[b] for b in data if b in names]
        if not got:
            continue
        RECEIVED.append(got[0])
        if HANDLED.wait(GRACE_S):
            return
        on_stuck(got[0])
        sys.stderr.flush()
        os._exit(EXIT_CODES[got[0]])


def received() -> str | None:
    return RECEIVED[0] if RECEIVED else None


def exit_code(e: BaseException | None) -> int:
    if isinstance(e, Terminated) or (e is None and received() == "SIGTERM"):
        return EXIT_CODES["SIGTERM"]
    return EXIT_CODES["SIGINT"]


def stop_workers() -> None:
    """Stop this driver's Ray work: an embedded local Ray shuts down with its workers; on a
    cluster, disconnecting ends the driver's tasks, actors and Ray Train worker groups."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # do not interrupt the shutdown itself
    try:
        if "ray" in sys.modules:
            import ray

            if ray.is_initialized():
                ray.shutdown()
    finally:
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGINT, signal.default_int_handler)
