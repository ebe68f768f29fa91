"""Response NLL of a causal LM: the one rule every job scores tokens by.

A target is a token whose label is not -100; the token at position t is predicted by the logits
at t-1 (labels are shifted, as in training). Only the predicting hidden states go through the
LM head, ``chunk_size`` rows at a time in fp32, so no ``[B, T, V]`` fp32 logits tensor exists.
Batches are padded (``attention_mask``) or packed (:mod:`effsft.models.packing`); per-row sums
come back either way.

* :func:`row_token_stats` (no grad): per-row NLL sum, entropy sum and target count. Select's
  CE / PPL / entropy / IFD and eval's perplexity use it.
* :func:`response_nll` (differentiable): the NLL sum of a micro-batch, each chunk's head and
  cross-entropy recomputed in backward. SFT's loss uses it.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from effsft.models.packing import IGNORE_INDEX, model_inputs
from effsft.models.parts import decoder_and_head, head_logits_fp32


def _targets(batch: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(batch row, predicting position, row of the token) of every target: ``[M]`` each."""
    labels = batch["labels"]
    b, t = torch.nonzero(labels[:, 1:] != IGNORE_INDEX, as_tuple=True)  # t = predicting position
    row = batch["segment"][b, t + 1] if "segment" in batch else b
    return b, t, row


@torch.inference_mode()
def row_token_stats(model, batch: dict, n_rows: int, chunk_size: int = 1024,
                    with_entropy: bool = True) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-row sums of -log p(target) and of the predictive entropy, and target counts.

    Args:
        model: HF causal LM (any device / dtype).
        batch: ``input_ids`` / ``labels`` and ``attention_mask`` (padded) or ``position_ids`` /
            ``segment`` (packed), ``[B, T]``.
        n_rows: rows in the batch (padded: B; packed: segments).
        chunk_size: target positions per LM-head call.
        with_entropy: also sum the entropy (else zeros).

    Returns:
        ``(nll_sum [n_rows] fp64, entropy_sum [n_rows] fp64, n_targets [n_rows] int64)`` on CPU.
    """
    body, head = decoder_and_head(model, plain_head=False)
    dev = next(model.parameters()).device
    batch = {k: v.to(dev) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
    hidden = body(**model_inputs(batch)).last_hidden_state  # [B, T, H]
    b, t, row = _targets(batch)
    targets = batch["input_ids"][b, t + 1]
    nll_sum = torch.zeros(n_rows, dtype=torch.float64, device=dev)
    ent_sum = torch.zeros(n_rows, dtype=torch.float64, device=dev)
    for s in range(0, len(b), chunk_size):
        sl = slice(s, s + chunk_size)
        logp = torch.log_softmax(head_logits_fp32(model, head, hidden[b[sl], t[sl]]), -1)  # [m, V]
        nll_sum.index_add_(0, row[sl], -logp.gather(1, targets[sl, None]).squeeze(1).double())
        if with_entropy:
            ent_sum.index_add_(0, row[sl], -(logp.exp() * logp).sum(-1).double())
    return nll_sum.cpu(), ent_sum.cpu(), torch.bincount(row, minlength=n_rows).cpu()


def _chunk_nll_sum(head: torch.nn.Module, rows: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    logits = head(rows).float()  # [n, V] fp32, only n = chunk_tokens rows at a time
    return F.cross_entropy(logits, targets, reduction="sum")


def response_nll(model: torch.nn.Module, batch: dict, chunk_tokens: int = 1024
                 ) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Sum of response-token NLLs of a micro-batch, chunked over tokens (differentiable).

    Returns:
        ``(nll_sum, hidden, n_response)``: scalar fp32 sum over the targets, the hidden states
        ``[B, T, H]`` and the number of targets.
    """
    decoder, head = decoder_and_head(model)
    hidden = decoder(**model_inputs(batch)).last_hidden_state  # [B, T, H]
    targets = batch["labels"][:, 1:]   # [B, T-1]
    mask = targets != IGNORE_INDEX     # [B, T-1]
    rows = hidden[:, :-1][mask]        # [N, H]
    targets = targets[mask]            # [N]
    total = hidden.new_zeros((), dtype=torch.float32)
    for s in range(0, rows.shape[0], chunk_tokens):
        total = total + checkpoint(_chunk_nll_sum, head, rows[s:s + chunk_tokens],
                                   targets[s:s + chunk_tokens], use_reentrant=False)
    return total, hidden, int(rows.shape[0])
