"""The prepared corpus: stage 1 (``prepare``, canonical shards cached by the input's
fingerprint) and the readers of ids, strata, rows and ZIP bytes over those shards."""
from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from effsft.config import to_dict
from effsft.runtime import OutputDir, timed
from effsft.select.config import SelectConfig

log = logging.getLogger("effsft.select")


# ---------------------------------------------------------------------------------- stage 1
def prepare(cfg: SelectConfig, cache: Path, timings: dict) -> tuple[Path, dict, str]:
    """Canonical shards of the input, cached by the input fingerprint (reused across runs)."""
    from effsft.corpus.normalize import NormalizeOptions
    from effsft.corpus.prepare import prepare_corpus
    from effsft.report.manifest import fingerprint, write_manifest

    opts = NormalizeOptions.of(cfg.input)
    with timed(timings, "fingerprint"):
        fp = fingerprint(cfg.input.path, options=(opts, cfg.input.split, cfg.input.shard_rows))
    out = OutputDir(cache / f"corpus-{fp[:16]}", overwrite=True, wait=True)  # shared cache: wait
    if not out.done:
        out.claim()  # another job preparing the same corpus: wait for it, then reuse its result
    if out.done:
        out.release()
    else:
        work = out.open()
        with timed(timings, "prepare"):
            counts = prepare_corpus(cfg.input.path, work, opts=opts, shard_rows=cfg.input.shard_rows,
                                    split=cfg.input.split)
        write_manifest(work, "prepare", to_dict(cfg.input), counts=counts.as_dict(),
                       inputs={"corpus": {"path": cfg.input.path, "fingerprint": fp}})
        out.commit()
    counts = json.loads((out.final / "manifest.json").read_text())["counts"]
    return out.final, counts, fp


# ---------------------------------------------------------------------------------- readers
def read_ids(shards: list[Path]) -> list[pa.Array]:
    return [pq.read_table(p, columns=["id"]).column("id").combine_chunks() for p in shards]


def read_strata(shards: list[Path], key: str) -> np.ndarray:
    vals = []
    for p in shards:
        vals += [meta_value(m, key) for m in pq.read_table(p, columns=["meta"]).column("meta").to_pylist()]
    return np.asarray(vals)


def meta_value(meta: str | None, key: str) -> str:
    try:
        return str(json.loads(meta or "{}").get(key))
    except json.JSONDecodeError:
        return "None"


def read_rows(shards: list[Path], idx: np.ndarray) -> list[dict]:
    """Rows (``messages``, ``meta``) at sorted global positions ``idx`` of the shards."""
    out, start = [], 0
    for p in shards:
        n = pq.read_metadata(p).num_rows
        local = idx[(idx >= start) & (idx < start + n)] - start
        if len(local):
            out += pq.read_table(p, columns=["messages", "meta"]).take(pa.array(local)).to_pylist()
        start += n
    return out


def read_target(path: str, limit: int) -> list[dict]:
    """The first ``limit`` usable rows of a target corpus, through the normalising readers."""
    from effsft.corpus.normalize import NormalizeOptions
    from effsft.corpus.prepare import good_rows

    rows, unreadable = good_rows(path, NormalizeOptions(), limit, columns=("messages", "meta"))
    if unreadable:
        log.warning("less.target: unreadable files in %s (skipped): %s", path, [u["file"] for u in unreadable])
    return rows


def read_zip_rows(shards: list[Path], ser: str) -> list[bytes]:
    from effsft.select.zip import serialize_rows

    out: list[bytes] = []
    for p in shards:
        out += serialize_rows(pq.read_table(p, columns=["messages"]).column("messages").to_pylist(), ser)
    return out
