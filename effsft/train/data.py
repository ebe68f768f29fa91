"""Training data: any corpus -> tokenised Ray Dataset (driver), and the per-worker stream of
collated micro-batches (inside ``train_loop_per_worker``).

Rows that cannot be trained on are counted by reason and reported, never silently dropped:
``rejected`` (the normaliser rejected the raw row), ``too_long`` (the final response does not
fit ``tokenize.max_len``), ``no_response`` (no token carries a label).
"""
from __future__ import annotations

import logging
from typing import Iterator

import numpy as np
import pyarrow as pa

from effsft.corpus.rejects import RejectsWriter, split_source
from effsft.corpus.tokenize import Encoded, collate, encode_chat

log = logging.getLogger("effsft.train")

STATUS = ("ok", "rejected", "too_long", "no_response")
_TOKENIZERS: dict = {}  # per Ray worker process: one tokenizer load per path


def _tokenizer(path: str, trust_remote_code: bool, template: str):
    key = (path, trust_remote_code, template)
    if key not in _TOKENIZERS:
        from effsft.models.loading import load_tokenizer

        _TOKENIZERS[key] = load_tokenizer(path, trust_remote_code=trust_remote_code, template=template)
    return _TOKENIZERS[key]


def tokenize_table(batch: pa.Table, tokenizer_path: str, max_len: int, train_on: str,
                   truncation: str, trust_remote_code: bool = False, template: str = "auto") -> pa.Table:
    """Ray Data ``map_batches`` fn: canonical (or normalised) rows -> token columns + status.

    Rows that are not ``ok`` keep what ``rejects.parquet`` (:data:`~effsft.corpus.schema.REJECTS_SCHEMA`) needs
    (where the row came from, why, and the raw bytes of a row the normaliser rejected).
    """
    tok = _tokenizer(tokenizer_path, trust_remote_code, template)
    n = batch.num_rows
    names = batch.column_names
    rejected = batch.column("reject_reason").to_pylist() if "reject_reason" in names else [None] * n
    rejected_detail = batch.column("reject_detail").to_pylist() if "reject_detail" in names else [None] * n
    if "src_file" in names:  # straight from the normalising readers
        src_file, src_row = batch.column("src_file").to_pylist(), batch.column("src_row").to_pylist()
    else:  # prepared shards / a selection: "<file>:<row>"
        src_file, src_row = split_source(batch.column("source").to_pylist())
    ids, labels, status, truncated, n_resp, reasons, details = [], [], [], [], [], [], []
    for msgs, why, why_detail in zip(batch.column("messages").to_pylist(), rejected, rejected_detail):
        e = None if why is not None else encode_chat(tok, msgs, max_len, train_on, truncation)
        st = ("rejected" if e is None else "too_long" if e.too_long
              else "no_response" if e.n_response == 0 else "ok")
        keep = st == "ok"
        ids.append(e.input_ids if keep else [])
        labels.append(e.labels if keep else [])
        status.append(st)
        truncated.append(bool(e is not None and e.truncated))
        n_resp.append(e.n_response if keep else 0)
        reasons.append(None if keep else why if st == "rejected" else st)
        details.append(None if keep else {
            "rejected": why_detail,
            "too_long": f"the final response does not fit tokenize.max_len={max_len} "
                        f"(tokenize.truncation={truncation})",
            "no_response": f"no token carries a label (tokenize.train_on={train_on})",
        }[st])
    not_ok = [st != "ok" for st in status]
    raw = batch.column("raw").to_pylist() if "raw" in names else [None] * n
    return pa.table({
        "input_ids": pa.array(ids, pa.list_(pa.int32())),
        "labels": pa.array(labels, pa.list_(pa.int32())),
        "n_response": pa.array(n_resp, pa.int32()),
        "truncated": pa.array(truncated, pa.bool_()),
        "status": pa.array(status, pa.string()),
        "src_file": pa.array([f if bad else None for f, bad in zip(src_file, not_ok)], pa.string()),
        "src_row": pa.array([r if bad else None for r, bad in zip(src_row, not_ok)], pa.int64()),
        "reason": pa.array(reasons, pa.string()),
        "detail": pa.array(details, pa.string()),
        "id": pa.array([i if bad else None for i, bad in zip(batch.column("id").to_pylist(), not_ok)],
                       pa.string()),
        "raw": pa.array([r if bad and st == "rejected" else None for r, bad, st in zip(raw, not_ok, status)],
                        pa.binary()),
    })


def source_dataset(path: str, normalize_options, split: str = "train"):
    """Ray Dataset with a ``messages`` column from any corpus path.

    A prepared corpus (``effsft prepare``: ``data/shard-*.parquet``) or a selection
    (``effsft select``: ``selected.parquet``) is read directly; anything else goes through
    the normalising readers (bad rows carry ``reject_reason``).
    """
    import fnmatch

    import pyarrow.fs as pafs
    import ray.data

    from effsft.corpus.prepare import SHARD_GLOB, normalised_dataset
    from effsft.storage import list_files, locate

    fs, root = locate(path)  # a local path or a URI (s3://, gs://, ...)
    if fs.get_file_info(f"{root}/data").type == pafs.FileType.Directory:
        shards = [f for f in list_files(fs, f"{root}/data")
                  if fnmatch.fnmatch(f.rsplit("/", 1)[-1], SHARD_GLOB)]
        if shards:
            return ray.data.read_parquet(shards, filesystem=fs)
    if fs.get_file_info(f"{root}/selected.parquet").type == pafs.FileType.File:
        return ray.data.read_parquet([f"{root}/selected.parquet"], filesystem=fs)
    return normalised_dataset(str(path), normalize_options, split=split)


