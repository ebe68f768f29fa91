"""The sft loss hook for the shared training loop (:mod:`effsft.train.loop`).

``method: off`` is plain SFT: the NLL summed over response tokens (labels != -100), divided by
the step's mean response tokens per micro-batch (``StepContext.loss_tokens``, counted over every
accumulation micro-batch and every rank), so that after DeepSpeed averages over accumulation
and ranks the step's gradient is that of the mean over *every response token of the step*:
micro-batch size, accumulation, worker count and packing do not change the update. Without a
step context it is the micro-batch's own token mean. Padded and packed micro-batches
(:mod:`effsft.models.packing`) alike. It is computed from the final hidden states in chunks of ``chunk_tokens`` rows,
each chunk's ``lm_head`` + cross-entropy recomputed in backward (activation checkpointing), so
no ``[B, T, V]`` fp32 logits tensor is ever alive.

Q-Tuning and its baselines plug in at ONE place: :func:`qtuning_loss` below.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from effsft.models.nll import response_nll


def sft_loss(model: torch.nn.Module, batch: dict, chunk_tokens: int = 1024,
             loss_tokens: float | None = None) -> tuple[torch.Tensor, dict]:
    """Plain SFT (``method: off``): response-token NLL sum / ``loss_tokens`` (the step's mean
    response tokens per micro-batch; None: this micro-batch's own count, i.e. its token mean)."""
    total, hidden, n = response_nll(model, batch, chunk_tokens)
    if n == 0:  # keep every parameter in the graph (DeepSpeed/DDP expect gradients)
        return total + 0.0 * hidden.sum(), {"n_response": 0}
    return total / (loss_tokens or n), {"n_response": n}


def qtuning_loss(model: torch.nn.Module, batch: dict, qtuning: Any, ctx: Any,
                 chunk_tokens: int, seed: int, plot_dir: str | None = None) -> tuple[torch.Tensor, dict]:
    """Q-Tuning (or one of its baselines) for every ``qtuning.method`` other than ``off``.

    The selection is :func:`effsft.sft.qtuning.eu_prune`'s pure function, run by
    :func:`effsft.sft.qtuning_loss.qtuning_step_loss` in ``mask`` or ``two_pass`` mode; with
    ``score_scope: global`` the per-sample statistics are all-gathered over the data-parallel
    ranks first. Rank 0 plots the EU plane every ``qtuning.plot_every`` steps.
    """
    from effsft.sft.qtuning import log_scalars
    from effsft.sft.qtuning_config import QTuningConfig
    from effsft.sft.qtuning_loss import qtuning_step_loss

    cfg = QTuningConfig(**qtuning.model_dump(), seed=seed)
    gather = ctx.all_gather if cfg.score_scope == "global" else None
    loss, info = qtuning_step_loss(model, batch, cfg, step=ctx.step, chunk_tokens=chunk_tokens,
                                   all_gather=gather, rank=ctx.rank)
    if plot_dir and ctx.rank == 0 and ctx.micro_step == 0 and ctx.step % cfg.plot_every == 0:
        from pathlib import Path

        from effsft.sft.eu_plot import plot_eu_plane

        out = Path(plot_dir) / "qtuning"
        out.mkdir(parents=True, exist_ok=True)
        plot_eu_plane(info, out / f"eu_plane_step{ctx.step}.png", title=f"EU plane, step {ctx.step}")
    return loss, log_scalars(info)


def check_method(qtuning: Any, zero_stage: int | None = None) -> None:
    """Fail before any work (driver side) on a combination that cannot run."""
    if qtuning.method != "off" and zero_stage == 3:
        # The chunked Q-Tuning loss reads lm_head.weight directly; ZeRO-3 partitions it.
        raise NotImplementedError("qtuning.method != off needs train.zero_stage <= 2 "
                                  "(ZeRO-3 partitions the lm_head weight the selection reads)")


@dataclass(frozen=True)
class SFTLoss:
    """The sft loss hook: ``SFTLoss(qtuning, chunk_tokens, seed)(model, batch, ctx)``."""

    qtuning: Any            # the recipe's ``qtuning`` section (QTuningSpec)
    chunk_tokens: int = 1024
    seed: int = 0
    plot_dir: str | None = None  # rank 0 writes qtuning/eu_plane_step{N}.png here

    def __call__(self, model: torch.nn.Module, batch: dict, ctx) -> tuple[torch.Tensor, dict]:
        if self.qtuning.method == "off":
            return sft_loss(model, batch, self.chunk_tokens, getattr(ctx, "loss_tokens", None))
        return qtuning_loss(model, batch, self.qtuning, ctx, self.chunk_tokens, self.seed, self.plot_dir)
