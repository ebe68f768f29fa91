"""Recipe ``effsft sft``: supervised fine-tuning with DeepSpeed on Ray Train.

Features (each a config key):
* data: any corpus (``data.path``: a prepared corpus dir, a ``select`` output, or raw
  JSONL/Parquet/... through the normalising readers), tokenised with the chat template and
  response-only labels (``tokenize.*``); rows that cannot be trained on are counted by reason.
* training (``train.*``): ``num_workers`` Ray Train workers, DeepSpeed ZeRO ``zero_stage``
  0-3, micro-batch ``micro_batch_size`` x ``grad_accum``, AdamW ``lr`` with ``warmup_steps``
  then ``schedule`` decay, gradient clipping ``clip``, ``max_steps`` or ``epochs``.
* LoRA (``lora.*``) instead of full fine-tuning.
* checkpoint / resume: every ``train.checkpoint_every`` steps; a failed worker group restarts
  from the last checkpoint (``train.max_failures``); re-running the same command after a crash
  resumes from ``<output>.partial/``.
* Q-Tuning (``qtuning.*``, spec docs/algorithms/qtuning.md §3.1): ``method: off`` is plain SFT.
* ``fault.kill_rank_at_step`` kills one worker once (tests).

Output: ``model/`` (HF directory, safetensors, tokenizer), ``metrics.jsonl`` (one line per
step), ``loss.png``, ``report.md``, ``manifest.json``, ``_SUCCESS``.
"""
from __future__ import annotations

import logging
import math
import shutil

from pydantic import model_validator

from effsft.config import ConfigError, CorpusSpec, TokenizeSpec, to_dict
from effsft.runtime import OutputDir, init_ray, timed, worker_path
from effsft.sft.qtuning_config import QTuningSpec
from effsft.train.config import LoraSpec, TrainJobConfig, check_train_lora

log = logging.getLogger("effsft.sft")


class SFTConfig(TrainJobConfig):
    """``effsft sft``: the shared model/output/train/fault/overwrite sections, plus these."""

    data: CorpusSpec
    tokenize: TokenizeSpec = TokenizeSpec()
    lora: LoraSpec = LoraSpec()
    qtuning: QTuningSpec = QTuningSpec()

    @model_validator(mode="after")
    def _compatible(self):
        check_train_lora(self.train, self.lora)
        return self


# ---- stages --------------------------------------------------------------------------------

def _data(cfg: SFTConfig, work):
    from effsft.corpus.normalize import NormalizeOptions
    from effsft.train.data import tokenised_dataset

    return tokenised_dataset(worker_path(cfg.data.path), NormalizeOptions.of(cfg.data), worker_path(cfg.model.path),
                             cfg.tokenize.max_len, cfg.tokenize.train_on, cfg.tokenize.truncation,
                             split=cfg.data.split, trust_remote_code=cfg.model.trust_remote_code,
                             rejects_path=work / "rejects.parquet", template=cfg.model.template)


def total_steps(cfg: SFTConfig, units: int, per_micro: int | None = None, unit: str = "rows") -> int:
    """``train.max_steps``, else ``epochs`` passes over the ``units`` (trainable rows, or
    packs when packing) taken ``per_micro`` (default ``train.micro_batch_size``) per micro-batch."""
    from effsft.train.data import steps_per_epoch

    tr = cfg.train
    per_micro = per_micro or tr.micro_batch_size
    if units // tr.num_workers < per_micro:  # each worker's shard must fill a micro-batch
        raise ConfigError(f"train.micro_batch_size: {units} trainable {unit} over train.num_workers="
                          f"{tr.num_workers} give {units // tr.num_workers} per worker, fewer than one "
                          f"micro-batch of {per_micro}")
    if tr.max_steps:
        return tr.max_steps
    per_epoch = steps_per_epoch(units, tr.num_workers, per_micro, tr.grad_accum)
    steps = math.floor(tr.epochs * per_epoch)
    if steps < 1:
        raise ConfigError(f"train.epochs: {units} trainable {unit} give no full optimizer step of "
                          f"{tr.num_workers} workers x {per_micro} x {tr.grad_accum}")
    return steps


