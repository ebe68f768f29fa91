"""The GRPO controller without Ray: prompt schedule, rewards -> advantages -> whole groups per
rank and micro-batch, the rollout actor class, and the DeepSpeed GA compensation checked on the
installed DeepSpeed (world size 1) against a plain-torch gradient."""
import math

import pytest
import torch

from effsft.grpo import controller as C
from effsft.grpo.loss import pad_logprobs


def _tiny_llama(vocab=48, seed=0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      tie_word_embeddings=False, attention_dropout=0.0, eos_token_id=2, pad_token_id=0)
    return LlamaForCausalLM(cfg).float()


def _groups(P=4, G=3, seed=0, vocab=48):
    g = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(3, vocab, (int(torch.randint(2, 6, (1,), generator=g)),), generator=g)
               for _ in range(P)]
    comps = [[torch.randint(3, vocab, (int(torch.randint(1, 5, (1,), generator=g)),), generator=g)
              for _ in range(G)] for _ in range(P)]
    return prompts, comps


# ---- schedule and sharding -----------------------------------------------------------------

def test_step_prompts_cover_each_epoch_once_and_are_deterministic():
    n, per = 10, 4
    seq = [i for s in range(5) for i in C.step_prompt_indices(s, n, per, seed=3)]
    assert sorted(seq[:10]) == list(range(10)) and sorted(seq[10:20]) == list(range(10))
    assert C.step_prompt_indices(3, n, per, 3) == seq[12:16]  # pure function of the step
    assert C.step_prompt_indices(0, n, per, 4) != C.step_prompt_indices(0, n, per, 3)


