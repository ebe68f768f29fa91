"""Pruning criteria vs naive looped references (spec dlp.md §5 items 4, 6, 10)."""

import math

import pytest
import torch

from effsft.prune.criteria import magnitude_mask, nm_mask, sparsegpt_prune_, wanda_mask


def _count(s, n):
    return int(math.floor(s * n + 0.5))


def naive_wanda_mask(W, sq, s):
    """Per row: rank (score, column) pairs with a plain Python sort; prune the first k."""
    out, inp = W.shape
    k = _count(s, inp)
    mask = torch.zeros(out, inp, dtype=torch.bool)
    for i in range(out):
        ranked = sorted(range(inp), key=lambda j: (abs(float(W[i, j])) * math.sqrt(float(sq[j])), j))
        for j in ranked[:k]:
            mask[i, j] = True
    return mask


@pytest.mark.parametrize("s", [0.0, 0.25, 0.5, 0.7, 0.99])
def test_wanda_mask_matches_naive_loop_8x16(s):
    torch.manual_seed(0)
    W = torch.randn(8, 16)
    W[:, 3] = W[:, 5]  # exact ties inside each row: the lower column must go first
    sq = torch.rand(16) + 0.1
    sq[5] = sq[3]
    W[2] = 0.5  # a whole row of ties
    got = wanda_mask(W, sq, s)
    assert torch.equal(got, naive_wanda_mask(W, sq, s))
    assert got.sum(1).tolist() == [_count(s, 16)] * 8


def test_wanda_mask_is_scale_invariant_in_act_norm():
    torch.manual_seed(1)
    W, sq = torch.randn(8, 16), torch.rand(16)
    assert torch.equal(wanda_mask(W, sq, 0.5), wanda_mask(W, sq / 37.0, 0.5))


def test_magnitude_mask_matches_naive():
    torch.manual_seed(2)
    W = torch.randn(6, 10)
    W[0, :4] = 0.3  # ties across the flattened order
    k = _count(0.45, W.numel())
    ranked = sorted(range(W.numel()), key=lambda f: (abs(float(W.view(-1)[f])), f))
    ref = torch.zeros(W.numel(), dtype=torch.bool)
    ref[ranked[:k]] = True
    assert torch.equal(magnitude_mask(W, 0.45), ref.view_as(W))


@pytest.mark.parametrize("n,m", [(2, 4), (4, 8), (1, 4)])
def test_nm_mask_exact_groups_and_naive(n, m):
    torch.manual_seed(3)
    scores = torch.rand(5, 4 * m)
    scores[1, :m] = 0.5  # tied group
    mask = nm_mask(scores, n, m)
    groups = mask.view(5, 4, m).sum(-1)
    assert torch.all(groups == n)
    for r in range(5):
        for g in range(4):
            cols = sorted(range(g * m, (g + 1) * m), key=lambda j: (float(scores[r, j]), j))[:n]
            assert sorted(torch.nonzero(mask[r, g * m : (g + 1) * m]).flatten().add(g * m).tolist()) == sorted(cols)


def test_nm_mask_rejects_bad_width():
    with pytest.raises(ValueError, match="% M"):
        nm_mask(torch.rand(2, 10), 2, 4)


# ----------------------------------------------------------------------------- SparseGPT


