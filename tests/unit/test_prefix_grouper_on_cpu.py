"""Prefix-grouped forward == repeated forward (docs/algorithms/prefix_grouper_grpo.md §2 exactness, §5.3, §5.5) on tiny random models."""

import pytest
import torch
import transformers

from effsft.grpo.attention import grouped_attention, grouped_attention_mode
from effsft.grpo.group_plan import build_plan
from effsft.grpo.loss import grpo_loss, pad_logprobs
from effsft.grpo.prefix_grouper import completion_logprobs, cost_coefficients, split_padded, theoretical_ratios

V = 97
FAMILIES = ["llama", "qwen2", "qwen3", "mistral"]


def make_model(family="llama", impl="sdpa", dtype=torch.float32, seed=0, **overrides):
    """Tiny random model: GQA (4 q heads, 2 kv heads), 2 layers, hidden 32."""
    torch.manual_seed(seed)
    common = dict(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=256, attn_implementation=impl)
    cls = {
        "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM, {}),
        "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM, {}),  # q/k/v bias
        "qwen3": (transformers.Qwen3Config, transformers.Qwen3ForCausalLM, {"head_dim": 8}),  # q/k norm
        "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM, {"sliding_window": None}),
        # beyond the four: the same registration, no per-family code
        "gemma": (transformers.GemmaConfig, transformers.GemmaForCausalLM, {"head_dim": 8}),
        "olmo2": (transformers.Olmo2Config, transformers.Olmo2ForCausalLM, {}),
        "phi3": (transformers.Phi3Config, transformers.Phi3ForCausalLM, {"pad_token_id": 0}),
        "qwen3_moe": (transformers.Qwen3MoeConfig, transformers.Qwen3MoeForCausalLM,
                      {"head_dim": 8, "num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 32}),
    }[family]
    cfg = cls[0](**{**common, **cls[2], **overrides})
    model = cls[1](cfg).to(dtype)
    if family == "qwen2":  # random biases so that the bias path is exercised
        for layer in model.model.layers:
            for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                torch.nn.init.normal_(proj.bias, std=0.5)
    model.eval()
    return model


def make_batch(seed, n_prompts=3, max_g=4, max_lp=7, max_lr=6, allow_empty=True):
    """Random prompts/groups: variable G, random lengths, possibly empty completions."""
    g = torch.Generator().manual_seed(seed)
    prompts, comps = [], []
    for _ in range(n_prompts):
        lp = int(torch.randint(1, max_lp + 1, (1,), generator=g))
        prompts.append(torch.randint(0, V, (lp,), generator=g))
        G = int(torch.randint(2, max_g + 1, (1,), generator=g))
        lo = 0 if allow_empty else 1
        comps.append([torch.randint(0, V, (int(torch.randint(lo, max_lr + 1, (1,), generator=g)),), generator=g)
                      for _ in range(G)])
    comps[0][0] = torch.randint(0, V, (max_lr,), generator=g)  # at least one full-length completion
    return prompts, comps


def naive_logprobs(model, prompts, comps, temperature=1.0):
    """Independent reference: one unpadded forward per (prompt, completion) with full logits."""
    out = []
    for p, cs in zip(prompts, comps):
        for c in cs:
            ids = torch.cat([p, c])[None]
            logits = model(input_ids=ids).logits[0].double() / temperature  # [L, V]
            lp = logits.log_softmax(-1)
            out.append(torch.stack([lp[p.numel() - 1 + t, c[t]] for t in range(c.numel())])
                       if c.numel() else torch.zeros(0))
    return out


def _weighted_sum(lps, seed=1):
    g = torch.Generator().manual_seed(seed)
    return sum((x * torch.randn(x.shape, generator=g, dtype=x.dtype)).sum() for x in lps if x.numel())


def _grads(model, lps):
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.autograd.grad(_weighted_sum(lps), params, allow_unused=True)


def _max_diff(a, b):
    return max((x - y).abs().max().item() for x, y in zip(a, b) if x.numel())


def _assert_grads_close(ga, gb, rel):
    for x, y in zip(ga, gb):
        if x is None or y is None:
            assert x is None and y is None
            continue
        assert (x - y).abs().max().item() <= rel * y.abs().max().item() + 1e-8


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
@pytest.mark.parametrize("family", FAMILIES)
def test_grouped_equals_repeated(family, impl):
    model = make_model(family, impl)
    for seed in (0, 1):
        prompts, comps = make_batch(seed)
        grouped = completion_logprobs(model, prompts, comps, grouped=True)
        repeated = completion_logprobs(model, prompts, comps, grouped=False)
        assert [x.shape for x in grouped] == [(c.numel(),) for cs in comps for c in cs]
        assert _max_diff(grouped, repeated) <= 1e-5
        _assert_grads_close(_grads(model, grouped), _grads(model, repeated), 1e-4)
    assert model.config._attn_implementation == impl  # restored


@pytest.mark.parametrize("family", ["gemma", "olmo2", "phi3", "qwen3_moe"])
def test_other_families_grouped_equals_repeated(family):
    """Gemma (scaled embeddings), OLMo2 (post-norms, q/k norm), Phi3 (fused qkv), Qwen3-MoE (routed
    experts): nothing family-specific in the grouped path, so they match like the four above."""
    model = make_model(family, "sdpa")
    prompts, comps = make_batch(3)
    grouped = completion_logprobs(model, prompts, comps, grouped=True)
    repeated = completion_logprobs(model, prompts, comps, grouped=False)
    assert _max_diff(grouped, repeated) <= 1e-5
    _assert_grads_close(_grads(model, grouped), _grads(model, repeated), 1e-4)


def test_flex_attention_model_scores_without_grad():
    """A model in FlexAttention mode: the grouped path runs its math through SDPA (exact). On CPU
    torch's FlexAttention has no backward, so this checks the no-grad scoring (old/ref log-probs)."""
    model = make_model("qwen2", "sdpa")
    prompts, comps = make_batch(4)
    with torch.no_grad():
        reference = completion_logprobs(model, prompts, comps, grouped=False)
        model.set_attn_implementation("flex_attention")
        grouped = completion_logprobs(model, prompts, comps, grouped=True)
    assert _max_diff(grouped, reference) <= 1e-5
    assert model.config._attn_implementation == "flex_attention"


def _rmsnorm_keep_dtype(self, x):
    """RMSNorm without transformers' cast to fp32 (which would cap fp64 agreement at fp32 rounding)."""
    return self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon))


