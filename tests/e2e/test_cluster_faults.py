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
SHARD_ROWS = 25    # ~60 shards: a scoring phase long enough to kill it inside


def build_inputs(built: Path) -> None:
    build_corpus_and_model(built, ROWS)


def test_select_survives_killed_scoring_actor(cluster, built):
    head, worker = cluster.node_ids()
    cache, out = built / "cache", built / "select"
    sid = cluster.submit([
        "select", "jobs/select.yaml", f"input.path={built / 'corpus' / 'train'}",
        f"input.shard_rows={SHARD_ROWS}", f"output={out}", f"model.path={built / 'model'}",
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
    # Kill it while it is scoring: its model is loaded and shards are being committed (a done
    # marker per shard). The trigger is the store itself, not a sleep: with ~0.1-0.5 s per shard
    # the whole scoring phase can be over in a few seconds, and the State API lags by seconds.
    done = lambda: len(list(cache.glob("scores/lm-*/*.done.json")))  # noqa: E731
    poll("the first scored shards", lambda: job_running(cluster, sid) or done() >= 2, 600,
         every=0.05)
    done_at_kill = done()
    os.kill(victim["pid"], signal.SIGKILL)
    t_kill, wall_kill = time.monotonic(), time.time()
    info = cluster.wait_ok(sid, timeout=600)
    shards_total = len(list(cache.glob("corpus-*/data/*.parquet")))
    assert done_at_kill < shards_total, (done_at_kill, shards_total)  # killed mid-scoring
    # Shards were committed after the kill: the replacement actor finished the work.
    after = [f for f in cache.glob("scores/lm-*/*.done.json") if f.stat().st_mtime > wall_kill]
    assert len(after) >= shards_total - done_at_kill - 1, (len(after), done_at_kill)
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
