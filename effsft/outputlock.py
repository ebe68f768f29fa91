"""One writer per output: a lock file ``<out>.lock`` next to ``<out>.partial/``.

The lock is created atomically (the holder's description is written to a temp file that is
hard-linked to the lock name: ``link()`` fails if the name exists, and a reader never sees a
half-written lock; ``O_CREAT|O_EXCL`` where the filesystem has no hard links). It names its
holder (host, pid, boot id, start time, job, argv) and a background thread touches it every
``HEARTBEAT_S`` seconds.

A second job on the same output either waits for the lock (``--wait``) or fails with
:class:`OutputLocked` naming the holder (exit 2). A lock whose holder is gone is taken over,
with a warning: on the same host (and boot) when its pid is dead; from another host when its
heartbeat is older than ``EFFSFT_LOCK_STALE_S`` (default 120 s). A take-over is itself guarded
by ``<out>.lock.takeover`` (O_EXCL), so that two jobs cannot both take over one stale lock.
"""
from __future__ import annotations

import errno
import json
import logging
import os
import socket
import sys
import threading
import time
import uuid
from pathlib import Path

log = logging.getLogger("effsft")

HEARTBEAT_S = float(os.environ.get("EFFSFT_LOCK_HEARTBEAT_S", "10"))
STALE_AFTER_S = float(os.environ.get("EFFSFT_LOCK_STALE_S", "120"))
POLL_S = 1.0


_LIVE: dict[str, "OutputLock"] = {}  # locks this process holds, by token


class OutputLocked(RuntimeError):
    """Another live job holds the output's lock (and this job was not told to wait)."""


def _boot_id() -> str | None:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return None


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, another user's
        return True
    return True


def describe(holder: dict) -> str:
    argv = " ".join(holder.get("argv") or [])
    return (f"pid {holder.get('pid')} on {holder.get('host')} (job {holder.get('job')!r}, started "
            f"{holder.get('started')}{', argv: ' + argv if argv else ''})")


def stale_reason(holder: dict, heartbeat_age_s: float, host: str, boot_id: str | None,
                 stale_after_s: float = STALE_AFTER_S) -> str | None:
    """Why the holder is gone (None: it is alive, or cannot be told dead). Pure, for tests."""
    if holder.get("host") == host:
        if boot_id and holder.get("boot_id") and holder["boot_id"] != boot_id:
            return f"{host} has rebooted since the lock was taken"
        if not pid_alive(int(holder.get("pid", -1))):
            return f"pid {holder.get('pid')} on {host} is gone"
        return None
    if heartbeat_age_s > stale_after_s:
        return f"no heartbeat from {holder.get('host')} for {heartbeat_age_s:.0f} s (> {stale_after_s:.0f} s)"
    return None


def read_holder(path: Path) -> tuple[dict | None, float]:
    """(holder description, heartbeat age in s), or (None, 0) when there is no lock."""
    try:
        text = path.read_text()
        age = time.time() - path.stat().st_mtime
    except FileNotFoundError:
        return None, 0.0
    try:
        return json.loads(text), age
    except json.JSONDecodeError:  # not ours, or damaged: treat by age alone
        return {"host": "?", "pid": -1, "token": None, "raw": text[:200]}, age


class OutputLock:
    """The lock of one output path; :meth:`acquire` / :meth:`release`."""

    def __init__(self, path: str | os.PathLike, job: str | None = None, argv: list[str] | None = None,
                 wait: bool = False, stale_after_s: float = STALE_AFTER_S,
                 heartbeat_s: float = HEARTBEAT_S, poll_s: float = POLL_S):
        self.path = Path(path)
        self.wait, self.stale_after_s = wait, stale_after_s
        self.heartbeat_s, self.poll_s = heartbeat_s, poll_s
        self.host, self.boot = socket.gethostname(), _boot_id()
        self.info = {"host": self.host, "pid": os.getpid(), "boot_id": self.boot,
                     "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "job": job,
                     "argv": list(sys.argv if argv is None else argv), "token": uuid.uuid4().hex}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.held = False

    # -- acquire / release -------------------------------------------------------------------
    def acquire(self) -> "OutputLock":
        waited = False
        while True:
            if self._create():
                break
            holder, age = read_holder(self.path)
            if holder is None:
                continue  # released in between: try again at once
            if holder.get("host") == self.host and holder.get("pid") == os.getpid():
                # This process's own earlier run on the output (a library call that failed and
                # is run again; a driver runs its jobs one after another): re-entrant.
                old = _LIVE.get(holder.get("token"))
                if old is not None:
                    old.release()
                elif holder.get("token"):
                    self.path.unlink(missing_ok=True)
                continue
            reason = stale_reason(holder, age, self.host, self.boot, self.stale_after_s)
            if reason is not None:
                self._take_over(holder, reason)
                continue
            if not self.wait:
                raise OutputLocked(f"output {self._output()} is being written by {describe(holder)}; "
                                   f"lock {self.path}. Pass --wait to wait for it, or choose another output")
            if not waited:
                log.warning("output %s is being written by %s: waiting (--wait)", self._output(), describe(holder))
                waited = True
            time.sleep(self.poll_s)
        self.held = True
        _LIVE[self.info["token"]] = self
        self._thread = threading.Thread(target=self._beat, name=f"effsft-lock-{self.path.name}", daemon=True)
        self._thread.start()
        return self

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
        if self.held and self.owned():
            self.path.unlink(missing_ok=True)
        self.held = False
        _LIVE.pop(self.info["token"], None)

    def owned(self) -> bool:
        holder, _ = read_holder(self.path)
        return bool(holder) and holder.get("token") == self.info["token"]

    # -- pieces ------------------------------------------------------------------------------
    def _output(self) -> Path:
        return self.path.with_name(self.path.name[: -len(".lock")]) if self.path.name.endswith(".lock") else self.path

    def _create(self) -> bool:
        """Atomically create the lock with our description; False if it exists."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        data = json.dumps(self.info, indent=1).encode()
        tmp = self.path.with_name(f".{self.path.name}.{self.info['token'][:8]}.tmp")
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        try:
            os.link(tmp, self.path)
            return True
        except FileExistsError:
            return False
        except OSError as e:
            if e.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV, errno.EMLINK):
                raise
            try:  # no hard links here: O_EXCL
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                return False
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            return True
        finally:
            tmp.unlink(missing_ok=True)

    def _take_over(self, holder: dict, reason: str) -> None:
        guard = self.path.with_name(self.path.name + ".takeover")
        try:
            fd = os.open(guard, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            try:  # a take-over that died half-way leaves its guard: clear it after a while
                if time.time() - guard.stat().st_mtime > 60:
                    guard.unlink(missing_ok=True)
            except FileNotFoundError:
                pass
            time.sleep(self.poll_s / 4)
            return
        os.close(fd)
        try:
            now, _ = read_holder(self.path)
            if now is not None and now.get("token") == holder.get("token"):  # still the stale one
                log.warning("taking over the stale lock %s of %s: %s", self.path, describe(holder), reason)
                self.path.unlink(missing_ok=True)
        finally:
            guard.unlink(missing_ok=True)

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            try:
                if not self.owned():
                    log.error("lock %s is no longer this job's (taken over?)", self.path)
                    return
                os.utime(self.path)
            except OSError as e:
                log.warning("lock heartbeat failed on %s: %s", self.path, e)
