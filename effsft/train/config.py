"""Config sections of the shared training loop (used by the ``sft`` and ``grpo`` recipes).

One optimizer step consumes ``micro_batch_size x grad_accum x num_workers`` rows.
"""
from __future__ import annotations

from typing import List, Literal, Optional

from pydantic import Field, field_validator, model_validator

from effsft.config import ModelSpec, OutputPath, Strict
from effsft.train.tracking import TrackingSpec


class TrainSpec(Strict):
    """``train.*``: scaling, DeepSpeed, optimizer, schedule, checkpointing."""

    num_workers: int = Field(2, ge=1)
    use_gpu: bool = False
    cpus_per_worker: float = Field(0.5, gt=0)   # fractional on CPU: whole CPUs deadlock small clusters (ray_notes)
    # torch intra-op threads per CPU worker; None = the node's cores / the workers on that node
    # (Ray would leave a fractional-CPU worker with OMP_NUM_THREADS=1: half the machine idle).
    threads: Optional[int] = Field(None, ge=1)
    # "auto": 0 on one worker (ZeRO partitions across workers: one worker has nothing to split,
    # and stage 2 cost +43% per step on CPU), 2 on several. The manifest records the resolved stage.
    zero_stage: Literal["auto", 0, 1, 2, 3] = "auto"
    # Rows per micro-batch. With packing, each micro-batch holds as many packs as that many rows
    # fill on average (so rows per step, the schedule and epochs stay as without packing).
    micro_batch_size: int = Field(4, ge=1)
    grad_accum: int = Field(1, ge=1)
    # Padding-free packing of whole rows into pack_len-token sequences (effsft.models.packing):
    # bfd = best-fit decreasing, greedy = in order, off = padded micro-batches of rows.
    packing: Literal["off", "bfd", "greedy"] = "bfd"
    pack_len: Optional[int] = Field(None, ge=8)              # tokens per pack; default tokenize.max_len
    tokens_per_micro_batch: Optional[int] = Field(None, ge=8)  # packing: this // pack_len packs per micro-batch instead
    optimizer: Literal["adamw", "sgd"] = "adamw"
    lr: float = Field(2e-5, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    betas: tuple[float, float] = (0.9, 0.999)
    warmup_steps: int = Field(0, ge=0)
    max_steps: Optional[int] = Field(None, ge=1)  # wins over epochs when set
    epochs: float = Field(1.0, gt=0)
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    min_lr_ratio: float = Field(0.0, ge=0, le=1)  # floor of the decay, as a fraction of lr
    clip: float = Field(1.0, ge=0)                # max grad norm; 0 = no clipping
    seed: int = 0
    shuffle_buffer: int = Field(0, ge=0)          # rows in the per-worker local shuffle buffer; 0 = off
    checkpoint_every: int = Field(0, ge=0)        # steps; 0 = only the final checkpoint
    keep_checkpoints: int = Field(2, ge=1)
    max_failures: int = Field(1, ge=0)            # worker-group restarts from the last checkpoint
    log_every: int = Field(1, ge=1)
    chunk_tokens: int = Field(1024, ge=1)         # lm_head rows per loss chunk (no B x T x V fp32 logits)
    gradient_checkpointing: bool = False
    # a step with a non-finite loss or gradients (any rank): skip = no update, go on (fails past
    # max_nan_steps skipped steps); stop = fail at once (effsft.train.faults)
    on_nan: Literal["skip", "stop"] = "skip"
    max_nan_steps: int = Field(10, ge=0)

    @field_validator("packing", mode="before")
    @classmethod
    def _yaml_off(cls, v):
        return "off" if v is False else v  # YAML 1.1 reads a bare `off` as False

    @model_validator(mode="after")
    def _packing_keys(self):
        if self.packing == "off" and self.tokens_per_micro_batch is not None:
            raise ValueError("train.tokens_per_micro_batch needs train.packing bfd or greedy")
        if self.tokens_per_micro_batch is not None and self.pack_len and self.tokens_per_micro_batch < self.pack_len:
            raise ValueError(f"train.tokens_per_micro_batch={self.tokens_per_micro_batch} is less than one pack "
                             f"(train.pack_len={self.pack_len})")
        return self

    def packs_per_micro_batch(self, pack_len: int, packs: int, rows: int) -> int:
        """Packs in one micro-batch: ``tokens_per_micro_batch // pack_len``, else the packs that
        ``micro_batch_size`` rows fill on average (``packs`` packs hold the ``rows`` rows)."""
        if self.tokens_per_micro_batch:
            return max(1, self.tokens_per_micro_batch // pack_len)
        return max(1, round(self.micro_batch_size * packs / max(1, rows)))

    @model_validator(mode="before")
    @classmethod
    def _auto_zero_stage(cls, data):
        if isinstance(data, dict) and data.get("zero_stage", "auto") == "auto":
            data = {**data, "zero_stage": 0 if data.get("num_workers", 2) in (1, "1") else 2}
        return data


class LoraSpec(Strict):
    """``lora.*``: train low-rank adapters (peft) instead of the full model."""

    enabled: bool = False
    r: int = Field(8, ge=1)
    alpha: float = Field(16, gt=0)
    dropout: float = Field(0.0, ge=0, lt=1)
    target_modules: List[str] = ["q_proj", "k_proj", "v_proj", "o_proj"]
    merge_on_save: bool = True   # model/ is the merged full model; the adapter goes to model/adapter/


class KillAt(Strict):
    rank: int = Field(0, ge=0)
    step: int = Field(..., ge=1)
    # Wait before dying: Ray Train V2 registers a reported checkpoint when its controller next
    # polls the workers (every 2 s), so a crash right after a report loses that checkpoint.
    delay_s: float = Field(5.0, ge=0)


class FaultSpec(Strict):
    """``fault.*``: fault injection for tests. The kill fires once per run (a marker file
    in the run's storage directory remembers it), so the restarted worker group gets past it."""

    kill_rank_at_step: Optional[KillAt] = None
    nan_at_steps: List[int] = []   # 1-based optimizer steps whose loss is made NaN (train.on_nan tests)


def check_train_lora(train: TrainSpec, lora: LoraSpec) -> None:
    """Fail fast on combinations the loop does not support."""
    if lora.enabled and train.zero_stage == 3:
        raise ValueError("lora.enabled with train.zero_stage=3 is not supported (use stage 0-2)")



class TrainJobConfig(Strict):
    """The sections every training job (``sft``, ``grpo``) shares; each job adds its own."""

    model: ModelSpec
    output: OutputPath
    train: TrainSpec = TrainSpec()
    fault: FaultSpec = FaultSpec()
    tracking: TrackingSpec = TrackingSpec()
    overwrite: bool = False

    @model_validator(mode="after")
    def _tracking_available(self):
        self.tracking.check()  # wandb / mlflow are optional packages: name the missing one
        return self
