"""Read -> normalise (+rejects) -> fixed-size canonical Parquet shards.

Ray Data reads and normalises in parallel; the driver only streams the normalised blocks
(in read order, so the result is deterministic) into fixed ``shard_rows`` shards and the
rejects file, dropping later duplicates of an id. The invariant
``rows_in = rows_ok + rows_rejected`` is checked before anything is declared done.
"""
from __future__ import annotations

import collections
import logging
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from effsft.corpus.normalize import NormalizeOptions, normalize_table
from effsft.corpus.rejects import RejectsWriter
from effsft.corpus.schema import CANONICAL_SCHEMA

SHARD_GLOB = "shard-*.parquet"
log = logging.getLogger("effsft.corpus")


class AccountingError(RuntimeError):
    """rows_in != rows_ok + rows_rejected: a row was lost or duplicated."""


@dataclass
class CorpusCounts:
    rows_in: int = 0
    rows_ok: int = 0
    rows_rejected: int = 0
    rejected_by_reason: dict = field(default_factory=dict)
    formats: dict = field(default_factory=dict)
    duplicate_ids: int = 0
    shards: int = 0
    unreadable_files: list = field(default_factory=list)  # [{file, rows_read, error}]

    def check(self) -> None:
        if self.rows_in != self.rows_ok + self.rows_rejected:
            raise AccountingError(f"rows_in={self.rows_in} != rows_ok={self.rows_ok} + "
                                  f"rows_rejected={self.rows_rejected}")
        if sum(self.rejected_by_reason.values()) != self.rows_rejected:
            raise AccountingError("reject reasons do not add up to rows_rejected")

    def as_dict(self) -> dict:
        return asdict(self)


class _ShardWriter:
    """Cuts a stream of Arrow tables into fixed-size Parquet shards (temp name + rename)."""

    def __init__(self, out: Path, shard_rows: int):
        self.out, self.shard_rows = out, shard_rows
        self.pending: list[pa.Table] = []
        self.n_pending = 0
        self.n_shards = 0

    def add(self, table: pa.Table) -> None:
        self.pending.append(table)
        self.n_pending += table.num_rows
        while self.n_pending >= self.shard_rows:
            self._flush(self.shard_rows)

    def _flush(self, n: int) -> None:
        table = pa.concat_tables(self.pending)
        head, tail = table.slice(0, n), table.slice(n)
        path = self.out / f"shard-{self.n_shards:05d}.parquet"
        tmp = path.with_name("." + path.name + ".tmp")
        pq.write_table(head, tmp, compression="zstd")
        os.replace(tmp, path)
        self.n_shards += 1
        self.pending = [tail] if tail.num_rows else []
        self.n_pending = tail.num_rows

    def close(self) -> int:
        if self.n_pending:
            self._flush(self.n_pending)
        return self.n_shards


def normalised_dataset(input_path: str, opts: NormalizeOptions, split: str = "train",
                       num_cpus: float = 0.5, batch_size: int = 4096):
    """Ray Dataset of NORMALISED_SCHEMA rows (canonical fields or reject info), 1:1 with input."""
    from effsft.corpus.readers import read_raw

    return read_raw(input_path, split=split, num_cpus=num_cpus,
                    on_unreadable=opts.on_unreadable).map_batches(
        normalize_table, fn_kwargs={"opts": opts}, batch_format="pyarrow",
        batch_size=batch_size, num_cpus=num_cpus, zero_copy_batch=True)


def _good_rows(t: pa.Table) -> pa.Table:
    return t.filter(pc.is_null(t["reject_reason"]))


UNREADABLE = "unreadable_file"


def _good_or_unreadable(t: pa.Table) -> pa.Table:
    return t.filter(pc.or_kleene(pc.is_null(t["reject_reason"]), pc.equal(t["reject_reason"], UNREADABLE)))


def unreadable_entry(src_file: str, src_row: int, detail: str) -> dict:
    """A manifest's entry for an unreadable file (``detail`` is the normaliser's reject detail)."""
    return {"file": src_file, "rows_read": int(src_row),
            "error": detail[len(src_file) + 2:] if detail.startswith(f"{src_file}: ") else detail}


def good_rows(path: str, opts: NormalizeOptions, limit: int, split: str = "train",
              columns: tuple = ("id", "messages")) -> tuple[list[dict], list[dict]]:
    """The first ``limit`` normalised rows of any corpus and the files found unreadable on the
    way (``[{file, rows_read, error}]``; the caller records them), through the same readers and
    normaliser as every job; other rejects are skipped. Reading stops once ``limit`` rows are in."""
    ds = normalised_dataset(path, opts, split=split).map_batches(
        _good_or_unreadable, batch_format="pyarrow", num_cpus=0.25)
    rows: list[dict] = []
    unreadable: list[dict] = []
    for b in ds.iter_batches(batch_format="pyarrow", batch_size=None):
        bad = pc.fill_null(pc.equal(b["reject_reason"], UNREADABLE), False)
        for r in b.filter(bad).select(["src_file", "src_row", "reject_detail"]).to_pylist():
            unreadable.append(unreadable_entry(r["src_file"], r["src_row"], r["reject_detail"]))
        if len(rows) < limit:
            rows += b.filter(pc.invert(bad)).select(list(columns)).slice(0, limit - len(rows)).to_pylist()
        if len(rows) >= limit:
            break
    return rows, unreadable


