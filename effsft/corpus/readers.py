"""Streaming corpus readers (Ray Data): JSONL (plain/gz/zst), JSON arrays, Parquet, Arrow
(HF ``datasets`` ``save_to_disk``), a single file or a directory of shards.

Every reader yields RAW_SCHEMA rows (raw JSON bytes + source file + row number) so that the
normaliser sees every row, good or bad, with its location. Nothing is read in the driver.

A file that cannot be read (a Parquet file truncated by an interrupted copy, a bad footer, a
gzip/zstd stream cut mid-way) is never silently skipped: the rows read before the damage are
kept and one marker row (``read_error`` set) stands for the rest, which the normaliser turns
into an ``unreadable_file`` reject naming the file and the reader's error. With
``on_unreadable="fail"`` the reader raises :class:`UnreadableFileError` instead. This is the
one place the rule lives: every job reads corpora through :func:`read_raw` or
:func:`iter_raw_file`.
"""
from __future__ import annotations

import json
import os
from typing import Iterator

import pyarrow as pa
import pyarrow.fs as pafs

from effsft.corpus.schema import RAW_SCHEMA
from effsft.storage import StoragePathError, display_path, exists, list_files, locate

SUFFIXES = (".jsonl", ".jsonl.gz", ".jsonl.zst", ".jsonl.zstd", ".jsonl.bz2", ".json", ".json.gz", ".ndjson",
            ".parquet", ".arrow")
BLOCK_ROWS = 8192


class CorpusPathError(StoragePathError):
    """A corpus path that does not exist or holds no corpus files."""


class UnreadableFileError(RuntimeError):
    """A corpus file that cannot be read, with ``input.on_unreadable: fail``."""


# What a damaged file raises while it is read: pyarrow's IO/format errors (ArrowInvalid is a
# ValueError, ArrowIOError an OSError), a compressed stream cut short (EOFError / OSError).
READ_ERRORS = (OSError, EOFError, ValueError, pa.ArrowException)
ON_UNREADABLE = ("reject", "fail")


def _kind(path: str) -> str:
    name = path.lower()
    if name.endswith(".parquet"):
        return "parquet"
    if name.endswith(".arrow"):
        return "arrow"
    return "jsonl"


def _read_json(fs: pafs.FileSystem, path: str):
    with fs.open_input_stream(path) as f:
        return json.loads(f.read())


def resolve_corpus(path: str | os.PathLike, split: str = "train") -> tuple[pafs.FileSystem, list[str]]:
    """Input path (local or URI) -> (filesystem, sorted data files inside it).

    A file is taken as is. A directory is an HF ``save_to_disk`` dataset (``state.json``), a
    ``DatasetDict`` (``dataset_dict.json``: the ``split`` sub-folder), or a directory of
    shards (every supported file below it; hidden and ``_``-prefixed names skipped).
    """
    fs, root = locate(path)
    return fs, _resolve_in(fs, root, split, str(path))


def _resolve_in(fs: pafs.FileSystem, p: str, split: str, shown: str) -> list[str]:
    info = fs.get_file_info(p)
    if info.type == pafs.FileType.NotFound:
        raise CorpusPathError(f"input path does not exist: {shown}")
    if info.type == pafs.FileType.File:
        return [p]
    if exists(fs, f"{p}/dataset_dict.json"):
        splits = _read_json(fs, f"{p}/dataset_dict.json").get("splits", [])
        if split not in splits:
            raise CorpusPathError(f"{shown}: split {split!r} not in {splits}")
        return _resolve_in(fs, f"{p}/{split}", split, f"{shown}/{split}")
    if exists(fs, f"{p}/state.json"):
        files = [f"{p}/{f['filename']}" for f in _read_json(fs, f"{p}/state.json").get("_data_files", [])]
        if files:
            return files
    files = [f for f in list_files(fs, p) if f.lower().endswith(SUFFIXES)]
    if not files:
        raise CorpusPathError(f"no corpus files ({', '.join(SUFFIXES)}) under {shown}")
    return files


