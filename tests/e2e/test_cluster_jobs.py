"""`select` and `sft` as Ray jobs on a real 2-node cluster (tests/e2e/conftest.py), both nodes
with 3 logical CPUs.

* select (length): the scorer actor pool and read tasks are spread by Ray Data over both
  nodes; outputs, manifest accounting and the score store are checked.
* sft (2 workers x DeepSpeed ZeRO-2): ``train.cpus_per_worker=2`` fits one worker per node
  (2 + 2 > 3), so the gloo process group really spans two raylets.

Both jobs go in at once (they share the cluster, as users' jobs do): the module's wall time is
roughly the slower of the two, plus the cluster start.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from effsft.cli import main as effsft_main

sys.path.insert(0, str(Path(__file__).parent))
from e2e_checks import check_select_output, check_store, metric_steps, n_ok  # noqa: E402

# Slow tier: select + sft jobs on the 2-node cluster take minutes; test_ray_job_submit.py keeps
# the Jobs API on a 2-node cluster in CI.
pytestmark = [pytest.mark.e2e, pytest.mark.slow, pytest.mark.timeout(900)]

ROOT = Path(__file__).resolve().parents[2]
CLUSTER = {"EFFSFT_CLUSTER_HEAD_CPUS": "3", "EFFSFT_CLUSTER_WORKER_CPUS": "3"}
ROWS = 600


def build_inputs(built: Path) -> None:
    corpus, model = built / "corpus", built / "model"
    assert effsft_main(["synth", str(ROOT / "jobs/synth.yaml"), f"output={corpus}", f"rows={ROWS}",
                        "eval_rows=8", "grpo_rows=8", "garbage=0.02"]) == 0
    assert effsft_main(["tiny-model", str(ROOT / "jobs/tiny_model.yaml"), f"output={model}",
                        f"corpus={corpus}", "vocab_size=300", "max_position=256"]) == 0


def select_args(built: Path, out: str, *extra: str) -> list[str]:
    return ["select", "jobs/select.yaml", f"input.path={built / 'corpus' / 'train'}",
            "input.shard_rows=150", f"output={built / out}", f"model.path={built / 'model'}",
            f"cache_dir={built / 'cache'}", "plots=false", "scorer.concurrency=2",
            "scorer.max_len=256", *extra]


def sft_args(built: Path, out: str, *extra: str) -> list[str]:
    return ["sft", "jobs/sft.yaml", f"model.path={built / 'model'}",
            f"data.path={built / 'corpus' / 'train'}", f"output={built / out}",
            "tokenize.max_len=128", "train.num_workers=2", "train.cpus_per_worker=2",
            "train.zero_stage=2", "train.micro_batch_size=2", "train.grad_accum=1",
            "train.lr=1e-3", "train.warmup_steps=0", "train.schedule=constant", *extra]


@pytest.fixture(scope="module")
def submitted(cluster, built) -> dict:
    return {
        "select": cluster.submit(select_args(built, "select", "method=length", "budget=100",
                                             "scorer.batch_size=64")),
        "sft": cluster.submit(sft_args(built, "sft", "train.max_steps=4",
                                       "train.checkpoint_every=2")),
    }


def test_select_scores_on_both_nodes(cluster, built, submitted):
    head, worker = cluster.node_ids()
    info = cluster.wait_ok(submitted["select"], timeout=700)
    m = check_select_output(built / "select", budget=100, rows=ROWS)
    assert [k.split("-")[0] for k in m["scoring"]] == ["length"]
    check_store(built / "cache", n_ok(m))
    # Where the work ran (State API): Ray Data's scorer actors and read tasks, not the driver.
    actors = cluster.actors(info.job_id)
    scorers = [a for a in actors if "MapWorker" in a["class_name"]]
    assert scorers, [a["class_name"] for a in actors]
    tasks = [t for t in cluster.tasks(info.job_id) if t["type"] != "DRIVER_TASK" and t.get("node_id")]
    # An actor the pool asked for but never placed has no node: only placed work counts.
    placed = {a["node_id"] for a in scorers if a.get("node_id")} | {t["node_id"] for t in tasks}
    assert placed == {head, worker}


def test_sft_one_worker_per_node(cluster, built, submitted):
    head, worker = cluster.node_ids()
    info = cluster.wait_ok(submitted["sft"], timeout=700)
    out = built / "sft"
    m = json.loads((out / "manifest.json").read_text())
    assert m["metrics"]["steps"] == 4 and m["metrics"]["resumed_from_step"] is None
    assert metric_steps(out) == [1, 2, 3, 4]
    assert m["counts"]["rows_in"] == ROWS and m["counts"]["rows_ok"] > 0
    for f in ("_SUCCESS", "model/model.safetensors", "model/tokenizer.json", "report.md"):
        assert (out / f).exists(), f
    assert not (out / "checkpoints").exists()
    workers = [a for a in cluster.actors(info.job_id) if a["class_name"].endswith("RayTrainWorker")]
    assert len(workers) == 2, workers
    assert {a["node_id"] for a in workers} == {head, worker}   # one rank on each node
