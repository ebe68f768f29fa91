"""Set-up shared by the benchmark scripts: environment defaults, the machine line printed with
results, the work dir with its synthetic corpus and tiny model, an embedded Ray, effsft CLI jobs,
timing, the warm-up + cosine learning rate and JSON results.

The scripts run as ``python benchmarks/<script>.py``, so Python puts ``benchmarks/`` first on
``sys.path`` and they ``import common``; ``benchmarks/real/study.py`` adds ``benchmarks/`` itself.
Only the drivers import this module; nothing here is shipped to Ray workers (a class that Ray
ships by value, like ``bench_select_overhead.TimedLMScorer``, must not use it). torch, ray and
effsft are imported inside the functions that need them, so importing it costs nothing.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import platform
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Iterator

# Environment defaults: what a benchmark sets unless the caller's environment already says otherwise.
ENV_DEFAULTS = {"TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}
RAY_ENV_DEFAULTS = {"RAY_DEDUP_LOGS": "0", "RAY_memory_usage_threshold": "0.98"}


def set_env_defaults(ray: bool = False, **extra: str) -> None:
    """``os.environ.setdefault`` for :data:`ENV_DEFAULTS` (and :data:`RAY_ENV_DEFAULTS` with
    ``ray``) and ``extra``. Call it before importing transformers or starting Ray."""
    for k, v in {**ENV_DEFAULTS, **(RAY_ENV_DEFAULTS if ray else {}), **extra}.items():
        os.environ.setdefault(k, v)


# ---- machine notes ---------------------------------------------------------------------------

def _loadavg() -> str:
    la = os.getloadavg()
    return f"{la[0]:.2f}/{la[1]:.2f}/{la[2]:.2f}"


def machine_line() -> str:
    """CPU count, load averages and library versions, for the results file."""
    import ray
    import torch

    return (f"machine: {platform.node()} cpus={os.cpu_count()} load average (1/5/15 min) "
            f"{_loadavg()}; torch {torch.__version__}, ray {ray.__version__}")


def load_line() -> str:
    return f"load average now {_loadavg()}"


# ---- inputs: work dir, synthetic corpus and tiny model --------------------------------------------

@contextlib.contextmanager
def work_dir(path: str | None, prefix: str) -> Iterator[Path]:
    """The benchmark's work dir: ``path`` (``--workdir``; made if missing and kept), or else a fresh
    temporary folder that is removed when the block ends without an error (a failed run keeps it)."""
    work = Path(path or tempfile.mkdtemp(prefix=prefix))
    work.mkdir(parents=True, exist_ok=True)
    yield work
    if not path:
        shutil.rmtree(work, ignore_errors=True)


def synth_corpus(out: Path, clean: bool = False, verbose: bool = False, **settings) -> Path:
    """``effsft synth`` corpus (``SynthSettings(**settings)``) written to ``out``; returns ``out``.

    Reused when ``out/grpo.parquet`` (the last file ``write_synth`` writes) exists. ``clean``:
    no noisy, duplicate or garbage rows. ``verbose``: print how long the writing took.
    """
    from effsft.corpus.synth import SynthSettings, write_synth

    if clean:
        settings = {"noise": 0.0, "dup": 0.0, "garbage": 0.0, **settings}
    if not (out / "grpo.parquet").exists():
        t = time.perf_counter()
        s = SynthSettings(**settings)
        write_synth(s, out, progress=False)
        if verbose:
            print(f"synth: {s.rows} rows in {time.perf_counter() - t:.1f}s -> {out}")
    return out


def make_corpus(out: Path, rows: int, shard_rows: int, noise: float = 0.1, dup: float = 0.05,
                seed: int = 0) -> Path:
    """The select benchmarks' labelled corpus (noisy and duplicate rows), cached; returns ``out``."""
    return synth_corpus(out, verbose=True, rows=rows, noise=noise, dup=dup, shard_rows=shard_rows, seed=seed,
                        eval_rows=200, grpo_rows=16)


def tiny_model(out: Path, corpus: Path, size: str = "small", seed: int = 0, **overrides) -> Path:
    """Tiny Llama (random weights) with a BPE trained on the corpus; reused when
    ``out/config.json`` exists. Returns ``out``."""
    from effsft.models.tiny import write_tiny_model

    if not (out / "config.json").exists():
        write_tiny_model(out, "llama", corpus=str(corpus), seed=seed, size=size, **overrides)
    return out


# ---- Ray and effsft jobs -----------------------------------------------------------------------

def init_local_ray(num_cpus: int = 4) -> None:
    """The embedded Ray a user gets (4 logical CPUs on this 2-core box), progress bars off."""
    import ray.data

    from effsft.runtime import init_ray

    os.environ.pop("RAY_ADDRESS", None)
    init_ray(num_cpus=num_cpus, object_store_memory=1 << 30)
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False


def effsft_job(argv: list[str], out: Path, announce: Callable[[], None] | None = None) -> Path:
    """``effsft <argv> --output <out>`` in this process, as a user runs it, unless
    ``out/_SUCCESS`` exists (a re-run resumes). ``announce`` is called just before a job starts.
    A failed job ends the benchmark (``SystemExit``). Returns ``out``."""
    from effsft.cli import main

    if (out / "_SUCCESS").exists():
        return out
    if announce:
        announce()
    rc = main([*argv, "--output", str(out)])
    if rc != 0:
        raise SystemExit(f"effsft {argv[0]} for {out} failed (exit {rc})")
    return out


# ---- timing ------------------------------------------------------------------------------------

def cuda_sync(device) -> None:
    """Wait for the GPU when ``device`` (a ``torch.device`` or its name) is CUDA, so a timer
    around GPU work measures the work."""
    import torch

    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def timed(fn: Callable[..., Any], *args, device=None, **kwargs) -> tuple[Any, float]:
    """``(fn(*args, **kwargs), wall seconds)``; with ``device``, CUDA is synchronised before and after."""
    if device is not None:
        cuda_sync(device)
    t0 = time.perf_counter()
    out = fn(*args, **kwargs)
    if device is not None:
        cuda_sync(device)
    return out, time.perf_counter() - t0


def steady_state(steps: list[dict]) -> tuple[float, float]:
    """(tokens/s, median step seconds) of training ``steps`` (dicts with ``tokens`` and
    ``step_s``) after the first, so start-up is excluded; all of them when there is only one."""
    rest = steps[1:] or steps
    return (sum(r["tokens"] for r in rest) / sum(r["step_s"] for r in rest),
            statistics.median(r["step_s"] for r in rest))


# ---- training loops ------------------------------------------------------------------------------

def warmup_cosine_lr(step: int, total: int, peak: float, warmup: int) -> float:
    """Linear warm-up to ``peak`` over ``warmup`` steps, then cosine decay to 10% of it at ``total``."""
    if step < warmup:
        return peak * (step + 1) / warmup
    frac = (step - warmup) / max(1, total - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))


# ---- results -------------------------------------------------------------------------------------

def write_json(path: str | os.PathLike, obj: Any, indent: int = 1) -> Path:
    """``obj`` as indented JSON at ``path`` (parent folders made; what JSON cannot hold written
    as ``str``); returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=indent, default=str))
    return path
