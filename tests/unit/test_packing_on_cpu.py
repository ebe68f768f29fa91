"""Padding-free packing: plans, layouts, and exactness against the same rows run unpacked.

A packed micro-batch must give every token the loss and every parameter the gradient of the
same rows run one by one (no attention across rows, positions restarting per row), for Llama
and Qwen2 with SDPA and eager attention; Q-Tuning must select and train the same way on
packed and padded micro-batches; and the step's loss is normalised by every response token of
the step, so accumulation and packing leave the update unchanged.
"""
from __future__ import annotations

import random

import pytest
import torch
import transformers

from effsft.corpus.tokenize import IGNORE_INDEX, Encoded, collate
from effsft.sft.loss import SFTLoss, sft_loss
from effsft.models.packing import RowBatch, pack_rows, plan_packs, plan_stats, row_layout, to_rows

V = 101


def _rows(seed=0, n=7, max_len=23):
    """Random rows: a prompt (label -100) then a response of random length."""
    g = random.Random(seed)
    out = []
    for _ in range(n):
        lp, lr = g.randint(1, 8), g.randint(1, max_len - 9)
        ids = [g.randrange(3, V) for _ in range(lp + lr)]
        out.append((ids, [-100] * lp + ids[lp:]))
    return out


def _model(family="llama", impl="sdpa", seed=0):
    torch.manual_seed(seed)
    cfg_cls, cls = {"llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
                    "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM)}[family]
    cfg = cfg_cls(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=128, attn_implementation=impl,
                  tie_word_embeddings=False)
    m = cls(cfg).float()
    if family == "qwen2":
        for layer in m.model.layers:
            torch.nn.init.normal_(layer.self_attn.q_proj.bias, std=0.5)
    return m.eval()


def _padded(rows):
    return collate([Encoded(list(x), list(y), 0, 0) for x, y in rows], pad_id=0)


# ---- plans ---------------------------------------------------------------------------------

@pytest.mark.parametrize("strategy", ["bfd", "greedy"])
def test_plans_cover_every_row_once_and_respect_capacity(strategy):
    g = random.Random(1)
    lengths = [g.randint(1, 60) for _ in range(500)] + [80, 75]  # two rows longer than a pack
    plan = plan_packs(lengths, 64, strategy)
    flat = sorted(i for p in plan.packs for i in p)
    assert flat == list(range(len(lengths)))
    assert plan.oversized == 2
    for p in plan.packs:
        assert sum(lengths[i] for i in p) <= 64 or len(p) == 1
        assert p == sorted(p)  # rows keep their order inside a pack
    assert plan_packs(lengths, 64, strategy) == plan  # deterministic
    if strategy == "greedy":  # in order: concatenating the packs gives the rows back
        assert [i for p in plan.packs for i in p] == list(range(len(lengths)))


def test_bfd_packs_tighter_than_greedy_and_stats():
    g = random.Random(2)
    lengths = [g.randint(5, 200) for _ in range(2000)]
    bfd, greedy = plan_packs(lengths, 256, "bfd"), plan_packs(lengths, 256, "greedy")
    assert len(bfd.packs) < len(greedy.packs)
    s = plan_stats(lengths, bfd, padded_batch=8)
    assert s["rows"] == 2000 and s["packs"] == len(bfd.packs)
    assert s["fill_ratio"] > 0.95 and s["padding_fraction_after"] == pytest.approx(1 - s["fill_ratio"])
    assert s["padding_fraction_before"] > 0.3  # lengths 5..200 padded to the longest of 8
    with pytest.raises(ValueError, match="train.packing"):
        plan_packs(lengths, 256, "first_fit")


def test_pack_rows_layout_round_trip():
    rows = _rows(3)
    plan = plan_packs([len(x) for x, _ in rows], 30, "bfd")
    b = pack_rows(rows, plan.packs, pad_id=0)
    assert b["num_tokens"] == sum(len(x) for x, _ in rows)
    # positions restart per row; a row's first token is never a target
    for r, pack in enumerate(plan.packs):
        at = 0
        for i in pack:
            n = len(rows[i][0])
            assert b["position_ids"][r, at:at + n].tolist() == list(range(n))
            assert b["input_ids"][r, at:at + n].tolist() == rows[i][0]
            assert b["labels"][r, at].item() == -100 and b["labels"][r, at + 1:at + n].tolist() == rows[i][1][1:]
            at += n
        assert (b["segment"][r, at:] == -1).all()
    idx, valid = row_layout(b["segment"], len(rows))
    ids = to_rows(b["input_ids"], idx, valid)
    for i, (x, _) in enumerate(rows):
        assert ids[i, :len(x)].tolist() == x and valid[i].sum() == len(x)
    assert b["num_response_tokens"] == sum(sum(t != -100 for t in y[1:]) for _, y in rows)


# ---- exactness -------------------------------------------------------------------------------

def _token_nll_and_grads(model, batch):
    """Per-token NLL of every target (in row order) and the gradient of their sum."""
    model.zero_grad(set_to_none=True)
    rb = RowBatch(batch)
    logits = model.lm_head(rb.hidden(model.model))  # [B, T, V] in row layout
    tgt = rb.labels[:, 1:]
    nll = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), tgt.clamp_min(0), reduction="none")
    per_token = nll[tgt != -100]
    per_token.sum().backward()
    return per_token.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("family", ["llama", "qwen2"])
