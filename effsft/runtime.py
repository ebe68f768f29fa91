"""Ray connect/start, atomic output directories, logging.

Same code path from laptop to cluster: with ``RAY_ADDRESS`` set we connect to that cluster;
otherwise we start an embedded local Ray sized to this machine, bound to 127.0.0.1.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import time
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

log = logging.getLogger("effsft")

# Ray Data otherwise waits 30 minutes before failing a stalled pipeline (ray_notes.md).
os.environ.setdefault("RAY_DATA_EXECUTION_NO_PROGRESS_TIMEOUT_S", "300")


def setup_logging(level: str = "INFO") -> None:
    logging.basicConfig(level=getattr(logging, level.upper(), logging.INFO),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def local_ray_resources() -> dict:
    """Logical resources for an embedded Ray on this machine.

    Why more logical CPUs than cores: on small machines an actor pool or a trainer that claims
    every CPU next to a read task deadlocks (ray_notes.md); jobs request fractional CPUs and the
    OS schedules the real cores.
    """
    cores = os.cpu_count() or 1
    total_mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return {
        "num_cpus": int(os.environ.get("EFFSFT_RAY_NUM_CPUS", max(4, 2 * cores))),
        # 30% of RAM by default is far too much next to model weights; cap at 2 GiB.
        "object_store_memory": int(os.environ.get("EFFSFT_RAY_OBJECT_STORE",
                                                  min(2 << 30, int(total_mem * 0.1)))),
    }


# Ray's own switch for a single-machine Ray (the default on macOS/Windows): with it off, Ray
# resolves the node IP to 127.0.0.1 instead of the routable interface, and then GCS, raylet,
# dashboard/runtime-env agents and workers all listen on loopback only. Passing
# ``_node_ip_address="127.0.0.1"`` alone is not enough: ``ray.init`` replaces a localhost
# address with the routable IP (``ray._private.services.resolve_ip_for_localhost``).
_RAY_CLUSTER_SWITCH = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"


@contextmanager
def _loopback_only() -> Iterator[None]:
    """While starting an embedded Ray: node IP 127.0.0.1, every service bound to loopback.

    The env var reaches the processes ``ray.init`` spawns; the module constant covers a
    ``ray`` already imported in this process (it is read once at import). Both are restored
    afterwards, so a later connect to a real cluster from this process resolves its own IP.
    """
    from ray._private import ray_constants

    saved_env, saved_const = os.environ.get(_RAY_CLUSTER_SWITCH), ray_constants.ENABLE_RAY_CLUSTER
    os.environ[_RAY_CLUSTER_SWITCH] = "0"
    ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        yield
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = saved_const
        if saved_env is None:
            os.environ.pop(_RAY_CLUSTER_SWITCH, None)
        else:
            os.environ[_RAY_CLUSTER_SWITCH] = saved_env


def quiet_without_state_api() -> None:
    """Ray worker setup hook of the dashboard-less local Ray: there is no State API, and Ray
    Train's placement-group cleaner would warn once a second for a whole run that it cannot query
    it (the cleaner only guards against a leaked group after a controller crash; a local Ray dies
    with its driver anyway)."""
    logging.getLogger("ray.train.v2._internal.execution.controller.placement_group_cleaner").setLevel(
        logging.ERROR)


def init_ray(**overrides) -> dict:
    """Connect to ``RAY_ADDRESS`` if set, else start (or reuse) an embedded local Ray.

    Returns a small description for the manifest. The local Ray binds to 127.0.0.1 only and
    runs without the dashboard unless ``EFFSFT_RAY_DASHBOARD=1``.
    """
    import ray

    from effsft import console

    if ray.is_initialized():
        return {"mode": "existing", "resources": ray.cluster_resources()}
    console.before_ray_init()
    address = os.environ.get("RAY_ADDRESS")
    runtime_env = {"env_vars": {"RAY_DATA_EXECUTION_NO_PROGRESS_TIMEOUT_S":
                                os.environ["RAY_DATA_EXECUTION_NO_PROGRESS_TIMEOUT_S"]}}
    if address:
        ray.init(address=address, log_to_driver=True, runtime_env=runtime_env)
        mode = "cluster"
    else:
        kwargs = dict(local_ray_resources())
        kwargs.update(overrides)
        dashboard = os.environ.get("EFFSFT_RAY_DASHBOARD", "0") == "1"
        if not dashboard:
            runtime_env["worker_process_setup_hook"] = "effsft.runtime.quiet_without_state_api"
        with _loopback_only():
            ray.init(
                include_dashboard=dashboard,
                dashboard_host="127.0.0.1",
                _node_ip_address="127.0.0.1",
                runtime_env=runtime_env,
                **kwargs,
            )
        mode = "local"
    if RUN.handle_signals:
        # ray.init installs its own fatal-signal handlers (SIGTERM -> abort, no clean-up):
        # take SIGTERM/SIGINT back so that a stopped job exits 143/130 and leaves a resumable
        # <out>.partial/ (effsft.interrupts).
        from effsft import interrupts

        interrupts.install()  # the watcher thread of the CLI's install() stays
    from effsft import console

    if console.S.configured:
        console.after_ray_init()  # worker output -> <out>/logs/workers.log, no Ray Data bars
    desc = {"mode": mode, "address": address, "resources": ray.cluster_resources()}
    log.info("ray %s: %s", mode, desc["resources"])
    return desc


class OutputExists(RuntimeError):
    pass


class RunOptions:
    """Per-process options of the running job that do not change its result (set by the CLI):
    ``wait`` for another job holding an output's lock, the job name and argv for the lock."""

    wait: bool = False
    job: str | None = None
    argv: list[str] | None = None
    handle_signals: bool = False   # the CLI's driver: SIGTERM/SIGINT -> a clean, resumable stop
    output: Path | None = None     # the job's output: its <out>.partial/logs/ holds the log files
    stage: str | None = None       # the demo's current stage (names the console's stage lines)


