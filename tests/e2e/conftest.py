"""The e2e tier: a real multi-node Ray cluster (`cluster/local_cluster.sh`: head + worker node,
own raylets, object stores, ports, token auth, loopback only) started in subprocesses ONCE per
test module; jobs go in through the Ray Jobs HTTP API exactly as `ray job submit` sends them.

A module chooses its cluster through two module attributes:
  ``CLUSTER``        environment overrides for local_cluster.sh (e.g. node CPU counts),
  ``build_inputs``   ``f(built: Path)`` building inputs on this side while the nodes come up.

Independent of the session-local Ray (`ray_session`): its own state/temp dir and ports, and this
process never calls `ray.init` (JobSubmissionClient and the State API are plain HTTP). The
token is sent as an explicit header, so this process's Ray token cache is never touched.
"""
from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from e2e_checks import FINAL, job_status  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "cluster" / "local_cluster.sh"
# Environment passed on to the nodes: none of this process's Ray settings leak into the cluster
# except the ones chosen here. Ray Data's no-progress timeout is generous: on a shared, overloaded
# 2-core machine starting one worker process took minutes and 120 s failed healthy jobs.
KEEP_RAY_ENV = {"RAY_DATA_EXECUTION_NO_PROGRESS_TIMEOUT_S": "600",
                "RAY_memory_usage_threshold": "0.98", "RAY_DEDUP_LOGS": "0"}


def cluster_env(state: str, overrides: dict | None = None) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update(KEEP_RAY_ENV, EFFSFT_CLUSTER_DIR=state, EFFSFT_CLUSTER_WORKERS="1",
               EFFSFT_CLUSTER_HEAD_CPUS="1", EFFSFT_CLUSTER_WORKER_CPUS="2",
               EFFSFT_CLUSTER_OBJECT_STORE=str(128 << 20), EFFSFT_CLUSTER_TIMEOUT="240",
               PYTHON=sys.executable)
    env.update(overrides or {})
    return env


def tail_logs(state: str, n: int = 40) -> str:
    out = []
    for f in sorted(Path(state, "logs").glob("*.log")):
        out.append(f"== {f.name}\n" + "\n".join(f.read_text(errors="replace").splitlines()[-n:]))
    return "\n".join(out)


class Cluster:
    """Handle on a running local cluster: Jobs API client, authenticated State API calls and
    the node controls of local_cluster.sh (kill-node / start-node)."""

    def __init__(self, state: str, env: dict):
        from ray.job_submission import JobSubmissionClient

        info = json.loads(Path(state, "cluster.json").read_text())
        self.state, self.env, self.url = state, env, info["dashboard_url"]
        token = Path(info["auth_token_path"]).read_text().strip()
        self.headers = {"Authorization": f"Bearer {token}"}
        self.client = JobSubmissionClient(self.url, headers=self.headers)

    # ---- State API ------------------------------------------------------------------------
    def api(self, path: str, **params) -> dict:
        query = urllib.parse.urlencode(params, doseq=True)
        req = urllib.request.Request(f"{self.url}{path}?{query}", headers=self.headers)
        with urllib.request.urlopen(req, timeout=30) as r:
            return json.loads(r.read())

    def _list(self, kind: str, job_id: str | None = None, detail: bool = False,
              **filters) -> list[dict]:
        keys = dict(filters, **({"job_id": job_id} if job_id else {}))
        extra = {"detail": 1} if detail else {}
        return self.api(f"/api/v0/{kind}", limit=10000, **extra, filter_keys=list(keys),
                        filter_predicates=["="] * len(keys),
                        filter_values=list(keys.values()))["data"]["result"]["result"]

    def nodes(self) -> list[dict]:
        return self._list("nodes")

    def tasks(self, job_id: str) -> list[dict]:
        return self._list("tasks", job_id)

    def actors(self, job_id: str, **filters) -> list[dict]:
        return self._list("actors", job_id, detail=True, **filters)

    def node_ids(self) -> tuple[str, str]:
        """(head, w1) node ids of the ALIVE nodes; checks there are exactly these two."""
        nodes = [n for n in self.nodes() if n["state"] == "ALIVE"]
        assert len(nodes) == 2, nodes
        assert {n["node_ip"] for n in nodes} == {"127.0.0.1"}     # loopback only
        head = next(n["node_id"] for n in nodes if n["is_head_node"])
        worker = next(n["node_id"] for n in nodes if "node_w1" in n["resources_total"])
        assert head != worker
        return head, worker

    # ---- nodes -----------------------------------------------------------------------------
    def script(self, *args: str, timeout: float = 200) -> str:
        r = subprocess.run(["bash", str(SCRIPT), *args], env=self.env, capture_output=True,
                           text=True, timeout=timeout)
        assert r.returncode == 0, f"local_cluster.sh {args}: {r.stdout}\n{r.stderr}"
        return r.stdout

    # ---- Jobs API --------------------------------------------------------------------------
    def submit(self, args: list[str], **kw) -> str:
        # `python` as a user writes it: the nodes put the cluster's interpreter first on PATH.
        # Quoted as a shell user would (an s3:// URI's query string holds `&`).
        entry = shlex.join(["python", "-m", "effsft", *args])
        return self.client.submit_job(entrypoint=entry, runtime_env={"working_dir": str(ROOT)},
                                      **kw)

    def wait(self, sid: str, timeout: float = 150):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            info = self.client.get_job_info(sid)
            if job_status(info) in FINAL:
                return info
            time.sleep(1)
        self.client.stop_job(sid)
        raise AssertionError(f"job {sid} not finished after {timeout}s:\n"
                             f"{self.client.get_job_logs(sid)[-4000:]}\n{tail_logs(self.state)}")

    def wait_ok(self, sid: str, timeout: float = 150):
        """Wait for the job; assert SUCCEEDED (with the driver's log tail otherwise)."""
        info = self.wait(sid, timeout)
        assert job_status(info) == "SUCCEEDED", (info.message, self.client.get_job_logs(sid)[-6000:])
        return info


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Path:
    """Where this module's inputs and outputs go (the module's build_inputs fills it)."""
    return tmp_path_factory.mktemp("e2e")


@pytest.fixture(scope="module")
def cluster(request, built):
    # Short state path: Ray's AF_UNIX socket paths must stay under 108 bytes.
    state = tempfile.mkdtemp(prefix="effsft-e2e-", dir="/tmp")
    env = cluster_env(state, getattr(request.module, "CLUSTER", None))
    starter = subprocess.Popen(["bash", str(SCRIPT), "start"], env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True)
    try:
        build = getattr(request.module, "build_inputs", None)
        if build:  # inputs are built on this side while the nodes come up (no Ray needed)
            build(built)
        out, _ = starter.communicate(timeout=600)
        assert starter.returncode == 0, f"cluster start failed:\n{out}\n{tail_logs(state)}"
        yield Cluster(state, env)
    finally:
        if starter.poll() is None:
            starter.kill()
        subprocess.run(["bash", str(SCRIPT), "stop"], env=env, capture_output=True, timeout=120)
        shutil.rmtree(state, ignore_errors=True)
