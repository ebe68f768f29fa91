"""Score store: per-shard, resumable, reusable scores.

Layout (under the select cache dir)::

    scores/<scorer>-<key>/spec.json                 what was scored, with which model/params
    scores/<scorer>-<key>/shard-00003.parquet       id, status, n_tokens, score_* / emb
    scores/<scorer>-<key>/shard-00003.done.json     rows + checksum, written after the rename

``key`` hashes the scorer, its params, the model fingerprint, the template, max_len and the
corpus fingerprint, so a new budget or selection method reuses every finished shard and a
crashed job resumes from the shards that have their ``.done.json``.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Iterable

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from effsft.runtime import atomic_write_json


def scorer_key(name: str, spec: dict) -> str:
    blob = json.dumps({"scorer": name, **spec}, sort_keys=True, default=str)
    return f"{name}-{hashlib.blake2b(blob.encode(), digest_size=8).hexdigest()}"


class ScoreStore:
    def __init__(self, root: str | os.PathLike, name: str, spec: dict):
        self.key = scorer_key(name, spec)
        self.dir = Path(root) / "scores" / self.key
        self.dir.mkdir(parents=True, exist_ok=True)
        self.spec = {"scorer": name, **spec}
        spec_path = self.dir / "spec.json"
        if not spec_path.exists():
            atomic_write_json(spec_path, self.spec)

    def path(self, shard: str) -> Path:
        return self.dir / f"{shard}.parquet"

    def done(self, shard: str) -> bool:
        return (self.dir / f"{shard}.done.json").exists()

    def pending(self, shards: Iterable[str]) -> list[str]:
        return [s for s in shards if not self.done(s)]

    def write(self, shard: str, table: pa.Table, expected_rows: int) -> None:
        """Write one shard's scores (temp + rename), then its done marker."""
        if table.num_rows != expected_rows:
            raise RuntimeError(f"{self.key}/{shard}: {table.num_rows} scored rows, expected "
                               f"{expected_rows}")
        ids = table.column("id").to_pylist()
        if len(set(ids)) != len(ids):
            raise RuntimeError(f"{self.key}/{shard}: a row was scored twice")
        path = self.path(shard)
        tmp = path.with_name("." + path.name + ".tmp")
        pq.write_table(table, tmp)
        os.replace(tmp, path)
        checksum = hashlib.blake2b("\n".join(sorted(ids)).encode(), digest_size=8).hexdigest()
        atomic_write_json(self.dir / f"{shard}.done.json", {"rows": expected_rows, "checksum": checksum})

    def read(self, shards: Iterable[str], columns: list[str] | None = None) -> pa.Table:
        tables = [pq.read_table(self.path(s), columns=columns) for s in shards]
        return pa.concat_tables(tables) if tables else pa.table({})


def emb_to_numpy(col: pa.ChunkedArray | pa.Array, dim: int) -> np.ndarray:
    """Decode the ``emb`` binary column (fp16 bytes per row) into an [N, dim] fp32 array."""
    buf = b"".join(col.to_pylist())
    return np.frombuffer(buf, dtype=np.float16).reshape(-1, dim).astype(np.float32)


def numpy_to_emb(x: np.ndarray) -> pa.Array:
    x16 = np.ascontiguousarray(x, dtype=np.float16)
    return pa.array([r.tobytes() for r in x16], pa.binary())
