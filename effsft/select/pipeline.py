"""Ray plumbing for selection: shard-wise scoring on actor pools, with resume.

``score_shards`` runs one scorer over the corpus shards that have no finished scores yet:
Ray Data reads those shards, an actor pool (model loaded once per actor) scores batches, and
the driver collects the small score rows per shard and writes each shard (temp + rename +
``.done.json``) as soon as all its rows are back. A crash loses at most the shards in flight;
a killed actor is restarted by Ray Data and its batch retried, and the store refuses a shard
whose rows are not each scored exactly once.
"""
from __future__ import annotations

import logging
import os
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from effsft.select.store import ScoreStore

log = logging.getLogger("effsft.select")


@dataclass(frozen=True)
class PoolSpec:
    """Actor-pool resources for a model scorer."""

    concurrency: int = 1
    num_cpus: float = 0.5
    num_gpus: float = 0.0
    batch_size: int = 256


@dataclass(frozen=True)
class Fault:
    """Fault injection for tests: kill a scoring actor once after ``kill_actor_after_batches``
    batches; stop the driver (as if interrupted) after ``stop_after_shards`` written shards;
    hold the driver (once per job, up to ``HOLD_S``) after ``hold_after_shards`` written shards,
    so that a test can signal it at a known point (``<marker_dir>/holding`` says when)."""

    kill_actor_after_batches: int | None = None
    stop_after_shards: int | None = None
    marker_dir: str | None = None
    hold_after_shards: int | None = None


HOLD_S = 300


def _hold(fault: Fault) -> None:
    marker = Path(fault.marker_dir) / "holding"
    try:
        fd = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        return  # fire once per job (a resumed run goes on)
    os.write(fd, str(os.getpid()).encode())
    os.close(fd)
    log.warning("fault injection: driver holds after %d shards (up to %d s)", fault.hold_after_shards, HOLD_S)
    deadline = time.monotonic() + HOLD_S
    while time.monotonic() < deadline:
        time.sleep(0.1)


class Interrupted(RuntimeError):
    pass


class ScorerActor:
    """Actor-pool callable: builds the scorer once, scores batches, tags rows with their shard."""

    def __init__(self, factory: Callable[..., Any], kwargs: dict, fault: Fault = Fault()):
        self.scorer = factory(**kwargs)
        self.fault = fault
        self.batches = 0

    def _maybe_die(self) -> None:
        n = self.fault.kill_actor_after_batches
        if n is None or self.batches < n or not self.fault.marker_dir:
            return
        marker = Path(self.fault.marker_dir) / "killed_actor"
        try:
            fd = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            return  # fire once per job
        os.close(fd)
        log.warning("fault injection: scoring actor exits after %d batches", self.batches)
        os._exit(1)

    def __call__(self, batch: pa.Table) -> pa.Table:
        self.batches += 1
        self._maybe_die()
        out = self.scorer(batch)
        shard = [Path(p).stem for p in batch.column("path").to_pylist()]
        return out.append_column("shard", pa.array(shard, pa.string()))


@dataclass
class ScoreStats:
    shards_total: int = 0
    shards_reused: int = 0
    shards_scored: int = 0
    rows_scored: int = 0
    seconds: float = 0.0
    extra: dict = field(default_factory=dict)

    @property
    def rows_per_s(self) -> float:
        return self.rows_scored / self.seconds if self.seconds else 0.0


def scoring_input(paths: list[Path], batch_size: int):
    """The shards as a Ray Dataset of blocks of at most ``batch_size`` rows.

    Why: an actor-pool task is one input block, and Ray Data 2.60's Parquet reader packs small
    files into one read task (measured: 4 shards of 1000 rows came back as ONE 4000-row block),
    so without the split a whole corpus can reach a single actor while the others idle (and the
    pool's autoscaler, which scales on queued tasks, never grows: ``scorer.concurrency`` had no
    effect). A streaming repartition (no shuffle) cuts the blocks to one actor call each.
    """
    import ray.data

    ds = ray.data.read_parquet([str(p) for p in paths], include_paths=True, num_cpus=0.25)
    return ds.repartition(target_num_rows_per_block=batch_size)


def score_shards(store: ScoreStore, shard_paths: list[Path], factory: Callable[..., Any],
                 kwargs: dict, pool: PoolSpec = PoolSpec(), fault: Fault = Fault()) -> ScoreStats:
    """Score every shard without a finished score file; returns what was (re)done."""
    import ray.data

    by_name = {p.stem: p for p in shard_paths}
    pending = store.pending(by_name)
    stats = ScoreStats(shards_total=len(by_name), shards_reused=len(by_name) - len(pending))
    if not pending:
        return stats
    expected = {s: pq.read_metadata(by_name[s]).num_rows for s in pending}
    t0 = time.perf_counter()
    ds = scoring_input([by_name[s] for s in pending], pool.batch_size)
    ds = ds.map_batches(
        ScorerActor, fn_constructor_kwargs={"factory": factory, "kwargs": kwargs, "fault": fault},
        compute=ray.data.ActorPoolStrategy(min_size=1, max_size=pool.concurrency),
        batch_size=pool.batch_size, batch_format="pyarrow", num_cpus=pool.num_cpus,
        num_gpus=pool.num_gpus or None, zero_copy_batch=True)
    parts: dict[str, list[pa.Table]] = defaultdict(list)
    got: dict[str, int] = defaultdict(int)
    from effsft import console

    progress = console.bar(sum(expected.values()), f"scoring {store.key}", "rows") if console.S.configured else None
    try:
        _collect(ds, store, expected, parts, got, stats, fault, progress)
    finally:
        if progress is not None:
            progress.close()
    missing = [s for s in pending if not store.done(s)]
    if missing:
        raise RuntimeError(f"scoring finished but shards {missing[:5]} are incomplete")
    stats.seconds = time.perf_counter() - t0
    return stats


def _collect(ds, store, expected, parts, got, stats, fault, progress) -> None:
    """The driver's loop: score rows as they come back, write each shard once complete."""
    for batch in ds.iter_batches(batch_format="pyarrow", batch_size=None):
        if progress is not None:
            progress.update(batch.num_rows)
        for s in set(batch.column("shard").to_pylist()):
            part = batch.filter(pc.equal(batch.column("shard"), s)).drop_columns(["shard"])
            parts[s].append(part)
            got[s] += part.num_rows
            if got[s] >= expected[s]:
                store.write(s, pa.concat_tables(parts.pop(s)), expected[s])
                stats.shards_scored += 1
                stats.rows_scored += expected[s]
                if fault.hold_after_shards is not None and stats.shards_scored == fault.hold_after_shards:
                    _hold(fault)
                if fault.stop_after_shards is not None and stats.shards_scored >= fault.stop_after_shards:
                    raise Interrupted(f"fault injection: stopped after {stats.shards_scored} shards")
