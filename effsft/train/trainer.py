"""Driver side: run :func:`effsft.train.loop.train_loop_per_worker` on a Ray Train
``TorchTrainer``.

Resume: Ray Train V2 resumes a run when a trainer is built again with the same
``RunConfig(storage_path, name)`` (the latest reported checkpoint is handed to the workers);
within one ``fit()``, ``FailureConfig(max_failures)`` restarts a failed worker group from it.
"""
from __future__ import annotations

from pathlib import Path

from effsft.train.loop import LoopSpec, train_loop_per_worker


def fit(spec: LoopSpec, train_ds, storage_path: str | Path, name: str = "train") -> dict:
    """Train on ``train_ds`` (a Ray Dataset of ``input_ids``/``labels`` rows, split equally
    across workers; None when ``spec.step_source`` provides the batches); returns rank 0's summary (``steps``, ``final_loss``, ``tokens_per_s``, ...)."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    tr = spec.train
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"spec": spec},
        # Fractional CPUs: a 2-worker trainer next to Ray Data on a 2-core node deadlocks with
        # whole CPUs (ray_notes.md). With use_gpu each worker also gets one GPU.
        scaling_config=ScalingConfig(num_workers=tr.num_workers, use_gpu=tr.use_gpu,
                                     resources_per_worker={"CPU": tr.cpus_per_worker}),
        run_config=RunConfig(storage_path=str(Path(storage_path).resolve()), name=name,
                             failure_config=FailureConfig(max_failures=tr.max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=tr.keep_checkpoints)),
        datasets={"train": train_ds} if train_ds is not None else None,
    )
    from effsft import console
    from effsft.train.loop import METRICS_FILE

    if console.S.configured:  # a bar of rank 0's metrics.jsonl: steps, loss, lr, tokens/s
        with console.follow_metrics(Path(spec.out_dir) / METRICS_FILE, spec.total_steps,
                                    "training" if spec.step_source is None else "grpo steps"):
            result = trainer.fit()
    else:
        result = trainer.fit()
    return result.return_value or {}
