"""effsft select end to end on local Ray: every method, accounting, fault tolerance, resume."""
import json

import pyarrow.parquet as pq
import pytest

from effsft.cli import main
from effsft.config import build_config
from effsft.select.config import SelectConfig
from effsft.select.recipe import run_select

pytestmark = pytest.mark.usefixtures("ray_session")

BUDGET = 40


@pytest.fixture(scope="module")
def small_corpus(tmp_path_factory):
    """600 rows (with garbage) in 4 shards of 150: CI-sized, still several shards to resume."""
    from effsft.corpus.synth import SynthSettings, write_synth

    out = tmp_path_factory.mktemp("selcorpus") / "corpus"
    write_synth(SynthSettings(rows=600, garbage=0.03, eval_rows=8, grpo_rows=8, shard_rows=300, seed=7),
                out, progress=False)
    return out


def _cfg(synth_corpus, tiny_model_dir, tmp_path, method, **extra):
    data = {"input": {"path": str(synth_corpus / "train"), "shard_rows": 150}, "method": method,
            "budget": BUDGET, "seed": 1, "model": {"path": str(tiny_model_dir)},
            "output": str(tmp_path / "out" / method), "cache_dir": str(tmp_path / "cache"),
            "scorer": {"batch_size": 128, "micro_batch_size": 16, "max_len": 256},
            "zip": {"k1": 300, "k2": 40, "k3": 20, "workers": 1}, "kmeans": {"k": 6},
            "selectit": {"max_tokens": 512},
            "less": {"epochs": 2, "batch_size": 8, "max_len": 128, "proj_dim": 256, "target_rows": 12,
                     "lr": 1e-3, "subtask_key": "task", "lora": {"r": 4, "alpha": 8,
                                                                "target_modules": ["q_proj", "v_proj"]}}}
    for k, v in extra.items():
        data[k] = v
    return build_config(SelectConfig, data)


@pytest.fixture(scope="module")
def shared(tmp_path_factory):
    return tmp_path_factory.mktemp("select")


def _check_output(res, out, budget=BUDGET):
    m = json.loads((out / "manifest.json").read_text())
    c = m["counts"]
    assert c["rows_in"] == c["rows_selected"] + c["rows_not_selected"] + c["rows_rejected"]
    assert c["rows_selected"] == budget and c["rows_rejected"] > 0  # the corpus has garbage rows
    sel = pq.read_table(out / "selected.parquet")
    assert sel.num_rows == budget and len(set(sel.column("id").to_pylist())) == budget
    assert sel.column("pick_order").to_pylist() == list(range(budget))
    scores = pq.read_table(out / "scores.parquet")
    assert scores.num_rows == c["rows_in"] - c["rows_rejected"]
    assert sum(scores.column("selected").to_pylist()) == budget
    assert (out / "rejects.parquet").exists() and (out / "report.md").exists() and (out / "_SUCCESS").exists()
    return m


@pytest.mark.parametrize("method", ["random", "random_stratified", "length", "ce", "ppl", "entropy", "ifd",
                                    "selectit", pytest.param("less", marks=pytest.mark.slow), "zip", "diverseevol", "kmeans", "km_length",
                                    "km_ce"])
def test_every_method_end_to_end(method, small_corpus, tiny_model_dir, shared):
    cfg = _cfg(small_corpus, tiny_model_dir, shared, method)
    res = run_select(cfg)
    m = _check_output(res, shared / "out" / method)
    if method in ("length", "ce", "ppl", "entropy", "ifd", "km_length", "km_ce"):
        assert m["metrics"]["score_pool"]["n"] == m["counts"]["rows_in"] - m["counts"]["rows_rejected"]
    if method == "less":
        d = m["method_details"]["less"]
        assert len(d["mean_lrs"]) == 2 and abs(sum(d["eta_bar"]) - 1) < 1e-9 and 0 < d["target_rows"] <= 12
        assert len(d["projector_checksum"]) == 32 and len(m["scoring"]) == 2  # one store per checkpoint
        assert m["counts"]["status"]["less_target"] == 12  # the holdout target is never selected
    if method.startswith("km") or method == "kmeans":
        d = m["method_details"]
        assert sum(d["cluster_selected"]) == BUDGET and d["k"] == 6


def test_length_selects_the_longest(small_corpus, tiny_model_dir, shared):
    out = shared / "out" / "length"
    if not (out / "_SUCCESS").exists():
        run_select(_cfg(small_corpus, tiny_model_dir, shared, "length"))
    s = pq.read_table(out / "scores.parquet").to_pandas()
    chosen = s[s.selected]["score"]
    rest = s[~s.selected]["score"]
    assert chosen.min() >= rest.max()


