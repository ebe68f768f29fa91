"""Learning-rate schedule: linear warm-up, then cosine / linear decay (or constant)."""
from __future__ import annotations

import math
from typing import Literal

Schedule = Literal["cosine", "linear", "constant"]


def lr_factor(step: int, warmup_steps: int, total_steps: int, schedule: Schedule = "cosine",
              min_ratio: float = 0.0) -> float:
    """Multiplier of the base LR for optimizer step ``step`` (0-based).

    Warm-up ramps linearly so that step ``warmup_steps - 1`` runs at the full LR (step 0 at
    ``1 / warmup_steps``, never 0: a zero-LR first step would be wasted). After warm-up the
    factor decays from 1 at step ``warmup_steps`` to ``min_ratio`` at step ``total_steps``.
    """
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    if schedule == "cosine":
        decay = 0.5 * (1.0 + math.cos(math.pi * progress))
    elif schedule == "linear":
        decay = 1.0 - progress
    else:
        raise ValueError(f"train.schedule must be cosine|linear|constant, got {schedule!r}")
    return min_ratio + (1.0 - min_ratio) * decay


def lambda_lr(optimizer, warmup_steps: int, total_steps: int, schedule: Schedule = "cosine",
              min_ratio: float = 0.0):
    """A ``torch.optim.lr_scheduler.LambdaLR`` over :func:`lr_factor` (stepped once per
    optimizer step; DeepSpeed steps it at each accumulation boundary)."""
    from torch.optim.lr_scheduler import LambdaLR

    return LambdaLR(optimizer, lambda s: lr_factor(s, warmup_steps, total_steps, schedule, min_ratio))