@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_packed_losses_and_gradients_equal_unpacked(family, impl):
    rows = _rows(4, n=9)
    model = _model(family, impl)
    plan = plan_packs([len(x) for x, _ in rows], 40, "bfd")
    assert any(len(p) > 1 for p in plan.packs)  # something is really packed
    packed = pack_rows(rows, plan.packs, pad_id=0)
    nll_p, g_p = _token_nll_and_grads(model, packed)
    nll_u, g_u = _token_nll_and_grads(model, _padded(rows))
    torch.testing.assert_close(nll_p, nll_u, rtol=1e-5, atol=1e-6)
    for n in g_u:
        torch.testing.assert_close(g_p[n], g_u[n], rtol=1e-4, atol=1e-6)
    # and each row alone, unpadded: the reference nothing can leak into
    alone = torch.cat([_token_nll_and_grads(model, _padded([r]))[0] for r in rows])
    torch.testing.assert_close(nll_u, alone, rtol=1e-5, atol=1e-6)


def test_sft_loss_packed_equals_padded():
    rows = _rows(5, n=8)
    model = _model()
    packed = pack_rows(rows, plan_packs([len(x) for x, _ in rows], 48, "greedy").packs, pad_id=0)
    out = {}
    for name, batch in (("packed", packed), ("padded", _padded(rows))):
        model.zero_grad(set_to_none=True)
        loss, info = sft_loss(model, batch, chunk_tokens=5)
        loss.backward()
        out[name] = (float(loss.detach()), info["n_response"], {n: p.grad.clone() for n, p in model.named_parameters()})
    assert out["packed"][:2] == pytest.approx(out["padded"][:2], rel=1e-5)
    for n in out["padded"][2]:
        torch.testing.assert_close(out["packed"][2][n], out["padded"][2][n], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("mode", ["mask", "two_pass"])
@pytest.mark.parametrize("method", ["qtuning", "ppl_only", "random_sample"])
def test_qtuning_selects_and_trains_the_same_on_packed_batches(mode, method):
    from effsft.sft.qtuning_config import QTuningConfig
    from effsft.sft.qtuning_loss import qtuning_step_loss

    rows = _rows(6, n=8)
    model = _model()
    cfg = QTuningConfig(method=method, sample_ratio=0.5, token_ratio=0.5, mode=mode)
    packed = pack_rows(rows, plan_packs([len(x) for x, _ in rows], 40, "bfd").packs, pad_id=0)
    out = {}
    for name, batch in (("packed", packed), ("padded", _padded(rows))):
        model.zero_grad(set_to_none=True)
        loss, info = qtuning_step_loss(model, batch, cfg, step=3, chunk_tokens=7)
        loss.backward()
        out[name] = (float(loss.detach()), info, {n: p.grad.clone() for n, p in model.named_parameters()})
    (lp, ip, gp), (lu, iu, gu) = out["packed"], out["padded"]
    assert lp == pytest.approx(lu, rel=1e-5)
    assert ip["keep"].tolist() == iu["keep"].tolist()
    assert ip["loss_denominator"] == iu["loss_denominator"] and ip["pass2_rows"] == iu["pass2_rows"]
    T = iu["keep_token"].shape[1]
    assert torch.equal(ip["keep_token"][:, :T], iu["keep_token"][:, :ip["keep_token"].shape[1]])
    for n in gu:
        torch.testing.assert_close(gp[n], gu[n], rtol=1e-4, atol=1e-6)


def test_two_pass_repacks_only_the_kept_rows():
    rows = _rows(7, n=8)
    packed = RowBatch(pack_rows(rows, plan_packs([len(x) for x, _ in rows], 64, "bfd").packs, pad_id=0))
    keep = torch.tensor([1, 4, 6])
    sub = packed.subset(keep)
    assert sub.packed and sub.n_rows == 3
    assert int(sub.attention_mask.sum()) == sum(len(rows[i][0]) for i in keep.tolist())
    assert int((sub.batch["segment"] >= 0).sum()) < int((packed.batch["segment"] >= 0).sum())
    for j, i in enumerate(keep.tolist()):
        n = len(rows[i][0])
        assert sub.labels[j, 1:n].tolist() == rows[i][1][1:]


# ---- the step's normalisation on a real DeepSpeed engine ---------------------------------------

class _Off:
    method = "off"


def _step(micro: list[dict], grad_accum: int):
    from effsft.train.config import TrainSpec
    from effsft.train.engine import build_engine
    from effsft.train.loop import LossModule, StepContext, run_step

    model = _model(seed=3).train()
    tr = TrainSpec(num_workers=1, zero_stage=0, micro_batch_size=4, grad_accum=grad_accum, lr=0.5, clip=0.0,
                   schedule="constant", optimizer="sgd")
    engine = build_engine(LossModule(model, SFTLoss(_Off(), chunk_tokens=6)), tr, total_steps=3, bf16=False)
    m = run_step(engine, micro, StepContext(0, 0, grad_accum, 0, 1, torch.device("cpu")))
    return m, {k: p.detach().clone() for k, p in engine.module.model.named_parameters()}


def test_step_is_the_mean_over_every_response_token(single_process_group):
    """Unequal response lengths: one big micro-batch == 4 accumulated ones == 2 packed ones
    (SGD, so equal weights mean equal gradients), and the logged loss is the token mean."""
    rows = _rows(8, n=8)
    big, w_big = _step([_padded(rows)], 1)
    acc, w_acc = _step([_padded(rows[i:i + 2]) for i in range(0, 8, 2)], 4)
    packs = plan_packs([len(x) for x, _ in rows[:4]], 40, "bfd").packs, plan_packs(
        [len(x) for x, _ in rows[4:]], 40, "bfd").packs
    pk, w_pk = _step([pack_rows(rows[:4], packs[0], 0), pack_rows(rows[4:], packs[1], 0)], 2)
    n = sum(sum(t != -100 for t in y[1:]) for _, y in rows)
    assert big["response_tokens"] == acc["response_tokens"] == pk["response_tokens"] == n
    assert big["loss"] == pytest.approx(acc["loss"], rel=1e-5) and big["loss"] == pytest.approx(pk["loss"], rel=1e-5)
    init = dict(_model(seed=3).named_parameters())
    for k in w_big:
        torch.testing.assert_close(w_acc[k], w_big[k], rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(w_pk[k], w_big[k], rtol=1e-5, atol=1e-7)
    assert any(not torch.equal(w_big[k], init[k].detach()) for k in w_big)


# ---- scoring on packed batches: select's scorers and eval's perplexity ----------------------

def test_select_scores_and_eval_perplexity_are_the_same_packed():
    from effsft.eval.metrics import perplexity
    from effsft.models.tiny import build_tokenizer
    from effsft.select.lm_scores import lm_score_rows

    convs = [[{"role": "user", "content": f"question {i} " * (1 + i % 4)},
              {"role": "assistant", "content": f"answer {i} " * (1 + (i * 7) % 5)}] for i in range(11)]
    tok = build_tokenizer([m["content"] for c in convs for m in c] * 5, 300)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2)).eval()
    a = lm_score_rows(model, tok, convs, batch_size=3, packing=False)
    b = lm_score_rows(model, tok, convs, batch_size=3, packing=True)
    for k in ("ce", "entropy", "s_a", "ifd_raw"):
        torch.testing.assert_close(torch.tensor(b[k]), torch.tensor(a[k]), rtol=1e-5, atol=1e-6)
    assert (a["n_tokens"] == b["n_tokens"]).all()
    pa, pb = perplexity(model, tok, convs, batch_size=3), perplexity(model, tok, convs, batch_size=3, packing=True)
    assert pa["tokens"] == pb["tokens"] and pb["ppl"] == pytest.approx(pa["ppl"], rel=1e-5)


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_packed_scoring_does_not_leak_across_rows_of_a_pack(family):
    """Rows of very different lengths share packs; an eval-mode model with ``config.use_cache``
    (the default) must still score each row as if alone (transformers skips its packed-segment
    mask when a KV cache exists, so the packed forward must not make one)."""
    from effsft.models.nll import row_token_stats
    from effsft.models.packing import batches

    model = _model(family)
    assert model.config.use_cache and not model.training
    g = torch.Generator().manual_seed(3)
    rows = []
    for n in [40, 6, 9, 33, 5, 12, 7, 38, 4, 10]:
        ids = torch.randint(3, V, (n,), generator=g).tolist()
        rows.append((ids, [IGNORE_INDEX] * (n // 3) + ids[n // 3:]))
    alone = [row_token_stats(model, {"input_ids": torch.tensor([x]), "labels": torch.tensor([y]),
                                     "attention_mask": torch.ones(1, len(x), dtype=torch.long)}, 1)[0].item()
             for x, y in rows]
    shared = 0
    for idx, batch in batches(rows, 0, 4, packing=True):
        nll, _, _ = row_token_stats(model, batch, len(idx))
        shared += int((batch["position_ids"] == 0).sum() - batch["input_ids"].shape[0] > 0)
        for j, i in enumerate(idx):
            assert nll[j].item() == pytest.approx(alone[i], rel=1e-5), (i, nll[j].item(), alone[i])
    assert shared, "no pack held two rows: the test would not see a leak"
