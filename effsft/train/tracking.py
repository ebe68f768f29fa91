"""Run tracking: every scalar of the metrics row rank 0 writes to ``metrics.jsonl`` also goes to
TensorBoard event files under ``<out>/tb/`` and, when configured, to Weights & Biases or MLflow.

``tracking.backend``: ``none`` (metrics.jsonl only), ``tensorboard`` (default), ``wandb`` or
``mlflow`` (each also writes the TensorBoard files). Offline use: ``WANDB_MODE=offline`` (runs
under ``<out>/wandb/``); MLflow logs to ``MLFLOW_TRACKING_URI``, else to a file store in
``<out>/mlruns``. wandb and mlflow are optional: a backend whose package is missing is a config
error naming the package.

    tracker = Tracker.open(spec, out_dir, resume_step=0)
    tracker.log({"step": 1, "loss": 2.3, "lr": 1e-4, "qtuning/n_Q2": 3})
    tracker.close()
"""
from __future__ import annotations

import importlib.util
import logging
import math
import os
from pathlib import Path
from typing import Literal, Optional

from effsft.config import Strict

log = logging.getLogger("effsft.train")

TB_DIR = "tb"
BACKEND_PACKAGES = {"tensorboard": "tensorboardX", "wandb": "wandb", "mlflow": "mlflow"}


class TrackingSpec(Strict):
    """``tracking.*``: where training metrics go besides metrics.jsonl."""

    backend: Literal["none", "tensorboard", "wandb", "mlflow"] = "tensorboard"
    project: str = "effsft"              # wandb project / MLflow experiment
    run_name: Optional[str] = None       # default: the output directory's name

    def check(self) -> None:
        """Raise ValueError naming the package when the backend's library is not installed."""
        pkg = BACKEND_PACKAGES.get(self.backend)
        if pkg and importlib.util.find_spec(pkg) is None:
            raise ValueError(f"tracking.backend={self.backend} needs the {pkg!r} package "
                             f"(pip install {pkg}), or set tracking.backend=tensorboard|none")


def scalars(row: dict) -> dict[str, float]:
    """The finite-or-not float scalars of a metrics row (``step`` excluded; strings dropped)."""
    out = {}
    for k, v in row.items():
        if k == "step" or isinstance(v, str):
            continue
        if isinstance(v, bool):
            v = float(v)
        if isinstance(v, (int, float)):
            out[k] = float(v)
        elif hasattr(v, "numel") and v.numel() == 1:  # a 0-d tensor
            out[k] = float(v.detach())
    return out


class Tracker:
    """Rank 0's writers; no-ops on other ranks and with ``backend: none``."""

    def __init__(self, spec: TrackingSpec, out_dir: str | os.PathLike, resume_step: int = 0,
                 config: dict | None = None, active: bool = True):
        self.spec, self.out = spec, Path(out_dir)
        self.tb = self.wandb = self.mlflow = None
        if not active or spec.backend == "none":
            return
        from tensorboardX import SummaryWriter

        # purge_step: on resume, events after the restored step (to be produced again) are hidden
        self.tb = SummaryWriter(str(self.out / TB_DIR), flush_secs=5,
                                purge_step=resume_step + 1 if resume_step else None)
        name = spec.run_name or self.out.name.removesuffix(".partial")
        if spec.backend == "wandb":
            spec.check()
            import wandb

            self.wandb = wandb.init(project=spec.project, name=name, dir=str(self.out), config=config,
                                    resume="allow", reinit=True)
        elif spec.backend == "mlflow":
            spec.check()
            import mlflow

            if not os.environ.get("MLFLOW_TRACKING_URI"):
                mlflow.set_tracking_uri((self.out / "mlruns").resolve().as_uri())
            mlflow.set_experiment(spec.project)
            self.mlflow = mlflow
            mlflow.start_run(run_name=name)
            if config:
                mlflow.log_params({k: str(v)[:250] for k, v in config.items()})

    @classmethod
    def open(cls, spec: TrackingSpec | None, out_dir, resume_step: int = 0, rank: int = 0,
             config: dict | None = None) -> "Tracker":
        return cls(spec or TrackingSpec(), out_dir, resume_step, config, active=rank == 0)

    def log(self, row: dict) -> None:
        if self.tb is None:
            return
        step = int(row["step"])
        vals = scalars(row)
        for k, v in vals.items():
            self.tb.add_scalar(k, v, step)
        finite = {k: v for k, v in vals.items() if math.isfinite(v)}
        if self.wandb is not None:
            self.wandb.log(vals, step=step)
        if self.mlflow is not None:
            self.mlflow.log_metrics(finite, step=step)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
            self.tb = None
        if self.wandb is not None:
            self.wandb.finish()
            self.wandb = None
        if self.mlflow is not None:
            self.mlflow.end_run()
            self.mlflow = None
