"""The one DeepSpeed-on-Ray-Train worker loop that ``sft`` and ``grpo`` drive with their own loss.

Each Ray Train worker runs :func:`train_loop_per_worker`: build the model (full or LoRA),
``deepspeed.initialize`` it (ZeRO 0-3, bf16 on GPU / fp32 on CPU), restore the latest
checkpoint if Ray Train hands one back, then run optimizer steps of ``grad_accum``
micro-batches from this worker's dataset shard until ``total_steps``. Every
``checkpoint_every`` steps every rank saves its DeepSpeed shard and the data position into a
checkpoint directory and reports it; rank 0 appends each step's metrics to a JSONL log.

The loss is a hook, ``loss_fn(model, batch, ctx) -> (loss, metrics)``: ``model`` is the HF
(or peft) model, ``batch`` the collated ``[B, T]`` tensors of one micro-batch, ``ctx`` a
:class:`StepContext`; ``metrics`` holds scalars to log (non-scalars are ignored).

Where the micro-batches come from is the second hook: by default this worker's shard of the
``train`` Ray Dataset; with ``LoopSpec.step_source`` (a :class:`StepSource`, e.g. GRPO's
rollout controller) the source hands out each step's micro-batches and runs after each
optimizer step (weight sync). A source's batch is any dict: tensors (also inside lists) are
moved to the device, and ``num_tokens`` / ``num_response_tokens`` stand in for the counts
that a collated batch's ``attention_mask`` / ``labels`` give.
"""
from __future__ import annotations

import json
import logging
import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Protocol

import torch

from effsft.corpus.tokenize import IGNORE_INDEX
from effsft.runtime import worker_path
from effsft.train.config import FaultSpec, LoraSpec, TrainSpec
from effsft.train.data import Batching
from effsft.train.tracking import TrackingSpec

log = logging.getLogger("effsft.train")

CKPT_TAG = "ds"             # DeepSpeed tag inside each checkpoint directory
STATE_FILE = "effsft_state_rank{rank}.json"
METRICS_FILE = "metrics.jsonl"


@dataclass(frozen=True)
class StepContext:
    """What a loss hook may need besides the model and the batch."""

    step: int                     # optimizer step this micro-batch belongs to (0-based)
    micro_step: int               # index within the accumulation window
    grad_accum: int
    rank: int
    world_size: int
    device: torch.device
    all_gather: Callable[[Any], list] = field(repr=False, default=lambda x: [x])
    # The step's response tokens (every micro-batch, every rank) / (grad_accum x world_size): a
    # loss that is a token sum divided by this gives, once DeepSpeed averages over accumulation
    # and ranks, the mean over all the step's response tokens (None outside run_step).
    loss_tokens: Optional[float] = None


LossFn = Callable[[torch.nn.Module, dict, StepContext], "tuple[torch.Tensor, dict]"]


class StepSource(Protocol):
    """Per-step batch provider replacing the dataset shard (picklable; state built in ``setup``).

    Every rank calls every method in the same order (they may run collectives).
    """

    def setup(self, engine, tokenizer, ctx: StepContext, start_step: int) -> None:
        """Once per worker (re)start, after the checkpoint (if any) is restored."""

    def micro_batches(self, step: int, ctx: StepContext) -> list[dict]:
        """This rank's ``grad_accum`` micro-batches for optimizer step ``step`` (0-based)."""

    def after_step(self, engine, step: int, ctx: StepContext) -> dict:
        """After optimizer step ``step`` (1-based count of steps done); scalars to log."""

    def summary(self) -> dict:
        """Extra entries for rank 0's summary."""


