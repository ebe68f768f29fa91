"""Streaming statistics of a block's Wanda scores: mean, exact lower median, outlier ratio.

A block's scores are never materialised together: a *score stream* is a zero-argument
callable that yields one score tensor per matrix, recomputed on every call (scores are
cheap to recompute from ``W`` and the activation norms; a 7B block has ~202M of them,
beyond ``torch.quantile``'s ~16M limit).

Exact lower median (rank ``ceil(n/2)``, what ``torch.median`` returns) by radix select:
non-negative fp32 values are ordered like their int32 bit patterns, so
    1. ``bincount`` the top 16 bits over the stream,
    2. find the bucket holding the rank,
    3. gather only that bucket's values and ``kthvalue`` at the residual rank
       (if the bucket itself is huge, e.g. millions of tied zeros, a second ``bincount`` of
       the low 16 bits pins the exact bit pattern instead of gathering).
"""

from __future__ import annotations

import math
from typing import Callable, Iterable

import torch

ScoreStream = Callable[[], Iterable[torch.Tensor]]

_HALF = 1 << 16
_GATHER_LIMIT = 1 << 24  # gather at most this many values for the final kthvalue


def _bit_patterns(t: torch.Tensor) -> torch.Tensor:
    """int32 bit patterns of a non-negative fp32 tensor, sign bit cleared (maps -0.0 to 0)."""
    return t.detach().reshape(-1).to(torch.float32).contiguous().view(torch.int32) & 0x7FFFFFFF


def _rank_bucket(counts: torch.Tensor, rank: int) -> tuple[int, int]:
    """Bucket holding the 1-based ``rank`` and the residual rank inside it."""
    cum = torch.cumsum(counts, 0)
    bucket = int(torch.searchsorted(cum, torch.tensor([rank], dtype=cum.dtype)).item())
    before = int(cum[bucket - 1].item()) if bucket > 0 else 0
    return bucket, rank - before


def _top_counts(stream: ScoreStream) -> torch.Tensor:
    """Histogram ``[2^16]`` (int64, CPU) of the top 16 bits of every value in the stream."""
    counts = torch.zeros(_HALF, dtype=torch.int64)
    for t in stream():
        counts += torch.bincount(_bit_patterns(t) >> 16, minlength=_HALF).cpu()
    return counts


def _select(stream: ScoreStream, counts: torch.Tensor, rank: int) -> float:
    """Second radix pass: the exact ``rank``-th smallest value given the top-16-bit histogram."""
    n = int(counts.sum().item())
    if not 1 <= rank <= n:
        raise ValueError(f"rank {rank} out of range for {n} values")
    hi, residual = _rank_bucket(counts, rank)
    if int(counts[hi].item()) <= _GATHER_LIMIT:
        parts = []
        for t in stream():
            bits = _bit_patterns(t)
            parts.append(bits[(bits >> 16) == hi].cpu())
        bucket_bits = torch.cat(parts)  # [counts[hi]] int32 patterns sharing the top 16 bits
        # same order as the floats; kthvalue on the integer patterns is exact
        pattern = int(torch.kthvalue(bucket_bits, residual).values.item())
    else:
        # huge bucket (e.g. many tied values): pin the low 16 bits with a second histogram
        low_counts = torch.zeros(_HALF, dtype=torch.int64)
        for t in stream():
            bits = _bit_patterns(t)
            low_counts += torch.bincount(bits[(bits >> 16) == hi] & 0xFFFF, minlength=_HALF).cpu()
        lo, _ = _rank_bucket(low_counts, residual)
        pattern = (hi << 16) | lo
    return float(torch.tensor([pattern], dtype=torch.int32).view(torch.float32).item())


def radix_kth(stream: ScoreStream, rank: int) -> float:
    """Exact ``rank``-th smallest value (1-based) of the non-negative fp32 values in ``stream``.

    Args:
        stream: zero-argument callable yielding score tensors (any shapes); called twice.
        rank: 1-based rank, ``1 <= rank <= n``.

    Returns:
        The value as a Python float (exactly representable in fp32).
    """
    return _select(stream, _top_counts(stream), rank)


def count_values(stream: ScoreStream) -> int:
    """Total number of values in the stream (consumes one pass)."""
    return sum(t.numel() for t in stream())


def radix_lower_median(stream: ScoreStream) -> float:
    """Exact lower median (rank ``ceil(n/2)``, as ``torch.median``) of non-negative fp32 scores."""
    counts = _top_counts(stream)
    n = int(counts.sum().item())
    if n == 0:
        raise ValueError("median of an empty stream")
    return _select(stream, counts, (n + 1) // 2)


def sampled_lower_median(stream: ScoreStream, sample_size: int = 1 << 24, seed: int = 0,
                         numel: int | None = None) -> float:
    """Lower median of a uniform sample (with replacement) of ``sample_size`` scores.

    The rank error is about ``0.5 / sqrt(sample_size)`` (``prune.median_approx``). When the
    stream holds at most ``sample_size`` values the exact median is returned.
    """
    n = count_values(stream) if numel is None else numel
    if n <= sample_size:
        return radix_lower_median(stream)
    gen = torch.Generator().manual_seed(seed)
    idx = torch.sort(torch.randint(n, (sample_size,), generator=gen)).values  # [S] global indices
    picked, offset = [], 0
    for t in stream():
        flat = t.detach().reshape(-1)
        lo = int(torch.searchsorted(idx, offset))
        hi = int(torch.searchsorted(idx, offset + flat.numel()))
        picked.append(flat[(idx[lo:hi] - offset).to(flat.device)].float().cpu())
        offset += flat.numel()
    sample = torch.cat(picked)
    return float(torch.kthvalue(sample, (sample.numel() + 1) // 2).values.item())


def _sum_and_count(stream: ScoreStream) -> tuple[float, int]:
    total, n = 0.0, 0
    for t in stream():
        total += float(torch.sum(t.detach(), dtype=torch.float64).item())
        n += t.numel()
    if n == 0:
        raise ValueError("mean of an empty stream")
    return total, n


def stream_mean(stream: ScoreStream) -> float:
    """Mean of all values, accumulated in float64."""
    total, n = _sum_and_count(stream)
    return total / n


def outlier_ratio(stream: ScoreStream, m: float, mean: float | None = None) -> float:
    """OWL layerwise outlier distribution ``D = 100 · #{score > m · mean} / #score``.

    The mean is over the pooled scores of the block (OWL ``check_outlier_mean``).
    """
    mu = stream_mean(stream) if mean is None else mean
    above, n = 0, 0
    for t in stream():
        above += int((t.detach().float() > m * mu).sum().item())
        n += t.numel()
    return 100.0 * above / n


def block_score_stats(stream: ScoreStream, outlier_m: float = 5.0, median: bool = True,
                      median_approx: bool = False, seed: int = 0) -> dict[str, float]:
    """Mean, lower median and OWL outlier ratio of one block's pooled scores.

    Returns:
        ``{"mean", "median" (nan when not asked), "outlier_ratio", "numel"}``.
    """
    total, n = _sum_and_count(stream)
    mu = total / n
    med = math.nan
    if median:
        med = sampled_lower_median(stream, seed=seed, numel=n) if median_approx else radix_lower_median(stream)
    return {"mean": mu, "median": med, "outlier_ratio": outlier_ratio(stream, outlier_m, mu), "numel": n}
