"""k-center greedy / topn vs a naive O(n²) implementation, for any block split."""

import numpy as np
import pytest

from effsft.select import kcenter as KC
from effsft.select.ranking import random_rank


def _points(seed=0, n=200, d=8):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, d)).astype(np.float32)


def _naive_d2(x):
    x = x.astype(np.float64)
    return np.array([[sum((a - b) ** 2) for b in x] for a in x])  # [n, n] plain loop


def _naive_greedy(x, ranks, init, n):
    D = _naive_d2(x)
    S = list(init)
    picks = []
    for _ in range(n):
        best = None
        for i in range(len(x)):
            if i in S:
                continue
            di = min(D[i, s] for s in S)
            key = (-di, int(ranks[i]))
            if best is None or key < best[0]:
                best = (key, i)
        S.append(best[1])
        picks.append(best[1])
    return picks


def _naive_topn(x, ranks, init, n):
    D = _naive_d2(x)
    d = {i: min(D[i, s] for s in init) for i in range(len(x)) if i not in init}
    return sorted(d, key=lambda i: (-d[i], int(ranks[i])))[:n]


@pytest.mark.parametrize("n_blocks", [1, 3, 7])
def test_greedy_matches_naive_for_any_split(n_blocks):
    x = _points()
    ranks = random_rank([f"p{i}" for i in range(len(x))], 0)
    init = [3, 50, 120]
    want = _naive_greedy(x, ranks, init, 25)
    bounds = np.array_split(np.arange(len(x)), n_blocks)
    blocks = [KC.GreedyBlock(x[b], ranks[b], x[init], np.isin(b, init)) for b in bounds]
    got = [int(bounds[blk][i]) for blk, i in KC.greedy_select_blocks(blocks, 25)]
    assert got == want
    assert list(KC.greedy_select(x, ranks, init, 25)) == want


@pytest.mark.parametrize("n_blocks", [1, 4, 9])
def test_topn_matches_naive_for_any_split(n_blocks):
    x = _points(1)
    ranks = random_rank([f"p{i}" for i in range(len(x))], 1)
    init = [0, 1, 2, 99]
    want = _naive_topn(x, ranks, init, 30)
    partials = []
    for b in np.array_split(np.random.default_rng(0).permutation(len(x)), n_blocks):
        d = KC.min_sq_dist(x[b], x[init])
        keep = KC.topn_select(d, ranks[b], 30, np.isin(b, init))
        partials.append((d[keep], ranks[b][keep], b[keep]))
    assert list(KC.merge_topn(partials, 30)) == want


def test_min_sq_dist_clamped_and_empty():
    x = _points(2, n=10)
    assert np.all(KC.min_sq_dist(x, x) >= 0)
    assert np.isinf(KC.min_sq_dist(x, np.zeros((0, 8), np.float32))).all()


def test_ties_broken_by_rank():
    x = np.array([[0, 0], [1, 0], [-1, 0], [0, 1]], np.float32)  # three points at distance 1
    ranks = np.array([0, 30, 10, 20], np.uint64)
    assert list(KC.greedy_select(x, ranks, [0], 1)) == [2]
    d = KC.min_sq_dist(x, x[[0]])
    assert list(KC.topn_select(d, ranks, 3, np.array([True, False, False, False]))) == [2, 3, 1]