@dataclass(frozen=True)
class LoopSpec:
    """Everything a worker needs (pickled into ``train_loop_config``)."""

    model_path: str
    train: TrainSpec
    lora: LoraSpec
    fault: FaultSpec
    loss_fn: LossFn
    total_steps: int
    out_dir: str                  # rank 0 writes metrics.jsonl and model/ here (shared storage)
    dtype: str = "auto"
    trust_remote_code: bool = False
    attn_implementation: Optional[str] = None
    template: str = "auto"        # model.template: the saved tokenizer carries the one trained with
    batching: Optional[Batching] = None        # None: micro_batch_size padded rows
    step_source: Optional[StepSource] = None   # None: micro-batches from the "train" dataset shard
    tracking: TrackingSpec = TrackingSpec()    # rank 0's metrics also to <out_dir>/tb (+ wandb/mlflow)

    @classmethod
    def for_job(cls, cfg, loss_fn: LossFn, total_steps: int, out_dir, *, train: Optional[TrainSpec] = None,
                lora: Optional[LoraSpec] = None, step_source: Optional[StepSource] = None,
                batching: Optional[Batching] = None) -> "LoopSpec":
        """The spec of a :class:`~effsft.train.config.TrainJobConfig` job (model, train, fault)."""
        m = cfg.model
        return cls(model_path=worker_path(m.path), train=train or cfg.train, lora=lora or LoraSpec(),
                   fault=cfg.fault, loss_fn=loss_fn, total_steps=total_steps, out_dir=str(out_dir),
                   dtype=m.dtype, trust_remote_code=m.trust_remote_code,
                   attn_implementation=m.attn_implementation, template=m.template, batching=batching,
                   step_source=step_source, tracking=getattr(cfg, "tracking", None) or TrackingSpec())


class LossModule(torch.nn.Module):
    """Wraps the model so the loss hook runs inside ``engine(...)``: DeepSpeed's forward
    registers the hooks its backward (and ZeRO-3's parameter fetching) rely on."""

    def __init__(self, model: torch.nn.Module, loss_fn: LossFn):
        super().__init__()
        self.model = model
        self.loss_fn = loss_fn

    def forward(self, batch: dict, ctx: StepContext):
        return self.loss_fn(self.model, batch, ctx)


# ---- pieces (testable without Ray) ---------------------------------------------------------

def _scalar(v) -> float | None:
    if isinstance(v, bool):
        return float(v)
    if isinstance(v, (int, float)):
        return float(v)
    if isinstance(v, torch.Tensor) and v.numel() == 1:
        return float(v.detach())
    return None


def _all_reduce_sum(values: list[float]) -> list[float]:
    import torch.distributed as dist

    t = torch.tensor(values, dtype=torch.float64)
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t)
    return t.tolist()


