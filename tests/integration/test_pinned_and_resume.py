"""The numerical safety net: every training recipe's first losses pinned, and resume equivalence.

Pinned: a fixed seed, the tiny model and fixed rows, fp32 on CPU: the first 5 logged (loss,
gradient norm) of sft plain / Q-Tuning mask / Q-Tuning two_pass / LoRA, (loss, gradient norm,
reward, KL) of grpo with and without Prefix Grouper, and (loss, lr) of select's LESS warm-up, each
equal to the values recorded in ``PINNED`` to 1e-5 relative. A refactor that changes any of these
numbers fails here, loudly.

Resume: sft and grpo on 2 ZeRO-2 workers with rank 1 killed after step 3 (checkpoints every 2
steps), so Ray Train restarts the group from the step-2 checkpoint: the resumed run logs the same
losses and saves the same final weights as the same run uninterrupted.

A change *meant* to change the numbers re-pins: ``EFFSFT_REPIN=1 pytest -s`` on this file prints
each test's new values (paste them into ``PINNED`` and say why in the commit).
"""
from __future__ import annotations

import json
import os

import pyarrow.parquet as pq
import pytest
import torch

from effsft.cli import main
from effsft.grpo.rollout import state_checksum
from effsft.train.loop import read_metrics

REPIN = os.environ.get("EFFSFT_REPIN") == "1"
RTOL = 1e-5

# Recorded on main (CPU, fp32, torch 2.13): steps 1..5.
PINNED: dict[str, list[tuple[float, ...]]] = {
    'sft_plain': [
        (6.219665050506592, 1.8258546590805054),
        (5.831234574317932, 1.8792473077774048),
        (5.5909823179244995, 2.0728776454925537),
        (5.255879998207092, 2.0388553142547607),
        (5.067691922187805, 5.284542560577393),
    ],
    'sft_qtuning_mask': [
        (6.200748682022095, 2.1324501037597656),
        (2.794466257095337, 2.3051512241363525),
        (5.491575479507446, 2.8039894104003906),
        (2.6598193645477295, 1.5573207139968872),
        (2.506120443344116, 1.7922372817993164),
    ],
    'sft_qtuning_two_pass': [
        (6.167314529418945, 2.976823568344116),
        (6.182368278503418, 2.978210926055908),
        (6.170938968658447, 2.1377975940704346),
        (5.835004806518555, 1.5161223411560059),
        (5.542514801025391, 2.215332269668579),
    ],
    'sft_lora': [
        (6.219665050506592, 0.17600737512111664),
        (6.213752031326294, 0.17436043918132782),
        (6.206173419952393, 0.19474700093269348),
        (6.196967363357544, 0.2124374508857727),
        (6.186539888381958, 0.22367370128631592),
    ],
    'grpo_prefix_grouper': [
        (0.0, 0.0, 0.0, 0.0),
        (-7.450580596923828e-09, 1.1277203559875488, 0.006510416666666666, 0.0),
        (7.285214815055951e-05, 0.7963842153549194, 0.001838235294117647, 0.001418421627022326),
        (0.00023775306181050837, 0.8190093636512756, 0.002717391304347826, 0.006321010645478964),
        (0.0002539120614528656, 1.138253927230835, 0.009628851540616247, 0.005733519792556763),
    ],
    'grpo_repeated': [
        (0.0, 0.0, 0.0, 0.0),
        (-7.450580596923828e-09, 1.1277203559875488, 0.006510416666666666, 0.0),
        (7.285190076800063e-05, 0.796384334564209, 0.001838235294117647, 0.0014184241881594062),
        (0.0002377531782258302, 0.8190093636512756, 0.002717391304347826, 0.0063210129737854),
        (0.00025392696261405945, 1.138253927230835, 0.009628851540616247, 0.0057335346937179565),
    ],
    'less_warmup': [
        (6.254717588424683, 0.001),
        (6.249593257904053, 0.001),
        (6.2282233238220215, 0.0008571428571428572),
        (6.197711229324341, 0.0007142857142857143),
        (6.2093939781188965, 0.0005714285714285714),
    ],
}


