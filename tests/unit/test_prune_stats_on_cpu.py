"""Streaming score statistics (spec dlp.md §5 item 9, §4 median/mean)."""

import pytest
import torch

from effsft.prune import stats
from effsft.prune.stats import (
    block_score_stats,
    outlier_ratio,
    radix_kth,
    radix_lower_median,
    sampled_lower_median,
    stream_mean,
)


def _stream(parts):
    return lambda: iter(parts)


def _sort_kth(parts, rank):
    flat = torch.cat([p.reshape(-1) for p in parts])
    return float(torch.sort(flat).values[rank - 1])


def _mixed_parts(seed):
    g = torch.Generator().manual_seed(seed)
    return [
        torch.rand(37, 11, generator=g),
        torch.zeros(200),  # many zeros
        torch.randint(0, 5, (300,), generator=g).float() / 3,  # heavy ties
        -torch.zeros(7),  # negative zeros count as 0
        torch.rand(1, generator=g) * 1e-30,  # denormal-ish
        torch.rand(50, generator=g) * 1e6,
    ]


@pytest.mark.parametrize("seed", range(3))
def test_radix_median_equals_sort_median(seed):
    parts = _mixed_parts(seed)
    n = sum(p.numel() for p in parts)
    assert radix_lower_median(_stream(parts)) == _sort_kth(parts, (n + 1) // 2)
    assert radix_lower_median(_stream(parts)) == float(torch.cat([p.reshape(-1) for p in parts]).abs().median())


def test_radix_every_rank_small_even_and_odd():
    parts = [torch.tensor([3.0, 1.0, 1.0, 0.0]), torch.tensor([2.5, 1.0])]
    for rank in range(1, 7):
        assert radix_kth(_stream(parts), rank) == _sort_kth(parts, rank)
    assert radix_lower_median(_stream(parts)) == 1.0  # even n: lower middle
    assert radix_lower_median(_stream(parts[:1] + [torch.tensor([2.5])])) == 1.0


def test_radix_second_level_histogram_path(monkeypatch):
    monkeypatch.setattr(stats, "_GATHER_LIMIT", 4)  # force the low-16-bit histogram
    parts = _mixed_parts(5)
    n = sum(p.numel() for p in parts)
    for rank in (1, (n + 1) // 2, n // 3, n):
        assert radix_kth(_stream(parts), rank) == _sort_kth(parts, rank)


def test_radix_median_above_2_pow_24_elements():
    g = torch.Generator().manual_seed(0)
    n = (1 << 24) + 5
    big = torch.randint(0, 2000, (n,), generator=g, dtype=torch.int32).float().div_(7.0)  # ties
    big[: n // 3] = 0.0  # a large block of zeros
    parts = [big[: n // 2], big[n // 2 :]]
    expected = float(torch.sort(big).values[(n + 1) // 2 - 1])
    assert radix_lower_median(_stream(parts)) == expected


def test_sampled_median_rank_error():
    g = torch.Generator().manual_seed(1)
    parts = [torch.rand(1 << 18, generator=g), torch.rand(1 << 17, generator=g) ** 2]
    flat = torch.cat(parts)
    approx = sampled_lower_median(_stream(parts), sample_size=1 << 14, seed=3)
    rank = float((flat <= approx).float().mean())
    assert abs(rank - 0.5) < 5 * 0.5 / (1 << 7)
    # small streams fall back to the exact median
    assert sampled_lower_median(_stream(parts[:1]), sample_size=1 << 20) == radix_lower_median(_stream(parts[:1]))


def test_mean_and_outlier_ratio_naive():
    parts = _mixed_parts(2)
    vals = [float(x) for p in parts for x in p.reshape(-1)]
    mu = sum(vals) / len(vals)
    assert stream_mean(_stream(parts)) == pytest.approx(mu, rel=1e-12)
    naive = 100.0 * sum(v > 5 * mu for v in vals) / len(vals)
    assert outlier_ratio(_stream(parts), 5) == pytest.approx(naive)
    st = block_score_stats(_stream(parts), outlier_m=5)
    assert st["numel"] == len(vals) and st["outlier_ratio"] == pytest.approx(naive)
    assert st["median"] == sorted(vals)[(len(vals) + 1) // 2 - 1]
