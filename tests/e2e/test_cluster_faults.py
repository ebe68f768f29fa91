"""Fault tolerance of `select` and `sft` jobs on a real 2-node cluster (tests/e2e/conftest.py):
head with 2 logical CPUs, worker node w1 with 3. Slow tier (`pytest -m slow`).

* select: a scoring actor (only w1 fits its 2.5 CPUs) is SIGKILLed while it runs a scoring
  task; Ray Data restarts it and retries the task; the job succeeds and every row is scored
  exactly once.
* sft: 2 workers, one per node (1.6 CPUs each: 2 fit neither node); once a checkpoint is
  reported the whole worker NODE w1 is killed (its process group: raylet, object store, the
  rank living there), then started again; Ray Train restarts the worker group from the last
  checkpoint and the job succeeds with every step logged once.
"""
from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path

import pytest

from effsft.cli import main as effsft_main

sys.path.insert(0, str(Path(__file__).parent))
from e2e_checks import check_select_output, check_store, metric_steps, n_ok, poll  # noqa: E402

pytestmark = [pytest.mark.e2e, pytest.mark.slow, pytest.mark.timeout(1500)]

ROOT = Path(__file__).resolve().parents[2]
CLUSTER = {"EFFSFT_CLUSTER_HEAD_CPUS": "2", "EFFSFT_CLUSTER_WORKER_CPUS": "3"}
ROWS = 1500


def build_inputs(built: Path) -> None:
    corpus, model = built / "corpus", built / "model"
    assert effsft_main(["synth", str(ROOT / "jobs/synth.yaml"), f"output={corpus}", f"rows={ROWS}",
                        "eval_rows=8", "grpo_rows=8", "garbage=0.02"]) == 0
    assert effsft_main(["tiny-model", str(ROOT / "jobs/tiny_model.yaml"), f"output={model}",
                        f"corpus={corpus}", "vocab_size=300", "max_position=256"]) == 0


def running(cluster, sid: str) -> None:
    """Fail at once (with the driver's log) if the job ended while the test waits for it."""
    info = cluster.client.get_job_info(sid)
    if getattr(info.status, "value", str(info.status)) in {"SUCCEEDED", "FAILED", "STOPPED"}:
        raise AssertionError(f"job ended early: {info.status}\n"
                             f"{cluster.client.get_job_logs(sid)[-4000:]}")


def test_select_survives_killed_scoring_actor(cluster, built):
    head, worker = cluster.node_ids()
    cache, out = built / "cache", built / "select"
    # Small batches over many shards: scoring takes long enough to be interrupted.
    sid = cluster.submit([
        "select", "jobs/select.yaml", f"input.path={built / 'corpus' / 'train'}",
        "input.shard_rows=100", f"output={out}", f"model.path={built / 'model'}",
        f"cache_dir={cache}", "plots=false", "method=ce", "budget=200", "scorer.concurrency=1",
        "scorer.num_cpus=2.5", "scorer.batch_size=8", "scorer.micro_batch_size=4",
        "scorer.max_len=256"])
    job_id = poll("the job id", lambda: cluster.client.get_job_info(sid).job_id, 120)

    def scoring_actor():
        running(cluster, sid)
        alive = [a for a in cluster.actors(job_id, state="ALIVE") if "MapWorker" in a["class_name"]]
        return next((a for a in alive if a.get("pid")), None)

    victim = poll("a scoring actor", scoring_actor, 600, every=0.5)
    assert victim["node_id"] == worker            # 2.5 CPUs fit only w1
    # Kill it while it is running a scoring task (its model is loaded and batches flow).
    def scoring_task():
        running(cluster, sid)
        return [t for t in cluster.tasks(job_id) if "MapWorker" in t["name"]
                and t["state"] == "RUNNING" and t.get("actor_id") == victim["actor_id"]]

    poll("a running scoring task", scoring_task, 600, every=0.5)
    time.sleep(3)
    running(cluster, sid)
    done_at_kill = len(list(cache.glob("scores/lm-*/*.done.json")))
    os.kill(victim["pid"], signal.SIGKILL)
    t_kill = time.monotonic()
    info = cluster.wait_ok(sid, timeout=600)
    shards_total = len(list((built / "cache").glob("corpus-*/data/*.parquet")))
    assert done_at_kill < shards_total, (done_at_kill, shards_total)  # killed mid-scoring
    m = check_select_output(out, budget=200, rows=ROWS)
    (key, st), = m["scoring"].items()
    assert key.startswith("lm-") and st["shards_scored"] == st["shards_total"] == shards_total
    assert st["rows_scored"] == n_ok(m)
    check_store(cache, n_ok(m))
    # The State API saw the killed actor die and a replacement finish the work on w1.
    workers = [a for a in cluster.actors(info.job_id) if "MapWorker" in a["class_name"]]
    killed = next(a for a in workers if a["actor_id"] == victim["actor_id"])
    assert killed["state"] == "DEAD" or str(killed.get("num_restarts", 0)) != "0", killed
    print(f"select: killed scoring actor pid {victim['pid']} after {done_at_kill}/{shards_total} "
          f"shards; job finished {time.monotonic() - t_kill:.0f}s later")


def test_sft_survives_losing_a_worker_node(cluster, built):
    head, worker = cluster.node_ids()
    out = built / "sft"
    partial = Path(f"{out}.partial")
    steps, every = 40, 4
    sid = cluster.submit([
        "sft", "jobs/sft.yaml", f"model.path={built / 'model'}",
        f"data.path={built / 'corpus' / 'train'}", f"output={out}", "tokenize.max_len=128",
        "train.num_workers=2", "train.cpus_per_worker=1.6", "train.zero_stage=2",
        "train.micro_batch_size=2", "train.lr=1e-3", "train.warmup_steps=0",
        "train.schedule=constant", f"train.max_steps={steps}", f"train.checkpoint_every={every}",
        "train.max_failures=3"])
    job_id = poll("the job id", lambda: cluster.client.get_job_info(sid).job_id, 120)

    def ranks_on_both_nodes():
        running(cluster, sid)
        ws = [a for a in cluster.actors(job_id, state="ALIVE")
              if a["class_name"].endswith("RayTrainWorker")]
        return ws if {a["node_id"] for a in ws} == {head, worker} else None

    poll("one train worker per node", ranks_on_both_nodes, 600, every=1)
    # The first checkpoint is reported (Ray Train persisted it) and training went on past it.
    def checkpointed():
        running(cluster, sid)
        return (list(partial.glob("checkpoints/train/checkpoint_*"))
                and max(metric_steps(partial) or [0]) > every)

    poll("a reported checkpoint", checkpointed, 600)
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
    assert (out / "_SUCCESS").exists() and (out / "model" / "model.safetensors").exists()
    logs = cluster.client.get_job_logs(sid)
    print(f"sft: node w1 killed at step {step_at_kill}, back after {t_back - t_kill:.0f}s, "
          f"resumed from step {resumed}, job done {time.monotonic() - t_kill:.0f}s after the kill")
    assert "Source: worker group" in logs or "RayActorError" in logs or "died" in logs, logs[-3000:]