def plan_batches(cfg: SFTConfig, ds, counts: dict):
    """The workers' batching and, with packing, the plan's summary (packs, fill, padding)."""
    import numpy as np

    from effsft.train.data import Batching, plan_summary

    batching = Batching.of(cfg.train, cfg.tokenize.max_len)
    if batching.packing == "off" or not counts["rows_ok"]:
        return batching, None
    lengths = np.concatenate([np.asarray(b["n_tokens"]) for b in ds.select_columns(["n_tokens"]).iter_batches(
        batch_format="numpy", batch_size=None)])
    summary = plan_summary(lengths, batching, cfg.train.micro_batch_size)
    batching = batching.with_plan(cfg.train, summary["packs"], summary["rows"])
    summary["packs_per_micro_batch"] = batching.micro_batch_size
    if summary["oversized_rows"]:
        log.warning("packing: %d rows are longer than train.pack_len=%d; each is a pack of its own (never split)",
                    summary["oversized_rows"], batching.pack_len)
    return batching, summary


def _loop_spec(cfg: SFTConfig, steps: int, work, batching=None):
    from effsft.sft.loss import SFTLoss
    from effsft.train.loop import LoopSpec

    loss = SFTLoss(cfg.qtuning, cfg.train.chunk_tokens, cfg.train.seed, plot_dir=str(work))
    return LoopSpec.for_job(cfg, loss, steps, work, lora=cfg.lora, batching=batching)


def _report(cfg: SFTConfig, work, rows: list[dict], counts: dict, summary: dict) -> None:
    from effsft.report.plots import curve, md_table, write_report

    steps = [r["step"] for r in rows]
    curve(work / "loss.png", steps, {"train loss": [r["loss"] for r in rows]},
          "sft training loss", "step", "loss (mean response NLL)")
    head = {k: summary.get(k) for k in ("steps", "final_loss", "tokens_per_s", "resumed_from_step")}
    data = {k: v for k, v in counts.items()}
    tr = cfg.train
    setup = (f"{tr.num_workers} workers, ZeRO-{tr.zero_stage}, micro-batch {tr.micro_batch_size} "
             f"x accum {tr.grad_accum}, lr {tr.lr} ({tr.schedule}, warm-up {tr.warmup_steps}), "
             f"{'LoRA r=%d' % cfg.lora.r if cfg.lora.enabled else 'full fine-tuning'}, "
             f"qtuning.method={cfg.qtuning.method}")
    write_report(work / "report.md", f"sft of {cfg.model.path}", [
        ("Setup", setup), ("Result", md_table([head])),
        ("Data (rows by status; not-ok rows are not trained on)", md_table([data])),
        ("Last steps", md_table(rows[-5:], ["step", "loss", "lr", "tokens", "tokens_per_s"]))],
        images=[("Training loss", "loss.png")])


def run_sft(cfg: SFTConfig) -> dict:
    """Set up, fit, write manifest + report, commit the output directory."""
    from effsft.models.loading import describe_model
    from effsft.report.manifest import write_manifest
    from effsft.sft.loss import check_method
    from effsft.train.loop import METRICS_FILE, read_metrics
    from effsft.train.trainer import fit

    check_method(cfg.qtuning, cfg.train.zero_stage)
    out = OutputDir(cfg.output, overwrite=cfg.overwrite)
    work = out.open()
    init_ray()
    timings: dict = {}
    with timed(timings, "tokenize"):
        ds, counts = _data(cfg, work)
    from effsft.corpus.rejects import unreadable_files

    counts["unreadable_files"] = unreadable_files(work / "rejects.parquet")
    if counts["unreadable_files"]:
        log.warning("sft: unreadable files in data.path (listed in rejects.parquet and the manifest): %s",
                    [u["file"] for u in counts["unreadable_files"]])
    batching, packing = plan_batches(cfg, ds, counts)
    if packing:
        steps = total_steps(cfg, packing["packs"], batching.micro_batch_size, "packs")
    else:
        steps = total_steps(cfg, counts["rows_ok"])
    with timed(timings, "train"):
        summary = fit(_loop_spec(cfg, steps, work, batching), ds, work / "checkpoints", name="train")
    rows = read_metrics(work / METRICS_FILE)
    _report(cfg, work, rows, counts, summary)
    inputs = {"model": describe_model(cfg.model),
              "data": {"path": cfg.data.path}}
    metrics = {**summary, "first_loss": rows[0]["loss"] if rows else None}
    write_manifest(work, "sft", to_dict(cfg), inputs=inputs,
                   counts={**counts, "steps": steps, **({"packing": packing} if packing else {})},
                   metrics=metrics, timings=timings)
    # Checkpoints only serve resumption; the committed output holds the final model.
    shutil.rmtree(work / "checkpoints", ignore_errors=True)
    out.commit()
    return {"output": str(out.final), "steps": summary.get("steps"),
            "first_loss": metrics["first_loss"], "final_loss": summary.get("final_loss"),
            "rows_ok": counts["rows_ok"], "rows_too_long": counts["rows_too_long"]}
