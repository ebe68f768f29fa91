"""Q-Tuning selection (docs/algorithms/qtuning.md §4) against hand-derived sets and independent naive loops."""

import math
import threading

import numpy as np
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

from effsft.sft.eu_plot import plot_eu_plane
from effsft.sft.qtuning import eu_prune, eu_select, log_scalars, make_rng, pad_concat, split_rows
from effsft.sft.qtuning_samples import keep_count
from effsft.sft.qtuning_scores import SampleStats, sample_stats, token_scores
from effsft.sft.qtuning_config import QTuningConfig
from effsft.sft.qtuning_loss import qtuning_step_loss
from effsft.sft.token_stats import label_masks

# ---------------------------------------------------------------------------------------------
# Builders and naive references
# ---------------------------------------------------------------------------------------------


def build_rows(ppl, ent, prompt=3, resp=5, pad=2):
    """Token arrays whose per-sample PPL/Ent are exactly ``ppl``/``ent`` (constant per row)."""
    B, T = len(ppl), prompt + resp + pad
    nll = torch.zeros(B, T, dtype=torch.float64)
    entropy = torch.zeros(B, T, dtype=torch.float64)
    nonpad = torch.zeros(B, T, dtype=torch.bool)
    nonpad[:, 1 : prompt + resp] = True
    response = torch.zeros(B, T, dtype=torch.bool)
    response[:, prompt : prompt + resp] = True
    for b in range(B):
        nll[b, prompt : prompt + resp] = math.log(ppl[b])
        entropy[b, 1 : prompt + resp] = ent[b]
    return nll, entropy, response, nonpad


def random_rows(seed, B, T=12, max_prompt=4):
    """Random per-token NLL/entropy with prompts and right padding of random lengths."""
    g = torch.Generator().manual_seed(seed)
    nll = torch.rand(B, T, generator=g, dtype=torch.float64) * 3
    ent = torch.rand(B, T, generator=g, dtype=torch.float64) * 2
    lengths = torch.randint(max_prompt + 2, T + 1, (B,), generator=g)
    prompts = torch.randint(1, max_prompt + 1, (B,), generator=g)
    pos = torch.arange(T)[None, :]
    nonpad = (pos >= 1) & (pos < lengths[:, None])
    response = nonpad & (pos >= prompts[:, None])
    return nll * response, ent * nonpad, response, nonpad


def naive_quantile(values, q):
    s = sorted(values)
    pos = q * (len(s) - 1)
    lo, hi = math.floor(pos), math.ceil(pos)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def naive_sample_selection(ppl, ent, r):
    """Bisection + fill-up written with lists; returns (kept set, prune set)."""
    n = len(ppl)
    lo, hi = 0.0, 0.49
    for _ in range(10):
        a = (lo + hi) / 2
        p_hi, p_lo = naive_quantile(ppl, 1 - a), naive_quantile(ppl, a)
        e_lo, e_hi = naive_quantile(ent, a), naive_quantile(ent, 1 - a)
        q2 = {i for i in range(n) if ppl[i] > p_hi and ent[i] <= e_lo}
        q4 = {i for i in range(n) if ppl[i] <= p_lo and ent[i] > e_hi}
        f = (len(q2) + len(q4)) / n
        if abs(f - r) < 0.01:
            break
        lo, hi = (a, hi) if f < r else (lo, a)
    k = min(n, max(1, round(n * r)))

    def norm(x):
        span = max(x) - min(x)
        return [0.0] * n if span < 1e-12 else [(v - min(x)) / span for v in x]

    ph, eh = norm(ppl), norm(ent)
    rest = sorted((i for i in range(n) if i not in q2 | q4), key=lambda i: (-abs(ph[i] - eh[i]), i))
    added = rest[: max(0, k - len(q2 | q4))]
    return q2 | q4 | set(added), q2 | {i for i in added if ph[i] >= eh[i]}


def naive_scores(nll, response, nonpad, lam, div2=False):
    B, T = nll.shape
    tau = [[0.0] * T for _ in range(B)]
    for b in range(B):
        for t in range(T):
            if response[b, t]:
                tau[b][t] = math.exp(float(nll[b, t]))
            elif nonpad[b, t]:
                tau[b][t] = 1.0
    out = np.zeros((B, T))
    for b in range(B):
        for t in range(T):
            left = tau[b][t - 1] if t > 0 else 0.0
            right = tau[b][t + 1] if t < T - 1 else 0.0
            out[b, t] = (1 - lam) * tau[b][t] + lam * (left + right) * (0.5 if div2 else 1.0)
    return out


