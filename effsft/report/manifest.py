"""Self-describing outputs: ``manifest.json`` (job, resolved config, input fingerprints,
counts, metrics, timings, package versions) and input fingerprints."""
from __future__ import annotations

import hashlib
import os
import platform
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path
from typing import Any, Iterable

import pyarrow.fs as pafs

from effsft.runtime import atomic_write_json
from effsft.storage import list_files, locate

_PACKAGES = ("effsft", "torch", "transformers", "ray", "deepspeed", "datasets", "pyarrow",
             "numpy", "faiss-cpu", "faiss-gpu", "tokenizers", "peft", "pydantic")


def package_versions() -> dict[str, str]:
    out = {}
    for name in _PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    out["python"] = platform.python_version()
    return out


def git_sha() -> str | None:
    try:
        here = Path(__file__).resolve().parent
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True,
                              text=True, timeout=5).stdout.strip() or None
    except Exception:
        return None


def _file_digest(fs: pafs.FileSystem, path: str, chunk: int = 1 << 20) -> str:
    h = hashlib.blake2b(digest_size=16)
    with fs.open_input_stream(path) as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def fingerprint(paths: str | os.PathLike | Iterable[str | os.PathLike], options: Any = None) -> str:
    """Hash of (relative path, size, content) of every input file, plus reader options.

    Local files are hashed in full (BLAKE2b): one changed byte anywhere changes it. Files
    behind a URI (``s3://``, ``gs://`` ...) count by size and modification time, so that a
    fingerprint does not download the corpus a second time.
    """
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    h = hashlib.blake2b(digest_size=16)
    for root in paths:
        fs, inner = locate(root)
        files = list_files(fs, inner)
        for f in files:
            rel = f.rsplit("/", 1)[-1] if files == [inner] else f[len(inner):].lstrip("/")
            info = fs.get_file_info(f)
            content = _file_digest(fs, f) if fs.type_name == "local" else info.mtime_ns
            h.update(f"{rel}\0{info.size}\0{content}\n".encode())
    h.update(repr(options).encode())
    return h.hexdigest()


def write_manifest(out_dir: str | os.PathLike, job: str, config: dict, *, inputs: dict | None = None,
                   counts: dict | None = None, metrics: dict | None = None,
                   timings: dict | None = None, extra: dict | None = None) -> dict:
    manifest = {
        "job": job,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "config": config,
        "inputs": inputs or {},
        "counts": counts or {},
        "metrics": metrics or {},
        "timings_s": timings or {},
        "versions": package_versions(),
        "git_sha": git_sha(),
        "host": {"platform": platform.platform(), "cpus": os.cpu_count(), "argv": sys.argv},
    }
    if extra:
        manifest.update(extra)
    atomic_write_json(Path(out_dir) / "manifest.json", manifest)
    return manifest