@pytest.mark.parametrize("P,W,GA", [(8, 2, 2), (6, 3, 1), (4, 1, 4), (12, 2, 3)])
def test_shard_groups_partitions_whole_groups(P, W, GA):
    shards = C.shard_groups(P, W, GA)
    assert len(shards) == W and all(len(s) == GA for s in shards)
    flat = [g for s in shards for mb in s for g in mb]
    assert sorted(flat) == list(range(P))                      # every group exactly once
    assert {len(mb) for s in shards for mb in s} == {P // (W * GA)}
    # naive reference: deal groups out in order, rank-major then micro-batch
    k, it = P // (W * GA), iter(range(P))
    assert shards == [[[next(it) for _ in range(k)] for _ in range(GA)] for _ in range(W)]


def test_shard_groups_rejects_uneven():
    with pytest.raises(ValueError, match="whole groups"):
        C.shard_groups(6, 4, 1)
    with pytest.raises(ValueError):
        C.shard_groups(2, 2, 2)


def test_rewards_advantages_payloads_end_to_end():
    """Rewards of 2 functions (one with None) -> weighted sum -> group advantages, then the
    payloads of each rank carry exactly their groups' completions and advantages."""
    P, G = 4, 3
    prompts, comps = _groups(P, G)
    f1 = [1.0, 0.0, 1.0] + [0.0] * 3 + [1.0] * 3 + [0.0, 1.0, 0.0]
    f2 = [None] * 3 + [2.0, None, 0.0] + [0.0] * 6
    total, per = C.combine_per_func([C.rewards_column(f1, P * G), C.rewards_column(f2, P * G)], [1.0, 0.5])
    want = [a + (0.5 * b if b is not None else 0.0) for a, b in zip(f1, f2)]
    assert total.tolist() == pytest.approx(want) and per.shape == (P * G, 2)
    ro = C.make_rollout(prompts, comps, total, per, G, "group")
    # naive advantages: per group, (r - mean) / (sample std + 1e-4), 0 for all-equal groups
    for p in range(P):
        r = want[p * G:(p + 1) * G]
        mu = sum(r) / G
        sd = math.sqrt(sum((x - mu) ** 2 for x in r) / (G - 1))
        exp = [0.0] * G if max(r) == min(r) else [(x - mu) / (sd + 1e-4) for x in r]
        assert ro.advantages[p * G:(p + 1) * G].tolist() == pytest.approx(exp, abs=1e-6)
    m = C.rollout_metrics(ro, ["f1", "f2"])
    assert m["frac_zero_adv_groups"] == 0.25 and m["reward/f2"] == pytest.approx(2 / 8)  # mean over the 8 non-None
    assert m["reward_mean"] == pytest.approx(sum(want) / 12)
    shards = C.shard_groups(P, 2, 1)
    n_active = sum(c.numel() for cs in comps for c in cs)
    for rank in range(2):
        (mb,) = C.micro_batch_payloads(ro, shards[rank])
        gs = shards[rank][0]
        assert [c.tolist() for cs in mb["completions"] for c in cs] == \
               [comps[g][j].tolist() for g in gs for j in range(G)]
        assert mb["advantages"].tolist() == pytest.approx([float(ro.advantages[g * G + j]) for g in gs for j in range(G)])
        assert mb["num_response_tokens"] == sum(comps[g][j].numel() for g in gs for j in range(G))
        assert mb["num_tokens"] == mb["num_response_tokens"] + sum(prompts[g].numel() for g in gs)
        assert mb["step_active_tokens"] == n_active


def test_rewards_column_checks_length():
    with pytest.raises(ValueError, match="returned 2 values for 3"):
        C.rewards_column([1.0, 0.0], 3)


# ---- rollout worker (plain class) ----------------------------------------------------------

def test_trim_at_eos_masks_after_first_eos():
    from effsft.grpo.rollout import trim_at_eos

    gen = torch.tensor([[5, 6, 2, 7, 2], [5, 5, 5, 5, 5], [2, 9, 9, 9, 9]])
    _, mask = trim_at_eos(gen, [2])
    assert mask.int().tolist() == [[1, 1, 1, 0, 0], [1] * 5, [1, 0, 0, 0, 0]]


def test_rollout_worker_generates_ids_and_syncs_weights(tmp_path):
    from effsft.grpo.rollout import RolloutWorker, state_checksum
    from effsft.models.tiny import write_tiny_model

    # a tiny model directory through the ordinary loader (tokenizer trained on a few lines)
    corpus = tmp_path / "c.jsonl"
    corpus.write_text("\n".join('{"messages": [{"role": "user", "content": "what is %d + %d"}, '
                                '{"role": "assistant", "content": "Answer: %d"}]}' % (i, i, 2 * i)
                                for i in range(50)))
    path = write_tiny_model(tmp_path / "m", "llama", corpus=str(corpus), seed=0)
    w = RolloutWorker(str(path), dtype="float32", num_threads=1)
    res = w.generate([[5, 6, 7], [8, 9]], num_generations=3, max_new_tokens=6, temperature=1.0, seed=1)
    ids, mask = res["completion_ids"], res["completion_mask"]
    assert ids.shape[0] == 6 and ids.shape == mask.shape and ids.shape[1] <= 6
    assert mask[:, 0].all() and res["tokens"] == int(mask.sum()) and res["version"] == 0
    again = w.generate([[5, 6, 7], [8, 9]], 3, 6, 1.0, seed=1)["completion_ids"]
    assert torch.equal(again, ids)  # seeded
    new = {k: v + 0.01 for k, v in w.model.state_dict().items()}
    before = w.weights_checksum()
    assert w.update_weights(new, 7) == 7 and w.get_version() == 7
    assert w.weights_checksum() == state_checksum(new) != before


# ---- the loss hook and DeepSpeed's GA division -----------------------------------------------

def _naive_step_objective(model, prompts, comps, adv, old, loss_type, L_max):
    """Spec §3 objective of a whole optimizer step (W = 1), written per token with full logits:
    grpo = mean over sequences of per-sequence token means; bnpo = dapo = token mean;
    dr_grpo = token sum / (N * L_max). Clipping with eps 0.2."""
    seq_terms, tok_sum, n_tok, n_seq = [], 0.0, 0, 0
    k = 0
    for p, cs in zip(prompts, comps):
        for c in cs:
            row = torch.cat([p, c])[None]
            logits = model(input_ids=row).logits[0].double()   # [L, V]
            lp = torch.log_softmax(logits, -1)
            terms = []
            for t in range(c.numel()):
                s = lp[p.numel() - 1 + t, c[t]]
                w = torch.exp(s - old[k][t])
                a = float(adv[k])
                terms.append(-torch.min(w * a, torch.clamp(w, 0.8, 1.2) * a))
            seq_terms.append(sum(terms) / len(terms))
            tok_sum = tok_sum + sum(terms)
            n_tok += len(terms)
            n_seq += 1
            k += 1
    return {"grpo": sum(seq_terms) / n_seq, "bnpo": tok_sum / n_tok, "dapo": tok_sum / n_tok,
            "dr_grpo": tok_sum / (n_seq * L_max)}[loss_type]


@pytest.mark.parametrize("loss_type", ["grpo", "dapo", "dr_grpo"])
def test_ga_compensated_loss_gives_the_step_gradient_on_deepspeed(single_process_group, loss_type):
    """GA=2 micro-batches through the real DeepSpeed engine (which divides each micro-loss by
    GA) give the gradient norm of the spec's whole-step objective: the compensation is applied
    exactly once (a missing or doubled one is off by a factor 2)."""
    from effsft.train.config import TrainSpec
    from effsft.train.engine import build_engine
    from effsft.train.loop import LossModule, StepContext, run_step

    P, G = 4, 2
    prompts, comps = _groups(P, G, seed=5)
    adv = torch.tensor([1.0, -1.0, 0.5, -0.5, 2.0, -2.0, 0.3, -0.3])
    # old log-probs shifted a little from the current ones, so some tokens clip
    ref_model = _tiny_llama(seed=3)
    with torch.no_grad():
        cur = [lp.detach() for lp in C.completion_logprobs(ref_model, prompts, comps)]
    gen = torch.Generator().manual_seed(0)
    old = [c + 0.3 * torch.randn(c.shape, generator=gen, dtype=c.dtype) for c in cur]
    L_max = 6
    want = _naive_step_objective(ref_model, prompts, comps, adv, old, loss_type, L_max)
    want.backward()
    want_norm = math.sqrt(sum(float(p.grad.double().pow(2).sum()) for p in ref_model.parameters()))

    hook = C.GRPOLoss(loss_type=loss_type, epsilon=0.2, epsilon_high=0.2, max_completion_length=L_max)
    tr = TrainSpec(num_workers=1, zero_stage=2, grad_accum=2, lr=1e-3, clip=0.0, schedule="constant")
    engine = build_engine(LossModule(_tiny_llama(seed=3), hook), tr, total_steps=2, bf16=False)
    ro = C.Rollout(prompts, comps, torch.zeros(P * G), torch.zeros(P * G, 1), adv)
    micro = C.micro_batch_payloads(ro, C.shard_groups(P, 1, 2)[0])
    for m, groups in zip(micro, C.shard_groups(P, 1, 2)[0]):
        old_pad, _ = pad_logprobs([old[g * G + j] for g in groups for j in range(G)])
        m["old_logps"] = old_pad.float()
    out = run_step(engine, micro, StepContext(0, 0, 2, 0, 1, torch.device("cpu")))
    assert out["grad_norm"] == pytest.approx(want_norm, rel=1e-4)
    assert out["loss"] == pytest.approx(float(want), rel=1e-4, abs=1e-6)
    assert out["response_tokens"] == sum(c.numel() for cs in comps for c in cs)
    assert 0 <= out["clip_ratio/region"] <= 1 and out["clip_ratio/region"] > 0


def test_hook_with_mu_1_uses_detached_logprobs_and_matches_repeated_path():
    """No old_logps: ratio 1, no clipping; the grouped and repeated forwards agree."""
    from effsft.train.loop import StepContext

    model = _tiny_llama(seed=1)
    prompts, comps = _groups(3, 4, seed=2)
    adv = torch.linspace(-1, 1, 12)
    batch = {"prompts": prompts, "completions": comps, "advantages": adv,
             "step_active_tokens": sum(c.numel() for cs in comps for c in cs)}
    ctx = StepContext(0, 0, 1, 0, 1, torch.device("cpu"))
    lg, mg = C.GRPOLoss(loss_type="bnpo", grouped=True)(model, batch, ctx)
    lr_, mr = C.GRPOLoss(loss_type="bnpo", grouped=False)(model, batch, ctx)
    assert float(lg) == pytest.approx(float(lr_), abs=1e-6)
    assert mg["clip_ratio/region"] == 0 and mg["ratio_mean"] == pytest.approx(1.0)
    # with w = 1 the bnpo loss is -sum_t A_i / n_tok
    lens = torch.tensor([c.numel() for cs in comps for c in cs], dtype=torch.float32)
    assert float(lg) == pytest.approx(float(-(adv * lens).sum() / lens.sum()), abs=1e-6)