def _keep_ok(t: pa.Table) -> pa.Table:
    import pyarrow.compute as pc

    return t.filter(pc.equal(t["status"], "ok")).select(["input_ids", "labels", "n_response"])


def _not_ok(t: pa.Table) -> pa.Table:
    import pyarrow.compute as pc

    return t.filter(pc.not_equal(t["status"], "ok")).select(
        ["src_file", "src_row", "reason", "detail", "id", "raw"])


def tokenised_dataset(path: str, normalize_options, tokenizer_path: str, max_len: int,
                      train_on: str = "all", truncation: str = "left", split: str = "train",
                      trust_remote_code: bool = False, num_cpus: float = 0.5,
                      rejects_path=None, template: str = "auto"):
    """Tokenise a corpus on Ray Data; return ``(dataset of ok rows, counts)``.

    ``counts`` has ``rows_in``, one entry per status, ``truncated`` (prompt cut from the left,
    row kept) and ``response_tokens``. Both datasets are materialised: the trainer splits the
    first across workers and the counts size the run. Every row that is not trained on goes to
    ``rejects_path`` (when given) with its source and reason (the normaliser's reason, or
    ``too_long`` / ``no_response``); ``rows_in = rows_ok + rows written`` is checked.
    """
    ds = source_dataset(path, normalize_options, split).map_batches(
        tokenize_table, batch_format="pyarrow", num_cpus=num_cpus, batch_size=256,
        fn_kwargs=dict(tokenizer_path=str(tokenizer_path), max_len=max_len, train_on=train_on,
                       truncation=truncation, trust_remote_code=trust_remote_code,
                       template=template)).materialize()
    status = {s: 0 for s in STATUS}
    truncated = 0
    for b in ds.select_columns(["status", "truncated"]).iter_batches(batch_format="pyarrow",
                                                                      batch_size=None):
        for s, n in zip(*np.unique(b["status"].to_numpy(zero_copy_only=False), return_counts=True)):
            status[str(s)] += int(n)
        truncated += int(np.asarray(b["truncated"]).sum())
    ok = ds.map_batches(_keep_ok, batch_format="pyarrow", num_cpus=num_cpus).materialize()
    counts = {"rows_in": sum(status.values()), **{f"rows_{k}": v for k, v in status.items()},
              "rows_truncated": truncated,
              "response_tokens": int(ok.sum("n_response")) if status["ok"] else 0}
    dropped = counts["rows_in"] - counts["rows_ok"]
    if rejects_path is not None:
        with RejectsWriter(rejects_path) as rejects:
            if dropped:
                for b in ds.map_batches(_not_ok, batch_format="pyarrow", num_cpus=num_cpus).iter_batches(
                        batch_format="pyarrow", batch_size=None):
                    rejects.write(src_file=b["src_file"], src_row=b["src_row"], reason=b["reason"],
                                  detail=b["detail"], id=b["id"], raw=b["raw"])
        if rejects.rows != dropped:
            raise RuntimeError(f"rows lost: {counts['rows_in']} in, {counts['rows_ok']} ok, "
                               f"{rejects.rows} written to {rejects_path}")
    if dropped:
        log.warning("train data: %d of %d rows not trainable (rejected %d, too_long %d, "
                    "no_response %d)%s", dropped, counts["rows_in"], status["rejected"],
                    status["too_long"], status["no_response"],
                    f"; listed in {rejects_path}" if rejects_path is not None else "")
    return ok, counts


def steps_per_epoch(rows: int, num_workers: int, micro_batch_size: int, grad_accum: int) -> int:
    """Optimizer steps in one pass over ``rows`` split equally across workers (the trainer's
    ``streaming_split(equal=True)`` gives each worker ``rows // num_workers`` rows; partial
    micro-batches are dropped so every rank runs the same number of steps)."""
    return (rows // num_workers // micro_batch_size) // grad_accum


def _encoded(ids: np.ndarray, labels: np.ndarray) -> Encoded:
    return Encoded(ids.tolist(), labels.tolist(), 0, int((labels != -100).sum()))


def micro_batches(shard, micro_batch_size: int, pad_id: int, *, start_epoch: int = 0,
                  skip: int = 0, seed: int = 0, shuffle_buffer: int = 0
                  ) -> Iterator[tuple[int, int, dict]]:
    """Endless stream of ``(epoch, index_in_epoch, batch)`` from a worker's dataset shard.

    ``batch`` is :func:`effsft.corpus.tokenize.collate`'s dict of ``[B, T]`` tensors. Resuming
    at ``(start_epoch, skip)`` re-reads that epoch and discards its first ``skip`` micro-batches
    (the data position saved in a checkpoint).
    """
    epoch = start_epoch
    while True:
        n = 0
        it = shard.iter_batches(batch_size=micro_batch_size, drop_last=True, batch_format="numpy",
                                local_shuffle_buffer_size=shuffle_buffer or None,
                                local_shuffle_seed=(seed + epoch) if shuffle_buffer else None)
        for b in it:
            if n >= skip:
                enc = [_encoded(i, y) for i, y in zip(b["input_ids"], b["labels"])]
                yield epoch, n, collate(enc, pad_id)
            n += 1
        if n == 0:
            raise ValueError(f"a worker's data shard has fewer than micro_batch_size="
                             f"{micro_batch_size} rows: use a larger corpus or fewer workers")
        epoch, skip = epoch + 1, 0
