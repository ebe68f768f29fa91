"""Per-token NLL and predictive entropy of a causal LM, chunked over tokens.

Q-Tuning (arXiv:2509.23873, §3) scores every sample of a micro-batch by its perplexity and its mean
predictive entropy. Both need the full softmax over the vocabulary, so a naive implementation builds
a ``[B, T, V]`` fp32 tensor (8 x 4096 x 152k x 4 B = 20 GB for Qwen2). Here the lm_head is applied to
at most ``chunk_tokens`` selected hidden rows at a time, so the largest temporary is
``[chunk_tokens, V]``.

Alignment convention (used by every function of ``effsft.sft``): all ``[B, T]`` outputs are aligned
with the *label* positions of an HF batch, i.e. position ``t`` holds the statistics of predicting
``labels[:, t]`` from the hidden state at ``t - 1``. Column 0 is never valid. A ``keep_token`` mask in
this convention can be applied to ``labels`` directly (``labels.masked_fill(~keep, -100)``).

The differentiable loss path (:func:`linear_nll`) reuses the NLL values of the no-grad scoring pass
as its forward value and recomputes the logits of the kept rows only in backward, so neither the
scoring nor the loss keeps ``[N, V]`` logits alive between forward and backward.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from effsft.corpus.tokenize import IGNORE_INDEX

DEFAULT_CHUNK_TOKENS = 1024

LossNorm = Literal["kept_response_tokens", "paper"]


@dataclass(frozen=True)
class TokenStats:
    """Label-aligned per-token statistics (fp32, no grad).

    Attributes:
        nll: ``[B, T]`` ``-log p(label_t)``; 0 where the label is ``-100`` or outside ``stat_mask``.
        entropy: ``[B, T]`` ``H_t = -sum_v p_v log p_v``; 0 outside ``stat_mask`` (all zeros when
            entropy was not requested).
    """

    nll: torch.Tensor
    entropy: torch.Tensor


def label_masks(
    labels: torch.Tensor, attention_mask: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Response and non-pad masks at label positions.

    Args:
        labels: ``[B, T]`` token ids, ``-100`` on prompt and padding.
        attention_mask: ``[B, T]`` 1 on real tokens, 0 on padding (None: no padding).

    Returns:
        ``(response_mask, nonpad_mask)``, both ``[B, T]`` bool. ``nonpad_mask[:, t]`` is True when
        token ``t`` is real and ``t >= 1`` (it has a prediction); ``response_mask`` additionally needs
        ``labels[:, t] != -100``. This is the authors' ``attention_mask[:, 1:]`` shifted back.
    """
    nonpad = torch.ones_like(labels, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
    nonpad = nonpad.clone()
    nonpad[:, 0] = False  # position 0 is never predicted
    response = nonpad & (labels != IGNORE_INDEX)
    return response, nonpad


def _chunk_stats(
    logits: torch.Tensor, targets: torch.Tensor, with_entropy: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """NLL and entropy of one chunk of logits in fp32.

    Args:
        logits: ``[n, V]`` any float dtype.
        targets: ``[n]`` ids, ``-100`` where no NLL is wanted.
        with_entropy: also return the entropy.

    Returns:
        ``nll [n]`` (0 where target is -100) and ``entropy [n]`` or None.
    """
    logp = torch.log_softmax(logits.float(), dim=-1)  # [n, V] fp32
    has_target = targets != IGNORE_INDEX
    nll = -logp.gather(1, targets.clamp_min(0)[:, None]).squeeze(1)  # [n]
    nll = torch.where(has_target, nll, torch.zeros_like(nll))
    entropy = -logp.exp().mul_(logp).sum(dim=-1) if with_entropy else None  # [n]; in place: one [n, V] temp
    return nll, entropy


def _prediction_rows(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(batch, position) indices of the label positions in ``mask`` (column 0 ignored)."""
    mask = mask.clone()
    mask[:, 0] = False
    b_idx, t_idx = mask.nonzero(as_tuple=True)  # [N], [N]
    return b_idx, t_idx


@torch.no_grad()
def _stats_from_rows(
    row_logits_fn,
    n_rows: int,
    labels: torch.Tensor,
    b_idx: torch.Tensor,
    t_idx: torch.Tensor,
    chunk_tokens: int,
    with_entropy: bool,
    device: torch.device,
) -> TokenStats:
    """Run ``row_logits_fn(start, end) -> [n, V]`` chunk by chunk and scatter into ``labels``' ``[B, T]``."""
    targets, shape = labels[b_idx, t_idx], tuple(labels.shape)
    nll = torch.zeros(shape, dtype=torch.float32, device=device)
    entropy = torch.zeros(shape, dtype=torch.float32, device=device)
    for start in range(0, n_rows, chunk_tokens):
        end = min(start + chunk_tokens, n_rows)
        c_nll, c_ent = _chunk_stats(row_logits_fn(start, end), targets[start:end], with_entropy)
        nll[b_idx[start:end], t_idx[start:end]] = c_nll
        if c_ent is not None:
            entropy[b_idx[start:end], t_idx[start:end]] = c_ent
    return TokenStats(nll=nll, entropy=entropy)


def token_stats_from_hidden(
    hidden: torch.Tensor,
    lm_head_weight: torch.Tensor,
    labels: torch.Tensor,
    stat_mask: torch.Tensor,
    *,
    with_entropy: bool = True,
    chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
) -> TokenStats:
    """Per-token NLL and entropy from final hidden states, chunked over tokens.

    The matmul runs in the hidden/weight dtype (as HF's lm_head does) and the softmax in fp32.

    Args:
        hidden: ``[B, T, H]`` final (normed) hidden states at input positions.
        lm_head_weight: ``[V, H]`` output projection (no bias).
        labels: ``[B, T]`` ids with ``-100`` on prompt/padding.
        stat_mask: ``[B, T]`` bool, label positions to score (e.g. response or non-pad mask).
        with_entropy: compute the entropy too (the loss-only path skips it).
        chunk_tokens: rows per lm_head chunk; the largest temporary is ``[chunk_tokens, V]`` fp32.

    Returns:
        :class:`TokenStats` with ``[B, T]`` fp32 tensors, zero outside ``stat_mask``.
    """
    b_idx, t_idx = _prediction_rows(stat_mask)
    rows = hidden.detach()[b_idx, t_idx - 1]  # [N, H]: state t-1 predicts label t
    weight = lm_head_weight.detach()
    return _stats_from_rows(
        lambda s, e: rows[s:e] @ weight.T,  # [n, V]
        rows.shape[0], labels, b_idx, t_idx, chunk_tokens, with_entropy, hidden.device,
    )


def token_stats_from_logits(
    logits: torch.Tensor,
    labels: torch.Tensor,
    stat_mask: torch.Tensor,
    *,
    with_entropy: bool = True,
    chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
) -> TokenStats:
    """Per-token NLL and entropy from HF logits (``logits[:, t]`` predicts token ``t + 1``).

    Args:
        logits: ``[B, T, V]`` in the model dtype; only ``[chunk_tokens, V]`` is upcast at a time.
        labels: ``[B, T]``; stat_mask: ``[B, T]`` bool; see :func:`token_stats_from_hidden`.
        with_entropy: compute the entropy too.
        chunk_tokens: rows per chunk.

    Returns:
        :class:`TokenStats`, label-aligned.
    """
    b_idx, t_idx = _prediction_rows(stat_mask)
    logits = logits.detach()
    return _stats_from_rows(
        lambda s, e: logits[b_idx[s:e], t_idx[s:e] - 1],  # [n, V]
        b_idx.numel(), labels, b_idx, t_idx, chunk_tokens, with_entropy, logits.device,
    )


class _LinearNLL(torch.autograd.Function):
    """``nll_i = -log softmax(h_i W^T)[y_i]`` with a precomputed forward and a chunked backward.

    Forward returns the NLL values computed by the no-grad scoring pass (bit-identical to the
    selection's statistics). Backward recomputes the logits chunk by chunk:
    ``dL/dz_i = g_i (softmax(z_i) - onehot(y_i))``, ``dL/dh = dz W``, ``dL/dW = dz^T h``.
    """

    @staticmethod
    def forward(ctx, rows, weight, targets, nll_values, chunk_tokens):  # noqa: D102
        ctx.save_for_backward(rows, weight, targets)
        ctx.chunk_tokens = chunk_tokens
        return nll_values.detach().clone().to(torch.float32)

    @staticmethod
    def backward(ctx, grad_out):  # noqa: D102
        rows, weight, targets = ctx.saved_tensors
        need_rows, need_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_rows = torch.zeros_like(rows) if need_rows else None
        grad_weight = torch.zeros_like(weight, dtype=torch.float32) if need_weight else None
        for start in range(0, rows.shape[0], ctx.chunk_tokens):
            end = min(start + ctx.chunk_tokens, rows.shape[0])
            h = rows[start:end]  # [n, H]
            probs = torch.softmax((h @ weight.T).float(), dim=-1)  # [n, V] fp32
            probs[torch.arange(end - start, device=h.device), targets[start:end]] -= 1.0
            dz = (probs * grad_out[start:end, None].float()).to(weight.dtype)  # [n, V]
            if need_rows:
                grad_rows[start:end] = dz @ weight
            if need_weight:
                grad_weight += (dz.T @ h).float()
        if need_weight:
            grad_weight = grad_weight.to(weight.dtype)
        return grad_rows, grad_weight, None, None, None


def linear_nll(
    rows: torch.Tensor,
    lm_head_weight: torch.Tensor,
    targets: torch.Tensor,
    nll_values: torch.Tensor,
    chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
) -> torch.Tensor:
    """Differentiable per-row NLL of ``rows @ W^T`` whose forward value is already known.

    Args:
        rows: ``[N, H]`` hidden states (with grad) that predict ``targets``.
        lm_head_weight: ``[V, H]``.
        targets: ``[N]`` ids (no ``-100``).
        nll_values: ``[N]`` the NLLs of these rows from :func:`token_stats_from_hidden`.
        chunk_tokens: rows per backward chunk.

    Returns:
        ``[N]`` fp32 NLL with a grad_fn into ``rows`` and ``lm_head_weight``.
    """
    return _LinearNLL.apply(rows, lm_head_weight, targets, nll_values, chunk_tokens)


def loss_denominator(
    keep_token: torch.Tensor, response_mask: torch.Tensor, loss_norm: LossNorm
) -> torch.Tensor:
    """Number of positions the loss is averaged over.

    ``kept_response_tokens``: kept response tokens (the plain SFT reduction with the mask applied).
    ``paper``: every kept non-pad position, prompt included (the authors' ``compute_loss``, §2.6).
    """
    if loss_norm == "kept_response_tokens":
        return (keep_token & response_mask).sum()
    if loss_norm == "paper":
        return keep_token.sum()
    raise ValueError(f"qtuning.loss_norm must be 'kept_response_tokens' or 'paper', got {loss_norm!r}")


def masked_sft_loss(
    token_nll: torch.Tensor,
    keep_token: torch.Tensor,
    response_mask: torch.Tensor,
    loss_norm: LossNorm = "kept_response_tokens",
) -> torch.Tensor:
    """SFT loss ``sum(nll * M) / max(1, denominator)`` on a ``[B, T]`` NLL tensor.

    Args:
        token_nll: ``[B, T]`` label-aligned NLL (may carry grad); prompt positions contribute 0.
        keep_token: ``[B, T]`` bool M (non-pad positions of kept samples minus dropped tokens).
        response_mask: ``[B, T]`` bool.
        loss_norm: see :func:`loss_denominator`.

    Returns:
        Scalar loss. With ``keep_token = response_mask`` this is plain SFT (mean response NLL).
    """
    numerator = (token_nll * (keep_token & response_mask)).sum()
    return numerator / loss_denominator(keep_token, response_mask, loss_norm).clamp_min(1)


def hidden_sft_loss(
    hidden: torch.Tensor,
    lm_head_weight: torch.Tensor,
    labels: torch.Tensor,
    token_nll: torch.Tensor,
    keep_token: torch.Tensor,
    response_mask: torch.Tensor,
    loss_norm: LossNorm = "kept_response_tokens",
    chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
    denominator: int | torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Masked SFT loss from hidden states, only the kept response rows go through the lm_head.

    Args:
        hidden: ``[B, T, H]`` final hidden states with grad.
        lm_head_weight: ``[V, H]``.
        labels: ``[B, T]``.
        token_nll: ``[B, T]`` no-grad NLL of these hidden states (from :func:`token_stats_from_hidden`),
            valid at least on ``keep_token & response_mask``.
        keep_token: ``[B, T]`` bool loss mask M.
        response_mask: ``[B, T]`` bool.
        loss_norm: ``kept_response_tokens`` or ``paper``.
        chunk_tokens: rows per backward chunk.
        denominator: override of the loss denominator (global score scope divides by the count of
            the whole all-gathered batch); default from ``loss_norm`` on this batch.

    Returns:
        ``(loss, numerator, denominator)``; the loss is ``numerator / max(1, denominator)``. When no
        token is kept the loss is an exact 0 that still depends on ``hidden`` (so every parameter
        receives a (zero) gradient, as DeepSpeed/DDP require).
    """
    b_idx, t_idx = _prediction_rows(keep_token & response_mask)
    nll_rows = linear_nll(
        hidden[b_idx, t_idx - 1], lm_head_weight, labels[b_idx, t_idx], token_nll[b_idx, t_idx], chunk_tokens
    )  # [N]
    numerator = nll_rows.sum()
    if b_idx.numel() == 0:
        numerator = numerator + 0.0 * (hidden.sum() + lm_head_weight.sum())
    if denominator is None:
        denominator = loss_denominator(keep_token, response_mask, loss_norm)
    denominator = torch.as_tensor(denominator, device=hidden.device)
    return numerator / denominator.clamp_min(1), numerator.detach(), denominator
