"""effsft sft end to end on the session's local Ray: 2 CPU workers x DeepSpeed ZeRO-2 on the
tiny model. The same 4 rows every step (2 workers x micro-batch 2) so the loss must fall."""
import json

import pyarrow.parquet as pq
import pytest
import torch

from effsft.cli import main
from effsft.config import build_config
from effsft.sft.recipe import SFTConfig, run_sft
from effsft.train.loop import read_metrics

pytestmark = pytest.mark.usefixtures("ray_session")


@pytest.fixture(scope="module")
def tiny_sft_data(synth_corpus, tmp_path_factory):
    """4 trainable rows, 2 whose response cannot fit max_len=96, 1 unparseable line."""
    shard = sorted((synth_corpus / "train").glob("*.parquet"))[0]
    rows = [r for r in pq.read_table(shard).to_pylist()
            if not json.loads(r["meta"]).get("garbage")][:4]
    lines = [json.dumps({"id": r["id"], "messages": r["messages"]}) for r in rows]
    long = "many words " * 200
    lines += [json.dumps({"id": f"long{i}", "messages": [{"role": "user", "content": "hi"},
                                                         {"role": "assistant", "content": long}]})
              for i in range(2)]
    lines.append("{not json")
    path = tmp_path_factory.mktemp("sftdata") / "rows.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def _cfg(model, data, out, **train):
    t = dict(num_workers=2, zero_stage=2, micro_batch_size=2, grad_accum=1, lr=3e-3,
             schedule="constant", max_steps=6, checkpoint_every=2, seed=0)
    t.update(train)
    return {"model": {"path": str(model)}, "data": {"path": str(data)}, "output": str(out),
            "tokenize": {"max_len": 96}, "train": t}


def test_sft_zero2_loss_falls_killed_worker_resumes_model_reloads(tiny_model_dir, tiny_sft_data,
                                                                   tmp_path, capsys):
    """One CLI run covers: 2 workers x ZeRO-2, too-long/rejected rows counted, loss falls,
    rank 1 killed after step 3 -> the group restarts from the step-2 checkpoint and finishes
    the same 8 steps, the final model reloads with from_pretrained."""
    from transformers import AutoModelForCausalLM

    out = tmp_path / "sft"
    rc = main(["sft", "--model", str(tiny_model_dir), "--data", str(tiny_sft_data), "--output", str(out),
               "tokenize.max_len=96", "train.num_workers=2", "train.zero_stage=2",
               "train.micro_batch_size=2", "train.lr=3e-3", "train.schedule=constant",
               "train.max_steps=8", "train.checkpoint_every=2", "train.warmup_steps=1",
               "train.max_failures=1", "fault.kill_rank_at_step={rank: 1, step: 3}"])
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
    assert [r["step"] for r in rows] == list(range(1, 9))  # re-run steps logged once
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


def test_sft_with_qtuning_two_pass_global_scope(tiny_model_dir, tiny_sft_data, tmp_path):
    """Q-Tuning on 2 ZeRO-2 workers: two_pass mode, selection over the all-gathered batch;
    the loss falls, quadrant counts are logged and the EU plane is plotted."""
    out = tmp_path / "sftq"
    cfg = _cfg(tiny_model_dir, tiny_sft_data, out, max_steps=6)
    cfg["qtuning"] = {"method": "qtuning", "mode": "two_pass", "score_scope": "global",
                      "sample_ratio": 0.5, "token_ratio": 0.5, "plot_every": 2}
    run_sft(build_config(SFTConfig, cfg))
    rows = read_metrics(out / "metrics.jsonl")
    assert len(rows) == 6
    assert all(0 < r["qtuning/n_kept_samples"] <= 4 for r in rows)
    assert all("qtuning/n_Q2" in r and "qtuning/n_Q4" in r for r in rows)
    losses = [r["loss"] for r in rows]
    assert min(losses[-2:]) < losses[0], losses
    assert (out / "qtuning" / "eu_plane_step0.png").exists()
    assert (out / "model" / "model.safetensors").exists()


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


@pytest.mark.slow
def test_lora_run_saves_merged_model_and_adapter(tiny_model_dir, tiny_sft_data, tmp_path):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "lora"
    cfg = _cfg(tiny_model_dir, tiny_sft_data, out, max_steps=4, checkpoint_every=2, lr=1e-2)
    cfg["lora"] = {"enabled": True, "r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]}
    res = run_sft(build_config(SFTConfig, cfg))
    rows = read_metrics(out / "metrics.jsonl")
    assert res["steps"] == 4 and rows[-1]["loss"] < rows[0]["loss"]
    assert (out / "model" / "adapter" / "adapter_config.json").exists()
    merged = dict(AutoModelForCausalLM.from_pretrained(out / "model").named_parameters())
    base = dict(AutoModelForCausalLM.from_pretrained(tiny_model_dir).named_parameters())
    assert set(merged) == set(base)  # a plain HF model: the adapter is merged in
    changed = {k for k in base if not torch.equal(merged[k], base[k])}
    assert changed and all(("q_proj" in k or "v_proj" in k) for k in changed)
