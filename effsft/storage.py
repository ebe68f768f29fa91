"""Where inputs live: local (or mounted) paths, and pyarrow filesystem URIs.

A URI (``s3://bucket/corpus``, ``gs://...``, ``hdfs://...``, ``file://...``) is opened with
``pyarrow.fs.FileSystem.from_uri``, the resolver Ray Data uses. S3/GCS options ride in the query
string (``s3://bucket/corpus?region=eu-west-1``; MinIO: ``?endpoint_override=host:9000&scheme=http``);
credentials come from each node's environment (IAM role / workload identity, ``AWS_*``,
``GOOGLE_APPLICATION_CREDENTIALS``), never from the URI. Corpora are read from URIs; models and
outputs need a POSIX path (HF loading, atomic rename).
"""
from __future__ import annotations

import os

import pyarrow as pa
import pyarrow.fs as pafs


class StoragePathError(ValueError):
    """An input path that cannot be opened, or does not exist."""


def is_uri(path: str | os.PathLike) -> bool:
    return "://" in str(path)


def locate(path: str | os.PathLike) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path inside it) of a local path or a URI; local paths are made real."""
    if is_uri(path):
        try:
            return pafs.FileSystem.from_uri(str(path))
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError, OSError) as e:
            raise StoragePathError(f"cannot open {path}: {e}") from e
    return pafs.LocalFileSystem(), os.path.realpath(path)


def display_path(fs: pafs.FileSystem, path: str) -> str:
    """A file's name in rejects and manifests: local paths as they are, remote ones as
    ``scheme://bucket/key`` (without the URI's query options)."""
    return path if fs.type_name == "local" else f"{fs.type_name}://{path}"


def exists(fs: pafs.FileSystem, path: str) -> bool:
    return fs.get_file_info(path).type != pafs.FileType.NotFound


def check_exists(path: str | os.PathLike) -> None:
    """Raise :class:`StoragePathError` unless ``path`` (local or URI) exists."""
    fs, inner = locate(path)
    try:
        found = exists(fs, inner)
    except OSError as e:  # e.g. no credentials, bucket in another region
        raise StoragePathError(f"cannot read {path}: {e}") from e
    if not found:
        raise StoragePathError(f"path does not exist: {path}")


def list_files(fs: pafs.FileSystem, root: str) -> list[str]:
    """``root`` itself if it is a file, else every file below it, sorted; names starting with
    ``.`` or ``_`` (in any directory below ``root``) are skipped."""
    if fs.get_file_info(root).type == pafs.FileType.File:
        return [root]
    found = fs.get_file_info(pafs.FileSelector(root, recursive=True))
    return sorted(f.path for f in found if f.type == pafs.FileType.File
                  and not any(part.startswith((".", "_"))
                              for part in f.path[len(root):].lstrip("/").split("/")))
