"""Training faults and tracking without Ray: a NaN loss skips the optimizer step (parameters
unchanged, DeepSpeed's LR schedule held) on ZeRO-0 and ZeRO-2, stop / max_nan_steps fail with a
clear error; checkpoint fallback order; the tracker's event files read back with TensorBoard's
reader; a missing wandb/mlflow is a config error naming the package."""
from __future__ import annotations

import json
import math

import pytest
import torch

from effsft.train.faults import NanGuard, NonFiniteLossError, checkpoint_candidates


def _engine(zero_stage, guard):
    from transformers import LlamaConfig, LlamaForCausalLM

    from effsft.sft.loss import SFTLoss
    from effsft.train.config import TrainSpec
    from effsft.train.engine import build_engine
    from effsft.train.loop import LossModule

    class _Off:
        method = "off"

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                         num_attention_heads=4, num_key_value_heads=2,
                                         max_position_embeddings=32)).float()
    tr = TrainSpec(num_workers=1, zero_stage=zero_stage, micro_batch_size=2, lr=1e-2, schedule="linear",
                   warmup_steps=0)
    engine = build_engine(LossModule(model, guard.wrap_loss(SFTLoss(_Off()))), tr, total_steps=10, bf16=False)
    guard.attach(engine)
    return engine


def _batch():
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 64, (2, 10), generator=g)
    labels = ids.clone()
    labels[:, :4] = -100
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}


def _params(engine):
    return {k: p.detach().clone() for k, p in engine.module.model.named_parameters()}


@pytest.mark.parametrize("zero_stage", [0, 2])
def test_nan_step_is_skipped_and_counted(zero_stage, single_process_group):
    from effsft.train.loop import StepContext, run_step

    guard = NanGuard("skip", max_nan_steps=1, nan_at_steps=[2])
    engine = _engine(zero_stage, guard)
    snaps, rows = [], []
    for step in range(3):
        m = run_step(engine, [_batch()], StepContext(step, 0, 1, 0, 1, torch.device("cpu")))
        m.update(guard.end_step(engine, step + 1))
        snaps.append(_params(engine))
        rows.append(m)
    assert [r["nan_skipped"] for r in rows] == [0.0, 1.0, 0.0] and rows[-1]["nan_steps_skipped"] == 1
    assert math.isnan(rows[1]["loss"]) and math.isfinite(rows[2]["loss"])
    assert all(torch.equal(snaps[0][k], snaps[1][k]) for k in snaps[0])      # no update at the NaN step
    assert any(not torch.equal(snaps[1][k], snaps[2][k]) for k in snaps[0])  # the next step trains
    assert all(torch.isfinite(p).all() for p in snaps[2].values())
    assert engine.skipped_steps == 1
    assert rows[2]["lr"] == rows[1]["lr"]  # the schedule did not advance over the skipped step
    assert guard.summary() == {"nan_steps_skipped": 1}


@pytest.mark.parametrize("on_nan,limit,message", [("stop", 10, "train.on_nan=stop"),
                                                   ("skip", 1, "more than train.max_nan_steps=1")])
def test_nan_stop_and_limit_fail_clearly(on_nan, limit, message, single_process_group):
    from effsft.train.loop import StepContext, run_step

    guard = NanGuard(on_nan, max_nan_steps=limit, nan_at_steps=[1, 2])
    engine = _engine(0, guard)
    with pytest.raises(NonFiniteLossError, match=message):
        for step in range(3):
            run_step(engine, [_batch()], StepContext(step, 0, 1, 0, 1, torch.device("cpu")))
            guard.end_step(engine, step + 1)


def test_checkpoint_candidates_newest_step_first(tmp_path):
    for name, step in (("checkpoint_a", 2), ("checkpoint_b", 6), ("checkpoint_c", 4), ("checkpoint_d", 8)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "effsft_state_rank0.json").write_text(json.dumps({"step": step}))
    got = [p.name for p in checkpoint_candidates(tmp_path / "checkpoint_b")]
    assert got == ["checkpoint_b", "checkpoint_c", "checkpoint_a"]  # never a later one


def test_tracker_writes_every_scalar_readable_by_tensorboard(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from effsft.train.tracking import Tracker, TrackingSpec

    t = Tracker.open(TrackingSpec(), tmp_path)
    for step in (1, 2, 3):
        t.log({"step": step, "loss": 1.0 / step, "lr": 1e-3, "qtuning/n_Q2": 2, "sample_completion": "text"})
    t.close()
    acc = EventAccumulator(str(tmp_path / "tb"))
    acc.Reload()
    assert set(acc.Tags()["scalars"]) == {"loss", "lr", "qtuning/n_Q2"}
    assert [(e.step, round(e.value, 4)) for e in acc.Scalars("loss")] == [(1, 1.0), (2, 0.5), (3, 0.3333)]
    off = Tracker.open(TrackingSpec(backend="none"), tmp_path / "off")
    off.log({"step": 1, "loss": 1.0})
    off.close()
    assert not (tmp_path / "off").exists()
    Tracker.open(TrackingSpec(), tmp_path / "rank1", rank=1).log({"step": 1, "loss": 1.0})
    assert not (tmp_path / "rank1").exists()


@pytest.mark.parametrize("backend", ["wandb", "mlflow"])
def test_missing_tracking_package_is_a_config_error(backend, tmp_path):
    import importlib.util

    from effsft.config import ConfigError, build_config
    from effsft.sft.recipe import SFTConfig

    if importlib.util.find_spec(backend) is not None:
        pytest.skip(f"{backend} is installed here")
    (tmp_path / "m").mkdir()
    with pytest.raises(ConfigError, match=rf"tracking.backend={backend} needs the '{backend}' package"):
        build_config(SFTConfig, {"model": {"path": str(tmp_path / "m")}, "data": {"path": str(tmp_path)},
                                 "output": str(tmp_path / "o"), "tracking": {"backend": backend}})