def all_gather_object(obj) -> list:
    """``[obj_rank0, ..., obj_rankW-1]`` (the ``StepContext.all_gather`` of the loop)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def _to_device(obj, device):
    """Tensors (also inside lists/tuples) to ``device``; other values unchanged."""
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_device(x, device) for x in obj)
    return obj


def _token_counts(batch: dict) -> tuple[int, int]:
    """(tokens, response tokens) of a micro-batch: from the collated masks, or the counts a
    step source put in the batch."""
    if "attention_mask" in batch:
        return int(batch["attention_mask"].sum()), int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
    return int(batch.get("num_tokens", 0)), int(batch.get("num_response_tokens", 0))


def run_step(engine, micro: list[dict], ctx: StepContext) -> dict:
    """One optimizer step over ``grad_accum`` micro-batches.

    ``engine.backward`` scales each micro-loss by ``1/grad_accum`` and ``engine.step`` only
    updates at the accumulation boundary, so the step's gradient is the mean of the micro-batch
    gradients (and of the ranks'). The step's token counts are all-reduced first and handed to
    the loss hook as ``StepContext.loss_tokens``, so a token-sum loss can be normalised by every
    response token of the step. Returns the metrics: ``loss`` (mean over micro-batches and ranks), ``tokens``
    and ``response_tokens`` (summed over ranks), ``lr`` used, ``grad_norm`` when DeepSpeed has
    it, and the hook's scalar metrics averaged over this rank's micro-batches.
    """
    lr = float(engine.get_lr()[0])
    counts = [_token_counts(b) for b in micro]
    tok_all, resp_all = _all_reduce_sum([sum(c[0] for c in counts), sum(c[1] for c in counts)])
    loss_tokens = max(resp_all, 1.0) / (len(micro) * ctx.world_size)
    loss_sum, hook_sums = 0.0, {}
    for i, batch in enumerate(micro):
        batch = {k: _to_device(v, ctx.device) for k, v in batch.items()}
        c = StepContext(ctx.step, i, len(micro), ctx.rank, ctx.world_size, ctx.device, ctx.all_gather,
                        loss_tokens)
        loss, metrics = engine(batch, c)
        engine.backward(loss)
        engine.step()
        loss_sum += float(loss.detach())
        for k, v in (metrics or {}).items():
            s = _scalar(v)
            if s is not None:
                hook_sums[k] = hook_sums.get(k, 0.0) + s
    (loss_all,) = _all_reduce_sum([loss_sum / len(micro)])
    out = {"loss": loss_all / ctx.world_size, "tokens": int(tok_all), "response_tokens": int(resp_all),
           "lr": lr}
    gn = engine.get_global_grad_norm() if hasattr(engine, "get_global_grad_norm") else None
    if gn is not None:
        out["grad_norm"] = float(gn)
    out.update({k: v / len(micro) for k, v in hook_sums.items()})
    return out


class MetricsLog:
    """Rank 0's JSONL log; on resume, lines after the restored step are dropped (they will be
    produced again) so the log holds each step once."""

    def __init__(self, path: str | Path, rank: int, resume_step: int, tracker=None):
        self.path = Path(path)
        self.active = rank == 0
        self.tracker = tracker  # effsft.train.tracking.Tracker: the same rows to TensorBoard/wandb/MLflow
        if self.active and self.path.exists():
            keep = [ln for ln in self.path.read_text().splitlines()
                    if ln.strip() and json.loads(ln)["step"] <= resume_step]
            self.path.write_text("".join(ln + "\n" for ln in keep))

    def write(self, row: dict) -> None:
        if self.active:
            with open(self.path, "a") as f:
                f.write(json.dumps(row) + "\n")
            if self.tracker is not None:
                self.tracker.log(row)

    def close(self) -> None:
        if self.tracker is not None:
            self.tracker.close()


def read_metrics(path: str | Path) -> list[dict]:
    p = Path(path)
    return [json.loads(ln) for ln in p.read_text().splitlines() if ln.strip()] if p.exists() else []


def maybe_inject_fault(fault: FaultSpec, step: int, rank: int, marker_dir: str) -> None:
    """Kill this worker process once (tests of restart-from-checkpoint)."""
    k = fault.kill_rank_at_step
    if k is None or k.rank != rank or k.step != step:
        return
    marker = Path(marker_dir) / f".fault-fired-rank{rank}-step{step}"
    if marker.exists():
        return
    marker.write_text(str(time.time()))
    time.sleep(k.delay_s)
    log.warning("fault injection: killing rank %d at step %d", rank, step)
    os._exit(17)


# ---- checkpoint / resume ---------------------------------------------------------------

@dataclass
class Position:
    step: int = 0    # optimizer steps done
    epoch: int = 0   # data position: next micro-batch is (epoch, offset)
    offset: int = 0


def save_and_report(engine, pos: Position, rank: int, metrics: dict, lora: LoraSpec) -> None:
    """Every rank saves its DeepSpeed shard + data position, then reports the checkpoint."""
    import ray.train

    with tempfile.TemporaryDirectory(prefix="effsft-ckpt-") as d:
        engine.save_checkpoint(d, tag=CKPT_TAG, client_state={"position": pos.__dict__},
                               exclude_frozen_parameters=lora.enabled)
        (Path(d) / STATE_FILE.format(rank=rank)).write_text(json.dumps(pos.__dict__))
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(d))


def restore(engine, lora: LoraSpec) -> Position | None:
    """Load the checkpoint Ray Train hands back (after a failure, or a re-run of the same
    run name); None when starting fresh."""

    from effsft.train.faults import restore_latest_readable  # falls back past a corrupt checkpoint

    client = restore_latest_readable(engine, CKPT_TAG, load_module_strict=not lora.enabled)
    return None if client is None else Position(**client["position"])


# ---- the worker loop -------------------------------------------------------------------

def peak_memory(device: torch.device) -> dict:
    """Rank 0's peak memory: host RSS (MiB) and, on a GPU, the CUDA allocator's peak."""
    import resource

    out = {"peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}
    if device.type == "cuda":
        out["peak_cuda_mib"] = round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
    return out


def worker_threads(threads: int | None, local_workers: int) -> int:
    """torch threads of a CPU worker: ``train.threads``, else this node's cores shared out."""
    if threads:
        return threads
    return max(1, (os.cpu_count() or 1) // max(1, local_workers))


def _take(stream: Iterator, n: int, pos: Position) -> list[dict]:
    out = []
    for _ in range(n):
        epoch, idx, batch = next(stream)
        out.append(batch)
        pos.epoch, pos.offset = epoch, idx + 1
    return out


def train_loop_per_worker(config: dict) -> dict | None:
    """Ray Train entry point; ``config = {"spec": LoopSpec}``. Rank 0 returns a summary."""
    import ray.train

    from effsft.models.loading import load_tokenizer, resolve_dtype
    from effsft.train.data import micro_batches
    from effsft.train.engine import build_engine, load_trainable_model, save_hf_model

    spec: LoopSpec = config["spec"]
    tr = spec.train
    rc = ray.train.get_context()
    rank, world = rc.get_world_rank(), rc.get_world_size()
    device = ray.train.torch.get_device() if tr.use_gpu else torch.device("cpu")
    if device.type == "cpu":
        torch.set_num_threads(worker_threads(tr.threads, rc.get_local_world_size()))
    dtype = resolve_dtype(spec.dtype, device)
    t_setup = time.perf_counter()
    torch.manual_seed(tr.seed)  # identical LoRA init on every rank
    tok = load_tokenizer(spec.model_path, trust_remote_code=spec.trust_remote_code, template=spec.template)
    model = load_trainable_model(spec.model_path, dtype, spec.lora, spec.trust_remote_code,
                                 spec.attn_implementation, tr.gradient_checkpointing)
    from effsft.train.faults import NanGuard
    from effsft.train.tracking import Tracker

    nan_guard = NanGuard(tr.on_nan, tr.max_nan_steps, spec.fault.nan_at_steps)
    engine = build_engine(LossModule(model, nan_guard.wrap_loss(spec.loss_fn)), tr, spec.total_steps,
                          bf16=dtype == torch.bfloat16)
    nan_guard.attach(engine)
    restored = restore(engine, spec.lora)
    pos = restored or Position()
    resumed_from = restored.step if restored else None
    torch.manual_seed(tr.seed + 1000 * rank + pos.step)  # dropout etc. differ per rank
    base_ctx = StepContext(pos.step, 0, tr.grad_accum, rank, world, device, all_gather_object)
    source = spec.step_source
    if source is None:
        stream = micro_batches(ray.train.get_dataset_shard("train"), spec.batching or tr.micro_batch_size,
                               tok.pad_token_id, start_epoch=pos.epoch, skip=pos.offset,
                               seed=tr.seed, shuffle_buffer=tr.shuffle_buffer)
    else:
        source.setup(engine, tok, base_ctx, pos.step)
    mlog = MetricsLog(Path(spec.out_dir) / METRICS_FILE, rank, pos.step,
                      Tracker.open(spec.tracking, spec.out_dir, pos.step, rank))
    setup_s = time.perf_counter() - t_setup
    t_train, tokens, last = time.perf_counter(), 0, {}
    while pos.step < spec.total_steps:
        t0 = time.perf_counter()
        ctx = StepContext(pos.step, 0, tr.grad_accum, rank, world, device, base_ctx.all_gather)
        micro = _take(stream, tr.grad_accum, pos) if source is None else source.micro_batches(pos.step, ctx)
        data_s = time.perf_counter() - t0
        m = run_step(engine, micro, ctx)
        pos.step += 1
        m.update(nan_guard.end_step(engine, pos.step))
        extra = source.after_step(engine, pos.step, ctx) if source is not None else {}
        dt = time.perf_counter() - t0
        tokens += m["tokens"]
        last = {"step": pos.step, "epoch": pos.epoch, **m, **extra, "tokens_per_s": m["tokens"] / dt,
                "step_s": dt, "data_s": data_s}
        mlog.write(last)
        maybe_inject_fault(spec.fault, pos.step, rank, spec.out_dir)
        if pos.step == spec.total_steps or (tr.checkpoint_every and pos.step % tr.checkpoint_every == 0):
            save_and_report(engine, pos, rank, last, spec.lora)
        elif pos.step % tr.log_every == 0:
            ray.train.report(last)
    train_s = time.perf_counter() - t_train
    mlog.close()
    save_hf_model(engine, tok, Path(spec.out_dir) / "model",
                  rank, spec.lora)
    if rank != 0:
        return None
    return {"steps": pos.step, "resumed_from_step": resumed_from,
            "final_loss": last.get("loss"), "tokens": tokens, "setup_s": round(setup_s, 3),
            "train_s": round(train_s, 3),
            "tokens_per_s": tokens / train_s if train_s > 0 else None, **nan_guard.summary(),
            **peak_memory(device), **(source.summary() if source is not None else {})}
