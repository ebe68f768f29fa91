"""End to end on a real 2-node Ray cluster (tests/e2e/conftest.py: head with 1 CPU + worker
node w1 with 2 CPUs): `prepare` with its driver pinned to the worker node, `eval` whose model
task only fits the worker node, and a bad config that fails before touching Ray."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from effsft.cli import main as effsft_main

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(400)]

ROOT = Path(__file__).resolve().parents[2]
CLUSTER = {"EFFSFT_CLUSTER_HEAD_CPUS": "1", "EFFSFT_CLUSTER_WORKER_CPUS": "2"}


def build_inputs(built: Path) -> None:
    corpus, model = built / "corpus", built / "model"
    assert effsft_main(["synth", str(ROOT / "jobs/synth.yaml"), f"output={corpus}", "rows=600",
                        "eval_rows=16", "grpo_rows=8", "garbage=0.02"]) == 0
    assert effsft_main(["tiny-model", str(ROOT / "jobs/tiny_model.yaml"), f"output={model}",
                        f"corpus={corpus}", "vocab_size=300", "max_position=256"]) == 0


def _status(info) -> str:
    return getattr(info.status, "value", str(info.status))


def _node_ids(cluster) -> tuple[str, str]:
    return cluster.node_ids()


@pytest.fixture(scope="module")
def submitted(cluster, built) -> dict:
    """All three jobs go in at once (they share the cluster, as users' jobs do), which keeps
    the module's wall time down; each test then waits for its own."""
    corpus = built / "corpus"
    return {
        # prepare: the driver is pinned to the worker node through its custom resource.
        "prepare": cluster.submit(["prepare", "jobs/prepare.yaml",
                                   f"input.path={corpus / 'train'}",
                                   f"output={built / 'prepared'}", "input.shard_rows=250"],
                                  entrypoint_resources={"node_w1": 1}),
        # eval: the driver stays on the head (Ray's default); the model task asks for 2 CPUs,
        # which only the worker node has. Perplexity reads the raw corpus through the readers.
        "eval": cluster.submit(["eval", "jobs/eval.yaml", f"model.path={built / 'model'}",
                                f"output={built / 'eval'}", f"data.path={corpus / 'train'}",
                                f"eval_split={corpus / 'eval.parquet'}", "limit=16",
                                "max_new_tokens=8", "batch_size=8", "num_cpus=2"]),
        "bad": cluster.submit(["prepare", "jobs/prepare.yaml", f"input.path={corpus}",
                               f"output={built / 'bad'}", "input.shard_rowz=5"]),
    }


def test_prepare_driver_on_worker_node(cluster, built, submitted):
    head, worker = _node_ids(cluster)
    info = cluster.wait(submitted["prepare"])
    logs = cluster.client.get_job_logs(submitted["prepare"])
    assert _status(info) == "SUCCEEDED", logs[-4000:]
    assert info.driver_node_id == worker
    prepared = built / "prepared"
    m = json.loads((prepared / "manifest.json").read_text())
    assert (prepared / "_SUCCESS").exists() and not Path(f"{prepared}.partial").exists()
    c = m["counts"]
    assert c["rows_in"] == 600 and c["rows_in"] == c["rows_ok"] + c["rows_rejected"]
    assert c["rows_rejected"] > 0                      # the garbage rows
    assert m["ray"]["mode"] == "cluster"               # connected to the cluster, not embedded
    assert len(list((prepared / "data").glob("*.parquet"))) >= 2   # shard_rows=250


def test_eval_task_on_worker_node(cluster, built, submitted):
    head, worker = _node_ids(cluster)
    info = cluster.wait(submitted["eval"])
    logs = cluster.client.get_job_logs(submitted["eval"])
    assert _status(info) == "SUCCEEDED", logs[-4000:]
    assert info.driver_node_id == head
    out = built / "eval"
    m = json.loads((out / "manifest.json").read_text())
    assert m["metrics"]["perplexity"]["rows"] == 16 and m["metrics"]["exact_match"]["n"] == 16
    assert (out / "report.md").exists() and (out / "_SUCCESS").exists()
    # The State API saw the model task run on the worker node while the driver ran on the
    # head: one job, both nodes.
    tasks = cluster.tasks(info.job_id)
    evaluate = [t for t in tasks if t["name"].endswith("evaluate")]
    assert evaluate and {t["node_id"] for t in evaluate} == {worker}, tasks
    assert {info.driver_node_id, *(t["node_id"] for t in evaluate)} == {head, worker}


def test_bad_config_fails_fast_and_writes_nothing(cluster, built, submitted):
    info = cluster.wait(submitted["bad"], timeout=90)
    logs = cluster.client.get_job_logs(submitted["bad"])
    assert _status(info) == "FAILED", logs[-3000:]
    assert "exit code 2" in (info.message or ""), info.message     # the CLI's bad-config code
    assert "input.shard_rowz: unknown key" in logs
    # rejected before any work: no Ray connection, no output, no partial output
    assert "Connecting to existing Ray cluster" not in logs
    out = built / "bad"
    assert not out.exists() and not Path(f"{out}.partial").exists()
