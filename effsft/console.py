"""A console a person can read: one line per stage and one progress bar per long piece of work;
the framework's own output goes to ``<out>/logs/``.

``log_level`` (a run option: ``--log_level debug|info|warning``):

* ``info`` (default): effsft's messages (``HH:MM:SS job: stage``) and progress bars (rows
  scored, steps trained with loss / lr / tokens per s, GRPO steps with the reward) on stderr;
  warnings and errors of every library still show. Ray's worker output (Ray Data executor
  status, Ray Train's "Reporting training result", DeepSpeed notices, weight-loading bars of
  every worker) goes to ``<out>/logs/workers.log`` only, except the lines of effsft's own
  warnings and errors; Ray Data's progress bars are off; Python logging of every library at
  every level goes to ``<out>/logs/effsft.log``.
* ``debug``: everything on the console as well (Ray's usual behaviour), DEBUG in the log file.

``<out>/logs/`` is ``<out>.partial/logs/`` while the job runs (it moves with the commit) and
``<demo output>/logs/`` for the demo. Records logged before the directory is known are kept in
memory and written there once it is.
"""
from __future__ import annotations

import json
import logging
import logging.handlers
import os
import re
import sys
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

LOG_FILE = "effsft.log"
WORKERS_FILE = "workers.log"
_FMT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
# Worker lines that still reach the console at level info: effsft's own warnings and errors.
_WORKER_KEEP = re.compile(r"(WARNING|ERROR|CRITICAL)\b.*\beffsft\b|\beffsft\b.*(WARNING|ERROR)")
# Loggers whose INFO is framework chatter (console: warnings and up at level info).
_CHATTY = ("ray", "ray.data", "ray.train", "ray.tune", "deepspeed", "DeepSpeed", "transformers", "torch",
           "filelock", "urllib3", "matplotlib", "PIL", "absl")


class _State:
    level = "info"
    log_dir: Path | None = None
    memory: logging.handlers.MemoryHandler | None = None
    file: logging.Handler | None = None
    workers: "object | None" = None
    configured = False


S = _State()


class _ConsoleFilter(logging.Filter):
    """At level info: effsft's INFO and up; other libraries' WARNING and up."""

    def filter(self, record: logging.LogRecord) -> bool:
        if S.level == "debug":
            return True
        if record.name == "effsft" or record.name.startswith("effsft."):
            return record.levelno >= (logging.WARNING if S.level == "warning" else logging.INFO)
        return record.levelno >= logging.WARNING


def setup(level: str = "info") -> None:
    """Console handler on stderr + an in-memory buffer until :func:`log_to` names the directory."""
    S.level = level
    root = logging.getLogger()
    for h in list(root.handlers):
        if getattr(h, "_effsft", False):
            root.removeHandler(h)
            h.close()
    S.log_dir, S.file = None, None  # a new job (main() may run several in one process)
    if S.workers is not None:
        with S.workers.lock:
            S.workers.close_file()
    root.setLevel(logging.DEBUG if level == "debug" else logging.INFO)
    console = logging.StreamHandler(sys.stderr)
    console.setFormatter(logging.Formatter("%(asctime)s %(message)s" if level != "debug" else _FMT,
                                           "%H:%M:%S"))
    console.addFilter(_ConsoleFilter())
    console._effsft = True
    root.addHandler(console)
    S.memory = logging.handlers.MemoryHandler(capacity=100_000, flushLevel=logging.CRITICAL + 1)
    S.memory._effsft = True
    root.addHandler(S.memory)
    if level != "debug":
        os.environ.setdefault("TQDM_MININTERVAL", "1")
        _quiet_libraries()
    S.configured = True


# Framework notices that are no news to an effsft user (the log file still has them).
_NOTICES = re.compile(r"Token authentication is enabled|Progress bars disabled|Started a local Ray instance")


class _NoticeFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        if S.level == "debug":
            return True
        if _NOTICES.search(record.getMessage()):
            if S.file is not None:
                S.file.handle(record)
            return False
        return True


def _quiet_libraries() -> None:
    """Driver-side framework output at level info: warnings and up, no per-library bars."""
    for name in _CHATTY:
        lg = logging.getLogger(name)
        for h in lg.handlers:  # libraries that log to their own console handlers (Ray, DeepSpeed)
            if isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler):
                h.setLevel(logging.WARNING)
                if not any(isinstance(f, _NoticeFilter) for f in h.filters):
                    h.addFilter(_NoticeFilter())
    try:
        import transformers

        transformers.utils.logging.set_verbosity_warning()
        transformers.utils.logging.disable_progress_bar()
    except Exception:  # transformers not importable: nothing to quiet
        pass


def before_ray_init() -> None:
    """Ray's own console handlers exist once ``ray`` is imported: quiet them before ``ray.init``."""
    if S.configured and S.level != "debug":
        _quiet_libraries()


def after_ray_init() -> None:
    """Route Ray's worker output to ``workers.log`` and turn Ray Data's progress output off."""
    import ray.data

    ctx = ray.data.DataContext.get_current()
    if S.level != "debug":
        ctx.enable_progress_bars = False
        ctx.print_on_execution_start = False
        if hasattr(ctx, "enable_operator_progress_bars"):
            ctx.enable_operator_progress_bars = False
        _quiet_libraries()  # Ray Data/Train configure their loggers on import
        logging.getLogger("ray.data").setLevel(logging.WARNING)
        logging.getLogger("ray.train").setLevel(logging.WARNING)
        _route_worker_output()