# ---------------------------------------------------------------------------------------------
# 1. Quadrants on a hand-built batch of 8
# ---------------------------------------------------------------------------------------------

# sample:         0    1    2    3    4    5    6    7
HAND_PPL = [8.0, 1.0, 7.0, 2.0, 3.0, 6.0, 4.0, 5.0]
HAND_ENT = [0.1, 0.8, 0.7, 0.2, 0.3, 0.6, 0.6, 0.3]


def test_quadrants_hand_built_batch():
    # a = 0.245 on the first iterate: P_lo = 2.715, P_hi = 6.285, E_lo = 0.2715, E_hi = 0.6285,
    # Q2 = {0} (ppl 8, ent .1), Q4 = {1} (ppl 1, ent .8): f = 2/8 = r_s, stop. Midpoints 4.5 / 0.45.
    nll, ent, resp, nonpad = build_rows(HAND_PPL, HAND_ENT)
    keep, keep_tok, info = eu_prune(nll, ent, resp, 0.25, 1.0, nonpad_mask=nonpad)
    assert keep.tolist() == [True, True] + [False] * 6
    assert list(info["decision"]) == ["Q2", "Q4", "Q1", "Q3", "Q3", "Q1", "other", "other"]
    assert (info["n_Q2"], info["n_Q4"], info["n_Q1"], info["n_Q3"], info["n_other"], info["n_fill"]) == (1, 1, 2, 2, 2, 0)
    assert info["a"] == pytest.approx(0.245)
    for key, value in dict(P_lo=2.715, P_hi=6.285, E_lo=0.2715, E_hi=0.6285, P_mid=4.5, E_mid=0.45).items():
        assert info[key] == pytest.approx(value), key
    np.testing.assert_allclose(info["ppl"], HAND_PPL)
    np.testing.assert_allclose(info["ent"], HAND_ENT)
    # r_t = 1: kept rows keep every non-pad position, dropped rows nothing.
    assert torch.equal(keep_tok, nonpad & keep[:, None])


def test_quadrants_second_iterate_widens_corners():
    # r_s = 0.5: a = .245 (f=.25) -> .3675 (f=.25) -> .42875: Q2 = {0, 7}, Q4 = {1, 6}, f = .5.
    nll, ent, resp, nonpad = build_rows(HAND_PPL, HAND_ENT)
    keep, _, info = eu_prune(nll, ent, resp, 0.5, 1.0, nonpad_mask=nonpad)
    assert np.flatnonzero(keep.numpy()).tolist() == [0, 1, 6, 7]
    assert list(info["decision"][[0, 7, 1, 6]]) == ["Q2", "Q2", "Q4", "Q4"]
    assert info["a"] == pytest.approx(0.42875) and info["bisect_iters"] == 3


FILL_PPL = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0]
FILL_ENT = [0.3, 0.1, 0.15, 0.4, 0.5, 0.6, 0.8, 0.75]


def test_fill_up_picks_and_labels():
    # Ent ranks follow PPL ranks half for half, so both corners are empty for every a; fill-up
    # ranks |p̂ - ê|: s0 2/7 (ê > p̂: Q4-like), s2 1.5/7 (Q2-like), then s1, s6 (1/7) ...
    nll, ent, resp, nonpad = build_rows(FILL_PPL, FILL_ENT)
    keep, _, info = eu_prune(nll, ent, resp, 0.25, 1.0, nonpad_mask=nonpad)
    assert np.flatnonzero(keep.numpy()).tolist() == [0, 2]
    assert info["decision"][0] == "Q4-like" and info["decision"][2] == "Q2-like"
    assert (info["n_Q2"], info["n_Q4"], info["n_fill"], info["n_fill_q2like"], info["n_fill_q4like"]) == (0, 0, 2, 1, 1)
    assert info["bisect_iters"] == 10 and info["a"] > 0.48
    # Dropped samples by the (≈ median) midpoints: low-low Q3 = {1, 3}, high-high Q1 = {4..7}.
    assert list(info["decision"]) == ["Q4-like", "Q3", "Q2-like", "Q3", "Q1", "Q1", "Q1", "Q1"]
    keep1, _, info1 = eu_prune(nll, ent, resp, 0.125, 1.0, nonpad_mask=nonpad)
    assert np.flatnonzero(keep1.numpy()).tolist() == [0] and info1["n_fill_q4like"] == 1


