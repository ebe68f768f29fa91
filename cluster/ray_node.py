"""``ray start`` for one node of a loopback-only cluster on one machine (local_cluster.sh).

Usage: ``python cluster/ray_node.py start [ray start options]`` (the options of ``ray start``).

Why a launcher: Ray's CLI turns 127.0.0.1 into the machine's routable IP, both for
``--node-ip-address`` and for a worker's ``--address``
(``ray._private.services.resolve_ip_for_localhost``), and then gRPC servers listen on every
interface. Ray's single-machine switch ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`` keeps loopback,
but the CLI then refuses to start a worker node. So this launcher

* keeps the loopback address as given (one function replaced, in this process only), and
* waits longer than Ray's fixed 30 s for the new raylet to register (overloaded machines), and
* allows worker nodes in this process, while every process the node spawns (raylet, agents,
  workers, job drivers) runs with the switch off, so that a driver's ``ray.init(address=
  "127.0.0.1:PORT")`` connects to the loopback GCS instead of the routable IP.

Nothing here is needed for a real cluster: there, nodes use their own routable addresses.
"""
from __future__ import annotations

import os
import sys
import time

SWITCH = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"
LOOPBACK = ("127.0.0.1", "localhost")


def _patient(get_node):
    """``ray start`` gives a new raylet a fixed 30 s to appear in the GCS, then tears the node
    down; on an overloaded machine (many engineers, 2 cores) registration took longer. Retry
    the lookup up to ``EFFSFT_NODE_REGISTER_TIMEOUT`` seconds (default 180)."""
    limit = float(os.environ.get("EFFSFT_NODE_REGISTER_TIMEOUT", "180"))

    def patient_get_node(*args, **kwargs):
        deadline = time.monotonic() + limit
        while True:
            try:
                return get_node(*args, **kwargs)
            except RuntimeError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(1.0)

    return patient_get_node


def main() -> int:
    from ray._private import ray_constants, services

    original = services.resolve_ip_for_localhost

    def keep_loopback(host: str) -> str:
        return "127.0.0.1" if host in LOOPBACK else original(host)

    services.resolve_ip_for_localhost = keep_loopback
    services.get_node = _patient(services.get_node)
    ray_constants.ENABLE_RAY_CLUSTER = True   # this CLI may start a worker node (--address)
    os.environ[SWITCH] = "0"                  # inherited by everything the node starts
    from ray.scripts.scripts import main as ray_main

    return ray_main()


if __name__ == "__main__":
    sys.exit(main())