def test_float64_and_naive_reference(monkeypatch):
    # sdpa only: transformers' eager softmax is fp32 even for fp64 inputs.
    monkeypatch.setattr(transformers.models.qwen3.modeling_qwen3.Qwen3RMSNorm, "forward", _rmsnorm_keep_dtype)
    model = make_model("qwen3", "sdpa", dtype=torch.float64)
    prompts, comps = make_batch(3)
    grouped = completion_logprobs(model, prompts, comps, grouped=True, temperature=0.7)
    naive = naive_logprobs(model, prompts, comps, temperature=0.7)
    repeated = completion_logprobs(model, prompts, comps, grouped=False, temperature=0.7)
    assert _max_diff(grouped, naive) <= 1e-10 and _max_diff(repeated, naive) <= 1e-10
    _assert_grads_close(_grads(model, grouped), _grads(model, naive), 1e-10)


def _dense_oracle(model, prompts, comps):
    """Plain model on the packed rows (one group per row) with a dense 4-D segment mask; logits
    picked by a loop."""
    plan = build_plan(prompts, comps, pack=False)
    B, S = plan.shape
    seg = torch.full((B, S), -1)
    for b, (p, cs) in enumerate(zip(prompts, comps)):
        seg[b, : p.numel()] = 0
        start = p.numel()
        for j, c in enumerate(cs):
            seg[b, start : start + c.numel()] = j + 1
            start += c.numel()
    q, k = seg[:, :, None], seg[:, None, :]  # [B, S, 1], [B, 1, S]
    causal = torch.ones(S, S, dtype=torch.bool).tril()
    allowed = causal & (k >= 0) & ((k == 0) | (k == q))
    allowed[:, :, 0] |= True  # padded query rows: see something, never NaN
    mask = torch.zeros(B, 1, S, S).masked_fill(~allowed[:, None], torch.finfo(torch.float32).min)
    logits = model(input_ids=plan.input_ids, attention_mask=mask, position_ids=plan.position_ids).logits
    lp = logits.float().log_softmax(-1)  # [B, S, V]
    out = []
    for b, (p, cs) in enumerate(zip(prompts, comps)):
        start = p.numel()
        for c in cs:
            rows = [lp[b, p.numel() - 1 if t == 0 else start + t - 1, c[t]] for t in range(c.numel())]
            out.append(torch.stack(rows))
            start += c.numel()
    return out


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
def test_dense_mask_oracle(impl):
    model = make_model("llama", impl)
    prompts, comps = make_batch(5, allow_empty=False)
    grouped = completion_logprobs(model, prompts, comps, grouped=True)
    oracle = _dense_oracle(model, prompts, comps)
    assert _max_diff(grouped, oracle) <= 1e-5
    _assert_grads_close(_grads(model, grouped), _grads(model, oracle), 1e-4)
    # The bug class of OpenPipe ART #666: a plain causal mask over the packed row must NOT match.
    plan = build_plan(prompts, comps, pack=False)
    plain = model(input_ids=plan.input_ids, position_ids=plan.position_ids).logits.float().log_softmax(-1)
    plain_lp = plain.flatten(0, 1)[plan.pred_idx, plan.targets]
    assert (plain_lp - torch.cat(grouped)).abs().max() > 1e-3