def test_single_sample_is_q2_like_and_token_pruned():
    # B = 1: quantiles equal the value, both corners are empty; fill-up adds it with p̂ = ê = 0,
    # which counts as Q2-like (p̂ >= ê), so its response tokens are drop candidates.
    nll, ent, resp, nonpad = build_rows([3.0], [0.5])
    keep, keep_tok, info = eu_prune(nll, ent, resp, 0.25, 0.5, nonpad_mask=nonpad)
    assert keep.tolist() == [True] and list(info["decision"]) == ["Q2-like"]
    assert info["n_drop_tokens"] > 0 and int((keep_tok & resp).sum()) < int(resp.sum())


def test_equal_ppl_sits_in_low_corner():
    # All PPL equal: P_lo = P_hi = PPL, so "PPL <= P_lo" holds for every sample and the two
    # highest-entropy samples are corner Q4 (not fill-up), while Q2 ("PPL > P_hi") is empty.
    ent = [0.1, 0.8, 0.2, 0.7, 0.3, 0.6, 0.4, 0.5]
    nll, e, resp, nonpad = build_rows([2.0] * 8, ent)
    keep, _, info = eu_prune(nll, e, resp, 0.25, 1.0, nonpad_mask=nonpad)
    assert np.flatnonzero(keep.numpy()).tolist() == [1, 3]
    assert list(info["decision"][[1, 3]]) == ["Q4", "Q4"] and info["n_fill"] == 0


def test_tied_token_scores_drop_lower_index_first():
    # Sample 0 is the only Q2 row; constant NLL makes every interior response score equal
    # (τ = 8: 0.5*8 + 0.5*16 = 12), edges lower (8.5 next to the prompt, 8 next to padding).
    # T_all = 8 * 42 = 336, by_samp = 6 * 42 = 252, round(336 * 0.25 * 79/84) = 79 -> n_drop = 5.
    nll, ent, resp, nonpad = build_rows(HAND_PPL, HAND_ENT, prompt=3, resp=40)
    keep, keep_tok, info = eu_prune(nll, ent, resp, 0.25, 79 / 84, nonpad_mask=nonpad)
    assert info["n_drop_tokens"] == 5
    dropped = np.flatnonzero((nonpad[0] & ~keep_tok[0]).numpy()).tolist()
    assert dropped == [4, 5, 6, 7, 8]


def test_sample_stats_match_loop_for_both_entropy_scopes():
    nll, ent, resp, nonpad = random_rows(13, 6)
    for scope in ["response", "all"]:
        st = sample_stats(nll, ent, resp, nonpad, scope)
        for b in range(6):
            r = [float(nll[b, t]) for t in range(nll.shape[1]) if resp[b, t]]
            where = resp[b] if scope == "response" else nonpad[b]
            e = [float(ent[b, t]) for t in range(nll.shape[1]) if where[t]]
            assert st.ppl[b] == pytest.approx(math.exp(sum(r) / max(1, len(r))))
            assert st.ent[b] == pytest.approx(sum(e) / max(1, len(e)))
            assert st.n_nonpad[b] == int(nonpad[b].sum()) and st.n_resp[b] == len(r)


# ---------------------------------------------------------------------------------------------
# 2. Bisection / fill-up property and naive reference
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("B", [1, 8, 64])
def test_bisection_reaches_ratio_or_fill_up_reaches_k(B):
    for r in [0.125, 0.25, 0.375, 0.5, 0.625, 0.75, 0.875, 1.0]:
        for seed in range(3):
            nll, ent, resp, nonpad = random_rows(seed, B)
            keep, _, info = eu_prune(nll, ent, resp, r, 1.0, nonpad_mask=nonpad)
            k = keep_count(B, r)
            assert abs(info["corner_frac"] - r) < 0.01 or int(keep.sum()) >= k
            assert int(keep.sum()) >= k  # fill-up never leaves fewer than K
            kept_ref, prune_ref = naive_sample_selection(list(info["ppl"]), list(info["ent"]), r)
            assert set(np.flatnonzero(keep.numpy()).tolist()) == kept_ref