def _check(name: str, rows: list[dict], keys=("loss", "grad_norm")) -> list[tuple]:
    got = [tuple(float(r[k]) for k in keys) for r in rows[:5]]
    assert len(got) == 5, f"{name}: {len(rows)} steps logged"
    if REPIN or name not in PINNED:
        print(f"\n    {name!r}: {got!r},")
        if not REPIN:
            pytest.fail(f"{name}: no pinned values (run with EFFSFT_REPIN=1 and paste them)")
        return got
    for step, (g, p) in enumerate(zip(got, PINNED[name]), start=1):
        assert g == pytest.approx(p, rel=RTOL, abs=1e-7), f"{name} step {step}: {g} != pinned {p}"
    return got


def _weights(out) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(out / "model" / "model.safetensors"))


def _resumed_equals_whole(whole_out, whole: list[dict], out, resumed: list[dict]) -> None:
    assert [r["step"] for r in resumed] == [r["step"] for r in whole]  # re-run steps logged once
    for a, b in zip(whole, resumed):
        assert b["loss"] == pytest.approx(a["loss"], rel=RTOL, abs=1e-7), (a["step"], a["loss"], b["loss"])
        assert b["lr"] == a["lr"]
    w, r = _weights(whole_out), _weights(out)
    assert w.keys() == r.keys()
    for k in w:
        torch.testing.assert_close(r[k], w[k], rtol=1e-5, atol=1e-7, msg=lambda m, k=k: f"{k}: {m}")


# ----------------------------------------------------------------------------------------- sft

def _sft_args(model, data, out, *extra) -> list[str]:
    """2 workers x ZeRO-2 x micro-batch 2: the same 4 rows every step, so the loss must fall."""
    return ["sft", "--model", str(model), "--data", str(data), "--output", str(out),
            "tokenize.max_len=96", "train.num_workers=2", "train.zero_stage=2",
            "train.micro_batch_size=2", "train.lr=3e-3", "train.schedule=constant",
            "train.max_steps=8", "train.checkpoint_every=2", "train.warmup_steps=1", "train.seed=0",
            "model.dtype=float32", *extra]


@pytest.fixture(scope="module")
def sft_whole(ray_session, tiny_model_dir, tiny_sft_data, tmp_path_factory):
    """Plain SFT, uninterrupted: pinned, and the reference of the resume test."""
    out = tmp_path_factory.mktemp("sft") / "whole"
    assert main(_sft_args(tiny_model_dir, tiny_sft_data, out)) == 0
    return out, read_metrics(out / "metrics.jsonl")


def test_sft_plain_first_losses_are_pinned(sft_whole):
    _check("sft_plain", sft_whole[1])


SFT_METHODS = {
    "sft_qtuning_mask": ["qtuning.method=qtuning", "qtuning.mode=mask", "qtuning.sample_ratio=0.5"],
    "sft_qtuning_two_pass": ["qtuning.method=qtuning", "qtuning.mode=two_pass", "qtuning.sample_ratio=0.5",
                             "qtuning.score_scope=global", "qtuning.plot_every=2"],
    "sft_lora": ["lora.enabled=true", "lora.r=4", "lora.alpha=8", "lora.target_modules=[q_proj, v_proj]"],
}


@pytest.mark.usefixtures("ray_session")
@pytest.mark.parametrize("method", list(SFT_METHODS))
def test_sft_method_first_losses_are_pinned(method, tiny_model_dir, tiny_sft_data, tmp_path):
    out = tmp_path / method
    assert main(_sft_args(tiny_model_dir, tiny_sft_data, out, "train.max_steps=5", "train.checkpoint_every=0",
                          *SFT_METHODS[method])) == 0
    rows = read_metrics(out / "metrics.jsonl")
    _check(method, rows)
    if "qtuning" in method:  # selection over the 4 rows (global: all-gathered over both ranks)
        assert all(0 < r["qtuning/n_kept_samples"] <= 4 for r in rows)
        assert all("qtuning/n_Q2" in r and "qtuning/n_Q4" in r for r in rows)
    if method == "sft_qtuning_two_pass":
        assert (out / "qtuning" / "eu_plane_step0.png").exists()
    if method == "sft_lora":
        from transformers import AutoModelForCausalLM

        assert (out / "model" / "adapter" / "adapter_config.json").exists()
        merged = dict(AutoModelForCausalLM.from_pretrained(out / "model").named_parameters())
        base = dict(AutoModelForCausalLM.from_pretrained(tiny_model_dir).named_parameters())
        assert set(merged) == set(base)  # a plain HF model: the adapter is merged in
        changed = {k for k in base if not torch.equal(merged[k], base[k])}
        assert changed and all(("q_proj" in k or "v_proj" in k) for k in changed)