RUN = RunOptions()
_OPEN: list["OutputDir"] = []   # output dirs this process holds (claimed, not yet committed/released)


def worker_path(path: str) -> str:
    """Ray workers run in another directory: hand them absolute local paths (URIs unchanged)."""
    return path if "://" in path else str(Path(path).resolve())


class OutputDir:
    """An output directory that appears atomically, with one writer at a time.

    Work happens in ``<out>.partial/``, which survives a crash so that the job can resume from
    what it finished (e.g. scored shards). ``commit()`` writes ``_SUCCESS`` last and renames the
    work dir into place. A finished output (``_SUCCESS`` present) is never overwritten unless
    ``overwrite`` is set. ``open()`` first claims ``<out>.lock`` (:mod:`effsft.outputlock`):
    a second job on the same output waits (``wait``, default the CLI's ``--wait``) or fails
    naming the holder.
    """

    def __init__(self, path: str | os.PathLike, overwrite: bool = False, wait: bool | None = None):
        self.final = Path(path).resolve()
        self.work = self.final.with_name(self.final.name + ".partial")
        self.lock_path = self.final.with_name(self.final.name + ".lock")
        self.overwrite = overwrite
        self.wait = RUN.wait if wait is None else wait
        self.created_work = False   # this process made <out>.partial (a setup error removes it)
        self._lock = None

    @property
    def done(self) -> bool:
        return (self.final / "_SUCCESS").exists()

    def claim(self) -> None:
        """Take the output's lock (waits or raises :class:`~effsft.outputlock.OutputLocked`)."""
        from effsft.outputlock import OutputLock

        if self._lock is None:
            for other in [o for o in _OPEN if o.lock_path == self.lock_path]:
                other.release()  # this process's earlier (failed) run on the same output
            self.final.parent.mkdir(parents=True, exist_ok=True)
            self._lock = OutputLock(self.lock_path, job=RUN.job, argv=RUN.argv, wait=self.wait).acquire()
            _OPEN.append(self)

    def release(self) -> None:
        if self._lock is not None:
            self._lock.release()
            self._lock = None
        if self in _OPEN:
            _OPEN.remove(self)

    def open(self) -> Path:
        self.claim()
        try:
            if self.final.exists():
                if self.done and not self.overwrite:
                    raise OutputExists(f"output {self.final} is already complete (has _SUCCESS); "
                                       "pass overwrite=true or choose another output")
                if not self.done:
                    # A foreign, unfinished directory: never silently mix with it.
                    if any(self.final.iterdir()) and not self.overwrite:
                        raise OutputExists(f"output {self.final} exists without _SUCCESS; remove it "
                                           "or pass overwrite=true")
        except BaseException:
            self.release()
            raise
        self.created_work = not self.work.exists()
        self.work.mkdir(parents=True, exist_ok=True)
        if RUN.output is not None and self.final == RUN.output:
            from effsft import console

            console.log_to(self.work / "logs")  # moves to <out>/logs/ with the commit
        return self.work

    @property
    def resuming(self) -> bool:
        return self.work.exists() and any(self.work.iterdir())

    def commit(self) -> Path:
        # _SUCCESS via temp + fsync + rename: a full disk leaves no half-written marker.
        atomic_write_bytes(self.work / "_SUCCESS", (time.strftime("%Y-%m-%dT%H:%M:%S%z") + "\n").encode())
        try:
            if self.final.exists():
                trash = self.final.with_name(f".{self.final.name}.old-{uuid.uuid4().hex[:8]}")
                os.rename(self.final, trash)
                os.rename(self.work, self.final)
                shutil.rmtree(trash, ignore_errors=True)
            else:
                os.rename(self.work, self.final)
        except BaseException:
            (self.work / "_SUCCESS").unlink(missing_ok=True)
            raise
        self.release()
        return self.final

    def discard(self) -> None:
        shutil.rmtree(self.work, ignore_errors=True)
        self.release()


def release_outputs(remove_fresh_work: bool = False) -> None:
    """Release every output lock this process holds (the CLI calls it when a job ends);
    with ``remove_fresh_work``, also remove the work dirs this run created (a setup error)."""
    for out in list(_OPEN):
        if remove_fresh_work and out.created_work:
            shutil.rmtree(out.work, ignore_errors=True)
        out.release()


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write a file via a temp name + rename, so readers never see half a file."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def atomic_write_json(path: str | os.PathLike, obj) -> None:
    atomic_write_bytes(path, json.dumps(obj, indent=2, sort_keys=False, default=str).encode())


@contextmanager
def timed(timings: dict, name: str) -> Iterator[None]:
    """Time a stage into ``timings[name]``; its start is the stage's console line."""
    log.info("%s%s: %s", "  " if RUN.stage else "", RUN.stage or RUN.job or "effsft", name.replace("_", " "))
    t0 = time.perf_counter()
    try:
        yield
    finally:
        timings[name] = round(time.perf_counter() - t0, 3)


def hostname() -> str:
    return socket.gethostname()
