"""Training data: any corpus -> tokenised Ray Dataset (driver), and the per-worker stream of
collated micro-batches (inside ``train_loop_per_worker``).

Rows that cannot be trained on are counted by reason and reported, never silently dropped:
``rejected`` (the normaliser rejected the raw row), ``too_long`` (the final response does not
fit ``tokenize.max_len``), ``no_response`` (no token carries a label).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import pyarrow as pa

from effsft.corpus.rejects import RejectsWriter, split_source
from effsft.corpus.tokenize import IGNORE_INDEX, Encoded, collate, encode_chat

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
        "n_tokens": pa.array([len(x) for x in ids], pa.int32()),
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

    return t.filter(pc.equal(t["status"], "ok")).select(["input_ids", "labels", "n_tokens", "n_response"])


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
    micro-batches are dropped so every rank runs the same number of steps). With packing,
    ``rows`` counts packs and ``micro_batch_size`` packs per micro-batch."""
    return (rows // num_workers // micro_batch_size) // grad_accum


# Rows a worker reads at a time and packs together: large enough that best-fit decreasing
# finds tight packs, small enough that a worker starts training within a second.
PACK_WINDOW_ROWS = 2048


@dataclass(frozen=True)
class Batching:
    """How a worker turns its rows into micro-batches (the ``train.*`` keys, resolved)."""

    micro_batch_size: int                 # rows, or packs when packing
    packing: str = "off"                  # off | bfd | greedy
    pack_len: int = 0                     # tokens per pack (packing only)
    window_rows: int = PACK_WINDOW_ROWS

    @classmethod
    def of(cls, train, max_len: int) -> "Batching":
        """Unpacked, or packing with ``micro_batch_size`` packs (see :meth:`with_plan`)."""
        if train.packing == "off":
            return cls(train.micro_batch_size)
        return cls(train.micro_batch_size, train.packing, train.pack_len or max_len)

    def with_plan(self, train, packs: int, rows: int) -> "Batching":
        """Packs per micro-batch resolved from the plan (``TrainSpec.packs_per_micro_batch``)."""
        from dataclasses import replace

        return replace(self, micro_batch_size=train.packs_per_micro_batch(self.pack_len, packs, rows))


def plan_summary(lengths: np.ndarray, batching: Batching, padded_batch: int) -> dict:
    """The packing plan of a run as the workers will build it (windows of rows in order),
    summarised for the manifest and for sizing the run (``packs``)."""
    from effsft.models.packing import PackPlan, plan_packs, plan_stats

    packs, oversized = [], 0
    w = batching.window_rows
    for s in range(0, len(lengths), w):
        plan = plan_packs(lengths[s:s + w], batching.pack_len, batching.packing)
        packs += [[s + i for i in p] for p in plan.packs]
        oversized += plan.oversized
    return {"strategy": batching.packing, **plan_stats(lengths, PackPlan(packs, batching.pack_len, oversized),
                                                      padded_batch)}


def _encoded(ids: np.ndarray, labels: np.ndarray) -> Encoded:
    return Encoded(ids.tolist(), labels.tolist(), 0, int((labels != IGNORE_INDEX).sum()))


def micro_batches(shard, batching: Batching | int, pad_id: int, *, start_epoch: int = 0,
                  skip: int = 0, seed: int = 0, shuffle_buffer: int = 0
                  ) -> Iterator[tuple[int, int, dict]]:
    """Endless stream of ``(epoch, index_in_epoch, batch)`` from a worker's dataset shard.

    ``batch`` is :func:`effsft.corpus.tokenize.collate`'s dict of ``[B, T]`` tensors, or with
    packing :func:`effsft.models.packing.pack_rows`'s packed micro-batch (windows of
    ``window_rows`` rows are planned, the packs taken ``micro_batch_size`` at a time; the
    packs left at the end of an epoch are dropped, as a partial micro-batch is unpacked).
    The stream is a deterministic function of the shard's row order, so resuming at
    ``(start_epoch, skip)`` re-reads that epoch and discards its first ``skip`` micro-batches
    (the data position saved in a checkpoint) and meets the same packs.
    """
    if isinstance(batching, int):
        batching = Batching(batching)
    epoch = start_epoch
    while True:
        n = 0
        for batch in _epoch_batches(shard, batching, pad_id, seed + epoch, shuffle_buffer):
            if n >= skip:
                yield epoch, n, batch()
            n += 1
        if n == 0:
            raise ValueError(f"a worker's data shard has fewer than one micro-batch "
                             f"(train.micro_batch_size={batching.micro_batch_size}"
                             f"{' packs' if batching.packing != 'off' else ' rows'}): use a larger "
                             "corpus or fewer workers")
        epoch, skip = epoch + 1, 0


def _epoch_batches(shard, b: Batching, pad_id: int, shuffle_seed: int, shuffle_buffer: int):
    """One epoch of micro-batches, each a thunk (a skipped one costs no collation)."""
    shuffle = dict(local_shuffle_buffer_size=shuffle_buffer or None,
                   local_shuffle_seed=shuffle_seed if shuffle_buffer else None)
    if b.packing == "off":
        for rows in shard.iter_batches(batch_size=b.micro_batch_size, drop_last=True, batch_format="numpy",
                                       **shuffle):
            yield lambda rows=rows: collate([_encoded(i, y) for i, y in zip(rows["input_ids"], rows["labels"])],
                                            pad_id)
        return
    from effsft.models.packing import plan_packs

    queue: list[list[tuple]] = []
    for rows in shard.iter_batches(batch_size=b.window_rows, batch_format="numpy", **shuffle):
        window = list(zip(rows["input_ids"], rows["labels"]))
        queue += [[window[i] for i in p] for p in plan_packs([len(x) for x, _ in window], b.pack_len,
                                                             b.packing).packs]
        while len(queue) >= b.micro_batch_size:
            group, queue = queue[: b.micro_batch_size], queue[b.micro_batch_size:]
            yield lambda group=group: _pack_group(group, pad_id)


def _pack_group(group: list[list[tuple]], pad_id: int) -> dict:
    from effsft.models.packing import pack_rows

    rows = [r for pack in group for r in pack]
    packs, at = [], 0
    for pack in group:
        packs.append(list(range(at, at + len(pack))))
        at += len(pack)
    return pack_rows(rows, packs, pad_id)
