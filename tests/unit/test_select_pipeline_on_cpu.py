"""score_shards input: blocks small enough that every actor of the pool gets work."""
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from effsft.select.pipeline import PoolSpec, score_shards, scoring_input
from effsft.select.store import ScoreStore

pytestmark = pytest.mark.usefixtures("ray_session")


def _shards(tmp_path, sizes):
    paths = []
    for k, n in enumerate(sizes):
        ids = [f"s{k}-{i}" for i in range(n)]
        msgs = [[{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}"}] for i in ids]
        p = tmp_path / f"shard-{k:05d}.parquet"
        pq.write_table(pa.table({"id": ids, "messages": msgs}), p)
        paths.append(p)
    return paths


def test_small_shards_are_split_into_batch_sized_blocks(tmp_path):
    # Ray Data's Parquet reader packs these 3 small files into one read task / one block;
    # the pool would then see a single task. The scoring input must be cut per batch.
    paths = _shards(tmp_path, [130, 70, 100])
    ds = scoring_input(paths, batch_size=32)
    rows = [m.num_rows for b in ds.iter_internal_ref_bundles() for m in b.metadata]  # per block
    assert sum(rows) == 300 and max(rows) <= 32
    assert len(rows) >= 300 // 32
    got = sorted(ds.to_pandas()["id"].tolist())
    assert got == sorted(f"s{k}-{i}" for k, n in enumerate([130, 70, 100]) for i in range(n))


class _IdScorer:
    def __init__(self):
        pass

    def __call__(self, batch):
        return pa.table({"id": batch.column("id"), "status": pa.array(["ok"] * batch.num_rows),
                         "score_x": pa.array([float(len(i)) for i in batch.column("id").to_pylist()])})


def test_every_row_scored_once_with_two_actors(tmp_path):
    paths = _shards(tmp_path, [90, 40])
    store = ScoreStore(tmp_path / "cache", "x", {"t": 1})
    stats = score_shards(store, paths, _IdScorer, {}, PoolSpec(concurrency=2, batch_size=16))
    assert stats.rows_scored == 130 and stats.shards_scored == 2
    for k, (p, n) in enumerate(zip(paths, [90, 40])):
        ids = pq.read_table(store.path(p.stem)).column("id").to_pylist()
        assert sorted(ids) == sorted(f"s{k}-{i}" for i in range(n))
