"""A scoring actor killed mid-`select` on a real 2-node cluster (tests/e2e/conftest.py: head
with 2 logical CPUs, worker node w1 with 3); ~70 s on a quiet 2-core box. The sft node-loss
test is in test_cluster_jobs.py; the same actor kill on one node in
tests/integration/test_select_job.py.

A scoring actor (only w1 fits its 2.5 CPUs) is SIGKILLed while it runs a scoring task; Ray Data
restarts it and retries the task; the job succeeds and every row is scored exactly once.
"""
from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from e2e_checks import (  # noqa: E402
    build_corpus_and_model, check_select_output, check_store, job_running, n_ok, poll,
)

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(1200)]

CLUSTER = {"EFFSFT_CLUSTER_HEAD_CPUS": "2", "EFFSFT_CLUSTER_WORKER_CPUS": "3"}
ROWS = 1500


def build_inputs(built: Path) -> None:
    build_corpus_and_model(built, ROWS)


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
        job_running(cluster, sid)
        alive = [a for a in cluster.actors(job_id, state="ALIVE") if "MapWorker" in a["class_name"]]
        return next((a for a in alive if a.get("pid")), None)

    victim = poll("a scoring actor", scoring_actor, 600, every=0.5)
    assert victim["node_id"] == worker            # 2.5 CPUs fit only w1
    # Kill it while it is running a scoring task (its model is loaded and batches flow).
    def scoring_task():
        job_running(cluster, sid)
        return [t for t in cluster.tasks(job_id) if "MapWorker" in t["name"]
                and t["state"] == "RUNNING" and t.get("actor_id") == victim["actor_id"]]

    poll("a running scoring task", scoring_task, 600, every=0.5)
    time.sleep(3)
    job_running(cluster, sid)
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
