"""Allocation maths (spec dlp.md §5 items 1 and 7)."""

import numpy as np
import pytest

from effsft.prune.allocate import (
    allocate,
    dlp_public_two_step,
    dlp_sparsities,
    owl_sparsities,
    rebalance,
    uniform_sparsities,
)


def _stats(seed, n=12):
    return np.random.default_rng(seed).uniform(0.5, 3.0, n).tolist()


@pytest.mark.parametrize("seed", range(5))
def test_closed_form_equals_public_two_step(seed):
    S = _stats(seed)
    ours = dlp_sparsities(S, 0.5, 0.1)  # band [0.4, 0.6]: no clamp, c = 0
    np.testing.assert_allclose(ours, dlp_public_two_step(S, 0.5, 0.1), rtol=0, atol=1e-12)


def test_scale_invariance():
    S = _stats(7)
    np.testing.assert_allclose(dlp_sparsities(S, 0.7, 0.15), dlp_sparsities([9.3 * x for x in S], 0.7, 0.15),
                               rtol=0, atol=1e-12)


def test_span_is_two_alpha_and_monotone():
    S = _stats(8)
    s = np.asarray(dlp_sparsities(S, 0.6, 0.12))
    assert s.max() - s.min() == pytest.approx(0.24, abs=1e-12)
    order = np.argsort(S)
    assert np.all(np.diff(s[order]) >= 0)
    assert s.mean() == pytest.approx(0.6, abs=1e-12)


def test_alpha_zero_and_flat_stats_are_uniform_bitwise():
    S = _stats(9)
    assert dlp_sparsities(S, 0.7, 0.0) == [0.7] * len(S)
    assert dlp_sparsities([2.0] * 5, 0.7, 0.15) == [0.7] * 5
    assert uniform_sparsities(4, 0.55) == [0.55] * 4
    a = allocate("dlp", 0.7, block_stats=S, alpha=0.0)
    assert a.shift == 0.0 and not any(a.clamped)


def naive_owl(D, s, lam):
    """OWL public form: min-max scale D to [0, 2λ], centre on 1-s as density, sparsity = 1-density."""
    D = np.asarray(D, dtype=np.float64)
    scaled = (D - D.min()) / (D.max() - D.min()) * lam * 2
    density = scaled - scaled.mean() + (1 - s)
    return 1 - density


def test_owl_more_outliers_denser_and_matches_public_form():
    D = [1.0, 4.0, 2.5, 0.2, 7.0]
    s = np.asarray(owl_sparsities(D, 0.6, 0.08))
    np.testing.assert_allclose(s, naive_owl(D, 0.6, 0.08), atol=1e-12)
    assert s[4] == s.min() and s[3] == s.max()


@pytest.mark.parametrize("s", [0.02, 0.3, 0.7, 0.9, 0.98])
def test_forced_clamping_keeps_weighted_global_exact(s):
    rng = np.random.default_rng(int(s * 100))
    S = np.concatenate([rng.uniform(0, 1, 10), [1e6]]).tolist()  # extreme spread
    P = rng.integers(1_000, 50_000, len(S)).tolist()
    a = allocate("dlp", s, block_stats=S, alpha=0.45, block_params=P)
    sl = np.asarray(a.sparsities)
    assert np.all((sl >= 0.01) & (sl <= 0.99))
    assert np.dot(sl, P) / sum(P) == pytest.approx(s, abs=1e-9)
    assert any(a.clamped)
    # s_l = clip(r_l + c) with one common c
    np.testing.assert_allclose(sl, np.clip(np.asarray(a.raw) + a.shift, 0.01, 0.99), atol=1e-15)


def test_rebalance_naive_grid():
    """Bisection vs a brute-force scan of c on a fine grid."""
    r, P, s = [0.2, 0.95, 1.3, 0.5, -0.1], [3, 1, 2, 5, 4], 0.55
    sl, c = rebalance(r, s, P)
    grid = np.linspace(-1.5, 1.5, 300001)
    vals = [np.dot(np.clip(np.asarray(r) + g, 0.01, 0.99), P) / sum(P) for g in grid]
    c_naive = grid[int(np.argmin(np.abs(np.asarray(vals) - s)))]
    assert c == pytest.approx(c_naive, abs=2e-5)


def test_equal_blocks_without_clamp_reproduce_public_numbers():
    S = _stats(11, n=32)
    a = allocate("dlp", 0.7, block_stats=S, alpha=0.15, block_params=[100] * 32)
    assert a.shift == 0.0
    np.testing.assert_allclose(a.sparsities, dlp_public_two_step(S, 0.7, 0.15), atol=1e-12)


def test_public_form_breaks_global_sum_when_clamping():
    S = [1.0] * 9 + [100.0]
    pub = np.asarray(dlp_public_two_step(S, 0.8, 0.15))
    ours = np.asarray(dlp_sparsities(S, 0.8, 0.15))
    assert pub.max() > 0.99  # the public code can exceed the upper bound
    assert ours.mean() == pytest.approx(0.8, abs=1e-9) and ours.max() <= 0.99


def test_errors():
    with pytest.raises(ValueError):
        dlp_sparsities([1, 2], 1.2, 0.1)
    with pytest.raises(ValueError):
        allocate("foo", 0.5, n_blocks=2)
