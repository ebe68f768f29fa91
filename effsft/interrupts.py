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
HANDLING = threading.Event()      # the main thread has caught the interruption and is stopping
HANDLED = threading.Event()       # the main thread has finished handling the interruption
EXIT_ON_STOP = True               # the CLI process ends right after a clean stop (tests of main() may turn it off)
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
        if HANDLED.wait(GRACE_S) or (HANDLING.is_set() and HANDLED.wait(60)):
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


def _descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (Linux /proc; empty elsewhere)."""
    children: dict[int, list[int]] = {}
    try:
        names = os.listdir("/proc")
    except OSError:
        return []
    for name in names:
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        children.setdefault(ppid, []).append(int(name))
    out, todo = [], [pid]
    while todo:
        for c in children.get(todo.pop(), []):
            out.append(c)
            todo.append(c)
    return out


def stop_workers() -> None:
    """Stop this driver's Ray work right before the process ends (``os._exit`` follows).

    An embedded local Ray: every process this driver started (GCS, raylet, agents, workers) is
    killed. Not through ``ray.shutdown``: from an interrupted driver it races Ray's background
    threads into a C++ exit with status 1. On a cluster nothing else is needed: when the driver
    is gone the cluster ends its tasks, actors and Ray Train worker groups.
    """
    import signal as _signal

    for pid in _descendants(os.getpid()):
        try:
            os.kill(pid, _signal.SIGKILL)
        except OSError:
            pass
