"""The ``effsft grpo`` config schema: ``data.*``, ``reward_funcs``, ``reward.*``, ``rollout.*`` and the
GRPO keys (docs/algorithms/prefix_grouper_grpo.md §3), on the shared train job sections."""

from __future__ import annotations

from typing import List, Literal, Optional

from pydantic import Field, field_validator, model_validator

from effsft.config import ExistingPath, Strict
from effsft.corpus.answer import AnswerSpec
from effsft.train.config import TrainJobConfig


class PromptDataSpec(Strict):
    """``data.*``: prompts with the reward functions' columns."""

    path: ExistingPath                     # JSONL/JSON/Parquet/Arrow file, or a directory of them
    prompt_column: str = "messages"        # chat messages (a trailing assistant turn is dropped) or a string
    tasks: Optional[List[str]] = None      # keep only rows whose ``task`` column is one of these
    limit: Optional[int] = Field(None, ge=1)
    max_prompt_tokens: int = Field(512, ge=1)  # longer prompts are counted and skipped
    on_unreadable: Literal["reject", "fail"] = "reject"   # a damaged file: rejects (and go on) or exit 1


class RewardFuncSpec(Strict):
    fn: str                                # built-in (exact_match: the answer.* rule; math_exact_match) or "pkg.mod:callable"
    weight: float = 1.0


class RewardSpec(Strict):
    """``reward.*``: where reward functions run."""

    mode: Literal["task", "inline"] = "task"
    num_cpus: float = Field(0.25, gt=0)    # per reward task
    # per call (one function over one rollout batch): a call that raises or runs longer scores 0
    # for the batch, logged (reward_errors in metrics.jsonl, reward_errors.jsonl); null = no limit
    timeout_s: Optional[float] = Field(60.0, gt=0)


class RolloutSpec(Strict):
    """``rollout.*``: the sampling actors."""

    num_actors: int = Field(1, ge=1)
    num_cpus: float = Field(0.5, gt=0)
    num_gpus: float = Field(0, ge=0)
    num_threads: int = Field(0, ge=0)      # torch threads per actor; 0 = torch's default
    prompts_per_step: int = Field(8, ge=1)


class GRPOConfig(TrainJobConfig):
    """``effsft grpo``: the shared model/output/train/fault/overwrite sections, plus these.
    The GRPO keys are docs/algorithms/prefix_grouper_grpo.md §3's with its defaults."""

    data: PromptDataSpec
    num_generations: int = Field(8, ge=2)
    scale_rewards: Literal["group", "batch", "none"] = "group"
    loss_type: Literal["grpo", "bnpo", "dr_grpo", "dapo"] = "dapo"
    epsilon: float = Field(0.2, gt=0, lt=1)
    epsilon_high: Optional[float] = Field(None, gt=0)   # None: = epsilon
    beta: float = Field(0.0, ge=0)
    num_iterations: int = Field(1, ge=1)
    max_completion_length: int = Field(256, ge=1)
    temperature: float = Field(1.0, gt=0)
    top_p: float = Field(1.0, gt=0, le=1)
    reward_funcs: List[RewardFuncSpec] = [RewardFuncSpec(fn="exact_match")]
    answer: AnswerSpec = AnswerSpec()      # the exact_match reward's rule (= eval's answer.*)
    prefix_grouping: Literal["auto", "on", "off"] = "auto"
    reward: RewardSpec = RewardSpec()
    rollout: RolloutSpec = RolloutSpec()

    @model_validator(mode="after")
    def _compatible(self):
        W, GA = self.train.num_workers, self.train.grad_accum
        if self.rollout.prompts_per_step % (W * GA):
            raise ValueError(f"rollout.prompts_per_step={self.rollout.prompts_per_step} must be "
                             f"divisible by train.num_workers x train.grad_accum = {W * GA} "
                             "(whole prompt groups per micro-batch)")
        if not self.reward_funcs:
            raise ValueError("reward_funcs: give at least one reward function")
        return self

    @field_validator("prefix_grouping", mode="before")
    @classmethod
    def _yaml_on_off(cls, v):
        # YAML 1.1 reads a bare `on` / `off` as a boolean: `prefix_grouping=on` must still mean "on".
        return {True: "on", False: "off"}.get(v, v) if isinstance(v, bool) else v

    @property
    def eps_high(self) -> float:
        return self.epsilon if self.epsilon_high is None else self.epsilon_high