def test_sft_killed_worker_resumes_and_equals_uninterrupted(sft_whole, tiny_model_dir, tiny_sft_data,
                                                            tmp_path, capsys):
    """One CLI run covers: too-long/rejected rows counted, loss falls, rank 1 killed after step 3
    -> the group restarts from the step-2 checkpoint and finishes the same 8 steps with the same
    losses and final weights as the uninterrupted run; the final model reloads."""
    from transformers import AutoModelForCausalLM

    out = tmp_path / "sft"
    rc = main(_sft_args(tiny_model_dir, tiny_sft_data, out, "train.max_failures=1",
                        "fault.kill_rank_at_step={rank: 1, step: 3}"))
    assert rc == 0, capsys.readouterr().err
    m = json.loads((out / "manifest.json").read_text())
    c = m["counts"]
    assert (c["rows_in"], c["rows_ok"], c["rows_too_long"], c["rows_rejected"]) == (7, 4, 2, 1)
    rejects = pq.read_table(out / "rejects.parquet").to_pylist()  # every row not trained on, why
    assert sorted(r["reason"] for r in rejects if r["reason"] == "too_long") == ["too_long"] * 2
    assert len(rejects) == 3 and all(r["src_file"] and r["src_row"] >= 0 for r in rejects)
    assert (out / ".fault-fired-rank1-step3").exists()
    assert m["metrics"]["steps"] == 8 and m["metrics"]["resumed_from_step"] == 2
    rows = read_metrics(out / "metrics.jsonl")
    assert [r["step"] for r in rows] == list(range(1, 9))
    _resumed_equals_whole(*sft_whole, out, rows)
    losses = [r["loss"] for r in rows]
    assert losses[-1] < 0.8 * losses[0], losses
    assert rows[0]["lr"] == pytest.approx(3e-3) and all(r["tokens_per_s"] > 0 for r in rows)
    assert all(r["tokens"] > r["response_tokens"] > 0 for r in rows)
    for f in ("_SUCCESS", "report.md", "loss.png", "model/model.safetensors", "model/tokenizer.json"):
        assert (out / f).exists(), f
    assert not (out / "checkpoints").exists()
    trained = AutoModelForCausalLM.from_pretrained(out / "model")
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    diff = [not torch.equal(a, b) for a, b in zip(trained.parameters(), base.parameters())]
    assert all(diff)  # full fine-tuning touched every tensor


# ---------------------------------------------------------------------------------------- grpo

def grpo_args(model, data, out, *extra) -> list[str]:
    """2 rollout actors + 2 ZeRO-2 train workers, 5 steps of 2 prompts x G=4 completions."""
    return ["grpo", "--model", str(model), "--data", str(data), "--output", str(out),
            "num_generations=4", "max_completion_length=12", "loss_type=grpo", "beta=0.05",
            "rollout.num_actors=2", "rollout.num_cpus=0.25", "rollout.num_threads=1",
            "rollout.prompts_per_step=2", "reward.mode=task", "reward.num_cpus=0.1",
            "train.num_workers=2", "train.cpus_per_worker=0.25", "train.zero_stage=2", "train.seed=0",
            "train.lr=1e-3", "train.schedule=constant", "train.max_steps=5",
            "train.checkpoint_every=2", "reward_funcs=[{fn: math_exact_match, weight: 1.0}, "
            "{fn: 'effsft.grpo.shaping:digit_ratio', weight: 0.5}]", *extra]


GRPO_KEYS = ("loss", "grad_norm", "reward_mean", "kl")


@pytest.fixture(scope="module")
def grpo_whole(ray_session, tiny_model_dir, synth_corpus, tmp_path_factory):
    """GRPO with Prefix Grouper, uninterrupted: pinned, and the reference of the resume test."""
    out = tmp_path_factory.mktemp("grpo") / "whole"
    assert main(grpo_args(tiny_model_dir, synth_corpus / "grpo.parquet", out, "prefix_grouping=on")) == 0
    return out, read_metrics(out / "metrics.jsonl")