# ---------------------------------------------------------------------------------------------
# 3. Protected positions, 4. budgets and the token score
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("budget", ["batch", "per_sample"])
def test_protected_positions_never_dropped(budget):
    for seed in range(6):
        nll, ent, resp, nonpad = random_rows(seed, 16)
        keep, keep_tok, info = eu_prune(nll, ent, resp, 0.5, 0.3, nonpad_mask=nonpad, token_budget=budget, entropy_scope="all")
        protected_rows = np.isin(info["decision"], ["Q4", "Q4-like"])
        kept_rows = keep.numpy()
        kt, rm, npm = keep_tok.numpy(), resp.numpy(), nonpad.numpy()
        assert not (kt & ~npm).any()  # padding never kept
        assert not kt[~kept_rows].any()  # dropped samples contribute nothing
        assert (kt[protected_rows] == npm[protected_rows]).all()  # Q4 / Q4-like whole
        prompt = npm & ~rm
        assert (kt[kept_rows] | ~prompt[kept_rows]).all()  # prompt of kept rows kept


def test_token_score_formula_matches_loop():
    nll, _, resp, nonpad = random_rows(7, 5)
    for lam, div2 in [(0.5, False), (0.3, True), (0.0, False)]:
        np.testing.assert_allclose(token_scores(nll, resp, nonpad, lam, div2), naive_scores(nll, resp, nonpad, lam, div2))


@pytest.mark.parametrize("r_s,r_t", [(0.5, 0.5), (0.5, 0.9), (0.25, 0.97)])
def test_batch_budget_matches_naive_top_k(r_s, r_t):
    lam = 0.5
    partial = 0
    for seed in range(5):
        nll, ent, resp, nonpad = random_rows(seed, 8, T=16)
        keep, keep_tok, info = eu_prune(nll, ent, resp, r_s, r_t, lam, nonpad_mask=nonpad)
        kept_ref, prune_ref = naive_sample_selection(list(info["ppl"]), list(info["ent"]), r_s)
        npm, rm = nonpad.numpy(), resp.numpy()
        t_all = int(npm.sum())
        by_samp = int(sum(npm[b].sum() for b in range(8) if b not in kept_ref))
        s = naive_scores(nll, resp, nonpad, lam)
        cands = [(b, t) for b in sorted(prune_ref) for t in range(16) if rm[b, t]]
        cands.sort(key=lambda bt: bt[0] * 16 + bt[1])
        n_drop = min(max(0, t_all - round(t_all * r_s * r_t) - by_samp), len(cands))
        dropped = sorted(cands, key=lambda bt: (-s[bt], bt))[:n_drop]
        expected = npm.copy()
        expected[[b for b in range(8) if b not in kept_ref]] = False
        for b, t in dropped:
            expected[b, t] = False
        assert (keep_tok.numpy() == expected).all()
        assert int(keep_tok.sum()) == t_all - by_samp - n_drop == info["kept_tokens"]
        assert info["n_drop_tokens"] == n_drop
        partial += 0 < n_drop < len(cands)
    if r_t > 0.5:
        assert partial, "the budget should bind below the candidate count in some batch"


def test_per_sample_budget_keeps_ceil_and_lowest_scores():
    r_t = 0.3
    nll, ent, resp, nonpad = random_rows(11, 16, T=16)
    keep, keep_tok, info = eu_prune(nll, ent, resp, 0.5, r_t, nonpad_mask=nonpad, token_budget="per_sample")
    _, prune_ref = naive_sample_selection(list(info["ppl"]), list(info["ent"]), 0.5)
    s = naive_scores(nll, resp, nonpad, 0.5)
    kt, rm = keep_tok.numpy(), resp.numpy()
    assert prune_ref, "test batch should have rows to prune"
    for b in range(16):
        n_resp = int(rm[b].sum())
        if b in prune_ref:
            assert int((kt[b] & rm[b]).sum()) == math.ceil(round(r_t * n_resp, 9))
            kept_s = s[b][kt[b] & rm[b]]
            dropped_s = s[b][~kt[b] & rm[b]]
            assert dropped_s.size == 0 or kept_s.max() <= dropped_s.min()
        elif keep[b]:
            assert int((kt[b] & rm[b]).sum()) == n_resp


def test_token_ratio_one_drops_no_token():
    nll, ent, resp, nonpad = random_rows(3, 8)
    keep, keep_tok, _ = eu_prune(nll, ent, resp, 0.25, 1.0, nonpad_mask=nonpad)
    assert torch.equal(keep_tok, nonpad & keep[:, None])


