"""Q-Tuning sample-level selection: the EU-plane triage (corner bisection, fill-up) and the sample
baselines (random_sample, ppl_only, entropy_only), docs/algorithms/qtuning.md §2.3-§2.4 and §3.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import numpy as np

from effsft.sft.qtuning_scores import SampleStats

Method = Literal["off", "qtuning", "random_sample", "ppl_only", "entropy_only", "random_token"]
METHODS: tuple[str, ...] = ("off", "qtuning", "random_sample", "ppl_only", "entropy_only", "random_token")
SAMPLE_BASELINES: tuple[str, ...] = ("random_sample", "ppl_only", "entropy_only")

# Bisection constants are fixed by the spec (§3.1), matching the authors' code.
BISECT_TOL = 0.01
BISECT_MAX_ITER = 10
BISECT_A_MAX = 0.49
NORM_EPS = 1e-12  # min-max normalisation treats a smaller range as constant (authors' code)


@dataclass(frozen=True)
class Corners:
    """Result of the corner-quantile bisection (docs/algorithms/qtuning.md §2.3), thresholds of the last iterate."""

    a: float
    p_lo: float
    p_hi: float
    e_lo: float
    e_hi: float
    q2: np.ndarray  # [B] bool, PPL > P_hi and Ent <= E_lo
    q4: np.ndarray  # [B] bool, PPL <= P_lo and Ent > E_hi
    iters: int


def bisect_corners(ppl: np.ndarray, ent: np.ndarray, sample_ratio: float) -> Corners:
    """Search one quantile level ``a`` in [0, 0.49] so that ``(|Q2| + |Q4|) / B ≈ r_s``.

    PPL and Ent use the same level (lock-step), linear-interpolation quantiles, tolerance 0.01,
    at most 10 halvings, as in the authors' ``_dynamic_threshold_search_bisect``.
    """
    lo, hi = 0.0, BISECT_A_MAX
    n = len(ppl)
    for it in range(1, BISECT_MAX_ITER + 1):
        a = (lo + hi) / 2.0
        p_hi, p_lo = float(np.quantile(ppl, 1.0 - a)), float(np.quantile(ppl, a))
        e_lo, e_hi = float(np.quantile(ent, a)), float(np.quantile(ent, 1.0 - a))
        q2 = (ppl > p_hi) & (ent <= e_lo)
        q4 = (ppl <= p_lo) & (ent > e_hi)
        frac = (int(q2.sum()) + int(q4.sum())) / max(1, n)
        if abs(frac - sample_ratio) < BISECT_TOL:
            break
        if frac < sample_ratio:
            lo = a
        else:
            hi = a
    return Corners(a, p_lo, p_hi, e_lo, e_hi, q2, q4, it)


def _minmax(x: np.ndarray) -> np.ndarray:
    span = float(x.max() - x.min())
    return np.zeros_like(x) if span < NORM_EPS else (x - x.min()) / span


def top_indices(scores: np.ndarray, k: int) -> np.ndarray:
    """Indices of the ``k`` largest scores; ties go to the lower index (stable sort)."""
    return np.argsort(-scores, kind="stable")[:k]


def fill_up(ppl: np.ndarray, ent: np.ndarray, kept: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Add the non-kept samples farthest from the diagonal of the normalised EU plane (§2.4).

    Args:
        ppl, ent: ``[B]`` float64.
        kept: ``[B]`` bool, corner members.
        k: target count K; a larger ``kept`` is not truncated.

    Returns:
        ``(added [m] int64, q2_like [B] bool)``: the added indices in pick order and, for all samples,
        whether ``p̂ >= ê`` (Q2-like: token-pruned) rather than Q4-like (kept whole).
    """
    p_hat, e_hat = _minmax(ppl), _minmax(ent)
    q2_like = p_hat >= e_hat
    need = k - int(kept.sum())
    if need <= 0:
        return np.zeros(0, dtype=np.int64), q2_like
    remain = np.flatnonzero(~kept)
    order = top_indices(np.abs(p_hat - e_hat)[remain], need)
    return remain[order].astype(np.int64), q2_like


def keep_count(n_samples: int, sample_ratio: float) -> int:
    """K = max(1, round(B r_s)) capped at B (Python's round, as in the authors' code)."""
    return min(n_samples, max(1, int(round(n_samples * sample_ratio))))


@dataclass(frozen=True)
class SampleSelection:
    """Which samples survive and which of them are token-pruned.

    Attributes:
        keep: ``[B]`` bool.
        prune_rows: ``[B]`` bool, rows whose response tokens are drop candidates (Q2 and Q2-like for
            ``qtuning``; every kept row for the baselines; none for ``off``).
        decision: ``[B]`` str: Q2, Q4, Q2-like, Q4-like, Q1, Q3, other (qtuning) or kept/dropped.
        info: scalar log values (quadrant counts, fill-up split, thresholds, midpoints).
    """

    keep: np.ndarray
    prune_rows: np.ndarray
    decision: np.ndarray
    info: dict = field(default_factory=dict)