def first_good_rows(spec, limit: int) -> tuple[list[dict], list[dict]]:
    """The first ``limit`` normalised rows (``id``, ``messages``) of a CorpusSpec and the
    unreadable files met (see :func:`good_rows`)."""
    return good_rows(spec.path, NormalizeOptions.of(spec), limit, split=spec.split)


def prepare_corpus(input_path: str, out_dir: str | os.PathLike, *, opts: NormalizeOptions = NormalizeOptions(),
                   shard_rows: int = 50_000, split: str = "train", num_cpus: float = 0.5,
                   progress: bool = True) -> CorpusCounts:
    """Write ``out_dir/data/shard-NNNNN.parquet`` (canonical) and ``out_dir/rejects.parquet``."""
    import ray.data

    out = Path(out_dir)
    data_dir = out / "data"
    data_dir.mkdir(parents=True, exist_ok=True)
    for stale in data_dir.glob("*.parquet"):  # a re-run rewrites the shards from scratch
        stale.unlink()
    ctx = ray.data.DataContext.get_current()
    prev_order = ctx.execution_options.preserve_order
    ctx.execution_options.preserve_order = True  # deterministic shard contents
    counts = CorpusCounts()
    formats: collections.Counter = collections.Counter()
    seen: set[bytes] = set()
    shards = _ShardWriter(data_dir, shard_rows)
    canon_names = [f.name for f in CANONICAL_SCHEMA]
    try:
        with RejectsWriter(out / "rejects.parquet") as rejects:
            ds = normalised_dataset(input_path, opts, split=split, num_cpus=num_cpus)
            for batch in ds.iter_batches(batch_format="pyarrow", batch_size=None):
                counts.rows_in += batch.num_rows
                bad = pc.is_valid(batch.column("reject_reason"))
                good = batch.filter(pc.invert(bad))
                # Drop later duplicates of an id (first occurrence in read order wins).
                ids = good.column("id").to_pylist()
                keep = []
                for rid in ids:
                    key = rid.encode()
                    keep.append(key not in seen)
                    seen.add(key)
                keep_arr = pa.array(keep, pa.bool_())
                dups = good.filter(pc.invert(keep_arr))
                good = good.filter(keep_arr)
                for meta in good.column("meta").to_pylist():
                    # cheap format tally without parsing the whole JSON
                    i = meta.rfind('"format": "')
                    formats[meta[i + 11: meta.index('"', i + 11)] if i >= 0 else "?"] += 1
                shards.add(good.select(canon_names).cast(CANONICAL_SCHEMA))
                counts.rows_ok += good.num_rows
                rej = batch.filter(bad)
                for r in rej.filter(pc.equal(rej["reject_reason"], UNREADABLE)).select(
                        ["src_file", "src_row", "reject_detail"]).to_pylist():
                    counts.unreadable_files.append(
                        unreadable_entry(r["src_file"], r["src_row"], r["reject_detail"]))
                rejects.write(src_file=rej.column("src_file"), src_row=rej.column("src_row"),
                              reason=rej.column("reject_reason"), detail=rej.column("reject_detail"),
                              raw=rej.column("raw"))
                rejects.write(src_file=dups.column("src_file"), src_row=dups.column("src_row"),
                              reason=["duplicate_id"] * dups.num_rows,
                              detail=["id seen earlier"] * dups.num_rows, id=dups.column("id"))
                counts.duplicate_ids += dups.num_rows
            counts.shards = shards.close()
    finally:
        ctx.execution_options.preserve_order = prev_order
    counts.rows_rejected = rejects.rows
    counts.rejected_by_reason = dict(sorted(rejects.by_reason.items()))
    counts.formats = dict(sorted(formats.items()))
    counts.check()
    if counts.unreadable_files:
        log.warning("unreadable corpus files (kept what could be read; listed in rejects.parquet "
                    "and the manifest): %s", [u["file"] for u in counts.unreadable_files])
    return counts


def shard_paths(corpus_dir: str | os.PathLike) -> list[Path]:
    return sorted((Path(corpus_dir) / "data").glob(SHARD_GLOB))


def read_prepared(corpus_dir: str | os.PathLike):
    """Ray Dataset of the canonical shards of a prepared corpus."""
    import ray.data

    paths = [str(p) for p in shard_paths(corpus_dir)]
    if not paths:
        raise FileNotFoundError(f"no shards under {corpus_dir}/data")
    return ray.data.read_parquet(paths)
