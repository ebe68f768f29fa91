"""Chunked per-token NLL / entropy and the masked SFT loss, against naive full-logit references."""

import math

import pytest
import torch
import torch.nn.functional as F

from effsft.sft.token_stats import (
    hidden_sft_loss,
    label_masks,
    linear_nll,
    masked_sft_loss,
    token_stats_from_hidden,
    token_stats_from_logits,
)


def _batch(seed=0, B=3, T=9, H=6, V=11, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(B, T, H, generator=g, dtype=dtype)
    weight = torch.randn(V, H, generator=g, dtype=dtype)
    labels = torch.randint(0, V, (B, T), generator=g)
    attn = torch.ones(B, T, dtype=torch.long)
    attn[1, 6:] = 0  # right padding
    attn[2, :2] = 0  # left padding
    labels[:, :3] = -100  # prompt
    labels[attn == 0] = -100
    return hidden, weight, labels, attn


def _naive(hidden, weight, labels, attn):
    """Loop over (b, t): full softmax of the logits of position t-1, in float64."""
    B, T, _ = hidden.shape
    nll = torch.zeros(B, T, dtype=torch.float64)
    ent = torch.zeros(B, T, dtype=torch.float64)
    for b in range(B):
        for t in range(1, T):
            if not attn[b, t]:
                continue
            p = torch.softmax((hidden[b, t - 1] @ weight.T).double(), dim=0)
            ent[b, t] = -(p * p.log()).sum()
            if labels[b, t] != -100:
                nll[b, t] = -p[labels[b, t]].log()
    return nll, ent


def test_label_masks_shift_and_padding():
    _, _, labels, attn = _batch()
    resp, nonpad = label_masks(labels, attn)
    assert not resp[:, 0].any() and not nonpad[:, 0].any()
    assert torch.equal(nonpad[:, 1:], attn[:, 1:].bool())
    assert torch.equal(resp, nonpad & (labels != -100))
    assert not resp[:, :3].any()


@pytest.mark.parametrize("chunk", [1, 4, 1000])
def test_chunked_stats_match_naive(chunk):
    hidden, weight, labels, attn = _batch()
    resp, nonpad = label_masks(labels, attn)
    ref_nll, ref_ent = _naive(hidden, weight, labels, attn)
    st = token_stats_from_hidden(hidden, weight, labels, nonpad, chunk_tokens=chunk)
    assert st.nll.dtype == torch.float32
    torch.testing.assert_close(st.nll.double(), ref_nll, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(st.entropy.double(), ref_ent, rtol=1e-5, atol=1e-5)
    # Only response positions scored: entropy is zero on the prompt.
    st_r = token_stats_from_hidden(hidden, weight, labels, resp, chunk_tokens=chunk)
    torch.testing.assert_close(st_r.entropy.double(), ref_ent * resp, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(st_r.nll, st.nll)


def test_logits_path_equals_hidden_path():
    hidden, weight, labels, attn = _batch(seed=1)
    _, nonpad = label_masks(labels, attn)
    logits = hidden @ weight.T  # [B, T, V]
    a = token_stats_from_hidden(hidden, weight, labels, nonpad, chunk_tokens=5)
    b = token_stats_from_logits(logits, labels, nonpad, chunk_tokens=3)
    torch.testing.assert_close(a.nll, b.nll)
    torch.testing.assert_close(a.entropy, b.entropy)


def test_uniform_logits_entropy_is_log_vocab():
    V = 37
    hidden = torch.randn(2, 5, 4)
    weight = torch.zeros(V, 4)
    labels = torch.full((2, 5), 3)
    mask = torch.ones(2, 5, dtype=torch.bool)
    st = token_stats_from_hidden(hidden, weight, labels, mask, chunk_tokens=3)
    torch.testing.assert_close(st.entropy[:, 1:], torch.full((2, 4), math.log(V)))
    torch.testing.assert_close(st.nll[:, 1:], torch.full((2, 4), math.log(V)))
    assert (st.entropy[:, 0] == 0).all()


@pytest.mark.parametrize("chunk", [1, 3, 100])
def test_linear_nll_gradients_match_autograd(chunk):
    g = torch.Generator().manual_seed(3)
    rows = torch.randn(7, 5, dtype=torch.float64, generator=g, requires_grad=True)
    weight = torch.randn(13, 5, dtype=torch.float64, generator=g, requires_grad=True)
    targets = torch.randint(0, 13, (7,), generator=g)
    coef = torch.rand(7, dtype=torch.float64, generator=g)
    ref = F.cross_entropy(rows @ weight.T, targets, reduction="none")
    (ref * coef).sum().backward()
    ref_gr, ref_gw = rows.grad.clone(), weight.grad.clone()
    rows.grad, weight.grad = None, None
    out = linear_nll(rows, weight, targets, ref.detach(), chunk_tokens=chunk)
    torch.testing.assert_close(out.double(), ref.detach(), rtol=1e-6, atol=1e-6)
    (out.double() * coef).sum().backward()
    torch.testing.assert_close(rows.grad, ref_gr)
    torch.testing.assert_close(weight.grad, ref_gw)


@pytest.mark.parametrize("norm", ["kept_response_tokens", "paper"])
def test_hidden_sft_loss_matches_naive_masked_loss(norm):
    hidden, weight, labels, attn = _batch(seed=4)
    resp, nonpad = label_masks(labels, attn)
    keep = nonpad.clone()
    keep[0] = False  # drop a sample
    keep[1, 4] = False  # drop a token
    h1 = hidden.clone().requires_grad_(True)
    st = token_stats_from_hidden(h1, weight, labels, resp)
    loss, num, den = hidden_sft_loss(h1, weight, labels, st.nll, keep, resp, norm, chunk_tokens=2)
    loss.backward()
    # Naive: full logits with grad, per-token CE, explicit mask and denominator.
    h2 = hidden.clone().requires_grad_(True)
    logits = (h2 @ weight.T)[:, :-1]  # [B, T-1, V] predicts labels[:, 1:]
    ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1), reduction="none", ignore_index=-100)
    ce = torch.cat([torch.zeros(labels.shape[0], 1, dtype=ce.dtype), ce.view(labels.shape[0], -1)], dim=1)
    m = keep & resp
    count = (m.sum() if norm == "kept_response_tokens" else keep.sum()).item()
    ref = (ce * m).sum() / count
    ref.backward()
    torch.testing.assert_close(loss.double(), ref.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(h1.grad, h2.grad, rtol=1e-5, atol=1e-6)
    assert den.item() == count
    # The tensor version agrees too.
    torch.testing.assert_close(masked_sft_loss(ce.detach(), keep, resp, norm), ref.detach())


def test_plain_sft_equals_hf_style_mean():
    hidden, weight, labels, attn = _batch(seed=5)
    resp, _ = label_masks(labels, attn)
    st = token_stats_from_hidden(hidden, weight, labels, resp)
    loss = masked_sft_loss(st.nll, resp, resp)
    logits = (hidden @ weight.T)[:, :-1]
    ref = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1), ignore_index=-100)
    torch.testing.assert_close(loss.double(), ref, rtol=1e-6, atol=1e-6)


def test_nothing_kept_gives_zero_loss_with_gradient_path():
    hidden, weight, labels, attn = _batch(seed=6)
    resp, _ = label_masks(labels, attn)
    h = hidden.clone().requires_grad_(True)
    w = weight.clone().requires_grad_(True)
    keep = torch.zeros_like(resp)
    loss, _, den = hidden_sft_loss(h, w, labels, torch.zeros(labels.shape), keep, resp)
    loss.backward()
    assert loss.item() == 0.0 and den.item() == 0
    assert h.grad is not None and (h.grad == 0).all() and (w.grad == 0).all()
