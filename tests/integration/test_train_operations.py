"""Training faults and tracking through the sft job on the session's Ray (1 worker, tiny model):
a run dies after its step-4 checkpoint, that checkpoint is then truncated, and the re-run falls
back to the step-2 checkpoint; a NaN loss at step 3 is skipped and counted; every metric is in
TensorBoard event files under <out>/tb/ (steps 1..6 once, the re-run's purge applied)."""
from __future__ import annotations

import json
import math

import pyarrow.parquet as pq
import pytest

from effsft.config import build_config
from effsft.sft.recipe import SFTConfig, run_sft
from effsft.train.loop import read_metrics

pytestmark = pytest.mark.usefixtures("ray_session")


@pytest.fixture(scope="module")
def sft_rows(synth_corpus, tmp_path_factory):
    shard = sorted((synth_corpus / "train").glob("*.parquet"))[0]
    rows = [r for r in pq.read_table(shard).to_pylist() if not json.loads(r["meta"]).get("garbage")][:8]
    path = tmp_path_factory.mktemp("sftops") / "rows.jsonl"
    path.write_text("".join(json.dumps({"id": r["id"], "messages": r["messages"]}) + "\n" for r in rows))
    return path


def test_corrupt_checkpoint_fallback_nan_skip_and_tensorboard(tiny_model_dir, sft_rows, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "sft"
    cfg = {"model": {"path": str(tiny_model_dir)}, "data": {"path": str(sft_rows)}, "output": str(out),
           "tokenize": {"max_len": 96},
           "train": {"num_workers": 1, "micro_batch_size": 2, "lr": 3e-3, "schedule": "constant", "max_steps": 6,
                     "checkpoint_every": 2, "keep_checkpoints": 3, "max_failures": 0, "max_nan_steps": 1},
           "fault": {"nan_at_steps": [3], "kill_rank_at_step": {"rank": 0, "step": 5, "delay_s": 3}}}
    with pytest.raises(Exception):
        run_sft(build_config(SFTConfig, cfg))
    ckpts = [c for c in (tmp_path / "sft.partial" / "checkpoints" / "train").glob("checkpoint_*") if c.is_dir()]
    steps = {json.loads((c / "effsft_state_rank0.json").read_text())["step"]: c for c in ckpts}
    assert set(steps) == {2, 4}
    states = sorted(steps[4].rglob("*model_states.pt"))
    assert states
    for f in states:  # an interrupted copy: half of the file
        f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])

    cfg["fault"] = {"nan_at_steps": [3]}
    run_sft(build_config(SFTConfig, cfg))
    m = json.loads((out / "manifest.json").read_text())["metrics"]
    assert m["resumed_from_step"] == 2 and m["steps"] == 6  # fell back past the corrupt step-4 one
    assert m["nan_steps_skipped"] == 1
    rows = read_metrics(out / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
    assert [r["nan_skipped"] for r in rows] == [0, 0, 1, 0, 0, 0] and math.isnan(rows[2]["loss"])
    assert all(math.isfinite(r["loss"]) for r in rows if r["step"] != 3)

    acc = EventAccumulator(str(out / "tb"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"loss", "lr", "tokens_per_s", "tokens", "nan_steps_skipped"} <= tags  # (grad_norm: ZeRO>0)
    assert all(k in tags for k, v in rows[-1].items() if k != "step" and isinstance(v, (int, float)))
    assert [e.step for e in acc.Scalars("loss")] == [1, 2, 3, 4, 5, 6]  # the re-run's purge applied
    assert acc.Scalars("loss")[-1].value == pytest.approx(rows[-1]["loss"], rel=1e-6)
