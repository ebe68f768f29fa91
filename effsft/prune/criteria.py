"""Pruning criteria: which weights of one ``nn.Linear`` to zero.

All selections use an *exact count* with an *index tie-break*: among equal scores the
lower (flattened, row-major) index is pruned first. The public Wanda/SparseGPT/DLP code
floors counts with ``int()`` or selects with a ``<=`` threshold, which over-prunes on
ties; here the count is ``round_half_up(s * n)`` so per-matrix sparsity is within
``0.5 / n`` of the target.

References:
    Wanda, Sun et al. 2023 (arXiv 2306.11695), Eq. 1: score ``|W_ij| * ||X_j||_2``,
    compared within each output row.
    SparseGPT, Frantar & Alistarh 2023 (arXiv 2301.00774), Algorithm 1.
"""

from __future__ import annotations

import math

import torch


def exact_count(sparsity: float, n: int) -> int:
    """Number of weights to prune out of ``n``: ``round(s * n)``, halves rounded up.

    Why not ``round``: Python rounds halves to even, which makes the count depend on the
    parity of ``n``; ``floor(x + 0.5)`` is the same rule everywhere (also in tests).
    """
    if not 0.0 <= sparsity <= 1.0:
        raise ValueError(f"sparsity must be in [0, 1], got {sparsity}")
    return min(n, int(math.floor(sparsity * n + 0.5)))


