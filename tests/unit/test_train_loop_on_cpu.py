"""The pieces of the shared training loop, without Ray: LR schedule, the sft loss against a
hand-computed response-only NLL, micro-batching/accumulation equivalence on a real DeepSpeed
engine (world size 1), the data stream's resume position, the metrics log, the configs."""
import math

import numpy as np
import pytest
import torch

from effsft.sft.loss import SFTLoss, sft_loss
from effsft.train.schedule import lr_factor


def _tiny_llama(vocab=64, seed=0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      tie_word_embeddings=False)
    return LlamaForCausalLM(cfg).float()


def _batch(B=4, T=12, vocab=64, n_prompt=(3, 5, 2, 4), lengths=(12, 9, 12, 7), seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (B, T), generator=g)
    mask = torch.zeros(B, T, dtype=torch.long)
    labels = torch.full((B, T), -100)
    for b in range(B):
        mask[b, :lengths[b]] = 1
        labels[b, n_prompt[b]:lengths[b]] = ids[b, n_prompt[b]:lengths[b]]
        ids[b, lengths[b]:] = 0
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


# ---- LR schedule ------------------------------------------------------------------------

def _ref_lr(step, warmup, total, kind, floor):
    if warmup and step < warmup:
        return (step + 1) / warmup
    if kind == "constant":
        return 1.0
    frac = (step - warmup) / (total - warmup)
    frac = 1.0 if frac > 1 else frac
    shape = (math.cos(frac * math.pi) + 1) / 2 if kind == "cosine" else 1 - frac
    return floor + shape * (1 - floor)


@pytest.mark.parametrize("kind", ["cosine", "linear", "constant"])
@pytest.mark.parametrize("warmup,floor", [(0, 0.0), (4, 0.1)])
def test_lr_schedule_matches_reference(kind, warmup, floor):
    total = 20
    got = [lr_factor(s, warmup, total, kind, floor) for s in range(total + 3)]
    want = [_ref_lr(s, warmup, total, kind, floor) for s in range(total + 3)]
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-12)
    if warmup:
        assert got[0] == pytest.approx(1 / warmup) and got[warmup - 1] == 1.0
    assert got[warmup] == 1.0
    if kind != "constant":
        assert got[total] == pytest.approx(floor) and got[total + 2] == pytest.approx(floor)
        assert all(a >= b for a, b in zip(got[warmup:], got[warmup + 1:]))  # monotone decay


def test_lr_schedule_drives_torch_optimizer():
    from effsft.train.schedule import lambda_lr

    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=0.5)
    sched = lambda_lr(opt, 2, 6, "linear")
    seen = []
    for _ in range(7):
        seen.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    np.testing.assert_allclose(seen, [0.5 * _ref_lr(s, 2, 6, "linear", 0) for s in range(7)])


# ---- loss -------------------------------------------------------------------------------

