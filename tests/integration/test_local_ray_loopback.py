"""The embedded local Ray listens on 127.0.0.1 only: node IP, GCS, dashboard and every socket
its processes listen on."""
import json
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap

import pytest

LOOPBACK = {"127.0.0.1", "::ffff:127.0.0.1", "::1"}

# Runs in a fresh interpreter: ray is imported *before* init_ray (as in most programs), the
# dashboard is on, and every listening socket of the driver and its descendants is reported.
PROBE = textwrap.dedent("""
    import json, os, sys
    import psutil
    import ray
    from effsft.runtime import init_ray
    init_ray(num_cpus=1, object_store_memory=80 << 20, _temp_dir=sys.argv[1])
    node = ray._private.worker.global_worker.node
    procs = [psutil.Process()] + psutil.Process().children(recursive=True)
    listen = sorted({c.laddr.ip for p in procs for c in p.net_connections(kind="inet")
                     if c.status == psutil.CONN_LISTEN})
    from ray._private import ray_constants
    print("PROBE" + json.dumps({
        "node_ip": ray.util.get_node_ip_address(),
        "nodes": [n["NodeManagerAddress"] for n in ray.nodes()],
        "gcs": ray.get_runtime_context().gcs_address,
        "webui": node.address_info.get("webui_url"),
        "listen": listen,
        "switch_restored": ray_constants.ENABLE_RAY_CLUSTER,
        "env_restored": "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER" not in os.environ,
    }))
    ray.shutdown()
""")


def test_embedded_ray_binds_loopback_only():
    env = dict(os.environ, EFFSFT_RAY_DASHBOARD="1")
    env.pop("RAY_ADDRESS", None)
    env.pop("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", None)
    temp = tempfile.mkdtemp(prefix="effsft-lo-", dir="/tmp")  # AF_UNIX paths: <108 bytes
    try:
        proc = subprocess.run([sys.executable, "-c", PROBE, temp], env=env, capture_output=True,
                              text=True, timeout=120)
    finally:
        shutil.rmtree(temp, ignore_errors=True)
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("PROBE")]
    assert proc.returncode == 0 and line, proc.stderr[-3000:]
    got = json.loads(line[0][len("PROBE"):])
    assert got["node_ip"] == "127.0.0.1"
    assert got["nodes"] == ["127.0.0.1"]
    assert got["gcs"].startswith("127.0.0.1:")
    assert got["webui"] and got["webui"].split(":")[0] in ("127.0.0.1", "localhost")
    assert got["listen"] and set(got["listen"]) <= LOOPBACK, got["listen"]
    # the switch is undone after start-up: a later connect resolves a real address
    assert got["switch_restored"] is True and got["env_restored"] is True


@pytest.mark.usefixtures("ray_session")
def test_session_ray_node_is_loopback():
    import ray

    assert ray.util.get_node_ip_address() == "127.0.0.1"
    assert {n["NodeManagerAddress"] for n in ray.nodes() if n["Alive"]} == {"127.0.0.1"}
    assert "node:127.0.0.1" in ray.cluster_resources()


@pytest.mark.usefixtures("ray_session")
def test_workers_of_the_dashboardless_ray_skip_the_state_api_warning():
    """No dashboard -> no State API: the worker setup hook quiets Ray Train's placement-group
    cleaner, which would otherwise warn once a second through a whole training run."""
    import logging

    import ray

    @ray.remote(num_cpus=0.1)
    def level():
        return logging.getLogger(
            "ray.train.v2._internal.execution.controller.placement_group_cleaner").getEffectiveLevel()

    assert ray.get(level.remote()) == logging.ERROR