def lowest_k_per_row(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Mask of the ``k`` lowest scores in every row (ties: lower column first).

    Args:
        scores: ``[rows, cols]`` float tensor.
        k: number of entries to mark in each row, ``0 <= k <= cols``.

    Returns:
        Bool mask ``[rows, cols]``, True = selected (pruned).
    """
    mask = torch.zeros_like(scores, dtype=torch.bool)  # [rows, cols]
    if k > 0:
        # stable sort keeps equal scores in column order, which is the index tie-break
        order = torch.sort(scores, dim=1, stable=True).indices[:, :k]  # [rows, k]
        mask.scatter_(1, order, True)
    return mask


def lowest_k_flat(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Mask of the ``k`` lowest scores over the whole tensor (ties: lower flat index first)."""
    flat = scores.reshape(-1)
    mask = torch.zeros_like(flat, dtype=torch.bool)
    if k > 0:
        order = torch.sort(flat, stable=True).indices[:k]
        mask[order] = True
    return mask.view_as(scores)


def wanda_scores(weight: torch.Tensor, act_sq_norm: torch.Tensor) -> torch.Tensor:
    """Wanda importance ``|W_ik| * sqrt(act_sq_norm_k)`` in fp32.

    Args:
        weight: ``[out, in]``.
        act_sq_norm: ``[in]``, the squared input-feature norm ``sum_tokens x_k^2`` or any
            positive multiple of it (Wanda's ``scaler_row`` is ``sum x^2 / n_samples``;
            DLP's spec writes ``n_k = sqrt(acc_k / N)``). The per-row ranking, and hence
            the mask, does not depend on that constant.

    Returns:
        ``[out, in]`` fp32 scores, all ``>= 0``.
    """
    return weight.detach().float().abs() * act_sq_norm.detach().float().clamp_min(0).sqrt().unsqueeze(0)


def wanda_mask(weight: torch.Tensor, act_sq_norm: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Wanda mask: in each output row prune the ``round(s * in)`` lowest ``|W| * ||X||``.

    Args:
        weight: ``[out, in]`` weight of an ``nn.Linear``.
        act_sq_norm: ``[in]`` squared activation norm per input feature (see
            :func:`wanda_scores`; Σx² and Σx²/N give the same mask).
        sparsity: fraction of each row to prune, in ``[0, 1]``.

    Returns:
        Bool mask ``[out, in]``, True = pruned.
    """
    scores = wanda_scores(weight, act_sq_norm)  # [out, in]
    return lowest_k_per_row(scores, exact_count(sparsity, scores.shape[1]))


def magnitude_mask(weight: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Magnitude mask: prune the ``round(s * numel)`` smallest ``|W|`` of the whole matrix.

    Returns:
        Bool mask shaped like ``weight``, True = pruned.
    """
    scores = weight.detach().float().abs()
    return lowest_k_flat(scores, exact_count(sparsity, scores.numel()))


def parse_nm(nm: str | tuple[int, int] | None) -> tuple[int, int] | None:
    """Parse ``"2:4"`` into ``(2, 4)``; ``None`` passes through."""
    if nm is None:
        return None
    if isinstance(nm, str):
        parts = nm.split(":")
        if len(parts) != 2:
            raise ValueError(f"N:M must look like '2:4', got {nm!r}")
        n, m = int(parts[0]), int(parts[1])
    else:
        n, m = int(nm[0]), int(nm[1])
    if not 0 < n < m:
        raise ValueError(f"N:M needs 0 < N < M, got {n}:{m}")
    return n, m


def nm_mask(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """N:M mask: in every row, prune the ``n`` lowest of each ``m`` consecutive inputs.

    Args:
        scores: ``[out, in]`` importance (e.g. :func:`wanda_scores` or ``|W|``).
        n: weights pruned per group.
        m: group size; ``in % m`` must be 0.

    Returns:
        Bool mask ``[out, in]`` with exactly ``n`` True values in every group.
    """
    rows, cols = scores.shape
    if cols % m != 0:
        raise ValueError(f"N:M sparsity needs in_features % M == 0, got in={cols}, M={m}")
    groups = scores.reshape(rows * (cols // m), m)  # [rows*G, m]
    return lowest_k_per_row(groups, n).view(rows, cols)


def _upper_chol_of_inverse(H: torch.Tensor) -> torch.Tensor:
    """``U`` with ``U^T U = H^{-1}`` (upper Cholesky factor of the inverse Hessian)."""
    L = torch.linalg.cholesky(H)
    Hinv = torch.cholesky_inverse(L)
    return torch.linalg.cholesky(Hinv, upper=True)


@torch.no_grad()
def sparsegpt_prune_(
    weight: torch.Tensor,
    H: torch.Tensor,
    sparsity: float,
    blocksize: int = 128,
    percdamp: float = 0.01,
    nm: str | tuple[int, int] | None = None,
    compute_dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """SparseGPT one-shot OBS pruning of one matrix, in place (Frantar & Alistarh 2023, Alg. 1).

    Steps:
        1. Dead inputs (``H_kk = 0``): set ``H_kk = 1`` and ``W[:, k] = 0``.
        2. Damp ``H += percdamp * mean(diag H) * I`` and take ``U = chol(H^{-1})`` (upper).
        3. Per block of ``blocksize`` columns, select the ``round(s * rows * cols_block)``
           smallest ``w^2 / U_kk^2`` over the whole block (exact count, index tie-break);
           with N:M, select the N lowest of each M columns when the loop reaches them.
        4. Column by column, zero the selected weights and push the error
           ``(w - q) / U_kk`` times row ``k`` of ``U`` onto the later columns (lazy across
           blocks).

    Args:
        weight: ``[rows, cols]`` Linear weight; overwritten with the pruned, updated values
            (in its own dtype).
        H: ``[cols, cols]`` Hessian proxy ``∝ Σ x xᵀ`` (any positive scale). Not modified.
        sparsity: fraction to prune (ignored when ``nm`` is given).
        blocksize: lazy-update block width; must be a multiple of M for N:M.
        percdamp: damping relative to the mean diagonal.
        nm: optional ``"N:M"`` / ``(N, M)`` semi-structured pattern.
        compute_dtype: fp32 by default; tests use fp64.

    Returns:
        Bool mask ``[rows, cols]``, True = pruned.
    """
    nm_pair = parse_nm(nm)
    if nm_pair is not None:
        n_keep, m = nm_pair
        if weight.shape[1] % m != 0:
            raise ValueError(f"N:M sparsity needs in_features % M == 0, got in={weight.shape[1]}, M={m}")
        if blocksize % m != 0:
            raise ValueError(f"blocksize {blocksize} must be a multiple of M={m}")
    W = weight.detach().to(compute_dtype).clone()  # [rows, cols]
    H = H.detach().to(device=W.device, dtype=compute_dtype).clone()  # [cols, cols]
    rows, cols = W.shape

    dead = torch.diag(H) == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    damp = percdamp * torch.mean(torch.diag(H))
    H.diagonal().add_(damp)
    U = _upper_chol_of_inverse(H)  # [cols, cols], upper triangular

    mask = torch.zeros_like(W, dtype=torch.bool)  # [rows, cols]
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        W1 = W[:, i1:i2].clone()  # [rows, b]
        U1 = U[i1:i2, i1:i2]  # [b, b]
        d1 = torch.diag(U1)  # [b]
        Err1 = torch.zeros_like(W1)  # [rows, b]
        if nm_pair is None:
            mask1 = lowest_k_flat(W1.pow(2) / d1.pow(2).unsqueeze(0), exact_count(sparsity, W1.numel()))
        else:
            mask1 = torch.zeros_like(W1, dtype=torch.bool)
        for i in range(i2 - i1):
            if nm_pair is not None and i % m == 0:
                # N:M groups are chosen with the weights as updated so far (inside the OBS loop)
                group = W1[:, i : i + m].pow(2) / d1[i : i + m].pow(2).unsqueeze(0)  # [rows, m]
                mask1[:, i : i + m] = lowest_k_per_row(group, n_keep)
            w = W1[:, i]  # [rows]
            q = torch.where(mask1[:, i], torch.zeros_like(w), w)
            err = (w - q) / d1[i]  # [rows]
            # subtract err ⊗ U[k, k:] from the remaining columns of this block (column i becomes q)
            W1[:, i:] -= err.unsqueeze(1) * U1[i, i:].unsqueeze(0)
            W1[:, i] = q  # exact zeros, no rounding residue
            Err1[:, i] = err
        W[:, i1:i2] = W1
        mask[:, i1:i2] = mask1
        W[:, i2:] -= Err1 @ U[i1:i2, i2:]  # lazy batch update of the later blocks
    weight.data.copy_(W.to(weight.dtype))
    return mask
