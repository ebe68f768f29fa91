"""effsft grpo end to end on the session's local Ray: 2 rollout actors + 2 DeepSpeed ZeRO-2
train workers on the tiny model, 3 GRPO steps of 2 prompts x G=4 completions. Rank 1 is killed
once after step 3 (before the final save): Ray Train restarts the worker group from the step-2
checkpoint, the actors get the restored weights, and step 3 runs again."""
import json

import pytest
import torch

from effsft.cli import main
from effsft.grpo.rollout import state_checksum
from effsft.train.loop import read_metrics

pytestmark = pytest.mark.usefixtures("ray_session")


def _args(model, data, out):
    return ["grpo", "--model", str(model), "--data", str(data), "--output", str(out),
            "num_generations=4", "max_completion_length=12", "loss_type=grpo", "beta=0.05",
            "rollout.num_actors=2", "rollout.num_cpus=0.25", "rollout.num_threads=1",
            "rollout.prompts_per_step=2", "reward.mode=task", "reward.num_cpus=0.1",
            "train.num_workers=2", "train.cpus_per_worker=0.25", "train.zero_stage=2",
            "train.lr=1e-3", "train.schedule=constant", "train.max_steps=3",
            "train.checkpoint_every=2", "reward_funcs=[{fn: math_exact_match, weight: 1.0}, "
            "{fn: 'effsft.grpo.shaping:digit_ratio', weight: 0.5}]"]


def test_grpo_three_steps_killed_worker_resumes_actors_synced(tiny_model_dir, synth_corpus, tmp_path,
                                                              capsys):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "grpo"
    rc = main(_args(tiny_model_dir, synth_corpus / "grpo.parquet", out)
              + ["train.max_failures=1", "fault.kill_rank_at_step={rank: 1, step: 3}"])
    assert rc == 0, capsys.readouterr().err
    assert (out / ".fault-fired-rank1-step3").exists()
    rows = read_metrics(out / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2, 3]  # step 3 ran twice, logged once
    for r in rows:
        assert all(torch.isfinite(torch.tensor(r[k])) for k in ("loss", "reward_mean", "reward_std", "kl"))
        assert 0 <= r["frac_zero_adv_groups"] <= 1 and 1 <= r["completion_len_mean"] <= 12
        assert r["rollout_tokens_per_s"] > 0 and r["tokens"] > r["response_tokens"] > 0
        assert r["weights_version"] == r["step"] and r["rollout_version"] == r["step"] - 1  # on-policy
    # the dense digit_ratio reward gives some group variance, hence a gradient
    assert any(r["frac_zero_adv_groups"] < 1 and r["grad_norm"] > 0 for r in rows)
    m = json.loads((out / "manifest.json").read_text())
    met = m["metrics"]
    assert met["resumed_from_step"] == 2
    assert met["steps"] == 3 and met["prefix_grouping"] is True and met["actors_in_sync"] is True
    # every actor holds exactly the trainer's final weights, which are the saved model's
    saved = AutoModelForCausalLM.from_pretrained(out / "model")
    assert met["rollout_checksums"] == [met["weights_checksum"]] * 2
    assert state_checksum(saved.state_dict()) == met["weights_checksum"]
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    assert state_checksum(base.state_dict()) != met["weights_checksum"]  # it did train
    assert met["actor_versions"] == [3, 3]
    for f in ("_SUCCESS", "report.md", "reward.png", "loss.png", "model/model.safetensors", "rejects.parquet"):
        assert (out / f).exists(), f
    assert "Reward" in (out / "report.md").read_text()


@pytest.mark.parametrize("bad", ["num_generations=1", "rollout.prompts_per_step=3",
                                 "reward_funcs=[{fn: 'no_such_mod:fn'}]", "loss_type=ppo",
                                 "data.prompt_column=question"])  # found while reading the data
def test_grpo_bad_config_exits_2_writes_nothing(tiny_model_dir, synth_corpus, tmp_path, capsys, bad):
    out = tmp_path / "bad"
    rc = main(_args(tiny_model_dir, synth_corpus / "grpo.parquet", out) + [bad])
    assert rc == 2
    key = bad.split("=")[0]
    assert key.split(".")[0] in capsys.readouterr().err
    assert not out.exists() and not out.with_name("bad.partial").exists()