# ---------------------------------------------------------------------------------------------
# Baselines
# ---------------------------------------------------------------------------------------------


def test_sample_baselines():
    nll, ent, resp, nonpad = random_rows(5, 16)
    stats = sample_stats(nll, ent, resp, nonpad)
    k = keep_count(16, 0.25)
    keep, kt, _ = eu_prune(nll, ent, resp, 0.25, 1.0, nonpad_mask=nonpad, method="ppl_only")
    assert set(np.flatnonzero(keep.numpy())) == set(np.argsort(-stats.ppl)[:k])
    keep, _, _ = eu_prune(nll, ent, resp, 0.25, 1.0, nonpad_mask=nonpad, method="ppl_only", baseline_order="reverse")
    assert set(np.flatnonzero(keep.numpy())) == set(np.argsort(stats.ppl)[:k])
    keep, _, _ = eu_prune(nll, ent, resp, 0.25, 1.0, nonpad_mask=nonpad, method="entropy_only")
    assert set(np.flatnonzero(keep.numpy())) == set(np.argsort(stats.ent)[:k])
    a, _, _ = eu_prune(nll, ent, resp, 0.25, 1.0, nonpad_mask=nonpad, method="random_sample", seed=1)
    b, _, _ = eu_prune(nll, ent, resp, 0.25, 1.0, nonpad_mask=nonpad, method="random_sample", seed=1)
    c, _, _ = eu_prune(nll, ent, resp, 0.25, 1.0, nonpad_mask=nonpad, method="random_sample", seed=2)
    assert int(a.sum()) == k and torch.equal(a, b) and not torch.equal(a, c)
    keep, kt, info = eu_prune(nll, ent, resp, 0.25, 1.0, nonpad_mask=nonpad, method="off")
    assert keep.all() and torch.equal(kt, nonpad)


def test_random_token_and_sample_baseline_token_drop():
    nll, ent, resp, nonpad = random_rows(9, 16)
    t_all = int(nonpad.sum())
    keep, kt, info = eu_prune(nll, ent, resp, 0.5, 0.5, nonpad_mask=nonpad, method="random_token", seed=0)
    n_drop = min(t_all - round(t_all * 0.25), int(resp.sum()))
    assert keep.all() and int(kt.sum()) == t_all - n_drop
    assert torch.equal(kt | resp, nonpad)  # only response tokens dropped
    keep, kt, info = eu_prune(nll, ent, resp, 0.5, 0.5, nonpad_mask=nonpad, method="random_sample", seed=0)
    by_samp = int(nonpad[~keep].sum())
    n_drop = min(max(0, t_all - round(t_all * 0.25) - by_samp), int(resp[keep].sum()))
    assert int(kt.sum()) == t_all - by_samp - n_drop and info["n_drop_tokens"] == n_drop


# ---------------------------------------------------------------------------------------------
# 5. mask vs two_pass, 7. identity, on tiny fp32 models
# ---------------------------------------------------------------------------------------------


def tiny_model(family="llama"):
    torch.manual_seed(0)
    kw = dict(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=64, attention_dropout=0.0)
    if family == "qwen2":
        return Qwen2ForCausalLM(Qwen2Config(**kw)).float().eval()
    return LlamaForCausalLM(LlamaConfig(**kw)).float().eval()


