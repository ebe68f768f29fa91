"""The ``qtuning.*`` config: one schema, read by the sft recipe and by the Q-Tuning step loss.

The keys and defaults are those of docs/algorithms/qtuning.md §3 (the paper's released trainer
where it and the paper differ; ``loss_norm: paper`` gives the authors' normalisation).
"""
from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator

from effsft.config import Strict


class QTuningSpec(Strict):
    """``qtuning.*``: exactly the keys of docs/algorithms/qtuning.md §3.1 (defaults are the spec's)."""

    method: Literal["off", "qtuning", "random_sample", "ppl_only", "entropy_only",
                    "random_token"] = "off"
    sample_ratio: float = Field(0.25, gt=0, le=1)
    token_ratio: float = Field(0.5, gt=0, le=1)
    lam: float = Field(0.5, ge=0, le=1)
    entropy_scope: Literal["response", "all"] = "response"
    token_budget: Literal["batch", "per_sample"] = "batch"
    loss_norm: Literal["kept_response_tokens", "paper"] = "kept_response_tokens"
    neighbor_div2: bool = False
    score_scope: Literal["local", "global"] = "local"
    mode: Literal["mask", "two_pass"] = "mask"
    plot_every: int = Field(500, ge=1)
    baseline_order: Literal["default", "reverse"] = "default"

    @field_validator("method", mode="before")
    @classmethod
    def _yaml_off(cls, v):
        # YAML 1.1 reads a bare `off` as False: `method: off` must still mean "off".
        return "off" if v is False else v


class QTuningConfig(QTuningSpec):
    """The ``qtuning`` section plus the run's seed (the random baselines draw from ``(seed, step)``)."""

    seed: int = 0