def _naive_response_nll(model, batch):
    """Full logits, a plain loop over every (row, position): mean -log p(label) on labels."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    total, n = 0.0, 0
    B, T = batch["labels"].shape
    for b in range(B):
        for t in range(1, T):
            y = int(batch["labels"][b, t])
            if y == -100:
                continue
            row = logits[b, t - 1].double()
            total = total + (torch.logsumexp(row, 0) - row[y])
            n += 1
    return total / n, n


@pytest.mark.parametrize("chunk", [1, 5, 1024])
def test_sft_loss_equals_hand_computed_response_nll(chunk):
    model = _tiny_llama()
    batch = _batch()
    ref, n = _naive_response_nll(model, batch)
    ref.backward()
    ref_grads = {k: p.grad.clone() for k, p in model.named_parameters()}
    model.zero_grad()
    loss, info = sft_loss(model, batch, chunk_tokens=chunk)
    loss.backward()
    assert info["n_response"] == n == sum(int((batch["labels"][b, 1:] != -100).sum()) for b in range(4))
    assert float(loss.detach()) == pytest.approx(float(ref.detach()), rel=1e-5)
    for k, p in model.named_parameters():
        torch.testing.assert_close(p.grad, ref_grads[k].to(p.grad.dtype), rtol=1e-4, atol=1e-6)


def test_sft_loss_hook_and_qtuning_wiring():
    from effsft.sft.loss import check_method
    from effsft.sft.recipe import QTuningSpec
    from effsft.train.loop import StepContext

    model, batch = _tiny_llama(), _batch()
    loss, _ = SFTLoss(QTuningSpec(), chunk_tokens=4)(model, batch, None)
    plain = float(_naive_response_nll(model, batch)[0].detach())
    assert float(loss.detach()) == pytest.approx(plain, rel=1e-5)
    ctx = StepContext(0, 0, 1, 0, 1, torch.device("cpu"))
    # Q-Tuning with both ratios 1 keeps everything: the plain SFT loss (docs/algorithms/qtuning.md §4)
    full, info = SFTLoss(QTuningSpec(method="qtuning", sample_ratio=1.0, token_ratio=1.0),
                         chunk_tokens=4)(model, batch, ctx)
    assert float(full.detach()) == pytest.approx(plain, rel=1e-5)
    assert info["qtuning/n_kept_samples"] == 4
    pruned, info = SFTLoss(QTuningSpec(method="qtuning", mode="two_pass", sample_ratio=0.5),
                           chunk_tokens=4)(model, batch, ctx)
    assert torch.isfinite(pruned) and 2 <= info["qtuning/n_kept_samples"] < 4
    with pytest.raises(NotImplementedError, match="zero_stage"):
        check_method(QTuningSpec(method="qtuning"), zero_stage=3)
    check_method(QTuningSpec(method="qtuning"), zero_stage=2)


def test_sft_loss_with_lora_trains_only_adapters():
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(_tiny_llama(), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    batch = _batch()
    loss, _ = sft_loss(model, batch, chunk_tokens=7)
    loss.backward()
    ref, _ = _naive_response_nll(model, batch)
    assert float(loss.detach()) == pytest.approx(float(ref.detach()), rel=1e-5)
    grads = {k for k, p in model.named_parameters() if p.grad is not None}
    assert grads and all("lora_" in k for k in grads)


# ---- micro-batching / accumulation on a real DeepSpeed engine ----------------------------

def _one_step(micro_batch_size, grad_accum, rows):
    from effsft.train.config import TrainSpec
    from effsft.train.engine import build_engine
    from effsft.train.loop import LossModule, StepContext, run_step

    model = _tiny_llama(seed=3)
    tr = TrainSpec(num_workers=1, zero_stage=2, micro_batch_size=micro_batch_size,
                   grad_accum=grad_accum, lr=1e-2, clip=0.5, schedule="constant")
    engine = build_engine(LossModule(model, SFTLoss(_Off())), tr, total_steps=5, bf16=False)
    micro = [{k: v[i:i + micro_batch_size] for k, v in rows.items()}
             for i in range(0, rows["input_ids"].shape[0], micro_batch_size)]
    m = run_step(engine, micro, StepContext(0, 0, grad_accum, 0, 1, torch.device("cpu")))
    return m, {k: p.detach().clone() for k, p in engine.module.model.named_parameters()}


class _Off:
    method = "off"


def test_accumulation_equals_one_big_micro_batch(single_process_group):
    # Equal response-token counts per row: then the mean of micro-batch means is the batch mean.
    rows = _batch(n_prompt=(3, 2, 4, 5), lengths=(9, 8, 10, 11))
    m_big, p_big = _one_step(4, 1, rows)
    m_acc, p_acc = _one_step(2, 2, rows)
    init = dict(_tiny_llama(seed=3).named_parameters())
    assert m_big["loss"] == pytest.approx(m_acc["loss"], rel=1e-6)
    assert m_big["tokens"] == m_acc["tokens"] == int(rows["attention_mask"].sum())
    assert m_big["response_tokens"] == 4 * 6 and m_big["lr"] == 1e-2
    # Adam is scale-invariant, so the grad norm is what pins the 1/grad_accum scaling.
    assert m_big["grad_norm"] == pytest.approx(m_acc["grad_norm"], rel=1e-4)
    for k in p_big:  # Adam's first step ~ lr * sign(g): near-zero grads amplify fp noise
        torch.testing.assert_close(p_acc[k], p_big[k], rtol=1e-3, atol=5e-5)
    assert any(not torch.equal(p_big[k], init[k].detach()) for k in p_big)  # it did step


# ---- data stream, metrics log, fault flag --------------------------------------------------

class _FakeShard:
    """Stands in for a Ray Train dataset shard: ``iter_batches`` over a fixed list of rows."""

    def __init__(self, n):
        self.rows = [(np.arange(3 + i % 3), np.array([-100] + list(range(1, 3 + i % 3)))) for i in range(n)]

    def iter_batches(self, batch_size, drop_last, batch_format, **_):
        for s in range(0, len(self.rows) - batch_size + 1, batch_size):
            chunk = self.rows[s:s + batch_size]
            yield {"input_ids": np.array([c[0] for c in chunk], dtype=object),
                   "labels": np.array([c[1] for c in chunk], dtype=object)}


def test_micro_batch_stream_cycles_epochs_and_resumes_at_position():
    from effsft.train.data import micro_batches

    full = micro_batches(_FakeShard(7), 2, pad_id=0)  # 3 micro-batches per epoch (last row dropped)
    seq = [next(full) for _ in range(7)]
    assert [(e, i) for e, i, _ in seq] == [(0, 0), (0, 1), (0, 2), (1, 0), (1, 1), (1, 2), (2, 0)]
    resumed = micro_batches(_FakeShard(7), 2, pad_id=0, start_epoch=1, skip=2)
    e, i, b = next(resumed)
    assert (e, i) == (1, 2) and torch.equal(b["input_ids"], seq[5][2]["input_ids"])
    assert b["labels"][0, 0] == -100 and b["attention_mask"].shape == b["input_ids"].shape
    with pytest.raises(ValueError, match="fewer than one micro-batch"):
        next(micro_batches(_FakeShard(1), 2, pad_id=0))


def test_metrics_log_drops_steps_after_resume_point(tmp_path):
    from effsft.train.loop import MetricsLog, read_metrics

    path = tmp_path / "metrics.jsonl"
    log = MetricsLog(path, rank=0, resume_step=0)
    for s in range(1, 6):
        log.write({"step": s, "loss": 1.0 / s})
    MetricsLog(path, rank=1, resume_step=2).write({"step": 99})  # non-zero ranks never write
    log2 = MetricsLog(path, rank=0, resume_step=3)
    log2.write({"step": 4, "loss": 0.0})
    assert [r["step"] for r in read_metrics(path)] == [1, 2, 3, 4]


def test_fault_flag_fires_only_on_its_rank_and_step(tmp_path):
    from effsft.train.config import FaultSpec
    from effsft.train.loop import maybe_inject_fault

    fault = FaultSpec(kill_rank_at_step={"rank": 1, "step": 3, "delay_s": 0})
    for rank, step in [(0, 3), (1, 2), (1, 4)]:
        maybe_inject_fault(fault, step, rank, str(tmp_path))  # returns: not this rank/step
    (tmp_path / ".fault-fired-rank1-step3").write_text("x")
    maybe_inject_fault(fault, 3, 1, str(tmp_path))  # marker present: fired before, not again
    maybe_inject_fault(FaultSpec(), 3, 1, str(tmp_path))


# ---- configs -------------------------------------------------------------------------------

QTUNING_KEYS = {"method": "off", "sample_ratio": 0.25, "token_ratio": 0.5, "lam": 0.5,
                "entropy_scope": "response", "token_budget": "batch",
                "loss_norm": "kept_response_tokens", "neighbor_div2": False, "score_scope": "local",
                "mode": "mask", "plot_every": 500, "baseline_order": "default"}


def test_jobs_sft_yaml_validates_and_qtuning_keys_are_the_spec(tmp_path):
    from pathlib import Path

    from effsft.config import ConfigError, load_config
    from effsft.sft.recipe import QTuningSpec, SFTConfig

    root = Path(__file__).resolve().parents[2]
    paths = [f"model.path={tmp_path}", f"data.path={tmp_path}"]
    cfg = load_config(SFTConfig, root / "jobs" / "sft.yaml", paths)
    assert cfg.qtuning.method == "off" and cfg.train.zero_stage == 2
    assert QTuningSpec().model_dump() == QTUNING_KEYS
    assert load_config(SFTConfig, None, paths + ["output=x", "qtuning.method=off"]).qtuning.method == "off"
    with pytest.raises(ConfigError, match="qtuning.sample_ratioo: unknown key"):
        load_config(SFTConfig, root / "jobs" / "sft.yaml", paths + ["qtuning.sample_ratioo=0.1"])
    with pytest.raises(ConfigError, match="zero_stage=3"):
        load_config(SFTConfig, root / "jobs" / "sft.yaml", paths + ["lora.enabled=true", "train.zero_stage=3"])
    # zero_stage auto (the YAML's): 0 on one worker, 2 on several; an explicit stage wins
    one = load_config(SFTConfig, root / "jobs" / "sft.yaml", paths + ["train.num_workers=1"])
    assert one.train.zero_stage == 0
    assert load_config(SFTConfig, root / "jobs" / "sft.yaml",
                       paths + ["train.num_workers=1", "train.zero_stage=2"]).train.zero_stage == 2
    with pytest.raises(ConfigError, match="train.zero_stage"):
        load_config(SFTConfig, root / "jobs" / "sft.yaml", paths + ["train.zero_stage=fast"])
    # run length from the trainable rows: each worker's shard must fill one micro-batch (a
    # config error before any worker starts), max_steps wins, else floor(epochs x steps/epoch)
    from effsft.sft.recipe import total_steps

    two = load_config(SFTConfig, root / "jobs" / "sft.yaml", paths + ["train.num_workers=2",
                                                                       "train.micro_batch_size=4", "train.grad_accum=1"])
    with pytest.raises(ConfigError, match="train.micro_batch_size: 7 trainable rows"):
        total_steps(two, 7)
    assert total_steps(two, 8) == 1 and total_steps(two, 100) == 12
    capped = load_config(SFTConfig, root / "jobs" / "sft.yaml", paths + ["train.max_steps=3"])
    assert total_steps(capped, 10_000) == 3
