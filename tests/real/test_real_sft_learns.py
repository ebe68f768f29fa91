"""Full SFT of the real model learns a task it cannot do, on held-out rows.

The task: synth's ``format`` family (``key=value`` pairs -> the JSON object, after
``Answer:``); the eval rows are held out by a hash of their prompt, so no eval prompt is in the
training data. The base model scores 0 under the ``Answer:`` rule (it never writes it) and is
also scored fairly, under a regex that takes the last JSON object it writes anywhere. After
SFT the exact match must be far above both.

* CI: 16 steps at lr 2e-4 (about 3 minutes on 2 cores);
* slow tier: the issue's setting, 60 steps at lr 1e-4, micro-batch 8, max_len 128, 1 worker.
"""
from __future__ import annotations

import json

import pytest

from effsft.cli import main

pytestmark = pytest.mark.usefixtures("ray_session")

JSON_ANYWHERE = {"format": "regex", "pattern": r"(\{[^{}]*\})"}


@pytest.fixture(scope="module")
def format_task(tmp_path_factory):
    out = tmp_path_factory.mktemp("fmt") / "corpus"
    assert main(["synth", "--rows", "1000", "--noise", "0", "--dup", "0", "--length_spread", "1",
                 "--eval_rows", "40", "--grpo_rows", "8", "--seed", "1", "--output", str(out),
                 "task_mix={format: 1.0}"]) == 0
    return out


def _em(model, split, out) -> dict:
    assert main(["eval", "--model", str(model), "--eval_split", str(split), "--output", str(out),
                 "--max_new_tokens", "48", "model.dtype=float32", f"also=[{json.dumps(JSON_ANYWHERE)}]"]) == 0
    em = json.loads((out / "manifest.json").read_text())["metrics"]["exact_match"]
    return {"answer_prefix": em["accuracy"], "json_anywhere": next(iter(em["also"].values()))["accuracy"]}


@pytest.mark.parametrize("steps,lr", [
    pytest.param(16, 2e-4, id="ci"),
    pytest.param(60, 1e-4, id="issue-setting", marks=pytest.mark.slow),
])
def test_full_sft_lifts_held_out_exact_match(real_model_dir, format_task, tmp_path, steps, lr, capsys):
    split = format_task / "eval.parquet"
    base = _em(real_model_dir, split, tmp_path / "eval_base")
    assert main(["sft", "--model", str(real_model_dir), "--data", str(format_task / "train"),
                 "--output", str(tmp_path / "sft"), "model.dtype=float32", "train.num_workers=1",
                 f"train.max_steps={steps}", f"train.lr={lr}", "train.micro_batch_size=8",
                 "tokenize.max_len=128", "train.warmup_steps=2"]) == 0, capsys.readouterr().err
    after = _em(tmp_path / "sft" / "model", split, tmp_path / "eval_sft")
    print(f"base {base} -> sft {after}")
    assert base["answer_prefix"] <= 0.05  # the chat model never writes "Answer:"
    assert after["answer_prefix"] >= max(base.values()) + 0.3, (base, after)