def test_random_is_seeded_and_budgets_nest(small_corpus, tiny_model_dir, tmp_path):
    def ids(budget, seed, name):
        cfg = _cfg(small_corpus, tiny_model_dir, tmp_path, "random", budget=budget, seed=seed,
                   output=str(tmp_path / name))
        run_select(cfg)
        return pq.read_table(tmp_path / name / "selected.parquet").column("id").to_pylist()

    a, b = ids(50, 3, "a"), ids(50, 3, "b")
    assert a == b
    assert set(ids(10, 3, "c")) <= set(a)
    assert set(ids(50, 4, "d")) != set(a)


def test_killed_actor_scores_every_row_exactly_once(small_corpus, tiny_model_dir, tmp_path):
    cfg = _cfg(small_corpus, tiny_model_dir, tmp_path, "ce", fault={"kill_actor_after_batches": 3})
    run_select(cfg)
    m = _check_output(None, tmp_path / "out" / "ce")
    (key, st), = m["scoring"].items()
    assert st["shards_scored"] == st["shards_total"] and st["rows_scored"] == m["metrics"]["score_pool"]["n"]
    ids = pq.read_table(tmp_path / "out" / "ce" / "scores.parquet").column("id").to_pylist()
    assert len(ids) == len(set(ids))


def test_interrupted_job_resumes_without_rescoring(small_corpus, tiny_model_dir, tmp_path):
    from effsft.select.pipeline import Interrupted

    with pytest.raises(Interrupted):
        run_select(_cfg(small_corpus, tiny_model_dir, tmp_path, "entropy", fault={"stop_after_shards": 2}))
    assert not (tmp_path / "out" / "entropy").exists()  # nothing half-written is visible
    run_select(_cfg(small_corpus, tiny_model_dir, tmp_path, "entropy"))
    m = json.loads((tmp_path / "out" / "entropy" / "manifest.json").read_text())
    (key, st), = m["scoring"].items()
    assert st["shards_reused"] == 2 and st["shards_scored"] == st["shards_total"] - 2
    # a new budget and another LM method: no model call at all
    run_select(_cfg(small_corpus, tiny_model_dir, tmp_path, "ce", budget=20,
                    output=str(tmp_path / "out" / "ce20")))
    m = json.loads((tmp_path / "out" / "ce20" / "manifest.json").read_text())
    (key, st), = m["scoring"].items()
    assert st["shards_scored"] == 0 and st["rows_scored"] == 0


def test_sentence_transformers_real_model_path(small_corpus, tiny_model_dir, tmp_path):
    pytest.importorskip("sentence_transformers")
    cfg = _cfg(small_corpus, tiny_model_dir, tmp_path, "km_length",
               embed={"kind": "sentence_transformers"})
    run_select(cfg)
    m = _check_output(None, tmp_path / "out" / "km_length")
    assert any(k.startswith("emb_sentence_transformers") for k in m["scoring"])


def test_cli_and_bad_config(small_corpus, tiny_model_dir, tmp_path, capsys):
    synth_corpus = small_corpus
    out = tmp_path / "cli"
    assert main(["select", "--input", str(synth_corpus / "train"), "--method", "random", "--budget", "0.05",
                 "--seed", "0", "--output", str(out), "--cache_dir", str(tmp_path / "c")]) == 0
    m = json.loads((out / "manifest.json").read_text())
    assert m["budget"] == round(0.05 * (m["counts"]["rows_in"] - m["counts"]["rows_rejected"]))
    rc = main(["select", "--input", str(synth_corpus / "train"), "--method", "nope", "--budget", "5",
               "--output", str(tmp_path / "bad")])
    assert rc == 2 and "method" in capsys.readouterr().err and not (tmp_path / "bad").exists()
    rc = main(["select", "--input", str(synth_corpus / "train"), "--method", "ce", "--budget", "5",
               "--output", str(tmp_path / "bad")])
    assert rc == 2 and "model" in capsys.readouterr().err
    # a budget larger than the usable rows is found after reading: exit 2 naming the key, and the
    # run leaves no output or work directory (the prepared corpus stays in the cache for a re-run)
    rc = main(["select", "--input", str(synth_corpus / "train"), "--method", "random", "--budget", "10000000",
               "--output", str(tmp_path / "big"), "--cache_dir", str(tmp_path / "c")])
    err = capsys.readouterr().err
    assert rc == 2 and "budget: " in err and "usable rows" in err, err
    assert not (tmp_path / "big").exists() and not (tmp_path / "big.partial").exists()
