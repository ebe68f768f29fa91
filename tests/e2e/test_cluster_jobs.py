"""effsft jobs through the Ray Jobs API on a real 2-node cluster (tests/e2e/conftest.py: head
with 2 logical CPUs, worker node w1 with 3), as `ray job submit` sends them.

All jobs go in at once (they share the cluster, as users' jobs do); each test waits for its own:

* prepare: its driver is pinned to w1 through w1's custom resource; the corpus is read in
  place from an S3 bucket (a loopback S3 server, tests/conftest.py);
* eval: the driver stays on the head, its model task asks for 3 CPUs (only w1 has them);
* a bad config: FAILED fast with the key named, nothing written, Ray never contacted;
* select (length): Ray Data's scorer actors and read tasks run on both nodes; accounting,
  selection and the score store are checked.

Then, with the cluster to itself, sft: 2 workers x DeepSpeed ZeRO-2 with 1.6 CPUs each, so one
rank per node and the gloo group spans two raylets (checked through the State API). Once a
checkpoint is registered, the worker NODE w1 is killed (raylet, object store, the rank living
there), then started again; Ray Train resumes the worker group from the last checkpoint and
the job succeeds with every step logged once.
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

sys.path.insert(0, str(Path(__file__).parent))
from e2e_checks import (  # noqa: E402
    build_corpus_and_model, check_select_output, check_store, job_running, job_status, metric_steps, n_ok,
    poll,
)

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(900)]

CLUSTER = {"EFFSFT_CLUSTER_HEAD_CPUS": "2", "EFFSFT_CLUSTER_WORKER_CPUS": "3"}
ROWS = 600


def build_inputs(built: Path) -> None:
    build_corpus_and_model(built, ROWS, eval_rows=16)


def sft_args(built: Path, out: str, *extra: str) -> list[str]:
    return ["sft", "jobs/sft.yaml", f"model.path={built / 'model'}",
            f"data.path={built / 'corpus' / 'train'}", f"output={built / out}",
            "tokenize.max_len=128", "train.num_workers=2", "train.cpus_per_worker=1.6",
            "train.zero_stage=2", "train.micro_batch_size=2", "train.grad_accum=1",
            "train.lr=1e-3", "train.warmup_steps=0", "train.schedule=constant", *extra]


@pytest.fixture(scope="module")
def submitted(cluster, built, s3_server) -> dict:
    corpus = built / "corpus"
    return {
        # read in place from an S3 bucket (a loopback S3 server) by the workers of both nodes
        "prepare": cluster.submit(["prepare", "jobs/prepare.yaml",
                                   f"input.path={s3_server.upload(corpus / 'train', 'e2e')}",
                                   f"output={built / 'prepared'}", "input.shard_rows=250"],
                                  entrypoint_resources={"node_w1": 1}),
        "eval": cluster.submit(["eval", "jobs/eval.yaml", f"model.path={built / 'model'}",
                                f"output={built / 'eval'}", f"data.path={corpus / 'train'}",
                                f"eval_split={corpus / 'eval.parquet'}", "limit=16",
                                "max_new_tokens=8", "batch_size=8", "num_cpus=3"]),
        "bad": cluster.submit(["prepare", "jobs/prepare.yaml", f"input.path={corpus}",
                               f"output={built / 'bad'}", "input.shard_rowz=5"]),
        "select": cluster.submit(["select", "jobs/select.yaml", f"input.path={corpus / 'train'}",
                                  "input.shard_rows=150", f"output={built / 'select'}",
                                  f"model.path={built / 'model'}", f"cache_dir={built / 'cache'}",
                                  "plots=false", "scorer.concurrency=2", "scorer.max_len=256",
                                  "method=length", "budget=100", "scorer.batch_size=64"]),
    }


def test_bad_config_fails_fast_and_writes_nothing(cluster, built, submitted):
    info = cluster.wait(submitted["bad"], timeout=120)
    logs = cluster.client.get_job_logs(submitted["bad"])
    assert job_status(info) == "FAILED", logs[-3000:]
    assert "exit code 2" in (info.message or ""), info.message     # the CLI's bad-config code
    assert "input.shard_rowz: unknown key" in logs
    # rejected before any work: no Ray connection, no output, no partial output
    assert "Connecting to existing Ray cluster" not in logs
    out = built / "bad"
    assert not out.exists() and not Path(f"{out}.partial").exists()


def test_prepare_driver_on_worker_node(cluster, built, submitted):
    head, worker = cluster.node_ids()
    info = cluster.wait_ok(submitted["prepare"], timeout=600)
    assert info.driver_node_id == worker
    prepared = built / "prepared"
    m = json.loads((prepared / "manifest.json").read_text())
    assert (prepared / "_SUCCESS").exists() and not Path(f"{prepared}.partial").exists()
    c = m["counts"]
    assert c["rows_in"] == ROWS and c["rows_in"] == c["rows_ok"] + c["rows_rejected"]
    assert c["rows_rejected"] > 0                      # the garbage rows
    assert m["ray"]["mode"] == "cluster"               # connected to the cluster, not embedded
    assert m["inputs"]["corpus"]["path"].startswith("s3://e2e/in?")
    rejects = pq.read_table(prepared / "rejects.parquet", columns=["src_file"]).column(0).to_pylist()
    assert rejects and all(f.startswith("s3://e2e/in/") for f in rejects)
    assert len(list((prepared / "data").glob("*.parquet"))) >= 2   # shard_rows=250


def test_eval_task_on_worker_node(cluster, built, submitted):
    head, worker = cluster.node_ids()
    info = cluster.wait_ok(submitted["eval"], timeout=600)
    assert info.driver_node_id == head
    out = built / "eval"
    m = json.loads((out / "manifest.json").read_text())
    assert m["metrics"]["perplexity"]["rows"] == 16 and m["metrics"]["exact_match"]["n"] == 16
    assert (out / "report.md").exists() and (out / "_SUCCESS").exists()
    # The model task ran on the worker node while the driver ran on the head: both nodes.
    evaluate = [t for t in cluster.tasks(info.job_id) if t["name"].endswith("evaluate")]
    assert evaluate and {t["node_id"] for t in evaluate} == {worker}, evaluate


def test_select_scores_on_both_nodes(cluster, built, submitted):
    head, worker = cluster.node_ids()
    info = cluster.wait_ok(submitted["select"], timeout=600)
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


def test_sft_one_rank_per_node_survives_losing_a_worker_node(cluster, built, submitted):
    """Last in the module: it kills w1 (once the other jobs are finished)."""
    for sid in submitted.values():
        cluster.wait(sid, timeout=600)
    head, worker = cluster.node_ids()
    out = built / "sft-fault"
    partial = Path(f"{out}.partial")
    steps, every = 12, 4
    sid = cluster.submit(sft_args(built, "sft-fault", f"train.max_steps={steps}",
                                  f"train.checkpoint_every={every}", "train.max_failures=3"))
    job_id = poll("the job id", lambda: cluster.client.get_job_info(sid).job_id, 120)

    def ranks_on_both_nodes():
        job_running(cluster, sid)
        ws = [a for a in cluster.actors(job_id, state="ALIVE")
              if a["class_name"].endswith("RayTrainWorker")]
        return ws if {a["node_id"] for a in ws} == {head, worker} else None

    poll("one train worker per node", ranks_on_both_nodes, 600, every=1)

    def checkpointed():
        """A checkpoint the controller has registered: Ray Train's controller polls the workers
        every 2 s, so a report younger than that can be lost with the node (the job would then
        restart from step 0, correctly but not what this test is about)."""
        job_running(cluster, sid)
        ckpts = list(partial.glob("checkpoints/train/checkpoint_*"))
        return ckpts and time.time() - min(c.stat().st_mtime for c in ckpts) > 5

    poll("a registered checkpoint", checkpointed, 600)
    step_at_kill = max(metric_steps(partial))
    cluster.script("kill-node", "w1")
    t_kill = time.monotonic()
    assert step_at_kill < steps, "training finished before the node was killed"
    # The cluster notices the loss; w1 then joins again as a new node.
    poll("the GCS to mark w1 dead", lambda: sum(n["state"] == "ALIVE" for n in cluster.nodes()) == 1,
         120, every=1)
    cluster.script("start-node", "w1")
    t_back = time.monotonic()
    cluster.wait_ok(sid, timeout=600)
    m = json.loads((out / "manifest.json").read_text())
    resumed = m["metrics"]["resumed_from_step"]
    assert resumed and resumed % every == 0 and 0 < resumed <= step_at_kill, (resumed, step_at_kill)
    assert m["metrics"]["steps"] == steps
    assert metric_steps(out) == list(range(1, steps + 1))   # re-run steps logged once
    assert m["counts"]["rows_in"] == ROWS and m["counts"]["rows_ok"] > 0
    for f in ("_SUCCESS", "model/model.safetensors", "model/tokenizer.json", "report.md"):
        assert (out / f).exists(), f
    assert not (out / "checkpoints").exists() and not partial.exists()
    print(f"sft: node w1 killed at step {step_at_kill}, back after {t_back - t_kill:.0f}s, "
          f"resumed from step {resumed}, job done {time.monotonic() - t_kill:.0f}s after the kill")
