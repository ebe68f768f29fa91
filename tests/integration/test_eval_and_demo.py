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


CONSOLE_LINE_BUDGET = 80  # was ~490 lines before the console work (framework logs on the console)


def _demo(args, cwd):
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    env = dict(os.environ, PYTHONPATH=str(root) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop("RAY_ADDRESS", None)
    p = subprocess.run([sys.executable, "-m", "effsft", *args], cwd=cwd, env=env, capture_output=True,
                       text=True, timeout=1500)
    return p.returncode, p.stdout, p.stderr


def test_demo_end_to_end(tmp_path):
    """`effsft demo` as a user runs it: every stage done, a console of one line per stage plus a
    progress bar per long piece of work (well under 100 lines), the framework logs in logs/."""
    out = tmp_path / "demo"
    args = ["demo", "--output", str(out), "--rows", "600", "--eval_rows", "16", "--sft_steps", "4", "--grpo_steps", "2"]
    rc, stdout, stderr = _demo(args, tmp_path)
    console = stdout + stderr
    assert rc == 0, console[-5000:]
    lines = console.count("\n")  # tqdm redraws a bar in place with \r: one line per bar
    assert lines < CONSOLE_LINE_BUDGET, console
    for stage in ("synth", "tiny_model", "prepare", "select", "sft", "grpo", "prune", "eval_base"):
        assert f"demo: running {stage}" in console, stage
    assert "scoring length-" in console and "training: 100%" in console and "grpo steps: 100%" in console
    assert "loss " in console and "tok/s" in console
    for noise in ("Reporting training result", "logging_progress", "TrainingReport", "Loading weights",
                  "Running Dataset", "Checkpoint successfully created"):
        assert noise not in console, noise
    workers = (out / "logs" / "workers.log").read_text()
    assert "Reporting training result" in workers and "RayTrainWorker" in workers  # the detail is kept
    assert "demo: running sft" in (out / "logs" / "effsft.log").read_text()
    summary = json.loads((out / "demo_summary.json").read_text())
    assert set(summary) >= {"synth", "tiny_model", "prepare", "select", "sft", "grpo", "prune", "eval_base",
                           "eval_sft", "eval_pruned"}
    assert summary["select"]["rows_selected"] > 0
    for stage in ("corpus", "model", "prepared", "selected", "sft", "grpo", "prune", "eval_base", "eval_sft",
                  "eval_pruned"):
        assert (out / stage / "_SUCCESS").exists(), stage
    assert (out / "sft" / "tb").is_dir() and (out / "grpo" / "tb").is_dir()
    # a second run resumes: every stage is reused
    rc, stdout, stderr = _demo(args, tmp_path)
    assert rc == 0, (stdout + stderr)[-3000:]
    again = json.loads((out / "demo_summary.json").read_text())
    assert all(v.get("reused") for v in again.values() if isinstance(v, dict))
    assert again["eval_sft"]["exact_match.accuracy"] == summary["eval_sft"]["exact_match.accuracy"]
    assert "exact_match.also.last_number.accuracy" in summary["eval_base"]
    assert len(summary["reward_curve"]) == 2 and (out / "demo_summary.md").exists()
