"""Q-Tuning sample and token pruning on the error-uncertainty (EU) plane (pure, CPU, float64).

Paper: "Winning the Pruning Gamble", arXiv:2509.23873 (Q-Tuning). Behaviour follows the authors'
released trainer (``plug == "wisely"``) as written down in ``docs/algorithms/qtuning.md`` §2, plus the effsft
options of §3 (response-only entropy, per-sample token budget, baselines, global score scope).

Every sample of a micro-batch gets ``PPL_s = exp(mean response NLL)`` and ``Ent_s`` (mean predictive
entropy). A corner-quantile bisection keeps the high-PPL/low-Ent corner (Q2, token-pruned) and the
low-PPL/high-Ent corner (Q4, kept whole); fill-up tops the kept set up to ``K = max(1, round(B r_s))``.
In Q2 rows the response tokens with the highest neighbour-smoothed PPL score
``s_t = (1-λ) τ_t + λ (τ_{t-1} + τ_{t+1})`` are dropped under a batch-level token budget.

The selection is split so that the data-parallel ``global`` score scope is trivial for the job layer:

1. :func:`sample_stats` and :func:`token_scores` run on each rank's own batch;
2. the job layer all-gathers them (``SampleStats.concat`` / :func:`pad_concat`);
3. every rank runs the same :func:`eu_select` on the concatenation and keeps its own rows
   (:func:`split_rows`). With a shared ``seed`` the random baselines agree as well.

:func:`eu_prune` is the one-call local entry point on torch tensors (the public one-call API).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal, Sequence

import numpy as np
import torch

Method = Literal["off", "qtuning", "random_sample", "ppl_only", "entropy_only", "random_token"]
METHODS: tuple[str, ...] = ("off", "qtuning", "random_sample", "ppl_only", "entropy_only", "random_token")
SAMPLE_BASELINES: tuple[str, ...] = ("random_sample", "ppl_only", "entropy_only")

# Bisection constants are fixed by the spec (§3.1), matching the authors' code.
BISECT_TOL = 0.01
BISECT_MAX_ITER = 10
BISECT_A_MAX = 0.49
NORM_EPS = 1e-12  # min-max normalisation treats a smaller range as constant (authors' code)


# --------------------------------------------------------------------------------------------------
# Per-sample statistics
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SampleStats:
    """Per-sample scores, all ``[B]`` numpy arrays (the only thing global scope must gather).

    Attributes:
        ppl: float64, ``exp(mean NLL over response tokens)`` (1 for a row without response).
        ent: float64, mean predictive entropy over the entropy scope.
        n_nonpad: int64, non-pad label positions (prompt + response), the ``T_all`` unit.
        n_resp: int64, response label positions.
    """

    ppl: np.ndarray
    ent: np.ndarray
    n_nonpad: np.ndarray
    n_resp: np.ndarray

    def __len__(self) -> int:
        return int(self.ppl.shape[0])

    @classmethod
    def concat(cls, parts: Sequence["SampleStats"]) -> "SampleStats":
        """Concatenate the stats of several ranks in rank order."""
        return cls(*(np.concatenate([getattr(p, f) for p in parts]) for f in ("ppl", "ent", "n_nonpad", "n_resp")))

    def to_array(self) -> np.ndarray:
        """``[B, 4]`` float64 (ppl, ent, n_nonpad, n_resp) for a single all-gather."""
        return np.stack([self.ppl, self.ent, self.n_nonpad, self.n_resp], axis=1).astype(np.float64)

    @classmethod
    def from_array(cls, arr: np.ndarray) -> "SampleStats":
        """Inverse of :meth:`to_array`."""
        arr = np.asarray(arr, dtype=np.float64).reshape(-1, 4)
        return cls(arr[:, 0].copy(), arr[:, 1].copy(), arr[:, 2].astype(np.int64), arr[:, 3].astype(np.int64))


def _np_bool(mask: torch.Tensor | np.ndarray) -> np.ndarray:
    if isinstance(mask, torch.Tensor):
        return mask.detach().cpu().numpy().astype(bool)
    return np.asarray(mask, dtype=bool)


def _np_f64(x: torch.Tensor | np.ndarray) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().to(torch.float64).numpy()
    return np.asarray(x, dtype=np.float64)


def sample_stats(
    token_nll: torch.Tensor | np.ndarray,
    token_entropy: torch.Tensor | np.ndarray,
    response_mask: torch.Tensor | np.ndarray,
    nonpad_mask: torch.Tensor | np.ndarray | None = None,
    entropy_scope: Literal["response", "all"] = "response",
) -> SampleStats:
    """Per-sample PPL and entropy (docs/algorithms/qtuning.md §2.1), in float64.

    Args:
        token_nll: ``[B, T]`` label-aligned NLL.
        token_entropy: ``[B, T]`` label-aligned predictive entropy.
        response_mask: ``[B, T]`` bool, response label positions.
        nonpad_mask: ``[B, T]`` bool, all non-pad label positions (prompt + response); default
            ``response_mask``.
        entropy_scope: ``response`` (effsft default, the paper's formula) or ``all`` (non-pad
            positions, prompt included: the authors' code).

    Returns:
        :class:`SampleStats`.
    """
    resp = _np_bool(response_mask)
    nonpad = resp if nonpad_mask is None else _np_bool(nonpad_mask)
    nll, ent = _np_f64(token_nll), _np_f64(token_entropy)
    n_resp = resp.sum(axis=1)
    ppl = np.exp(np.where(resp, nll, 0.0).sum(axis=1) / np.maximum(n_resp, 1))
    if entropy_scope == "response":
        ent_mask = resp
    elif entropy_scope == "all":
        ent_mask = nonpad
    else:
        raise ValueError(f"qtuning.entropy_scope must be 'response' or 'all', got {entropy_scope!r}")
    ent_s = np.where(ent_mask, ent, 0.0).sum(axis=1) / np.maximum(ent_mask.sum(axis=1), 1)
    return SampleStats(ppl=ppl, ent=ent_s, n_nonpad=nonpad.sum(axis=1).astype(np.int64), n_resp=n_resp.astype(np.int64))


# --------------------------------------------------------------------------------------------------
# Sample selection
# --------------------------------------------------------------------------------------------------


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


def _top_indices(scores: np.ndarray, k: int) -> np.ndarray:
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
    order = _top_indices(np.abs(p_hat - e_hat)[remain], need)
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
        picked = _top_indices(-stats.ppl if reverse else stats.ppl, k)
    elif method == "entropy_only":  # default: the K lowest-Ent samples
        picked = _top_indices(stats.ent if reverse else -stats.ent, k)
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


# --------------------------------------------------------------------------------------------------
# Token selection
# --------------------------------------------------------------------------------------------------


def token_scores(
    token_nll: torch.Tensor | np.ndarray,
    response_mask: torch.Tensor | np.ndarray,
    nonpad_mask: torch.Tensor | np.ndarray | None = None,
    lam: float = 0.5,
    neighbor_div2: bool = False,
) -> np.ndarray:
    """Neighbour-smoothed token PPL ``s_t`` (docs/algorithms/qtuning.md §2.5), float64 ``[B, T]``.

    ``τ_t = exp(ℓ_t)`` on response positions, 1 on other non-pad positions (prompt: ℓ = 0), 0 on
    padding and outside the row; ``s_t = (1-λ) τ_t + λ (τ_{t-1} + τ_{t+1})`` (the sum is halved
    only with ``neighbor_div2``, the third-party variant).
    """
    resp = _np_bool(response_mask)
    nonpad = resp if nonpad_mask is None else _np_bool(nonpad_mask) | resp
    tau = np.where(resp, np.exp(_np_f64(token_nll)), np.where(nonpad, 1.0, 0.0))  # [B, T]
    neighbours = np.zeros_like(tau)
    neighbours[:, 1:] += tau[:, :-1]
    neighbours[:, :-1] += tau[:, 1:]
    if neighbor_div2:
        neighbours /= 2.0
    return (1.0 - lam) * tau + lam * neighbours


def per_sample_keep_count(n_resp: int, token_ratio: float) -> int:
    """ceil(r_t n_resp); the product is rounded to 9 digits first so 0.1 * 30 gives 3, not 4."""
    return int(math.ceil(round(token_ratio * n_resp, 9)))


def batch_drop_budget(stats: SampleStats, keep: np.ndarray, sample_ratio: float, token_ratio: float, n_candidates: int) -> dict:
    """Batch token budget of §2.5: how many candidate tokens to drop.

    ``drop_goal = T_all - round(T_all r_s r_t)``; ``n_drop = min(max(0, drop_goal - by_samp), #cand)``.
    """
    t_all = int(stats.n_nonpad.sum())
    drop_goal = t_all - int(round(t_all * sample_ratio * token_ratio))
    by_samp = int(stats.n_nonpad[~keep].sum())
    n_drop = min(max(0, drop_goal - by_samp), n_candidates)
    return {"drop_goal": drop_goal, "dropped_by_samples": by_samp, "n_drop_tokens": n_drop}


def select_tokens(
    scores: np.ndarray,
    response_mask: torch.Tensor | np.ndarray,
    nonpad_mask: torch.Tensor | np.ndarray | None,
    stats: SampleStats,
    selection: SampleSelection,
    sample_ratio: float,
    token_ratio: float,
    *,
    token_budget: Literal["batch", "per_sample"] = "batch",
    random_scores: bool = False,
    rng: np.random.Generator | None = None,
) -> tuple[np.ndarray, dict]:
    """Token keep mask M: non-pad positions of kept samples minus dropped response tokens.

    Args:
        scores: ``[B, T]`` float64 drop scores (higher = dropped first), from :func:`token_scores`.
        response_mask, nonpad_mask: ``[B, T]`` bool (nonpad default = response).
        stats: per-sample stats (``n_nonpad`` gives ``T_all``).
        selection: output of :func:`select_samples`.
        sample_ratio, token_ratio: r_s, r_t.
        token_budget: ``batch`` (one top-k over all candidates of the batch) or ``per_sample``
            (each pruned row keeps its ``ceil(r_t n_resp)`` lowest-score response tokens).
        random_scores: replace the scores by uniform draws (random token drop of the baselines);
            one draw per candidate in row-major order, so equal seeds agree across ranks.
        rng: numpy generator for ``random_scores``.

    Returns:
        ``(keep_token [B, T] bool, info)``. Ties are dropped lower index first.
    """
    resp = _np_bool(response_mask)
    nonpad = resp if nonpad_mask is None else _np_bool(nonpad_mask) | resp
    keep_token = nonpad & selection.keep[:, None]
    cand = resp & selection.prune_rows[:, None]  # [B, T]
    b_idx, t_idx = np.nonzero(cand)  # row-major order = concatenation order across ranks
    cand_scores = scores[b_idx, t_idx]
    if random_scores:
        cand_scores = (rng or np.random.default_rng(0)).random(b_idx.size)
    info = {"n_candidates": int(b_idx.size), "drop_goal": 0, "dropped_by_samples": int(stats.n_nonpad[~selection.keep].sum()), "n_drop_tokens": 0}
    if token_ratio < 1.0 and b_idx.size:
        if token_budget == "batch":
            info.update(batch_drop_budget(stats, selection.keep, sample_ratio, token_ratio, int(b_idx.size)))
            drop = _top_indices(cand_scores, info["n_drop_tokens"])
        elif token_budget == "per_sample":
            drop = _per_sample_drops(b_idx, cand_scores, token_ratio)
            info["n_drop_tokens"] = int(drop.size)
        else:
            raise ValueError(f"qtuning.token_budget must be 'batch' or 'per_sample', got {token_budget!r}")
        keep_token[b_idx[drop], t_idx[drop]] = False
    return keep_token, info


def _per_sample_drops(b_idx: np.ndarray, cand_scores: np.ndarray, token_ratio: float) -> np.ndarray:
    """Candidate indices to drop so each row keeps ceil(r_t n) of its n candidates."""
    drops = []
    for row in np.unique(b_idx):
        members = np.flatnonzero(b_idx == row)
        n_drop = members.size - per_sample_keep_count(members.size, token_ratio)
        drops.append(members[_top_indices(cand_scores[members], n_drop)])
    return np.concatenate(drops) if drops else np.zeros(0, dtype=np.int64)


# --------------------------------------------------------------------------------------------------
# Whole selection, local and global
# --------------------------------------------------------------------------------------------------


def eu_select(
    stats: SampleStats,
    scores: np.ndarray,
    response_mask: torch.Tensor | np.ndarray,
    nonpad_mask: torch.Tensor | np.ndarray | None,
    sample_ratio: float,
    token_ratio: float,
    *,
    method: Method = "qtuning",
    token_budget: Literal["batch", "per_sample"] = "batch",
    baseline_order: Literal["default", "reverse"] = "default",
    rng: np.random.Generator | None = None,
) -> tuple[np.ndarray, np.ndarray, dict]:
    """Sample + token selection from precomputed stats and scores (numpy in, numpy out).

    This is the function every rank calls on the all-gathered inputs in ``score_scope: global``:
    it sees only per-sample stats and ``[B, T]`` score/mask arrays, so the concatenation of W
    ranks (rows padded to a common T with :func:`pad_concat`) gives the local-on-concatenation
    result by construction.

    Returns:
        ``(keep_sample [B] bool, keep_token [B, T] bool, info)``; see :func:`eu_prune`.
    """
    rng = rng or np.random.default_rng(0)
    sel = select_samples(stats, sample_ratio, method=method, baseline_order=baseline_order, rng=rng)
    random_scores = method != "qtuning"
    keep_token, tok_info = select_tokens(
        scores, response_mask, nonpad_mask, stats, sel, sample_ratio, token_ratio,
        token_budget=token_budget, random_scores=random_scores, rng=rng,
    )
    resp = _np_bool(response_mask)
    info = {
        "method": method,
        "n_samples": len(stats),
        "n_kept_samples": int(sel.keep.sum()),
        **sel.info,
        **tok_info,
        "total_tokens": int(stats.n_nonpad.sum()),
        "kept_tokens": int(keep_token.sum()),
        "total_response_tokens": int(resp.sum()),
        "kept_response_tokens": int((keep_token & resp).sum()),
        "ppl": stats.ppl.copy(),
        "ent": stats.ent.copy(),
        "decision": sel.decision.copy(),
        "keep": sel.keep.copy(),
    }
    return sel.keep, keep_token, info


def pad_concat(arrays: Sequence[np.ndarray], fill=0) -> np.ndarray:
    """Stack ``[B_r, T_r]`` arrays of W ranks into ``[sum B_r, max T_r]`` (right-padded with fill)."""
    t_max = max(a.shape[1] for a in arrays)
    out = [np.pad(a, ((0, 0), (0, t_max - a.shape[1])), constant_values=fill) for a in arrays]
    return np.concatenate(out, axis=0)


def split_rows(arr: np.ndarray, sizes: Sequence[int], rank: int) -> np.ndarray:
    """Rows of ``rank`` from a rank-ordered concatenation (column padding is kept)."""
    start = int(sum(sizes[:rank]))
    return arr[start : start + sizes[rank]]


def make_rng(seed: int | None, step: int = 0) -> np.random.Generator:
    """Generator for the random baselines; identical on all ranks for the same (seed, step)."""
    return np.random.default_rng([0 if seed is None else int(seed), int(step)])


def eu_prune(
    token_nll: torch.Tensor,
    token_entropy: torch.Tensor,
    response_mask: torch.Tensor,
    sample_ratio: float,
    token_ratio: float,
    lam: float = 0.5,
    *,
    nonpad_mask: torch.Tensor | None = None,
    entropy_scope: Literal["response", "all"] = "response",
    token_budget: Literal["batch", "per_sample"] = "batch",
    neighbor_div2: bool = False,
    method: Method = "qtuning",
    baseline_order: Literal["default", "reverse"] = "default",
    generator: np.random.Generator | None = None,
    seed: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """Q-Tuning pruning of one micro-batch (local score scope).

    Args:
        token_nll: ``[B, T]`` label-aligned NLL (0 off-response), e.g. from
            :func:`effsft.sft.token_stats.token_stats_from_hidden`.
        token_entropy: ``[B, T]`` label-aligned predictive entropy.
        response_mask: ``[B, T]`` bool, response label positions.
        sample_ratio: r_s, target kept fraction of samples.
        token_ratio: r_t, target kept fraction of tokens inside pruned samples.
        lam: λ of the neighbour-smoothed token score.
        nonpad_mask: ``[B, T]`` bool, all non-pad label positions (prompt + response); they count in
            ``T_all`` and in the ``paper`` loss denominator. Default ``response_mask``.
        entropy_scope: ``response`` or ``all`` (authors' code: prompt included).
        token_budget: ``batch`` or ``per_sample``.
        neighbor_div2: halve the neighbour sum.
        method: ``qtuning`` | ``off`` | ``random_sample`` | ``ppl_only`` | ``entropy_only`` |
            ``random_token``.
        baseline_order: ``default`` | ``reverse`` (direction of ppl_only / entropy_only).
        generator: numpy generator for the random baselines (overrides ``seed``).
        seed: seed for the random baselines when no generator is given.

    Returns:
        ``keep_sample`` ``[B]`` bool, ``keep_token`` ``[B, T]`` bool (the loss mask M: non-pad
        positions of kept samples minus dropped tokens), both on the input's device, and ``info``:
        scalar log values (``n_Q1..n_Q4``, ``n_other``, ``n_fill``, ``n_fill_q2like``,
        ``n_fill_q4like``, ``n_kept_samples``, ``kept/total_response_tokens``, ``kept/total_tokens``,
        ``a``, ``P_lo``, ``P_hi``, ``E_lo``, ``E_hi``, ``P_mid``, ``E_mid``, budget terms) and per-sample
        arrays ``ppl``, ``ent``, ``decision``, ``keep`` for :func:`effsft.sft.eu_plot.plot_eu_plane`.
    """
    stats = sample_stats(token_nll, token_entropy, response_mask, nonpad_mask, entropy_scope)
    scores = token_scores(token_nll, response_mask, nonpad_mask, lam, neighbor_div2)
    keep_sample, keep_token, info = eu_select(
        stats, scores, response_mask, nonpad_mask, sample_ratio, token_ratio,
        method=method, token_budget=token_budget, baseline_order=baseline_order,
        rng=generator if generator is not None else make_rng(seed),
    )
    device = response_mask.device
    return torch.from_numpy(keep_sample).to(device), torch.from_numpy(keep_token).to(device), info


def log_scalars(info: dict, prefix: str = "qtuning/") -> dict[str, float]:
    """The numeric scalars of an ``info`` dict, prefixed, for the metrics logger."""
    return {
        prefix + k: float(v)
        for k, v in info.items()
        if isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool)
    }
