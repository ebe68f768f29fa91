"""GRPO advantages and clipped policy loss (TRL formulas, docs/algorithms/prefix_grouper_grpo.md §3).

References: DeepSeekMath (arXiv 2402.03300, Eq. 3 GRPO objective), Dr. GRPO (arXiv 2503.20783,
``scale_rewards=none`` and the ``dr_grpo`` normaliser), DAPO (arXiv 2503.14476, token-level
normalisation and the asymmetric clip ``eps_high``); TRL ``GRPOTrainer._compute_loss`` (v1.16).
"""

from __future__ import annotations

import torch

STD_EPS = 1e-4  # TRL adds it to the std, not inside the sqrt
LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo")
SCALES = ("group", "batch", "none")


def combine_rewards(per_func: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
    """Weighted sum of several reward functions; ``None`` (NaN) entries are skipped.

    Args:
        per_func: ``[N, K]`` rewards of K functions (NaN where a function returned None).
        weights: ``[K]`` (default all ones).

    Returns:
        ``[N]``; NaN where every function returned None for that sample.
    """
    w = torch.ones(per_func.shape[1], dtype=per_func.dtype) if weights is None else weights.to(per_func)
    total = (per_func * w).nansum(dim=1)  # [N]
    return torch.where(per_func.isnan().all(dim=1), torch.full_like(total, float("nan")), total)


def _nanstd(x: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Bessel-corrected std ignoring NaN (NaN when fewer than 2 valid values)."""
    valid = ~x.isnan()
    n = valid.sum(dim) if dim is not None else valid.sum()
    mean = x.nanmean(dim, keepdim=dim is not None) if dim is not None else x.nanmean()
    sq = torch.where(valid, (x - mean) ** 2, torch.zeros_like(x))
    ss = sq.sum(dim) if dim is not None else sq.sum()
    return torch.sqrt(ss / (n - 1))


def group_advantages(rewards: torch.Tensor, group_size: int, scale: str = "group") -> torch.Tensor:
    """Group-relative advantages ``A_i = (r_i - mean_group(r)) / (std + 1e-4)``.

    Args:
        rewards: ``[N]`` prompt-major (N = num_prompts * group_size); NaN = no reward (skipped in
            the statistics, advantage 0).
        group_size: G, completions per prompt.
        scale: ``group`` (÷ group std), ``batch`` (÷ std over the whole batch, computed before any
            sharding; the mean is still per group) or ``none`` (Dr. GRPO: no division).

    Returns:
        ``[N]`` advantages; exactly 0 in any group whose valid rewards are all equal, and for NaN rewards.
    """
    if scale not in SCALES:
        raise ValueError(f"scale_rewards must be one of {SCALES}, got {scale!r}")
    if rewards.numel() % group_size:
        raise ValueError(f"{rewards.numel()} rewards do not split into groups of {group_size}")
    r = rewards.view(-1, group_size)  # [P, G]
    valid = ~r.isnan()
    mean = r.nanmean(dim=1, keepdim=True)  # [P, 1] (NaN for an all-None group)
    centred = r - mean
    if scale == "group":
        centred = centred / (_nanstd(r, dim=1)[:, None] + STD_EPS)
    elif scale == "batch":
        centred = centred / (_nanstd(r.flatten()) + STD_EPS)
    # An all-equal group must give exactly 0: r - mean can round away from 0 (e.g. mean of 3 x 0.1).
    lo = torch.where(valid, r, torch.full_like(r, float("inf"))).amin(dim=1, keepdim=True)
    hi = torch.where(valid, r, torch.full_like(r, float("-inf"))).amax(dim=1, keepdim=True)
    flat = ~(hi > lo)  # [P, 1]: all equal, or at most one valid value
    adv = torch.where(valid & ~flat, centred, torch.zeros_like(r))
    return adv.reshape(-1)


def per_token_loss(logps, old_logps, advantages, eps_low: float, eps_high: float, ref_logps=None, beta: float = 0.0):
    """``ℓ_t = -min(w A, clip(w, 1-eps_low, 1+eps_high) A) + beta * kl_t`` with ``w = exp(s - s_old)``.

    Args:
        logps, old_logps: ``[N, T]`` per-token log-probs (current policy, rollout-time policy).
        advantages: ``[N]``.
        ref_logps: ``[N, T]`` reference log-probs (needed when beta != 0).

    Returns:
        ``[N, T]`` (unmasked).
    """
    a = advantages[:, None]  # [N, 1]
    w = torch.exp(logps - old_logps)  # [N, T]
    loss = -torch.min(w * a, torch.clamp(w, 1 - eps_low, 1 + eps_high) * a)
    if beta != 0.0:
        if ref_logps is None:
            raise ValueError("beta != 0 needs ref_logps")
        loss = loss + beta * k3_kl(logps, ref_logps)
    return loss


def k3_kl(logps: torch.Tensor, ref_logps: torch.Tensor) -> torch.Tensor:
    """Schulman's k3 estimator ``exp(s_ref - s) - (s_ref - s) - 1`` (>= 0), ``[N, T]``."""
    d = ref_logps - logps
    return torch.exp(d) - d - 1


def grpo_loss(
    logps: torch.Tensor,
    old_logps: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    loss_type: str,
    eps_low: float,
    eps_high: float,
    ref_logps: torch.Tensor | None = None,
    beta: float = 0.0,
    max_completion_length: int | None = None,
    num_active_tokens: float | torch.Tensor | None = None,
    grad_accum: int = 1,
    world_size: int = 1,
) -> torch.Tensor:
    """Micro-batch GRPO loss (docs/algorithms/prefix_grouper_grpo.md §3 table); each scaling is applied exactly once here.

    Args:
        logps, old_logps, ref_logps: ``[N, T]`` right-padded per-token log-probs.
        advantages: ``[N]``.
        mask: ``[N, T]`` completion mask (1 = real token).
        loss_type: ``grpo`` (per-sequence mean, then mean over sequences), ``bnpo`` (mean over the
            micro-batch's tokens), ``dr_grpo`` (sum / (N * max_completion_length)) or ``dapo``
            (sum / (N_tok / world_size), N_tok = active tokens of the whole optimizer step over all ranks).
        eps_low, eps_high: clip range ``[1 - eps_low, 1 + eps_high]``.
        beta: k3-KL coefficient.
        max_completion_length: dr_grpo's L_max (default T).
        num_active_tokens: dapo's N_tok (default: this micro-batch's ``mask.sum()``, i.e. W = GA = 1).
        grad_accum: GA; grpo/bnpo/dr_grpo divide by it, dapo does not (N_tok already spans GA).
            A caller whose engine divides by GA itself (DeepSpeed) must compensate.
        world_size: W, data-parallel ranks (dapo only).

    Returns:
        Scalar loss.
    """
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"loss_type must be one of {LOSS_TYPES}, got {loss_type!r}")
    m = mask.to(logps.dtype)
    masked = per_token_loss(logps, old_logps, advantages, eps_low, eps_high, ref_logps, beta) * m  # [N, T]
    if loss_type == "grpo":
        return (masked.sum(-1) / m.sum(-1).clamp(min=1.0)).mean() / grad_accum
    if loss_type == "bnpo":
        return masked.sum() / m.sum().clamp(min=1.0) / grad_accum
    if loss_type == "dr_grpo":
        l_max = max_completion_length if max_completion_length is not None else logps.shape[1]
        return masked.sum() / (logps.shape[0] * l_max) / grad_accum
    n_tok = m.sum() if num_active_tokens is None else torch.as_tensor(num_active_tokens, dtype=logps.dtype)
    return masked.sum() / (n_tok.clamp(min=1.0) / world_size)


@torch.no_grad()
def grpo_metrics(logps, old_logps, advantages, mask, eps_low: float, eps_high: float,
                 ref_logps=None) -> dict[str, torch.Tensor]:
    """Token-averaged diagnostics (TRL's definitions), as 0-d tensors (reduce across ranks, then ``.item()``).

    Returns:
        ``clip_ratio/low`` (w < 1-eps_low with A < 0), ``clip_ratio/high`` (w > 1+eps_high with A > 0),
        ``clip_ratio/region`` (either), ``ratio_mean`` and, with ``ref_logps``, ``kl`` (mean k3).
    """
    m = mask.to(torch.float32)
    denom = m.sum().clamp(min=1.0)

    def mean(x):
        return (x.float() * m).sum() / denom

    w = torch.exp(logps - old_logps)
    a = advantages[:, None]
    low = (w < 1 - eps_low) & (a < 0)
    high = (w > 1 + eps_high) & (a > 0)
    out = {"clip_ratio/low": mean(low), "clip_ratio/high": mean(high), "clip_ratio/region": mean(low | high),
           "ratio_mean": mean(w)}
    if ref_logps is not None:
        out["kl"] = mean(k3_kl(logps, ref_logps))
    return out


def pad_logprobs(seqs: list[torch.Tensor], max_len: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Flat list of 1-D per-token log-probs -> right-padded ``[N, T]`` values and ``[N, T]`` bool mask."""
    lengths = torch.tensor([s.numel() for s in seqs])
    T = max(int(lengths.max()), max_len or 0)
    vals = torch.nn.utils.rnn.pad_sequence(seqs, batch_first=True)  # [N, max len], differentiable
    vals = torch.nn.functional.pad(vals, (0, T - vals.shape[1]))
    mask = torch.arange(T)[None] < lengths[:, None]  # [N, T]
    return vals, mask.to(vals.device)
