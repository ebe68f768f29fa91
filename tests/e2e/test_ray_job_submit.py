"""End to end on a real 2-node Ray cluster: `cluster/local_cluster.sh` starts a head node and a
worker node (own raylets, object stores, ports, token auth, loopback only) in subprocesses;
jobs go in through the Ray Jobs HTTP API exactly as `ray job submit` sends them.

Independent of the session-local Ray (`ray_session`): its own state/temp dir and ports, and this
process never calls `ray.init` (JobSubmissionClient and the State API are plain HTTP). The
token is sent as an explicit header, so this process's Ray token cache is never touched.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

from effsft.cli import main as effsft_main

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(400)]

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "cluster" / "local_cluster.sh"
FINAL = {"SUCCEEDED", "FAILED", "STOPPED"}
# Environment passed on to the nodes: none of this process's Ray settings leak into the cluster
# except the ones chosen here.
KEEP_RAY_ENV = {"RAY_DATA_EXECUTION_NO_PROGRESS_TIMEOUT_S": "120",
                "RAY_memory_usage_threshold": "0.98", "RAY_DEDUP_LOGS": "0"}


def _cluster_env(state: str) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update(KEEP_RAY_ENV, EFFSFT_CLUSTER_DIR=state, EFFSFT_CLUSTER_WORKERS="1",
               EFFSFT_CLUSTER_HEAD_CPUS="1", EFFSFT_CLUSTER_WORKER_CPUS="2",
               EFFSFT_CLUSTER_OBJECT_STORE=str(128 << 20), EFFSFT_CLUSTER_TIMEOUT="150",
               PYTHON=sys.executable)
    return env


def _tail_logs(state: str, n: int = 40) -> str:
    out = []
    for f in sorted(Path(state, "logs").glob("*.log")):
        out.append(f"== {f.name}\n" + "\n".join(f.read_text(errors="replace").splitlines()[-n:]))
    return "\n".join(out)


class Cluster:
    """Handle on a running local cluster: Jobs API client + authenticated State API calls."""

    def __init__(self, state: str):
        from ray.job_submission import JobSubmissionClient

        info = json.loads(Path(state, "cluster.json").read_text())
        self.state, self.url = state, info["dashboard_url"]
        token = Path(info["auth_token_path"]).read_text().strip()
        self.headers = {"Authorization": f"Bearer {token}"}
        self.client = JobSubmissionClient(self.url, headers=self.headers)

    def api(self, path: str, **params) -> dict:
        query = urllib.parse.urlencode(params, doseq=True)
        req = urllib.request.Request(f"{self.url}{path}?{query}", headers=self.headers)
        with urllib.request.urlopen(req, timeout=10) as r:
            return json.loads(r.read())

    def nodes(self) -> list[dict]:
        return self.api("/api/v0/nodes", limit=100)["data"]["result"]["result"]

    def tasks(self, job_id: str) -> list[dict]:
        return self.api("/api/v0/tasks", limit=10000, filter_keys=["job_id"],
                        filter_predicates=["="], filter_values=[job_id])["data"]["result"]["result"]

    def submit(self, args: list[str], **kw) -> str:
        # `python` as a user writes it: the nodes put the cluster's interpreter first on PATH.
        entry = " ".join(["python", "-m", "effsft", *args])
        return self.client.submit_job(entrypoint=entry, runtime_env={"working_dir": str(ROOT)},
                                      **kw)

    def wait(self, sid: str, timeout: float = 150):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            info = self.client.get_job_info(sid)
            if str(info.status) in FINAL or getattr(info.status, "value", None) in FINAL:
                return info
            time.sleep(1)
        self.client.stop_job(sid)
        raise AssertionError(f"job {sid} not finished after {timeout}s:\n"
                             f"{self.client.get_job_logs(sid)[-4000:]}\n{_tail_logs(self.state)}")


def _status(info) -> str:
    return getattr(info.status, "value", str(info.status))


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Path:
    """Where this module's inputs and outputs go (the cluster fixture fills in corpus/model)."""
    return tmp_path_factory.mktemp("e2e")


@pytest.fixture(scope="module")
def cluster(built):
    # Short state path: Ray's AF_UNIX socket paths must stay under 108 bytes.
    state = tempfile.mkdtemp(prefix="effsft-e2e-", dir="/tmp")
    env = _cluster_env(state)
    starter = subprocess.Popen(["bash", str(SCRIPT), "start"], env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True)
    try:
        # Build the inputs on this side while the nodes come up (no Ray needed for these).
        corpus, model = built / "corpus", built / "model"
        assert effsft_main(["synth", str(ROOT / "jobs/synth.yaml"), f"output={corpus}", "rows=600",
                            "eval_rows=16", "grpo_rows=8", "garbage=0.02"]) == 0
        assert effsft_main(["tiny-model", str(ROOT / "jobs/tiny_model.yaml"), f"output={model}",
                            f"corpus={corpus}", "vocab_size=300", "max_position=256"]) == 0
        out, _ = starter.communicate(timeout=200)
        assert starter.returncode == 0, f"cluster start failed:\n{out}\n{_tail_logs(state)}"
        yield Cluster(state)
    finally:
        if starter.poll() is None:
            starter.kill()
        subprocess.run(["bash", str(SCRIPT), "stop"], env=env, capture_output=True, timeout=120)
        shutil.rmtree(state, ignore_errors=True)


def _node_ids(cluster: Cluster) -> tuple[str, str]:
    nodes = [n for n in cluster.nodes() if n["state"] == "ALIVE"]
    assert len(nodes) == 2, nodes
    assert {n["node_ip"] for n in nodes} == {"127.0.0.1"}     # loopback only
    head = next(n["node_id"] for n in nodes if n["is_head_node"])
    worker = next(n["node_id"] for n in nodes if "node_w1" in n["resources_total"])
    assert head != worker
    return head, worker


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
