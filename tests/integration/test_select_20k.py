"""Every selection method end to end on a 20k-row synthetic corpus (slow tier: `make test-slow`).
The CI tier runs the same methods on 600 rows (test_select_job.py)."""
import json

import pyarrow.parquet as pq
import pytest

from effsft.config import build_config
from effsft.select.config import SelectConfig
from effsft.select.recipe import run_select

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("ray_session")]

METHODS = ["random", "random_stratified", "length", "ce", "ppl", "entropy", "ifd", "selectit", "zip",
           "diverseevol", "kmeans", "km_length", "km_ce"]


@pytest.fixture(scope="module")
def corpus_20k(tmp_path_factory):
    from effsft.corpus.synth import SynthSettings, write_synth

    out = tmp_path_factory.mktemp("sel20k") / "corpus"
    write_synth(SynthSettings(rows=20_000, noise=0.1, dup=0.05, garbage=0.01, eval_rows=16, grpo_rows=16,
                              shard_rows=5000, seed=3), out, progress=False)
    return out


@pytest.mark.parametrize("method", METHODS)
def test_method_on_20k_rows(method, corpus_20k, tiny_model_dir, tmp_path_factory):
    work = tmp_path_factory.getbasetemp() / "sel20k-runs"
    cfg = build_config(SelectConfig, {
        "input": {"path": str(corpus_20k / "train"), "shard_rows": 5000}, "method": method, "budget": 2000,
        "seed": 0, "model": {"path": str(tiny_model_dir)}, "output": str(work / method),
        "cache_dir": str(work / "cache"),
        "scorer": {"batch_size": 512, "micro_batch_size": 32, "max_len": 256, "concurrency": 2},
        "zip": {"mode": "window", "k1": 2000, "k2": 200, "k3": 100, "workers": 2}})
    run_select(cfg)
    m = json.loads((work / method / "manifest.json").read_text())
    c = m["counts"]
    assert c["rows_in"] == 20_000 == c["rows_selected"] + c["rows_not_selected"] + c["rows_rejected"]
    assert c["rows_selected"] == 2000
    assert pq.read_metadata(work / method / "selected.parquet").num_rows == 2000