@pytest.mark.parametrize("grouped", [True, False])
def test_invariance_batch_composition_and_padding(grouped):
    model = make_model("mistral", "sdpa")
    prompts, comps = make_batch(7, n_prompts=4)
    together = completion_logprobs(model, prompts, comps, grouped=grouped)
    alone = [x for p, cs in zip(prompts, comps) for x in completion_logprobs(model, [p], [cs], grouped=grouped)]
    assert _max_diff(together, alone) <= 1e-5
    # Prompts arriving padded on either side (and by different amounts) give the same log-probs.
    for side in ("left", "right"):
        T = max(p.numel() for p in prompts) + 3
        ids = torch.zeros(len(prompts), T, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, p in enumerate(prompts):
            sl = slice(T - p.numel(), T) if side == "left" else slice(0, p.numel())
            ids[i, sl], mask[i, sl] = p, 1
        again = completion_logprobs(model, split_padded(ids, mask), comps, grouped=grouped)
        assert _max_diff(together, again) <= 1e-6


def test_every_layer_consumes_plan_and_model_restored():
    model = make_model("qwen2", "sdpa", num_hidden_layers=3)
    prompts, comps = make_batch(2, allow_empty=False)
    plan = build_plan(prompts, comps)
    with grouped_attention_mode(model):
        assert model.config._attn_implementation == "effsft_grouped_sdpa"
        model.get_decoder()(input_ids=plan.input_ids, position_ids=plan.position_ids, effsft_pg_plan=plan)
    assert plan.calls == 3
    assert model.config._attn_implementation == "sdpa"
    # Left in grouped mode, the model delegates to its backend (with the backend's padding mask).
    ids = torch.randint(0, V, (2, 9))
    att = torch.ones_like(ids)
    att[1, :4] = 0  # left padding
    ref = model(input_ids=ids, attention_mask=att).logits
    model.set_attn_implementation("effsft_grouped_sdpa")
    out = model(input_ids=ids, attention_mask=att).logits
    model.set_attn_implementation("sdpa")
    assert torch.allclose(out[att.bool()], ref[att.bool()], atol=1e-6)


def test_errors_and_empty():
    prompts, comps = make_batch(4, allow_empty=False)
    short = make_model("mistral", "sdpa", sliding_window=3)
    with pytest.raises(ValueError, match="sliding_window"):
        completion_logprobs(short, prompts, comps)
    assert short.config._attn_implementation == "sdpa"  # restored after the error
    long_window = make_model("mistral", "sdpa", sliding_window=64)
    assert _max_diff(completion_logprobs(long_window, prompts, comps),
                     completion_logprobs(long_window, prompts, comps, grouped=False)) <= 1e-5
    dropout = make_model("llama", "sdpa", attention_dropout=0.1).train()
    with pytest.raises(ValueError, match="dropout"):
        completion_logprobs(dropout, prompts, comps)
    empty = completion_logprobs(make_model(), prompts, [[torch.zeros(0, dtype=torch.long)] * 2] * len(prompts))
    assert len(empty) == 2 * len(prompts) and all(x.numel() == 0 for x in empty)


def test_grpo_loss_grouped_equals_repeated_mu2():
    """Spec §5.3: same loss and gradients, with old log-probs from a no-grad grouped pass before a step."""
    model = make_model("llama", "eager")
    prompts, comps = make_batch(9, allow_empty=False)
    with torch.no_grad():
        old, mask = pad_logprobs(completion_logprobs(model, prompts, comps))
        for p in model.parameters():  # pretend an optimizer step happened (iteration 2 of mu = 2)
            p.add_(0.01 * torch.randn_like(p))
    adv = torch.randn(old.shape[0])
    results = []
    for grouped in (True, False):
        model.zero_grad()
        lps, _ = pad_logprobs(completion_logprobs(model, prompts, comps, grouped=grouped))
        loss = grpo_loss(lps, old, adv, mask, "dapo", 0.2, 0.28)
        loss.backward()
        results.append((loss.item(), [p.grad.clone() for p in model.parameters()]))
    assert results[0][0] == pytest.approx(results[1][0], abs=1e-6)
    _assert_grads_close(results[0][1], results[1][1], 1e-4)


# ------------------------------------------------------------------ prefix_grouper package cross-check
def _ref_attn_func(q, k, v, attn_mask, *args, **kwargs):
    """Eager attention, bottom-right causal plus the 2-D key mask; [b,h,s,d] in, [b,s,h,d] out."""
    Lq, Lk = q.shape[2], k.shape[2]
    causal = torch.ones(Lq, Lk, dtype=torch.bool).tril(diagonal=Lk - Lq)
    allowed = causal[None, None] & attn_mask[:, None, None, :].bool()
    w = (q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5
    w = w.masked_fill(~allowed, torch.finfo(q.dtype).min).softmax(-1)
    return (w @ v).transpose(1, 2)


def _pg_inputs():
    pg = pytest.importorskip("prefix_grouper")
    prompts, comps = make_batch(11, allow_empty=False)
    plan = build_plan(prompts, comps, pack=False)  # the package lays out one group per row
    info = [[p.numel()] + [c.numel() for c in cs] for p, cs in zip(prompts, comps)]
    return pg.PrefixGrouper(info, padding_mode="right"), plan


def test_cross_check_prefix_grouper_attention():
    grouper, plan = _pg_inputs()
    B, S = plan.shape
    torch.manual_seed(0)
    q, k, v = (torch.randn(B, 4, S, 8, dtype=torch.float64) for _ in range(3))
    theirs = grouper.forward(_ref_attn_func, q, k, v)  # [B, S, H, d]
    ours = grouped_attention(q, k, v, plan, 8**-0.5, "eager")
    valid = torch.zeros(B * S, dtype=torch.bool)
    valid[plan.scatter_dst] = True
    valid = valid.view(B, S)
    assert theirs.shape == ours.shape
    assert (theirs[valid] - ours[valid]).abs().max().item() <= 1e-12


def test_cross_check_prefix_grouper_split_output():
    grouper, plan = _pg_inputs()
    B, S = plan.shape
    positions = torch.arange(B * S, dtype=torch.float64).view(B, S, 1)  # each packed slot's flat index
    _, _, suffix, suffix_mask = grouper.split_output(positions, include_prefix_last=1)
    suffix = grouper.convert_padding(suffix, suffix_mask, padding_mode="right")  # [N, 1 + maxLr, 1]
    lens = [int(x) for x in suffix_mask.sum(1) - 1]  # minus the completion's own last token
    theirs = torch.cat([suffix[n, :L, 0] for n, L in enumerate(lens)]).long()
    assert torch.equal(theirs, plan.pred_idx)


def test_theoretical_ratios_table():
    # docs/algorithms/prefix_grouper_grpo.md §1 table (r = Lp / Lr)
    for G, r, pw, att in [(4, 1, 0.625, 0.812), (8, 4, 0.300, 0.440), (16, 16, 0.118, 0.170)]:
        t = theoretical_ratios(G, r * 10, 10)
        assert t["pointwise"] == pytest.approx(pw, abs=6e-4) and t["attention"] == pytest.approx(att, abs=6e-4)
    c = theoretical_ratios(8, 40, 10, c_pw=1.0, c_att=0.0)["combined"]
    assert c == pytest.approx(theoretical_ratios(8, 40, 10)["pointwise"])
    t = theoretical_ratios(8, 40, 10, c_pw=1.0, c_att=0.5, c_head=0.0)
    assert t["total"] == pytest.approx(t["combined"])
    assert theoretical_ratios(8, 40, 10, c_pw=0.0, c_att=0.0, c_head=1.0)["total"] == pytest.approx(1.0)


@pytest.mark.parametrize("G,Lp,Lr", [(4, 12, 6), (8, 24, 6)])
def test_theoretical_matmul_flops_match_counted_flops(G, Lp, Lr):
    """The FLOP model against torch's own count of every matmul of both paths (forward):
    linear layers and the LM head, i.e. ``total`` with the attention term left out."""
    from torch.utils.flop_counter import FlopCounterMode

    model = make_model(num_key_value_heads=4, tie_word_embeddings=False)
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, V, (Lp,), generator=g)]
    comps = [[torch.randint(0, V, (Lr,), generator=g) for _ in range(G)]]
    counted = {}
    for grouped in (True, False):
        with FlopCounterMode(display=False) as fc:
            completion_logprobs(model, prompts, comps, grouped=grouped)
        per_op = fc.get_flop_counts()["Global"]
        counted[grouped] = sum(v for op, v in per_op.items() if "mm" in str(op))  # mm / addmm / bmm
    c_pw, _, c_head = cost_coefficients(model)
    norms = sum(p.numel() for n, p in model.named_parameters() if "norm" in n)
    c_pw -= 2.0 * norms  # RMSNorm weights are parameters without a matmul
    theo = theoretical_ratios(G, Lp, Lr, c_pw, 0.0, c_head)["total"]
    assert counted[True] / counted[False] == pytest.approx(theo, rel=1e-6)


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
def test_several_groups_share_a_packed_row(impl):
    """Small groups packed into the rows of the largest (micro-batches of many short groups pad
    little): the same log-probs and gradients as one group per row and as the repeated forward."""
    model = make_model("qwen2", impl)
    g = torch.Generator().manual_seed(11)
    prompts = [torch.randint(0, V, (n,), generator=g) for n in (20, 3, 4, 2, 5)]
    comps = [[torch.randint(0, V, (n,), generator=g) for n in sizes]
             for sizes in ((6, 5, 7), (2, 3), (1, 2), (3,), (2, 2))]
    plan = build_plan(prompts, comps)
    assert plan.shape[0] < len(prompts)  # really packed: fewer rows than groups
    packed = completion_logprobs(model, prompts, comps, grouped=True)
    repeated = completion_logprobs(model, prompts, comps, grouped=False)
    assert _max_diff(packed, repeated) <= 1e-5
    _assert_grads_close(_grads(model, packed), _grads(model, repeated), 1e-4)
