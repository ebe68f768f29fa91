"""effsft grpo: a bad config exits 2 naming its key and writes nothing. (GRPO end to end, 2
rollout actors + 2 ZeRO-2 workers with a killed worker resuming, is in test_pinned_and_resume.py.)"""

import pytest

from effsft.cli import main

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