def resolve_files(path: str | os.PathLike, split: str = "train") -> list[str]:
    """Like :func:`resolve_corpus`, as names: local paths, or ``scheme://`` URIs for remote files."""
    fs, files = resolve_corpus(path, split)
    return [display_path(fs, f) for f in files]


def compression_of(path: str) -> str | None:
    name = path.lower()
    for suffix, codec in ((".gz", "gzip"), (".zst", "zstd"), (".zstd", "zstd"), (".bz2", "bz2")):
        if name.endswith(suffix):
            return codec
    return None


def _raw_block(raws: list[bytes], path: str, start: int) -> pa.Table:
    return pa.Table.from_arrays(
        [pa.array(raws, pa.binary()), pa.array([path] * len(raws), pa.string()),
         pa.array(range(start, start + len(raws)), pa.int64()), pa.nulls(len(raws), pa.string())],
        schema=RAW_SCHEMA)


def describe_error(e: BaseException) -> str:
    return f"{type(e).__name__}: {e}"[:500]


def unreadable_block(path: str, row: int, error: str) -> pa.Table:
    """The one marker row of a file that could not be read from ``row`` on."""
    return pa.Table.from_arrays(
        [pa.nulls(1, pa.binary()), pa.array([path], pa.string()), pa.array([row], pa.int64()),
         pa.array([error], pa.string())], schema=RAW_SCHEMA)


def guard_unreadable(blocks: Iterator[pa.Table], name: str, on_unreadable: str = "reject"
                     ) -> Iterator[pa.Table]:
    """Pass ``blocks`` of one file through; a read error ends the file with a marker row
    (``reject``) or :class:`UnreadableFileError` naming the file (``fail``)."""
    if on_unreadable not in ON_UNREADABLE:
        raise ValueError(f"on_unreadable: {on_unreadable!r} is not one of {ON_UNREADABLE}")
    rows = 0
    try:
        for block in blocks:
            rows += block.num_rows
            yield block
    except READ_ERRORS as e:
        msg = describe_error(e)
        if on_unreadable == "fail":
            raise UnreadableFileError(f"unreadable corpus file {name} (after {rows} rows): {msg} "
                                      "(input.on_unreadable=fail)") from None
        yield unreadable_block(name, rows, msg)


def _dump(row: dict) -> bytes:
    return json.dumps(row, ensure_ascii=False, default=str).encode("utf-8", "surrogatepass")


def iter_raw_jsonl(f, path: str) -> Iterator[pa.Table]:
    """JSON Lines; a file whose first non-blank byte is ``[`` is read as one JSON array."""
    head = f.read(1 << 16)
    stripped = head.lstrip()
    if stripped[:1] == b"[":
        data = head + f.read()
        try:
            rows = json.loads(data)
        except (json.JSONDecodeError, UnicodeDecodeError):
            yield _raw_block([data[:1 << 20]], path, 0)  # the whole file is one bad row
            return
        for i in range(0, len(rows), BLOCK_ROWS):
            yield _raw_block([_dump(r) if isinstance(r, dict) else json.dumps(r).encode()
                              for r in rows[i:i + BLOCK_ROWS]], path, i)
        return
    buf, lines, row = head, [], 0
    while True:
        parts = buf.split(b"\n")
        buf = parts.pop()  # incomplete tail
        for line in parts:
            lines.append(line.rstrip(b"\r"))
            if len(lines) == BLOCK_ROWS:
                yield _raw_block(lines, path, row)
                row += len(lines)
                lines = []
        try:
            more = f.read(1 << 20)
        except READ_ERRORS:
            if lines:  # the complete lines before the damage are kept; the error ends the file
                yield _raw_block(lines, path, row)
            raise
        if not more:
            break
        buf += more
    if buf.strip():
        lines.append(buf.rstrip(b"\r"))
    if lines:
        yield _raw_block(lines, path, row)


