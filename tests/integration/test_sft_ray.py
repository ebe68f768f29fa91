"""effsft sft on the session's local Ray, the slow tier: a crashed run re-run resumes; ZeRO-3
gathers the weights it saves. (The CI tier's sft runs, plain / Q-Tuning / LoRA / killed worker,
are in test_pinned_and_resume.py.)"""
import json

import pytest
import torch

from effsft.config import build_config
from effsft.sft.recipe import SFTConfig, run_sft
from effsft.train.loop import read_metrics

pytestmark = pytest.mark.usefixtures("ray_session")


def _cfg(model, data, out, **train):
    t = dict(num_workers=2, zero_stage=2, micro_batch_size=2, grad_accum=1, lr=3e-3,
             schedule="constant", max_steps=6, checkpoint_every=2, seed=0)
    t.update(train)
    return {"model": {"path": str(model)}, "data": {"path": str(data)}, "output": str(out),
            "tokenize": {"max_len": 96}, "train": t}


@pytest.mark.slow
def test_rerun_after_crash_resumes_same_step_count(tiny_model_dir, tiny_sft_data, tmp_path):
    out = tmp_path / "sft"
    cfg = _cfg(tiny_model_dir, tiny_sft_data, out, max_steps=5, max_failures=0)
    cfg["fault"] = {"kill_rank_at_step": {"rank": 0, "step": 3, "delay_s": 3}}
    with pytest.raises(Exception):
        run_sft(build_config(SFTConfig, cfg))
    assert not out.exists() and (out.parent / "sft.partial" / "checkpoints").exists()
    res = run_sft(build_config(SFTConfig, cfg))  # same command again: resumes
    m = json.loads((out / "manifest.json").read_text())
    assert res["steps"] == 5 and m["metrics"]["resumed_from_step"] == 2
    assert [r["step"] for r in read_metrics(out / "metrics.jsonl")] == [1, 2, 3, 4, 5]


@pytest.mark.slow
def test_zero3_run_gathers_weights_for_the_saved_model(tiny_model_dir, tiny_sft_data, tmp_path):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "z3"
    res = run_sft(build_config(SFTConfig, _cfg(tiny_model_dir, tiny_sft_data, out, zero_stage=3,
                                               max_steps=3, checkpoint_every=0)))
    assert res["steps"] == 3
    model = AutoModelForCausalLM.from_pretrained(out / "model")
    base = dict(AutoModelForCausalLM.from_pretrained(tiny_model_dir).named_parameters())
    assert all(p.shape == base[k].shape and not torch.equal(p, base[k]) for k, p in model.named_parameters())