def naive_sparsegpt(W, H, s, blocksize, percdamp=0.01, nm=None):
    """Float64 OBS by explicit sequential elimination (SparseGPT paper, §3.2 / Alg. 1).

    Instead of the Cholesky trick, keep the full inverse Hessian ``Hinv`` of the *remaining*
    columns and after handling column k eliminate it: Hinv <- Hinv - Hinv[:,k] Hinv[k,:] / Hinv[k,k].
    Mask selection per block uses ``w^2 / [Hinv_k]_kk`` with ``Hinv_k`` the inverse at the time
    column k is reached (= ``U_kk^2``).
    """
    W = W.double().clone()
    H = H.double().clone()
    rows, cols = W.shape
    for k in range(cols):
        if H[k, k] == 0:
            H[k, k] = 1.0
            W[:, k] = 0.0
    H += percdamp * torch.diag(H).mean() * torch.eye(cols, dtype=torch.float64)
    Hinv = torch.linalg.inv(H)
    # diag of the successive eliminated inverses, needed for block masks before reaching columns
    diag_at, tmp = [], Hinv.clone()
    for k in range(cols):
        diag_at.append(float(tmp[k, k]))
        tmp = tmp - torch.outer(tmp[:, k], tmp[k, :]) / tmp[k, k]
    mask = torch.zeros(rows, cols, dtype=torch.bool)
    for b0 in range(0, cols, blocksize):
        b1 = min(b0 + blocksize, cols)
        if nm is None:
            entries = [(float(W[i, j]) ** 2 / diag_at[j], i * (b1 - b0) + (j - b0), i, j)
                       for i in range(rows) for j in range(b0, b1)]
            entries.sort()
            for _, _, i, j in entries[: _count(s, rows * (b1 - b0))]:
                mask[i, j] = True
        for k in range(b0, b1):
            if nm is not None and (k - b0) % nm[1] == 0:
                for i in range(rows):
                    cols_g = sorted(range(k, k + nm[1]), key=lambda j: (float(W[i, j]) ** 2 / diag_at[j], j))
                    for j in cols_g[: nm[0]]:
                        mask[i, j] = True
            d = Hinv[k, k]
            for i in range(rows):
                if mask[i, k]:
                    e = W[i, k] / d
                    W[i, k:] = W[i, k:] - e * Hinv[k, k:]
                    W[i, k] = 0.0
            Hinv = Hinv - torch.outer(Hinv[:, k], Hinv[k, :]) / d
    return W, mask


def _layer(rows=6, cols=20, tokens=64, dead=(7,)):
    torch.manual_seed(4)
    X = torch.randn(tokens, cols, dtype=torch.float64)
    X[:, list(dead)] = 0.0  # a dead input: H_kk = 0
    H = X.t() @ X
    W = torch.randn(rows, cols, dtype=torch.float64)
    return W, H


@pytest.mark.parametrize("nm", [None, (2, 4)])
def test_sparsegpt_matches_naive_float64(nm):
    W, H = _layer()
    ref_W, ref_mask = naive_sparsegpt(W, H, 0.5, blocksize=8, nm=nm)
    got = W.clone()
    mask = sparsegpt_prune_(got, H, 0.5, blocksize=8, nm=nm, compute_dtype=torch.float64)
    assert torch.equal(mask, ref_mask)
    torch.testing.assert_close(got, ref_W, rtol=1e-9, atol=1e-10)
    assert torch.all(got[:, 7] == 0)
    if nm is not None:
        assert torch.all((got == 0).view(6, 5, 4).sum(-1) >= 2)
        assert torch.all(mask.view(6, 5, 4).sum(-1) == 2)
    else:
        # exact count per block of columns: 6*8 -> 24, 6*8 -> 24, 6*4 -> 12
        assert [int(mask[:, a:b].sum()) for a, b in [(0, 8), (8, 16), (16, 20)]] == [24, 24, 12]


def test_sparsegpt_fp32_close_to_float64_and_inplace_dtype():
    W, H = _layer(rows=8, cols=32, tokens=128, dead=())
    ref_W, ref_mask = naive_sparsegpt(W, H, 0.6, blocksize=16)
    got = W.float().clone()
    mask = sparsegpt_prune_(got, H.float(), 0.6, blocksize=16)
    assert got.dtype == torch.float32
    assert (mask != ref_mask).sum() <= 2  # fp32 may flip a near-tie
    if torch.equal(mask, ref_mask):
        torch.testing.assert_close(got.double(), ref_W, rtol=1e-3, atol=1e-4)
    assert abs((got == 0).float().mean().item() - 0.6) < 1e-6 + 1 / 256


def test_sparsegpt_reduces_output_error_vs_plain_masking():
    """OBS updates must beat zeroing the same mask without compensation (||(W-Ŵ)X||)."""
    torch.manual_seed(5)
    X = torch.randn(256, 32) @ torch.randn(32, 32)  # correlated inputs
    W = torch.randn(16, 32)
    pruned = W.clone()
    mask = sparsegpt_prune_(pruned, X.t() @ X, 0.5, blocksize=16)
    plain = W.masked_fill(mask, 0)
    assert ((W - pruned) @ X.t()).norm() < ((W - plain) @ X.t()).norm()
