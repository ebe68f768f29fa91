"""One writer per output (effsft.outputlock, OutputDir) and a full disk, without Ray."""
from __future__ import annotations

import errno
import json
import logging
import os
import subprocess
import sys
import threading
import time

import pytest

from effsft import runtime
from effsft.cli import main
from effsft.outputlock import OutputLock, OutputLocked, read_holder, stale_reason
from effsft.runtime import OutputDir


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def _write_lock(path, **holder):
    info = {"host": "elsewhere", "pid": 1, "token": "t0", "job": "select", "argv": ["effsft", "select"],
            "started": "then", **holder}
    path.write_text(json.dumps(info))
    return info


def _holder_process(path) -> subprocess.Popen:
    """Another live process that holds the lock at ``path`` until killed."""
    code = ("import sys,time; from effsft.outputlock import OutputLock; "
            "OutputLock(sys.argv[1], job='select', argv=['effsft','select','x=1']).acquire(); "
            "print('held', flush=True); time.sleep(120)")
    p = subprocess.Popen([sys.executable, "-c", code, str(path)], stdout=subprocess.PIPE, text=True,
                         env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    assert p.stdout.readline().strip() == "held"
    return p


def test_lock_names_its_holder_and_a_second_writer_fails_naming_it(tmp_path):
    p = _holder_process(tmp_path / "out.lock")
    try:
        holder, _ = read_holder(tmp_path / "out.lock")
        assert holder["pid"] == p.pid and holder["host"] and holder["argv"][-1] == "x=1"
        with pytest.raises(OutputLocked, match=rf"pid {p.pid} on .*x=1.*--wait"):
            OutputLock(tmp_path / "out.lock").acquire()
    finally:
        p.kill()
        p.wait()
    lock = OutputLock(tmp_path / "out.lock").acquire()  # the holder died: taken over
    assert lock.owned()
    lock.release()
    assert not (tmp_path / "out.lock").exists()


def test_the_same_process_may_reopen_its_own_output(tmp_path):
    """A failed in-process run (demo, library use) does not lock its own re-run out."""
    first = OutputLock(tmp_path / "out.lock").acquire()
    second = OutputLock(tmp_path / "out.lock").acquire()
    assert second.owned() and not first.owned()
    second.release()


class _Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.lines: list[str] = []

    def emit(self, record):
        self.lines.append(record.getMessage())


def test_stale_lock_of_a_dead_pid_is_taken_over_with_a_warning(tmp_path):
    import socket

    _write_lock(tmp_path / "out.lock", host=socket.gethostname(), pid=_dead_pid(), boot_id=None)
    rec = _Records()
    logging.getLogger("effsft").addHandler(rec)
    try:
        lock = OutputLock(tmp_path / "out.lock").acquire()
    finally:
        logging.getLogger("effsft").removeHandler(rec)
    text = "\n".join(rec.lines)
    assert lock.owned() and "taking over the stale lock" in text and "is gone" in text
    lock.release()


def test_other_host_lock_is_stale_only_without_heartbeat(tmp_path):
    info = _write_lock(tmp_path / "out.lock")
    with pytest.raises(OutputLocked, match="elsewhere"):
        OutputLock(tmp_path / "out.lock", stale_after_s=60).acquire()
    old = time.time() - 120
    os.utime(tmp_path / "out.lock", (old, old))
    lock = OutputLock(tmp_path / "out.lock", stale_after_s=60).acquire()
    assert lock.owned()
    lock.release()
    assert stale_reason(info, 10, "here", None, 60) is None
    assert "no heartbeat" in stale_reason(info, 61, "here", None, 60)


def test_heartbeat_touches_the_lock_and_wait_waits_for_the_holder(tmp_path):
    path = tmp_path / "out.lock"
    first = OutputLock(path, heartbeat_s=0.05).acquire()
    old = time.time() - 100
    os.utime(path, (old, old))
    deadline = time.monotonic() + 10
    while time.time() - path.stat().st_mtime > 50 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert time.time() - path.stat().st_mtime < 50  # touched again by the heartbeat thread
    threading.Timer(0.5, first.release).start()
    second = OutputLock(path, wait=True, poll_s=0.05).acquire()
    assert second.owned()
    second.release()


def test_output_dir_claims_and_commit_releases(tmp_path):
    out = OutputDir(tmp_path / "job")
    out.open()
    holder, _ = read_holder(tmp_path / "job.lock")
    assert holder["pid"] == os.getpid()
    out.commit()
    assert not (tmp_path / "job.lock").exists() and (tmp_path / "job" / "_SUCCESS").exists()


def test_cli_exits_2_naming_the_live_holder(tmp_path, capsys):
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        import socket

        (tmp_path / "in").mkdir()
        _write_lock(tmp_path / "sel.lock", host=socket.gethostname(), pid=holder.pid, boot_id=None)
        rc = main(["select", "--input", str(tmp_path / "in"), "--method", "random", "--budget", "5",
                   "--output", str(tmp_path / "sel")])
        err = capsys.readouterr().err
        assert rc == 2 and f"pid {holder.pid}" in err and "being written by" in err
        assert not (tmp_path / "sel.partial").exists() and (tmp_path / "sel.lock").exists()
    finally:
        holder.kill()
        holder.wait()


def _enospc(path, data):
    raise OSError(errno.ENOSPC, "No space left on device", str(path))


def test_disk_full_at_commit_leaves_no_finished_directory(tmp_path, monkeypatch):
    out = OutputDir(tmp_path / "job")
    (out.open() / "part").write_text("1")
    monkeypatch.setattr(runtime, "atomic_write_bytes", _enospc)
    with pytest.raises(OSError):
        out.commit()
    assert not (tmp_path / "job").exists() and not (tmp_path / "job.partial" / "_SUCCESS").exists()
    assert (tmp_path / "job.partial" / "part").exists()  # kept: a re-run resumes
    runtime.release_outputs()


def test_disk_full_while_writing_the_manifest_exits_1(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(runtime, "atomic_write_bytes", _enospc)
    rc = main(["synth", "--rows", "200", "--eval_rows", "8", "--grpo_rows", "8", "--output",
               str(tmp_path / "syn"), "progress=false"])
    err = capsys.readouterr().err
    assert rc == 1 and "disk full while writing" in err and "manifest.json" in err
    assert not (tmp_path / "syn").exists() and not list(tmp_path.glob("**/_SUCCESS"))
    assert not (tmp_path / "syn.lock").exists()  # released on failure
