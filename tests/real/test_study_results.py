"""The committed real-model study (benchmarks/real/study.json) is checked, not just stored: the
base model's exact match it records for a task reproduces when ``effsft eval`` is run, with its
default settings, on the imported model and that task's committed eval split."""
from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from effsft.cli import main

pytestmark = pytest.mark.usefixtures("ray_session")

ROOT = Path(__file__).resolve().parents[2]
STUDY = ROOT / "benchmarks" / "real" / "study.json"


def _study() -> dict:
    assert STUDY.exists(), "benchmarks/real/study.json is committed (make study writes it)"
    return json.loads(STUDY.read_text())


def test_committed_study_is_complete():
    s = _study()
    assert set(s) >= {"model", "eval_splits", "base", "sft", "prune", "versions", "machine"}
    for task, path in s["eval_splits"].items():
        rows = pq.read_table(ROOT / path).to_pylist()
        assert rows and {"messages", "answer"} <= set(rows[0]), task
    seeds = {}
    for r in s["sft"]:
        seeds.setdefault(r["arm"], set()).add(r["seed"])
    assert seeds and all(len(v) >= 3 for v in seeds.values()), seeds
    at70 = {r["allocation"] for r in s["prune"] if abs(r["sparsity"] - 0.7) < 1e-9 and r["ppl"] is not None}
    assert at70 >= {"dlp", "owl", "uniform"}, at70


def test_base_exact_match_reproduces_with_effsft_eval(real_model_dir, tmp_path, capsys):
    s = _study()
    # the task whose split is smallest (the check's cost), ties by name
    task = min(s["base"], key=lambda t: (pq.read_metadata(ROOT / s["eval_splits"][t]).num_rows, t))
    out = tmp_path / "eval"
    assert main(["eval", "--model", str(real_model_dir), "--eval_split", str(ROOT / s["eval_splits"][task]),
                 "--output", str(out)]) == 0, capsys.readouterr().err
    got = json.loads((out / "manifest.json").read_text())["metrics"]["exact_match"]["accuracy"]
    assert abs(got - s["base"][task]["em"]) <= 0.05, (task, got, s["base"][task]["em"])


def test_fair_rule_exact_match_reproduces_with_effsft_eval(real_model_dir, tmp_path, capsys):
    """The task where the base model scores best under its fair answer rule (a non-zero number to
    reproduce), run as the study ran it: fp32, the study's generation length, the rule as ``also``."""
    s = _study()
    task = max(sorted(s["base"]), key=lambda t: s["base"][t]["em_fair"] or 0.0)
    rule = s["fair_rules"][task]
    out = tmp_path / "eval_fair"
    argv = ["eval", "--model", str(real_model_dir), "--eval_split", str(ROOT / s["eval_splits"][task]),
            "model.dtype=float32", f"max_new_tokens={s['settings']['max_new_tokens']}", f"also={json.dumps([rule])}",
            "--output", str(out)]
    assert main(argv) == 0, capsys.readouterr().err
    em = json.loads((out / "manifest.json").read_text())["metrics"]["exact_match"]
    (got,) = [a["per_task"][task] for a in em["also"].values()]
    assert s["base"][task]["em_fair"] > 0 and abs(got - s["base"][task]["em_fair"]) <= 0.05, (task, got, s["base"][task])
