"""Random ranks, bottom-k merges, stratified quotas, top-k and km quotas vs naive references."""

import hashlib
import math

import numpy as np
import pytest

from effsft.select import ranking as R


def _ids(n, prefix="row"):
    return [f"{prefix}-{i}" for i in range(n)]


def _naive_rank(i, seed):
    d = hashlib.blake2b(int(seed).to_bytes(8, "little", signed=True) + i.encode()).digest()
    return int.from_bytes(d[:8], "little")


def _blocks(seq, n_blocks, rng):
    cuts = np.sort(rng.choice(np.arange(1, len(seq)), n_blocks - 1, replace=False)) if n_blocks > 1 else []
    return np.split(np.asarray(seq, dtype=object), cuts)


def test_random_rank_matches_definition():
    ids = _ids(50)
    r = R.random_rank(ids, 7)
    assert r.dtype == np.uint64
    assert [int(x) for x in r] == [_naive_rank(i, 7) for i in ids]


@pytest.mark.parametrize("n_blocks", [1, 3, 17])
def test_random_same_ids_for_any_blocks_and_order(n_blocks):
    ids = _ids(1000)
    B = 50
    ref = sorted(ids, key=lambda i: _naive_rank(i, 3))[:B]
    rng = np.random.default_rng(n_blocks)
    shuffled = list(rng.permutation(ids))
    partials = []
    for blk in _blocks(shuffled, n_blocks, rng):
        r = R.random_rank(blk, 3)
        keep = R.bottom_k(r, B, blk)
        partials.append((r[keep], blk[keep]))
    _, got = R.merge_bottom_k(partials, B)
    assert list(got) == ref  # same set, same (ascending r) order


def test_other_seed_differs_and_budgets_nest():
    ids = _ids(2000)
    r0, r1 = R.random_rank(ids, 0), R.random_rank(ids, 1)
    s10 = set(R.bottom_k(r0, 10))
    s50 = set(R.bottom_k(r0, 50))
    assert s10 <= s50
    assert set(R.bottom_k(r1, 50)) != s50


def test_bottom_k_rank_collision_uses_id():
    ranks = np.array([5, 1, 5, 5], np.uint64)
    ids = ["d", "a", "b", "c"]
    assert list(R.bottom_k(ranks, 2, ids)) == [1, 2]  # rank 1, then smallest id among rank 5


def test_largest_remainder_hand_example():
    # 10 seats over sizes 5, 3, 2 of n=10 -> exact; 7 seats: 3.5, 2.1, 1.4 -> 3,2,1 + leftover to 0.5
    assert list(R.largest_remainder_quotas([5, 3, 2], 7)) == [4, 2, 1]
    # equal remainders go to the lower id
    assert list(R.largest_remainder_quotas([1, 1, 1, 1], 2)) == [1, 1, 0, 0]


def test_stratified_quotas_sum_and_smallest_r_per_stratum():
    rng = np.random.default_rng(0)
    ids = _ids(500)
    strata = rng.integers(0, 7, 500)
    ranks = R.random_rank(ids, 11)
    B = 37
    picks = R.stratified_bottom_k(strata, ranks, B)
    assert len(picks) == B == len(set(picks))
    q = R.largest_remainder_quotas(np.bincount(strata, minlength=7), B)
    for s in range(7):
        members = [i for i in range(500) if strata[i] == s]
        want = sorted(members, key=lambda i: int(ranks[i]))[: q[s]]
        assert sorted(p for p in picks if strata[p] == s) == sorted(want)


def test_top_k_by_score_ties_by_rank_and_nulls_ineligible():
    ids = ["a", "b", "c", "d", "e"]
    scores = np.array([1.0, 3.0, np.nan, 3.0, 2.0])
    ranks = np.array([1, 9, 0, 2, 5], np.uint64)
    assert list(R.top_k_by_score(ids, scores, 3, True, ranks)) == ["d", "b", "e"]
    assert list(R.top_k_by_score(ids, scores, 10, False, ranks)) == ["a", "e", "d", "b"]


def _naive_quotas(sizes, B):
    n = sum(sizes)
    exact = [B * s / n for s in sizes]
    q = [math.floor(e) for e in exact]
    frac = sorted(range(len(sizes)), key=lambda c: (-(exact[c] - q[c]), c))
    for c in frac[: B - sum(q)]:
        q[c] += 1
    return q


@pytest.mark.parametrize("seed", range(5))
def test_km_quotas_properties(seed):
    rng = np.random.default_rng(seed)
    sizes = rng.integers(1, 60, rng.integers(2, 30))
    n = int(sizes.sum())
    for B in [1, n // 7, n // 2, n]:
        q = R.km_quotas(sizes, B)
        assert q.sum() == B and np.all(q <= sizes)
        assert np.all(np.abs(q - B * sizes / n) < 1)
        assert list(q) == _naive_quotas(list(sizes), B)


def test_km_select_top_scored_per_cluster_and_shortfall():
    rng = np.random.default_rng(0)
    N, C, B = 400, 6, 60
    cluster = rng.integers(0, C, N)
    score = rng.normal(size=N)
    ranks = R.random_rank(_ids(N), 0)
    # cluster 0 has only 2 eligible rows: its shortfall must move elsewhere
    zero = np.flatnonzero(cluster == 0)
    score[zero[2:]] = np.nan
    picks = R.km_select(cluster, score, ranks, B, descending=True)
    assert len(picks) == B == len(set(picks))
    assert not np.isnan(score[picks]).any()
    sizes = np.bincount(cluster, minlength=C)
    q = np.bincount(cluster[picks], minlength=C)
    assert q[0] == 2 and q.sum() == B
    base = R.largest_remainder_quotas(sizes, B)
    assert np.all(q[1:] >= base[1:])  # others only gain seats
    for c in range(C):  # each cluster's picks are its top-scored eligible rows
        members = [i for i in range(N) if cluster[i] == c and not np.isnan(score[i])]
        best = sorted(members, key=lambda i: (-score[i], int(ranks[i])))[: q[c]]
        assert sorted(p for p in picks if cluster[p] == c) == sorted(best)


def test_km_quotas_shortfall_hand_example():
    # sizes 10, 10, 10; B = 9 -> 3,3,3; cluster 0 can only give 1 -> 2 seats re-quota'd
    q = R.km_quotas([10, 10, 10], 9, capacity=[1, 10, 10])
    assert list(q) == [1, 4, 4]
    with pytest.raises(ValueError):
        R.km_quotas([10, 10], 5, capacity=[1, 2])
