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

1. :func:`~effsft.sft.qtuning_scores.sample_stats` and :func:`~effsft.sft.qtuning_scores.token_scores`
   run on each rank's own batch;
2. the job layer all-gathers them (``SampleStats.concat`` / :func:`pad_concat`);
3. every rank runs the same :func:`eu_select` on the concatenation and keeps its own rows
   (:func:`split_rows`). With a shared ``seed`` the random baselines agree as well.

:func:`eu_prune` is the one-call local entry point on torch tensors (the public one-call API).
"""

from __future__ import annotations

import math
from typing import Literal, Sequence

import numpy as np
import torch

from effsft.sft.qtuning_samples import Method, SampleSelection, select_samples, top_indices
from effsft.sft.qtuning_scores import SampleStats, np_bool, sample_stats, token_scores


# --------------------------------------------------------------------------------------------------
# Token selection
# --------------------------------------------------------------------------------------------------


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
    resp = np_bool(response_mask)
    nonpad = resp if nonpad_mask is None else np_bool(nonpad_mask) | resp
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
            drop = top_indices(cand_scores, info["n_drop_tokens"])
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
        drops.append(members[top_indices(cand_scores[members], n_drop)])
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
    resp = np_bool(response_mask)
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