_NAN_THRESHOLDS = {k: float("nan") for k in ("a", "P_lo", "P_hi", "E_lo", "E_hi", "P_mid", "E_mid")}


def _select_qtuning(stats: SampleStats, sample_ratio: float) -> SampleSelection:
    ppl, ent, n = stats.ppl, stats.ent, len(stats)
    c = bisect_corners(ppl, ent, sample_ratio)
    corner = c.q2 | c.q4
    k = keep_count(n, sample_ratio)
    added, q2_like = fill_up(ppl, ent, corner, k)
    keep = corner.copy()
    keep[added] = True
    fill_q2 = np.zeros(n, dtype=bool)
    fill_q2[added] = q2_like[added]
    fill_q4 = np.zeros(n, dtype=bool)
    fill_q4[added] = ~q2_like[added]
    p_mid, e_mid = (c.p_lo + c.p_hi) / 2.0, (c.e_lo + c.e_hi) / 2.0
    # Dropped samples are only labelled (for logging) by the figure's midpoint lines.
    q1 = ~keep & (ppl > p_mid) & (ent > e_mid)
    q3 = ~keep & (ppl <= p_mid) & (ent <= e_mid)
    decision = np.full(n, "other", dtype=object)
    for name, mask in (("Q1", q1), ("Q3", q3), ("Q2", c.q2), ("Q4", c.q4), ("Q2-like", fill_q2), ("Q4-like", fill_q4)):
        decision[mask] = name
    info = {
        "K": k, "n_Q2": int(c.q2.sum()), "n_Q4": int(c.q4.sum()), "n_Q1": int(q1.sum()), "n_Q3": int(q3.sum()),
        "n_other": int((~keep & ~q1 & ~q3).sum()), "n_fill": int(added.size),
        "n_fill_q2like": int(fill_q2.sum()), "n_fill_q4like": int(fill_q4.sum()),
        "a": c.a, "P_lo": c.p_lo, "P_hi": c.p_hi, "E_lo": c.e_lo, "E_hi": c.e_hi, "P_mid": p_mid, "E_mid": e_mid,
        "bisect_iters": c.iters, "corner_frac": float(corner.sum()) / max(1, n),
    }
    return SampleSelection(keep=keep, prune_rows=c.q2 | fill_q2, decision=decision, info=info)


def _select_baseline(
    stats: SampleStats, sample_ratio: float, method: str, baseline_order: str, rng: np.random.Generator
) -> SampleSelection:
    n = len(stats)
    k = keep_count(n, sample_ratio) if method in SAMPLE_BASELINES else n
    reverse = {"default": False, "reverse": True}.get(baseline_order)
    if reverse is None:
        raise ValueError(f"qtuning.baseline_order must be 'default' or 'reverse', got {baseline_order!r}")
    if method == "random_sample":
        picked = rng.choice(n, size=k, replace=False) if n else np.zeros(0, dtype=np.int64)
    elif method == "ppl_only":  # default: the K highest-PPL samples
        picked = top_indices(-stats.ppl if reverse else stats.ppl, k)
    elif method == "entropy_only":  # default: the K lowest-Ent samples
        picked = top_indices(stats.ent if reverse else -stats.ent, k)
    else:  # off, random_token: every sample
        picked = np.arange(n)
    keep = np.zeros(n, dtype=bool)
    keep[picked] = True
    prune_rows = keep.copy() if method != "off" else np.zeros(n, dtype=bool)
    decision = np.where(keep, "kept", "dropped").astype(object)
    info = {"K": k, **_NAN_THRESHOLDS}
    return SampleSelection(keep=keep, prune_rows=prune_rows, decision=decision, info=info)


def select_samples(
    stats: SampleStats,
    sample_ratio: float,
    *,
    method: Method = "qtuning",
    baseline_order: Literal["default", "reverse"] = "default",
    rng: np.random.Generator | None = None,
) -> SampleSelection:
    """Sample-level decision for one (possibly all-gathered) batch.

    Args:
        stats: per-sample stats of the batch.
        sample_ratio: r_s.
        method: see :data:`METHODS`.
        baseline_order: ``default`` (ppl_only keeps the highest PPL, entropy_only the lowest Ent) or
            ``reverse``.
        rng: numpy generator for ``random_sample`` (must be seeded identically on every rank).

    Returns:
        :class:`SampleSelection`.
    """
    if method not in METHODS:
        raise ValueError(f"qtuning.method must be one of {METHODS}, got {method!r}")
    if method == "qtuning" and len(stats) > 0:
        return _select_qtuning(stats, sample_ratio)
    return _select_baseline(stats, sample_ratio, method, baseline_order, rng or np.random.default_rng(0))