def test_grpo_first_losses_are_pinned_with_and_without_prefix_grouper(grpo_whole, tiny_model_dir,
                                                                       synth_corpus, tmp_path):
    grouped = _check("grpo_prefix_grouper", grpo_whole[1], GRPO_KEYS)
    out = tmp_path / "repeated"
    assert main(grpo_args(tiny_model_dir, synth_corpus / "grpo.parquet", out, "prefix_grouping=off")) == 0
    repeated = _check("grpo_repeated", read_metrics(out / "metrics.jsonl"), GRPO_KEYS)
    # Prefix Grouper is exact: the same rollouts give the same losses and gradients either way
    for g, r in zip(grouped, repeated):
        assert g == pytest.approx(r, rel=1e-4, abs=1e-6)
    assert any(gn > 0 for _, gn, _, _ in grouped)  # the dense digit_ratio reward gave a gradient


def test_grpo_killed_worker_resumes_actors_synced_equals_uninterrupted(grpo_whole, tiny_model_dir,
                                                                       synth_corpus, tmp_path, capsys):
    """Rank 1 killed once after step 3 (before its checkpoint): Ray Train restarts the worker
    group from the step-2 checkpoint, the actors get the restored weights, and step 3 runs
    again with the same rollouts: same losses, rewards and final weights as uninterrupted."""
    from transformers import AutoModelForCausalLM

    out = tmp_path / "grpo"
    rc = main(grpo_args(tiny_model_dir, synth_corpus / "grpo.parquet", out, "prefix_grouping=on",
                        "train.max_failures=1", "fault.kill_rank_at_step={rank: 1, step: 3}"))
    assert rc == 0, capsys.readouterr().err
    assert (out / ".fault-fired-rank1-step3").exists()
    rows = read_metrics(out / "metrics.jsonl")
    _resumed_equals_whole(*grpo_whole, out, rows)
    for a, b in zip(grpo_whole[1], rows):  # the re-run step's rollouts are the same too
        assert b["reward_mean"] == pytest.approx(a["reward_mean"], rel=RTOL, abs=1e-7)
    for r in rows:
        assert all(torch.isfinite(torch.tensor(r[k])) for k in ("loss", "reward_mean", "reward_std", "kl"))
        assert 0 <= r["frac_zero_adv_groups"] <= 1 and 1 <= r["completion_len_mean"] <= 12
        assert r["rollout_tokens_per_s"] > 0 and r["tokens"] > r["response_tokens"] > 0
        assert r["weights_version"] == r["step"] and r["rollout_version"] == r["step"] - 1  # on-policy
    m = json.loads((out / "manifest.json").read_text())
    met = m["metrics"]
    assert met["resumed_from_step"] == 2
    assert met["steps"] == 5 and met["prefix_grouping"] is True and met["actors_in_sync"] is True
    # every actor holds exactly the trainer's final weights, which are the saved model's
    saved = AutoModelForCausalLM.from_pretrained(out / "model")
    assert met["rollout_checksums"] == [met["weights_checksum"]] * 2
    assert state_checksum(saved.state_dict()) == met["weights_checksum"]
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    assert state_checksum(base.state_dict()) != met["weights_checksum"]  # it did train
    assert met["actor_versions"] == [5, 5]
    for f in ("_SUCCESS", "report.md", "reward.png", "loss.png", "model/model.safetensors", "rejects.parquet"):
        assert (out / f).exists(), f
    assert "Reward" in (out / "report.md").read_text()


# ---------------------------------------------------------------------------------- LESS warm-up

def test_less_warmup_first_losses_are_pinned(tiny_model_dir, synth_corpus, tmp_path):
    from effsft.models.loading import load_model, load_tokenizer
    from effsft.select.less import LoraSettings, WarmupSettings, less_warmup

    shard = sorted((synth_corpus / "train").glob("*.parquet"))[0]
    messages = [r["messages"] for r in pq.read_table(shard).to_pylist()
                if not json.loads(r["meta"]).get("garbage")][:16]
    torch.set_num_threads(2)
    logged: list[dict] = []
    s = WarmupSettings(lora=LoraSettings(r=4, alpha=16), epochs=2, lr=1e-3, batch_size=4,
                       micro_batch_size=2, max_len=128, seed=0)
    paths = less_warmup(load_model(str(tiny_model_dir), dtype="float32"), load_tokenizer(str(tiny_model_dir)),
                        messages, tmp_path, s, log_step=logged.append)
    assert len(paths) == 2 and [r["step"] for r in logged] == list(range(1, 9))
    _check("less_warmup", logged, ("loss", "lr"))