class _WorkerSink:
    """Replaces Ray's "print worker logs to the driver" handler."""

    def __init__(self):
        self.lock = threading.Lock()
        self.pending: list[str] = []
        self.file = None

    def open(self, path: Path) -> None:
        with self.lock:
            self.close_file()
            path.parent.mkdir(parents=True, exist_ok=True)
            self.file = open(path, "a", buffering=1)
            for line in self.pending:
                self.file.write(line)
            self.pending = []

    def close_file(self) -> None:
        if self.file is not None:
            self.file.close()
            self.file = None

    def __call__(self, data: dict) -> None:
        who = data.get("actor_name") or data.get("task_name") or ""
        prefix = f"({who} pid={data.get('pid')}) "
        with self.lock:
            for line in data.get("lines", []):
                text = prefix + line + "\n"
                if self.file is not None:
                    self.file.write(text)
                elif len(self.pending) < 200_000:
                    self.pending.append(text)
                if _WORKER_KEEP.search(line):
                    print(prefix + line, file=sys.stderr if data.get("is_err") else sys.stdout)


def _route_worker_output() -> None:
    from ray._private.ray_logging import global_worker_stdstream_dispatcher as dispatcher

    if S.workers is None:
        S.workers = _WorkerSink()
    dispatcher.remove_handler("ray_print_logs")
    dispatcher.remove_handler("effsft_worker_logs")
    dispatcher.add_handler("effsft_worker_logs", S.workers)
    if S.log_dir is not None:
        S.workers.open(S.log_dir / WORKERS_FILE)


def log_to(directory: str | os.PathLike) -> None:
    """Write the log files into ``directory`` from now on (earlier records included)."""
    if not S.configured or S.log_dir is not None:
        return
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    S.log_dir = d
    fh = logging.FileHandler(d / LOG_FILE)
    fh.setFormatter(logging.Formatter(_FMT))
    fh.setLevel(logging.DEBUG if S.level == "debug" else logging.INFO)
    fh._effsft = True
    root = logging.getLogger()
    if S.memory is not None:
        S.memory.setTarget(fh)
        S.memory.flush()
        root.removeHandler(S.memory)
        S.memory = None
    root.addHandler(fh)
    S.file = fh
    if S.workers is not None:
        S.workers.open(d / WORKERS_FILE)


def detach() -> None:
    """The job is over: close its log files and forget their directory (it may be renamed or
    removed next). Later output of the process (another job run in-process, a Ray started by
    someone else) is not written into a finished job's logs."""
    root = logging.getLogger()
    for h in list(root.handlers):
        if getattr(h, "_effsft", False) and h is not S.file and h is not S.memory:
            continue  # the console handler stays
        if getattr(h, "_effsft", False):
            root.removeHandler(h)
            h.close()
    S.log_dir, S.file, S.memory = None, None, None
    if S.workers is not None:
        with S.workers.lock:
            S.workers.close_file()
            S.workers.pending = []


def log_exception(text: str) -> None:
    """A traceback into the log file (the console gets one line)."""
    if S.file is not None:
        S.file.stream.write(text)
        S.file.flush()


def quiet() -> bool:
    return S.configured and S.level != "debug"


# ---- progress bars --------------------------------------------------------------------------

def bar(total: int | None, desc: str, unit: str = "it"):
    """A tqdm bar on stderr (disabled at log level warning)."""
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit=unit, file=sys.stderr, dynamic_ncols=True,
                mininterval=1.0, leave=True, disable=S.level == "warning")


_POSTFIX = (("loss", "loss", "{:.4g}"), ("reward_mean", "reward", "{:.3g}"), ("lr", "lr", "{:.2e}"),
            ("tokens_per_s", "tok/s", "{:.0f}"))


@contextmanager
def follow_metrics(path: str | os.PathLike, total_steps: int, desc: str) -> Iterator[None]:
    """While the block runs (a Ray Train ``fit()``), show rank 0's ``metrics.jsonl`` as a bar of
    steps with loss, reward, lr and tokens/s (a driver thread reading the file)."""
    path = Path(path)
    stop = threading.Event()
    pbar = bar(total_steps, desc, "step")

    def poll():
        pos = 0
        while True:
            stopping = stop.wait(0.5)
            try:
                with open(path) as f:
                    f.seek(pos)
                    chunk = f.read()
            except FileNotFoundError:
                chunk = ""
            lines = chunk.split("\n")
            done_part = "\n".join(lines[:-1])
            pos += len(done_part) + (1 if len(lines) > 1 else 0)
            for ln in filter(None, lines[:-1]):
                try:
                    row = json.loads(ln)
                except json.JSONDecodeError:
                    continue
                pbar.n = min(int(row.get("step", pbar.n)), total_steps)
                pbar.set_postfix_str(", ".join(fmt.format(row[k]).join((f"{name} ", ""))
                                               for k, name, fmt in _POSTFIX
                                               if isinstance(row.get(k), (int, float))), refresh=False)
                pbar.refresh()
            if stopping:
                return

    t = threading.Thread(target=poll, name="effsft-progress", daemon=True)
    t.start()
    try:
        yield
    finally:
        stop.set()
        t.join(timeout=5)
        pbar.close()