def _iter_table_batches(batches, path: str) -> Iterator[pa.Table]:
    row = 0
    for batch in batches:
        dumped = [_dump(r) for r in batch.to_pylist()]
        for i in range(0, len(dumped), BLOCK_ROWS):
            yield _raw_block(dumped[i:i + BLOCK_ROWS], path, row + i)
        row += len(dumped)


def iter_raw_parquet(f, path: str) -> Iterator[pa.Table]:
    import pyarrow.parquet as pq

    yield from _iter_table_batches(pq.ParquetFile(f).iter_batches(batch_size=BLOCK_ROWS), path)


def iter_raw_arrow(f, path: str) -> Iterator[pa.Table]:
    # HF datasets write Arrow IPC *stream* files; accept the file format too.
    try:
        reader = pa.ipc.open_stream(f)
    except pa.ArrowInvalid:
        f.seek(0)
        reader = pa.ipc.open_file(f)
        yield from _iter_table_batches((reader.get_batch(i) for i in range(reader.num_record_batches)), path)
        return
    yield from _iter_table_batches(reader, path)


def _open(fs: pafs.FileSystem, path: str):
    if _kind(path) == "jsonl":  # streamed, decompressed on the fly
        return fs.open_input_stream(path, compression=compression_of(path), buffer_size=1 << 20)
    return fs.open_input_file(path)  # Parquet / Arrow: random access


def _read_opened(f, path: str, name: str, on_unreadable: str = "reject") -> Iterator[pa.Table]:
    kind = _kind(path)
    reader = {"jsonl": iter_raw_jsonl, "parquet": iter_raw_parquet, "arrow": iter_raw_arrow}[kind]
    yield from guard_unreadable(reader(f, name), name, on_unreadable)


def iter_raw_file(path: str, on_unreadable: str = "reject") -> Iterator[pa.Table]:
    """Plain-Python reader of one file, local or URI (grpo's prompts, tests and tools)."""
    fs, inner = locate(path)
    name = display_path(fs, inner)
    try:
        f = _open(fs, inner)
    except READ_ERRORS as e:
        yield from guard_unreadable(_raise(e), name, on_unreadable)
        return
    with f:
        yield from _read_opened(f, inner, name, on_unreadable)


def _raise(e: BaseException) -> Iterator[pa.Table]:
    raise e
    yield  # a generator


def _datasource_cls():
    from ray.data.datasource import FileBasedDatasource

    class CorpusDatasource(FileBasedDatasource):
        """Reads any supported corpus file into RAW_SCHEMA blocks, streaming per file."""

        def __init__(self, paths: list[str], filesystem: pafs.FileSystem, on_unreadable: str = "reject",
                     **kw):
            super().__init__(paths, filesystem=filesystem, **kw)
            self._fs = filesystem
            self._on_unreadable = on_unreadable

        def _open_input_source(self, filesystem, path, **open_args):
            return _open(filesystem, path)

        def _read_stream(self, f, path: str) -> Iterator[pa.Table]:
            yield from _read_opened(f, path, display_path(self._fs, path), self._on_unreadable)

    return CorpusDatasource


def read_raw(path: str | os.PathLike, split: str = "train", num_cpus: float = 0.5,
             on_unreadable: str = "reject"):
    """A Ray Dataset of RAW_SCHEMA rows for every row of every file under ``path`` (a local
    path or a pyarrow filesystem URI: the files are read on the Ray workers, never the driver).
    An unreadable file gives a marker row, or fails the read (``on_unreadable``)."""
    import ray.data

    fs, files = resolve_corpus(path, split)
    return ray.data.read_datasource(_datasource_cls()(files, fs, on_unreadable), num_cpus=num_cpus,
                                    override_num_blocks=max(1, len(files)))
