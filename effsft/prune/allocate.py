"""Per-block sparsity allocation: DLP, OWL and uniform.

DLP (Chen et al., ICML 2025, arXiv 2505.23807): a block whose typical Wanda score
``S_l`` is larger is pruned harder. The public code (``lib/prune.py::get_dlp_ratios``)
does it in two steps, importance ``I_l = 1 - S_l / Σ S`` followed by a min-max map of
``I`` onto a density band of width ``2α`` centred on ``1 - s``. That is exactly

    r_l = s + 2α (S_l - S̄) / (S_max - S_min),        S̄ = unweighted mean of S.

OWL (Yin et al. 2023, arXiv 2310.05175, ``lib/prune_all.py``): more outliers ``D_l``
-> denser block,

    r_l = s - 2λ (D_l - D̄) / (D_max - D_min).

effsft then clamps to ``[0.01, 0.99]`` and adds one common shift ``c`` (found by
bisection, re-clamping inside) so that the parameter-weighted mean sparsity equals ``s``:

    Σ_l P_l · clip(r_l + c, .01, .99) = s · Σ_l P_l.

With equal-size blocks and no active clamp ``c = 0`` and the public numbers are reproduced.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Sequence

import numpy as np

S_MIN, S_MAX = 0.01, 0.99
METHODS = ("dlp", "owl", "uniform")


@dataclass(frozen=True)
class Allocation:
    """Result of an allocation.

    Attributes:
        method: ``dlp`` | ``owl`` | ``uniform``.
        raw: unclamped per-block sparsities ``r_l`` (before the shift).
        sparsities: final per-block targets ``s_l = clip(r_l + c, .01, .99)``.
        clamped: per block, True where the clip was active.
        shift: the common additive shift ``c``.
        target: the global target ``s``.
        achieved: ``Σ P_l s_l / Σ P_l`` (equals ``target`` up to bisection precision).
    """

    method: str
    raw: list[float]
    sparsities: list[float]
    clamped: list[bool]
    shift: float
    target: float
    achieved: float

    def to_dict(self) -> dict:
        return asdict(self)


def _check_sparsity(sparsity: float) -> None:
    if not S_MIN <= sparsity <= S_MAX:
        raise ValueError(f"prune.sparsity must be in [{S_MIN}, {S_MAX}], got {sparsity}")


def _minmax_spread(values: Sequence[float], sparsity: float, half_width: float, sign: float) -> np.ndarray:
    """``s + sign·2·half_width·(v - mean v)/(max v - min v)``; uniform ``s`` when max = min."""
    v = np.asarray(values, dtype=np.float64)
    if v.ndim != 1 or v.size == 0:
        raise ValueError("need a non-empty 1-D list of block statistics")
    if not np.all(np.isfinite(v)):
        raise ValueError(f"block statistics must be finite, got {v.tolist()}")
    span = float(v.max() - v.min())
    if span == 0.0 or half_width == 0.0:
        return np.full(v.shape, float(sparsity))
    return sparsity + sign * 2.0 * half_width * (v - v.mean()) / span


def _weighted_mean(s: np.ndarray, w: np.ndarray) -> float:
    return float(np.dot(s, w) / w.sum())


def rebalance(raw: Sequence[float], sparsity: float, block_params: Sequence[int] | None = None,
              tol: float = 1e-13) -> tuple[np.ndarray, float]:
    """Find the shift ``c`` with ``Σ P_l clip(r_l + c) = s Σ P_l`` by bisection.

    ``g(c) = Σ P_l clip(r_l + c)`` is continuous and non-decreasing, equal to ``.01 ΣP`` at
    ``c = .01 - max r`` and ``.99 ΣP`` at ``c = .99 - min r``, so a root exists for any
    ``s`` in ``[.01, .99]``.

    Returns:
        ``(s_l, c)``: the clamped per-block sparsities and the shift.
    """
    _check_sparsity(sparsity)
    r = np.asarray(raw, dtype=np.float64)
    w = np.ones_like(r) if block_params is None else np.asarray(block_params, dtype=np.float64)
    if w.shape != r.shape or np.any(w <= 0):
        raise ValueError("block_params must be positive and one per block")

    def g(c: float) -> float:
        return _weighted_mean(np.clip(r + c, S_MIN, S_MAX), w)

    # why a c = 0 fast path: with no active clamp and balanced r this keeps s_l == r_l bit for
    # bit (α = 0 then gives exactly the uniform s, and equal-size blocks the public numbers)
    if abs(g(0.0) - sparsity) <= tol:
        return np.clip(r, S_MIN, S_MAX), 0.0
    lo, hi = S_MIN - float(r.max()), S_MAX - float(r.min())
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if g(mid) < sparsity:
            lo = mid
        else:
            hi = mid
        if hi - lo <= 1e-15:
            break
    c = 0.5 * (lo + hi)
    return np.clip(r + c, S_MIN, S_MAX), c


def _finish(method: str, raw: np.ndarray, sparsity: float, block_params: Sequence[int] | None) -> Allocation:
    s, c = rebalance(raw, sparsity, block_params)
    w = np.ones_like(s) if block_params is None else np.asarray(block_params, dtype=np.float64)
    clamped = [bool(x + c < S_MIN or x + c > S_MAX) for x in raw]
    return Allocation(method=method, raw=[float(x) for x in raw], sparsities=[float(x) for x in s],
                      clamped=clamped, shift=float(c), target=float(sparsity),
                      achieved=_weighted_mean(s, w))


def allocate(method: str, sparsity: float, n_blocks: int | None = None, *,
             block_stats: Sequence[float] | None = None, outlier_ratios: Sequence[float] | None = None,
             alpha: float = 0.15, lam: float = 0.08, block_params: Sequence[int] | None = None) -> Allocation:
    """Allocate per-block sparsities with the given method (see module docstring).

    Args:
        method: ``dlp`` (uses ``block_stats`` and ``alpha``), ``owl`` (``outlier_ratios``,
            ``lam``) or ``uniform`` (``n_blocks``).
        sparsity: global target ``s`` over the prunable set, in ``[0.01, 0.99]``.
        n_blocks: number of blocks (only needed for ``uniform`` without statistics).
        block_stats: per-block central Wanda score ``S_l``.
        outlier_ratios: per-block OWL outlier ratio ``D_l`` (percent).
        alpha: DLP half-band ``α``; the raw band is ``2α`` wide.
        lam: OWL ``λ``.
        block_params: prunable weights ``P_l`` per block (default: all equal).

    Returns:
        An :class:`Allocation`.
    """
    _check_sparsity(sparsity)
    if method == "dlp":
        if block_stats is None:
            raise ValueError("dlp needs block_stats")
        raw = _minmax_spread(block_stats, sparsity, alpha, +1.0)
    elif method == "owl":
        if outlier_ratios is None:
            raise ValueError("owl needs outlier_ratios")
        raw = _minmax_spread(outlier_ratios, sparsity, lam, -1.0)
    elif method == "uniform":
        count = n_blocks if n_blocks is not None else len(block_stats or outlier_ratios or [])
        if count <= 0:
            raise ValueError("uniform needs n_blocks")
        raw = np.full(count, float(sparsity))
    else:
        raise ValueError(f"prune.method must be one of {METHODS}, got {method!r}")
    return _finish(method, raw, sparsity, block_params)


def dlp_sparsities(block_stats: Sequence[float], sparsity: float, alpha: float,
                   block_params: Sequence[int] | None = None) -> list[float]:
    """DLP per-block sparsities (public entry point; see :func:`allocate`)."""
    return allocate("dlp", sparsity, block_stats=block_stats, alpha=alpha, block_params=block_params).sparsities


def owl_sparsities(outlier_ratios: Sequence[float], sparsity: float, lam: float,
                   block_params: Sequence[int] | None = None) -> list[float]:
    """OWL per-block sparsities: more outliers -> denser (see :func:`allocate`)."""
    return allocate("owl", sparsity, outlier_ratios=outlier_ratios, lam=lam, block_params=block_params).sparsities


def uniform_sparsities(n_blocks: int, sparsity: float) -> list[float]:
    """The same sparsity ``s`` for each of ``n_blocks`` blocks."""
    return allocate("uniform", sparsity, n_blocks=n_blocks).sparsities


def dlp_public_two_step(block_stats: Sequence[float], sparsity: float, alpha: float) -> list[float]:
    """Reference: the public DLP code's two-step form, returned as sparsities.

    ``I_l = 1 - S_l / Σ S``; ``I`` min-max scaled to ``[0, 2α]``; density
    ``= scaled - mean(scaled) + (1 - s)``; sparsity ``= 1 - density``, floored at 0.01 as
    the public code does (no upper clamp, no re-balancing). Kept for tests only.
    """
    S = np.asarray(block_stats, dtype=np.float64)
    importance = 1.0 - S / S.sum()
    span = importance.max() - importance.min()
    scaled = np.zeros_like(importance) if span == 0 else (importance - importance.min()) / span * (2.0 * alpha)
    density = scaled - scaled.mean() + (1.0 - sparsity)
    return [max(float(1.0 - d), 0.01) for d in density]
