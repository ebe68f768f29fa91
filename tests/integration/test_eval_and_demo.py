import json

import pytest

from effsft.cli import main

pytestmark = pytest.mark.usefixtures("ray_session")


def test_eval_cli_writes_atomic_output(tiny_model_dir, synth_corpus, tmp_path, capsys):
    out = tmp_path / "eval"
    rc = main(["eval", "--model", str(tiny_model_dir), "--data", str(synth_corpus / "train"),
               "--eval_split", str(synth_corpus / "eval.parquet"), "--limit", "24",
               "--max_new_tokens", "8", "--output", str(out)])
    assert rc == 0, capsys.readouterr().err
    m = json.loads((out / "manifest.json").read_text())
    assert (out / "_SUCCESS").exists() and (out / "report.md").exists()
    ppl = m["metrics"]["perplexity"]
    # a random tiny model: perplexity is finite and of the order of the vocabulary size
    assert 10 < ppl["ppl"] < 5 * 512 and ppl["rows"] == 24 and ppl["tokens"] > 0
    em = m["metrics"]["exact_match"]
    assert em["n"] == 24 and 0 <= em["accuracy"] <= 1
    assert m["inputs"]["model"]["fingerprint"] and m["versions"]["torch"]


def test_eval_bad_config_fails_fast(tmp_path, capsys):
    out = tmp_path / "eval"
    rc = main(["eval", "--model", str(tmp_path / "missing"), "--output", str(out),
               "eval_split=" + str(tmp_path / "nope.parquet")])
    err = capsys.readouterr().err
    assert rc == 2 and "model.path" in err and "eval_split" in err
    assert not out.exists()


def test_demo_end_to_end(tmp_path, capsys):
    out = tmp_path / "demo"
    args = ["demo", "--output", str(out), "--rows", "600", "--eval_rows", "16", "--sft_steps", "4", "--grpo_steps", "2"]
    assert main(args) == 0
    summary = json.loads((out / "demo_summary.json").read_text())
    assert set(summary) >= {"synth", "tiny_model", "prepare", "select", "sft", "grpo", "prune", "eval_base",
                           "eval_sft", "eval_pruned"}
    assert summary["select"]["rows_selected"] > 0
    for stage in ("corpus", "model", "prepared", "selected", "sft", "grpo", "prune", "eval_base", "eval_sft",
                  "eval_pruned"):
        assert (out / stage / "_SUCCESS").exists(), stage
    # a second run resumes: every stage is reused
    assert main(args) == 0
    again = json.loads((out / "demo_summary.json").read_text())
    assert all(v.get("reused") for v in again.values() if isinstance(v, dict))
    assert again["eval_sft"]["exact_match.accuracy"] == summary["eval_sft"]["exact_match.accuracy"]
    assert "exact_match.also.last_number.accuracy" in summary["eval_base"]
    assert len(summary["reward_curve"]) == 2 and (out / "demo_summary.md").exists()