def tiny_batch(seed=0, B=8, T=20, V=96):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, V, (B, T), generator=g)
    lengths = torch.randint(T // 2, T + 1, (B,), generator=g)
    prompts = torch.randint(2, 6, (B,), generator=g)
    pos = torch.arange(T)[None, :]
    attn = (pos < lengths[:, None]).long()
    labels = ids.masked_fill((pos < prompts[:, None]) | (attn == 0), -100)
    return dict(input_ids=ids, attention_mask=attn, labels=labels)


def run_step(model, batch, cfg, mode, **kw):
    model.zero_grad(set_to_none=True)
    loss, info = qtuning_step_loss(model, batch, cfg, mode, **kw)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return loss.detach(), info, grads


@pytest.mark.parametrize(
    "family,cfg",
    [
        ("llama", QTuningConfig(method="qtuning")),
        ("llama", QTuningConfig(method="qtuning", token_budget="per_sample", loss_norm="paper", entropy_scope="all")),
        ("qwen2", QTuningConfig(method="qtuning", sample_ratio=0.5, token_ratio=0.7)),
        ("llama", QTuningConfig(method="entropy_only", entropy_scope="all")),
        ("llama", QTuningConfig(method="random_sample", seed=3)),
    ],
)
def test_mask_and_two_pass_agree(family, cfg):
    model = tiny_model(family)
    batch = tiny_batch(seed=1)
    loss_m, info_m, grads_m = run_step(model, batch, cfg, "mask", step=5)
    loss_t, info_t, grads_t = run_step(model, batch, cfg, "two_pass", step=5)
    assert np.array_equal(info_m["keep"], info_t["keep"])
    assert torch.equal(info_m["keep_token"], info_t["keep_token"])
    assert info_t["pass2_rows"] == int(info_m["keep"].sum()) < 8
    torch.testing.assert_close(loss_m, loss_t, rtol=1e-5, atol=1e-6)
    assert grads_m.keys() == grads_t.keys()
    for name in grads_m:
        torch.testing.assert_close(grads_m[name], grads_t[name], rtol=1e-4, atol=1e-6, msg=name)


def test_identity_ratios_equal_plain_sft():
    model = tiny_model()
    batch = tiny_batch(seed=2)
    plain, _, _ = run_step(model, batch, QTuningConfig(method="off"), "mask")
    hf = model(**batch).loss.detach()
    torch.testing.assert_close(plain, hf, rtol=1e-5, atol=1e-6)
    full = QTuningConfig(method="qtuning", sample_ratio=1.0, token_ratio=1.0)
    ident, info, _ = run_step(model, batch, full, "mask")
    assert info["keep"].all() and info["kept_response_tokens"] == info["total_response_tokens"]
    assert torch.equal(ident, plain)  # exactly
    ident2, _, _ = run_step(model, batch, full, "two_pass")
    torch.testing.assert_close(ident2, plain, rtol=1e-5, atol=1e-6)
    paper, _, _ = run_step(model, batch, QTuningConfig(method="qtuning", sample_ratio=1.0, token_ratio=1.0, loss_norm="paper"), "mask")
    resp, nonpad = label_masks(batch["labels"], batch["attention_mask"])
    torch.testing.assert_close(paper, plain * resp.sum() / nonpad.sum(), rtol=1e-6, atol=0)


# ---------------------------------------------------------------------------------------------
# 6. Global scope == local scope on the concatenation
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("method,budget", [("qtuning", "batch"), ("qtuning", "per_sample"), ("random_sample", "batch"), ("random_token", "batch")])
def test_global_scope_equals_local_on_concatenation(method, budget):
    shapes = [(3, 10), (5, 14), (8, 12)]  # W = 3 ranks, different B_r and T_r
    ranks = [random_rows(20 + r, b, T=t) for r, (b, t) in enumerate(shapes)]
    opts = dict(method=method, token_budget=budget, entropy_scope="response")
    # What each rank computes locally and all-gathers:
    gathered = []
    for nll, ent, resp, nonpad in ranks:
        st = sample_stats(nll, ent, resp, nonpad)
        gathered.append((st.to_array(), token_scores(nll, resp, nonpad), resp.numpy(), nonpad.numpy()))
    sizes = [g[0].shape[0] for g in gathered]
    stats = SampleStats.concat([SampleStats.from_array(g[0]) for g in gathered])
    scores, resp_c, nonpad_c = (pad_concat([g[i] for g in gathered]) for i in (1, 2, 3))
    ks, kt, _ = eu_select(stats, scores, resp_c, nonpad_c, 0.25, 0.5, method=method, token_budget=budget, rng=make_rng(4, 1))
    # Reference: local scope on the concatenated (right-padded) tensors.
    T = max(t for _, t in shapes)
    cat = [torch.cat([torch.nn.functional.pad(x[i], (0, T - x[i].shape[1])) for x in ranks]) for i in range(4)]
    ref_ks, ref_kt, _ = eu_prune(cat[0], cat[1], cat[2], 0.25, 0.5, nonpad_mask=cat[3], generator=make_rng(4, 1), **opts)
    for r, (b, t) in enumerate(shapes):
        assert np.array_equal(split_rows(ks[:, None], sizes, r)[:, 0], split_rows(ref_ks.numpy()[:, None], sizes, r)[:, 0])
        assert np.array_equal(split_rows(kt, sizes, r)[:, :t], split_rows(ref_kt.numpy(), sizes, r)[:, :t])


def _thread_all_gather(world):
    slots, barrier = [None] * world, threading.Barrier(world)

    def make(rank):
        def gather(obj):
            slots[rank] = obj
            barrier.wait()
            out = list(slots)
            barrier.wait()
            return out

        return gather

    return make


def test_global_scope_step_loss_with_simulated_ranks():
    model = tiny_model()
    world, T = 3, 20
    shards = [tiny_batch(seed=30 + r, B=3, T=T) for r in range(world)]
    cfg = QTuningConfig(method="qtuning", score_scope="global", sample_ratio=0.2)
    make = _thread_all_gather(world)
    results = [None] * world

    def worker(rank):
        results[rank] = qtuning_step_loss(model, shards[rank], cfg, "two_pass", all_gather=make(rank), rank=rank)

    threads = [threading.Thread(target=worker, args=(r,)) for r in range(world)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    model.zero_grad(set_to_none=True)
    sum(loss for loss, _ in results).div(world).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    concat = {k: torch.cat([s[k] for s in shards]) for k in shards[0]}
    local_cfg = QTuningConfig(method="qtuning", sample_ratio=0.2)
    kept_rows = [int(info["keep_token"].any(dim=1).sum()) for _, info in results]
    assert 0 in kept_rows, kept_rows  # one rank runs the zero-weighted pass
    for (loss, _), n in zip(results, kept_rows):
        assert loss.requires_grad and (n > 0 or loss.item() == 0.0)
    ref_loss, ref_info, ref_grads = run_step(model, concat, local_cfg, "mask")
    keep_token = torch.cat([info["keep_token"] for _, info in results])
    assert torch.equal(keep_token, ref_info["keep_token"])
    mean_loss = sum(loss.detach() for loss, _ in results) / world
    torch.testing.assert_close(mean_loss, ref_loss, rtol=1e-5, atol=1e-6)
    for name, g in ref_grads.items():
        torch.testing.assert_close(grads[name], g, rtol=1e-4, atol=1e-6, msg=name)


# ---------------------------------------------------------------------------------------------
# Logging and plot
# ---------------------------------------------------------------------------------------------


def test_log_scalars_and_plot(tmp_path):
    nll, ent, resp, nonpad = build_rows(HAND_PPL, HAND_ENT)
    _, _, info = eu_prune(nll, ent, resp, 0.25, 0.5, nonpad_mask=nonpad)
    scalars = log_scalars(info)
    for key in ["n_Q1", "n_Q2", "n_Q3", "n_Q4", "n_other", "n_fill", "n_fill_q2like", "n_fill_q4like", "n_kept_samples",
                "kept_response_tokens", "total_response_tokens", "a", "P_lo", "P_hi", "E_lo", "E_hi", "P_mid", "E_mid"]:
        assert "qtuning/" + key in scalars, key
    path = plot_eu_plane(info, tmp_path / "qtuning" / "eu_plane_step0.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_step_that_keeps_no_response_token_warns_and_per_sample_keeps_some():
    """Long prompts, short responses: the batch budget (prompt tokens in T_all) can drop every
    response token of the token-pruned rows; the step warns, and per_sample keeps ceil(r_t n)."""
    model = tiny_model()
    B, T = 8, 20
    g = torch.Generator().manual_seed(4)
    ids = torch.randint(0, 96, (B, T), generator=g)
    labels = ids.masked_fill(torch.arange(T)[None, :] < 16, -100)  # 16 prompt, 4 response tokens
    batch = dict(input_ids=ids, attention_mask=torch.ones(B, T, dtype=torch.long), labels=labels)
    cfg = QTuningConfig(method="entropy_only", sample_ratio=0.25, token_ratio=0.5)
    with pytest.warns(UserWarning, match="kept no response token"):
        _, info, _ = run_step(model, batch, cfg, "mask")
    assert info["kept_response_tokens"] == 0 < info["total_response_tokens"]
    per_sample = QTuningConfig(method="entropy_only", sample_ratio=0.25, token_ratio=0.5, token_budget="per_sample")
    _, info2, _ = run_step(model, batch, per_sample, "mask")
    assert info2["kept_response_tokens"] == int(info2["keep"].sum()) * 2  # ceil(0.5 * 4) per kept row
