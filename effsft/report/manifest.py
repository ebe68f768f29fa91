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

from effsft.runtime import atomic_write_json

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


def _file_digest(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def list_files(root: str | os.PathLike) -> list[Path]:
    """Every regular file under ``root`` (or ``root`` itself), sorted, hidden files skipped."""
    root = Path(root)
    if root.is_file():
        return [root]
    return sorted(p for p in root.rglob("*") if p.is_file()
                  and not any(part.startswith((".", "_")) for part in p.relative_to(root).parts))


def fingerprint(paths: str | os.PathLike | Iterable[str | os.PathLike], options: Any = None) -> str:
    """Hash of (relative path, size, BLAKE2b of content) of every input file, plus reader
    options: one changed byte anywhere changes it."""
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    h = hashlib.blake2b(digest_size=16)
    for root in paths:
        root = Path(root)
        for f in list_files(root):
            rel = f.name if root.is_file() else str(f.relative_to(root))
            h.update(f"{rel}\0{f.stat().st_size}\0{_file_digest(f)}\n".encode())
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
