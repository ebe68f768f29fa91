"""Helpers shared by the ``bench_select_*`` scripts (synthetic corpus, tiny model, machine notes).

Only the drivers import this module; nothing here is shipped to Ray workers.
"""
from __future__ import annotations

import os
import platform
import time
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")
os.environ.setdefault("RAY_memory_usage_threshold", "0.98")


def machine_line() -> str:
    """CPU count, load averages and library versions, for the results file."""
    import ray
    import torch

    la = os.getloadavg()
    return (f"machine: {platform.node()} cpus={os.cpu_count()} load average (1/5/15 min) "
            f"{la[0]:.2f}/{la[1]:.2f}/{la[2]:.2f}; torch {torch.__version__}, ray {ray.__version__}")


def load_line() -> str:
    la = os.getloadavg()
    return f"load average now {la[0]:.2f}/{la[1]:.2f}/{la[2]:.2f}"


def make_corpus(out: Path, rows: int, shard_rows: int, noise: float = 0.1, dup: float = 0.05,
                seed: int = 0) -> Path:
    """``effsft synth`` corpus (cached: reused when ``out/train`` exists); returns ``out``."""
    from effsft.corpus.synth import SynthSettings, write_synth

    if not (out / "train").is_dir():
        t = time.perf_counter()
        write_synth(SynthSettings(rows=rows, noise=noise, dup=dup, shard_rows=shard_rows, seed=seed,
                                  eval_rows=200, grpo_rows=16), out, progress=False)
        print(f"synth: {rows} rows in {time.perf_counter() - t:.1f}s -> {out}")
    return out


def make_model(out: Path, corpus: Path, size: str = "small", seed: int = 0, **overrides) -> Path:
    """Tiny Llama (random weights) with a BPE trained on the corpus (cached)."""
    from effsft.models.tiny import write_tiny_model

    if not (out / "config.json").exists():
        write_tiny_model(out, "llama", corpus=str(corpus), seed=seed, size=size, **overrides)
    return out


def init_local_ray(num_cpus: int = 4) -> None:
    """The embedded Ray a user gets (4 logical CPUs on this 2-core box), progress bars off."""
    import ray.data

    from effsft.runtime import init_ray

    os.environ.pop("RAY_ADDRESS", None)
    init_ray(num_cpus=num_cpus, object_store_memory=1 << 30)
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
