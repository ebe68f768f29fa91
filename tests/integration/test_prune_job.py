"""``effsft prune`` end to end on the tiny model through the CLI, on the session's local Ray."""
import json
import math
from pathlib import Path

import pytest
import torch

from effsft.cli import main

pytestmark = pytest.mark.usefixtures("ray_session")

REPO = Path(__file__).resolve().parents[2]
SMALL = ["prune.calib.n_samples=8", "prune.calib.seqlen=64", "prune.calib.max_docs=300",
         "prune.eval.n_windows=4", "prune.eval.max_docs=120", "prune.batch_size=4"]


def _saved_matrix_sparsity(model_dir: Path, names) -> dict:
    """Zero fraction of each named matrix, read back from the saved weights."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(model_dir))
    return {n: float((model.get_parameter(n + ".weight") == 0).float().mean()) for n in names}, model


def test_prune_cli_single_run(tiny_model_dir, synth_corpus, tmp_path, capsys):
    out = tmp_path / "pruned"
    rc = main(["prune", "--model", str(tiny_model_dir), "--data", str(synth_corpus / "train"),
               "--eval_data", str(synth_corpus / "eval.parquet"), "--sparsity", "0.5",
               "--output", str(out), *SMALL])
    assert rc == 0, capsys.readouterr().err
    for f in ("_SUCCESS", "manifest.json", "prune_report.json", "report.md", "sparsity.png",
              "model/model.safetensors", "model/tokenizer.json"):
        assert (out / f).exists(), f
    assert not out.with_name("pruned.partial").exists()
    m = json.loads((out / "manifest.json").read_text())
    rep = json.loads((out / "prune_report.json").read_text())
    assert m["job"] == "prune" and m["config"]["prune"]["sparsity"] == 0.5
    assert m["counts"]["seqlen"] == 64 and m["counts"]["eval_windows"] == 4

    # what was saved is what the report and manifest say
    per_matrix = {n: s for b in rep["blocks"] for n, s in b["matrices"].items()}
    target = {n: b["target"] for b in rep["blocks"] for n in b["matrices"]}
    assert len(per_matrix) == 2 * 7  # 2 blocks x (q, k, v, o, gate, up, down)
    # DLP on 2 blocks: the band is 2*alpha wide around s
    assert max(target.values()) - min(target.values()) == pytest.approx(2 * 0.15, abs=1e-6)
    saved, model = _saved_matrix_sparsity(out / "model", per_matrix)
    for n, s in per_matrix.items():
        assert saved[n] == pytest.approx(s, abs=1e-9), n
        # Wanda keeps an exact count round(s_l * in) per row: off by at most 0.5 / in
        in_features = model.get_parameter(n + ".weight").shape[1]
        assert abs(saved[n] - target[n]) <= 0.5 / in_features + 1e-9, n
    sizes = {n: model.get_parameter(n + ".weight").numel() for n in per_matrix}
    achieved = sum(saved[n] * sizes[n] for n in per_matrix) / sum(sizes.values())
    assert m["metrics"]["achieved"] == pytest.approx(achieved, abs=1e-9)
    assert abs(achieved - 0.5) <= 0.5 / 64  # the P-weighted targets sum to s exactly; rows round
    # embeddings, lm_head and norms are never touched
    from transformers import AutoModelForCausalLM

    dense = dict(AutoModelForCausalLM.from_pretrained(str(tiny_model_dir)).named_parameters())
    untouched = [n for n, _ in model.named_parameters() if n.removesuffix(".weight") not in per_matrix]
    assert "lm_head.weight" in untouched and "model.embed_tokens.weight" in untouched
    for n in untouched:
        assert torch.equal(model.get_parameter(n), dense[n]), n

    ppl_d, ppl_p = m["metrics"]["ppl_dense"], m["metrics"]["ppl_pruned"]
    assert math.isfinite(ppl_d) and math.isfinite(ppl_p) and ppl_d > 1 and ppl_p > 1
    assert m["metrics"]["peak_host_mib"] > 0 and m["timings_s"]["prune_tasks"] > 0

    # the reloaded model gives the reported pruned perplexity on the same windows
    from effsft.config import load_config
    from effsft.models.loading import load_tokenizer
    from effsft.prune.calibration import build_windows
    from effsft.prune.config import PruneConfig
    from effsft.prune.streaming import perplexity

    cfg = load_config(PruneConfig, base=m["config"], overrides=[f"output={tmp_path / 'x'}"])
    _, windows, _ = build_windows(cfg, load_tokenizer(tiny_model_dir), 1024)
    assert perplexity(model.eval(), windows, "cpu", 4) == pytest.approx(ppl_p, rel=1e-4)


def test_prune_sweep_comparison_and_resume(tiny_model_dir, synth_corpus, tmp_path, capsys):
    out = tmp_path / "sweep"
    args = ["prune", "--model", str(tiny_model_dir), "--data", str(synth_corpus / "train"),
            "--output", str(out), "sweep.method=[uniform,dlp]", "sweep.criterion=[wanda,sparsegpt]",
            "sweep.sparsity=[0.6]", "prune.stat=mean", "sweep.max_parallel=2", *SMALL]
    rc = main(args)
    assert rc == 0, capsys.readouterr().err
    names = ["uniform_wanda_s0.60", "dlp-mean_wanda_s0.60", "uniform_sparsegpt_s0.60", "dlp-mean_sparsegpt_s0.60"]
    table = (out / "comparison.md").read_text()
    assert (out / "comparison.png").exists() and (out / "_SUCCESS").exists()
    rows = json.loads((out / "comparison.json").read_text())["rows"]
    assert [r["run"] for r in rows] == names
    for r in rows:
        assert f"| {r['run']} |" in table
        # exact counts per row (wanda) or per 64-column block (sparsegpt) round by <= 0.5 / 64
        assert abs(r["achieved"] - 0.6) <= 0.5 / 64 and math.isfinite(r["ppl"]) and r["ppl"] > 1
        sub = out / r["run"]
        assert (sub / "prune_report.json").exists() and (sub / "sparsity.png").exists()
        assert not (sub / "model").exists()  # sweep.save_models defaults to false
    m = json.loads((out / "manifest.json").read_text())
    # eval.data unset: held-out documents of the calibration corpus after the calibration ones
    assert m["counts"]["runs"] == 4 and m["counts"]["eval_docs"] == 120 and m["counts"]["calib_docs"] == 300
    assert math.isfinite(m["metrics"]["ppl_dense"])

    # resume: an interrupted sweep reuses its finished runs and redoes only the missing one
    partial = out.with_name("sweep.partial")
    out.rename(partial)
    (partial / "_SUCCESS").unlink()
    (partial / names[3] / "_task_result.json").unlink()
    reused = partial / names[0] / "_task_result.json"
    res0 = json.loads(reused.read_text())
    res0["ppl_pruned"] = 12345.0  # a marker: only a reused result carries it
    reused.write_text(json.dumps(res0))
    assert main(args) == 0, capsys.readouterr().err
    again = {r["run"]: r for r in json.loads((out / "comparison.json").read_text())["rows"]}
    assert again[names[0]]["ppl"] == 12345.0
    assert again[names[3]]["ppl"] == pytest.approx(rows[3]["ppl"], rel=1e-6)  # recomputed, deterministic


def test_prune_bad_config_exit_2_names_key(tiny_model_dir, synth_corpus, tmp_path, capsys):
    out = tmp_path / "bad"
    rc = main(["prune", "--model", str(tiny_model_dir), "--data", str(synth_corpus / "train"),
               "--output", str(out), "--method", "dlpp", "prune.owl.lamda=0.1"])
    err = capsys.readouterr().err
    assert rc == 2 and "prune.method" in err and "prune.owl.lamda" in err
    assert not out.exists() and not out.with_name("bad.partial").exists()


def test_shipped_prune_config_is_valid(tiny_model_dir, synth_corpus):
    import yaml

    from effsft.config import build_config
    from effsft.prune.config import PruneConfig
    from effsft.prune.recipe import sweep_grid

    text = (REPO / "jobs" / "prune.yaml").read_text()
    data = yaml.safe_load(text)
    data["model"]["path"] = str(tiny_model_dir)
    data["prune"]["calib"]["data"]["path"] = str(synth_corpus / "train")
    cfg = build_config(PruneConfig, data)
    assert cfg.prune.method == "dlp" and cfg.prune.owl.lam == 0.08 and cfg.sweep is None
    # the commented-out sweep block is valid too: 3 s x 2 criteria x (uniform, owl, dlp-mean, dlp-median)
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("# sweep:"))
    block = "\n".join(line[2:] for line in lines[start:] if line.startswith("#"))
    swept = build_config(PruneConfig, {**data, **yaml.safe_load(block)})
    assert len(sweep_grid(swept)) == 3 * 2 * 4


def test_demo_config_is_valid(tiny_model_dir, synth_corpus, tmp_path):
    from effsft.config import build_config
    from effsft.prune.config import PruneConfig, demo_config

    cfg = build_config(PruneConfig, demo_config(tiny_model_dir, synth_corpus / "train", tmp_path / "p"))
    assert cfg.prune.method == "dlp" and cfg.sweep is None and cfg.prune.eval.data is None
