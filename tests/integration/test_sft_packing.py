"""Packed SFT through the job on the session's Ray: rows conserved, the plan in the manifest, and
the optimizer step independent of accumulation, worker count and packing.

The invariance test trains one step with plain SGD (the update is -lr x the gradient, so equal
weights mean equal gradients) on exactly the 8 rows of one step, laid out three ways:
1 worker x accumulation 4 x 2 rows (padded), 2 workers x accumulation 2 x 2 rows (padded,
ZeRO-2), and 1 worker with all 8 rows packed into one sequence.
"""
from __future__ import annotations

import json

import pyarrow.parquet as pq
import pytest
import torch

from effsft.cli import job_usage, main

pytestmark = pytest.mark.usefixtures("ray_session")


def test_help_lists_the_packing_keys():
    text = job_usage("sft")
    for key in ("train.packing", "train.pack_len", "train.tokens_per_micro_batch"):
        assert key in text


def test_packed_sft_on_a_spread_corpus_conserves_rows(tiny_model_dir, tmp_path, capsys):
    corpus = tmp_path / "spread"
    assert main(["synth", "--rows", "400", "--length_spread", "12", "--garbage", "0.02", "--eval_rows", "8",
                 "--grpo_rows", "8", "--seed", "3", "--output", str(corpus)]) == 0
    out = tmp_path / "sft"
    assert main(["sft", "--model", str(tiny_model_dir), "--data", str(corpus / "train"), "--output", str(out),
                 "train.num_workers=1", "train.max_steps=4", "train.micro_batch_size=8", "tokenize.max_len=256",
                 "train.packing=bfd"]) == 0, capsys.readouterr().err
    m = json.loads((out / "manifest.json").read_text())
    c = m["counts"]
    rejects = pq.read_table(out / "rejects.parquet").num_rows
    assert c["rows_in"] == 400 and c["rows_in"] == c["rows_ok"] + rejects and rejects > 0
    p = c["packing"]
    assert p["strategy"] == "bfd" and p["rows"] == c["rows_ok"] and p["pack_len"] == 256
    assert p["packs"] < c["rows_ok"] / 2 and p["padding_fraction_after"] < p["padding_fraction_before"]
    assert m["metrics"]["steps"] == 4
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 4 and all(r["response_tokens"] > 0 for r in rows)


@pytest.fixture(scope="module")
def eight_rows(synth_corpus, tmp_path_factory):
    shard = sorted((synth_corpus / "train").glob("*.parquet"))[0]
    rows = [r for r in pq.read_table(shard).to_pylist() if not json.loads(r["meta"]).get("garbage")][:8]
    path = tmp_path_factory.mktemp("eight") / "rows.jsonl"
    path.write_text("".join(json.dumps({"id": r["id"], "messages": r["messages"]}) + "\n" for r in rows))
    return path


def _one_step(model, data, out, *layout):
    assert main(["sft", "--model", str(model), "--data", str(data), "--output", str(out), "train.max_steps=1",
                 "train.optimizer=sgd", "train.lr=0.5", "train.clip=0", "train.schedule=constant",
                 "train.warmup_steps=0", "tokenize.max_len=256", "model.dtype=float32", *layout]) == 0
    from transformers import AutoModelForCausalLM

    m = json.loads((out / "manifest.json").read_text())
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    return dict(AutoModelForCausalLM.from_pretrained(str(out / "model")).named_parameters()), rows[0], m


def test_step_is_invariant_to_accumulation_workers_and_packing(tiny_model_dir, eight_rows, tmp_path):
    a, ma, _ = _one_step(tiny_model_dir, eight_rows, tmp_path / "acc4", "train.num_workers=1", "train.packing=off",
                         "train.micro_batch_size=2", "train.grad_accum=4")
    b, mb, _ = _one_step(tiny_model_dir, eight_rows, tmp_path / "w2", "train.num_workers=2", "train.zero_stage=2",
                         "train.packing=off", "train.micro_batch_size=2", "train.grad_accum=2")
    c, mc, man = _one_step(tiny_model_dir, eight_rows, tmp_path / "packed", "train.num_workers=1",
                           "train.packing=bfd", "train.pack_len=2048", "train.tokens_per_micro_batch=2048")
    assert man["counts"]["packing"]["packs"] == 1  # all 8 rows in one sequence
    assert ma["response_tokens"] == mb["response_tokens"] == mc["response_tokens"]
    assert ma["loss"] == pytest.approx(mb["loss"], rel=1e-5) and ma["loss"] == pytest.approx(mc["loss"], rel=1e-5)
    from transformers import AutoModelForCausalLM

    base = dict(AutoModelForCausalLM.from_pretrained(str(tiny_model_dir)).named_parameters())
    moved = 0
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(c[k], a[k], rtol=1e-5, atol=1e-7)
        moved += not torch.equal(a[k], base[k])
    assert moved > 0
