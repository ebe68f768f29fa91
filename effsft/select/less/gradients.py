"""LESS per-example gradients: the rows' response-only encoding, the per-row LoRA gradients
(torch.func vmap or a loop) and their normalised projected features at one checkpoint. No Ray."""
from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from effsft.corpus.tokenize import IGNORE_INDEX
from effsft.select.less.features import RademacherProjector, adam_features, normalize_rows
from effsft.select.lm_scores import STATUS_OK, encode_pairs, pad_right

if TYPE_CHECKING:
    from effsft.select.less.warmup import Checkpoint


def encode_rows(tokenizer, messages_list, max_len: int) -> tuple[list, list[str]]:
    """Token ids and response-only labels per row (the LM scorers' encoding: the template rule).

    Returns:
        (rows, status): ``rows[i]`` is ``(ids, labels)`` (lists; labels −100 on the prompt)
        or None when ``status[i]`` is not ``ok``.
    """
    rows, status = [], []
    for e in encode_pairs(tokenizer, messages_list, max_len):
        status.append(e.status)
        rows.append((e.prompt_ids + e.answer_ids, [IGNORE_INDEX] * len(e.prompt_ids) + e.answer_ids)
                    if e.status == STATUS_OK else None)
    return rows, status


def _collate(rows: Sequence[tuple[list, list]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded (ids [B, T], labels [B, T] with −100 on padding, attention_mask [B, T])."""
    ids, mask = pad_right([r[0] for r in rows], pad_id)
    labels, _ = pad_right([r[1] for r in rows], IGNORE_INDEX)
    return ids, labels, mask


def trainable_names(model: torch.nn.Module) -> list[str]:
    """Names of the parameters that require grad (the LoRA adapters), in module order."""
    return [n for n, p in model.named_parameters() if p.requires_grad]


def response_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-row mean NLL over response tokens, the token at t predicted from logits at t−1.

    Args:
        logits: [B, T, V]; labels: [B, T] with −100 where not trained.
    Returns:
        [B] fp32.
    """
    tgt = labels[:, 1:]  # [B, T-1]
    keep = tgt != IGNORE_INDEX
    nll = F.cross_entropy(logits[:, :-1].float().transpose(1, 2), tgt.clamp_min(0), reduction="none")  # [B, T-1]
    return (nll * keep).sum(1) / keep.sum(1).clamp_min(1)


def per_example_grads(model: torch.nn.Module, ids: torch.Tensor, labels: torch.Tensor,
                      names: Sequence[str], method: str = "vmap") -> torch.Tensor:
    """Gradient of each row's response loss w.r.t. the parameters ``names``, flattened.

    Rows are right-padded and run without an attention mask: with causal attention the padding
    after a row's last token cannot change its real positions, and padding carries no label.

    Args:
        model: causal LM (eval mode: no dropout).
        ids / labels: [B, T].
        names: trainable parameter names (:func:`trainable_names`), the flattening order.
        method: ``vmap`` (torch.func, one batched pass) or ``loop`` (one backward per row).
    Returns:
        [B, P] fp32, P = total size of ``names``.
    """
    from torch.func import functional_call, grad, vmap

    params = dict(model.named_parameters())
    theta = {n: params[n].detach() for n in names}

    def loss_one(p: dict, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        logits = functional_call(model, p, (), {"input_ids": x[None], "use_cache": False}).logits  # [1, T, V]
        return response_loss(logits, y[None])[0]

    if method == "vmap":
        g = vmap(grad(loss_one), in_dims=(None, 0, 0))(theta, ids, labels)  # {name: [B, ...]}
        return torch.cat([g[n].reshape(ids.shape[0], -1).float() for n in names], 1)
    if method == "loop":
        out = []
        for x, y in zip(ids, labels):
            g = grad(loss_one)(theta, x, y)
            out.append(torch.cat([g[n].reshape(-1).float() for n in names]))
        return torch.stack(out)
    raise ValueError(f"method must be vmap|loop, got {method!r}")


def gradient_features(model: torch.nn.Module, tokenizer, messages_list, projector: RademacherProjector,
                      ckpt: Checkpoint, adam: bool, max_len: int = 2048, micro_batch_size: int = 8,
                      method: str = "vmap") -> tuple[np.ndarray, list[str]]:
    """Normalised projected features of rows at one checkpoint.

    Args:
        model / ckpt: from :func:`load_checkpoint`.
        projector: built for P = ckpt's parameter count.
        adam: True for training rows (Γ with the checkpoint's moments), False for target rows
            (plain gradients).
        max_len / micro_batch_size: truncation and rows per gradient pass.
        method: :func:`per_example_grads` method.
    Returns:
        (features [N, d] fp32 — NaN rows where status is not ok —, status [N]).
    """
    rows, status = encode_rows(tokenizer, messages_list, max_len)
    feats = np.full((len(rows), projector.dim), np.nan, np.float32)
    ok = [i for i, r in enumerate(rows) if r is not None]
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    device = next(model.parameters()).device
    ok.sort(key=lambda i: -len(rows[i][0]))  # length-sorted micro-batches: less padding
    for b0 in range(0, len(ok), micro_batch_size):
        idx = ok[b0:b0 + micro_batch_size]
        ids, labels, _ = _collate([rows[i] for i in idx], pad_id)
        g = per_example_grads(model, ids.to(device), labels.to(device), ckpt.names, method)  # [b, P]
        if adam:
            g = adam_features(g, ckpt.exp_avg, ckpt.exp_avg_sq)
        feats[idx] = normalize_rows(projector.project(g)).cpu().numpy()
    return feats, status
