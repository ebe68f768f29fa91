"""``rejects.parquet``: every input row a job could not use, with where it came from and why.

One writer for every job that reads a corpus (prepare/select, sft, grpo), so the file always
has :data:`effsft.corpus.schema.REJECTS_SCHEMA` and appears atomically (temp file + rename):

    with RejectsWriter(out_dir / "rejects.parquet") as rejects:
        rejects.write(src_file=..., src_row=..., reason=..., detail=..., id=..., raw=...)
    rejects.rows  # how many were written (the caller checks rows_in = rows_ok + rows)
"""
from __future__ import annotations

import collections
import os
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from effsft.corpus.schema import REJECTS_SCHEMA


def split_source(sources) -> tuple[list[str], list[int]]:
    """Canonical ``source`` values (``"<file>:<row>"``) -> (src_file, src_row) columns."""
    files, rows = [], []
    for s in sources:
        f, _, r = (s or "").rpartition(":")
        ok = bool(f) and r.isdigit()
        files.append(f if ok else (s or ""))
        rows.append(int(r) if ok else -1)
    return files, rows


class RejectsWriter:
    """Stream reject rows into ``path`` (zstd Parquet); the file appears on a clean exit."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self._tmp = self.path.with_name(f".{self.path.name}.tmp")
        self._writer = pq.ParquetWriter(self._tmp, REJECTS_SCHEMA, compression="zstd")
        self.rows = 0
        self.by_reason: collections.Counter = collections.Counter()

    def write(self, *, src_file, src_row, reason, detail, id=None, raw=None) -> None:
        """Append columns of equal length (lists or Arrow arrays); ``id``/``raw`` may be None."""
        n = len(reason)
        if n == 0:
            return
        cols = {"src_file": src_file, "src_row": src_row, "reason": reason, "detail": detail,
                "id": pa.nulls(n, pa.string()) if id is None else id,
                "raw": pa.nulls(n, pa.binary()) if raw is None else raw}
        table = pa.table(cols, schema=REJECTS_SCHEMA)
        self._writer.write_table(table)
        self.rows += n
        self.by_reason.update(table.column("reason").to_pylist())

    def close(self) -> None:
        self._writer.close()
        os.replace(self._tmp, self.path)

    def __enter__(self) -> "RejectsWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self._writer.close()
            self._tmp.unlink(missing_ok=True)


def unreadable_files(path: str | os.PathLike) -> list[dict]:
    """The ``unreadable_file`` entries of a written rejects file, for a manifest:
    ``[{file, rows_read, error}]``."""
    import pyarrow.compute as pc

    from effsft.corpus.prepare import UNREADABLE, unreadable_entry

    p = Path(path)
    if not p.exists():
        return []
    t = pq.read_table(p, columns=["src_file", "src_row", "reason", "detail"])
    t = t.filter(pc.equal(t["reason"], UNREADABLE))
    return [unreadable_entry(r["src_file"], r["src_row"], r["detail"] or "") for r in t.to_pylist()]
