"""LESS pure layer (spec data_selection.md §2.2, §5 'less'): projector, Γ, η̄, subtask
mean/max, per-example gradients, warm-up checkpoints; each against a naive reference."""
import json
import math
import subprocess
import sys

import numpy as np
import pytest
import torch

from effsft.select import less
from effsft.select.less.gradients import _collate


# ----------------------------------------------------------------------------- projector
def _dense(p: less.RademacherProjector) -> torch.Tensor:
    return torch.cat([p.block(b) for b in range(p.n_blocks)])  # [P, d]


def test_projector_same_in_two_builds_and_two_processes():
    a = less.RademacherProjector(1000, dim=64, seed=3, block_rows=128)
    b = less.RademacherProjector(1000, dim=64, seed=3, block_rows=128, cache_bytes=0)
    assert torch.equal(_dense(a), _dense(b)) and a.checksum == b.checksum
    x = torch.randn(4, 1000, generator=torch.Generator().manual_seed(0))
    code = ("import json,torch;from effsft.select.less import RademacherProjector as R;"
            "p=R(1000,dim=64,seed=3,block_rows=128);"
            "x=torch.randn(4,1000,generator=torch.Generator().manual_seed(0));"
            "print(json.dumps([p.checksum,p.project(x).tolist()]))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    checksum, proj = json.loads(out.stdout.strip().splitlines()[-1])
    assert checksum == a.checksum
    assert torch.equal(torch.tensor(proj), a.project(x))
    # a different seed is a different matrix and checksum; entries are ±1
    c = less.RademacherProjector(1000, dim=64, seed=4, block_rows=128)
    assert c.checksum != a.checksum and not torch.equal(_dense(c), _dense(a))
    assert set(_dense(a).unique().tolist()) == {-1.0, 1.0}


def test_projection_equals_dense_matmul_and_block_sums():
    p = less.RademacherProjector(300, dim=32, seed=0, block_rows=64)
    x = torch.randn(5, 300, generator=torch.Generator().manual_seed(1), dtype=torch.float64).float()
    R = _dense(p).tolist()
    xs = x.tolist()
    naive = [[sum(xs[i][k] * R[k][j] for k in range(300)) / math.sqrt(32) for j in range(32)] for i in range(5)]
    assert torch.allclose(p.project(x), torch.tensor(naive), atol=1e-4)
    # distributed: each worker projects its parameter slice; the partial sums add up
    parts = [p.project_block(x[:, slice(*p.block_range(b))], b) for b in reversed(range(p.n_blocks))]
    assert torch.allclose(sum(parts), p.project(x), atol=1e-5)


def test_jl_error_within_bound():
    d, n = 1024, 30
    p = less.RademacherProjector(2000, dim=d, seed=0, block_rows=500)
    x = torch.randn(n, 2000, generator=torch.Generator().manual_seed(2))
    y = p.project(x)
    ratio = (y.norm(dim=1) ** 2 / x.norm(dim=1) ** 2).numpy()
    # Var(‖Rx‖²/d / ‖x‖²) ≤ 2/d for Rademacher R: 5 standard deviations
    assert np.abs(ratio - 1).max() < 5 * math.sqrt(2 / d)
    # inner products of unit vectors (JL: |⟨Ru,Rv⟩ − ⟨u,v⟩| ≲ ε)
    u = x / x.norm(dim=1, keepdim=True)
    pu = p.project(u)
    err = (pu @ pu.T - u @ u.T).abs().max().item()
    assert err < 5 * math.sqrt(2 / d)


# ----------------------------------------------------------------------------- Γ, η̄, scores
def test_adam_features_match_formula():
    g = torch.tensor([[0.5, -2.0, 0.0]])
    m = torch.tensor([0.1, 0.2, -0.3])
    v = torch.tensor([0.01, 0.04, 0.0])
    got = less.adam_features(g, m, v)[0].tolist()
    for gi, mi, vi, out in zip(g[0].tolist(), m.tolist(), v.tolist(), got):
        m2 = 0.9 * mi + 0.1 * gi
        v2 = 0.999 * vi + 0.001 * gi * gi
        assert out == pytest.approx(m2 / math.sqrt(v2 + 1e-8), rel=1e-5)


def test_eta_bar_sums_to_one():
    e = less.eta_bar([2e-5, 1.5e-5, 1e-5, 0.5e-5])
    assert e.sum() == pytest.approx(1.0) and e == pytest.approx([0.4, 0.3, 0.2, 0.1])
    with pytest.raises(ValueError):
        less.eta_bar([0.0, 0.0])


def test_subtask_mean_max_hand_example():
    # 2 checkpoints, d = 2, 2 training rows, 3 target rows in subtasks a (2 rows) and b (1 row)
    s = 1 / math.sqrt(2)
    train = [np.array([[1.0, 0.0], [0.0, 1.0]]), np.array([[s, s], [1.0, 0.0]])]
    target = [np.array([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]]), np.array([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])]
    groups = ["a", "a", "b"]
    lrs = [3.0, 1.0]  # η̄ = 0.75, 0.25
    # row 0: ckpt0 cos a: (1 + 0)/2 = .5, b: -1; ckpt1 a: (s + s)/2 = s, b: s
    #   a: .75*.5 + .25*s, b: .75*-1 + .25*s -> max = .375 + .25 s
    # row 1: ckpt0 a: (0 + 1)/2 = .5, b: 0; ckpt1 a: 1, b: 0 -> a: .375 + .25 = .625, b: 0
    got = less.less_scores(train, target, groups, lrs)
    assert got == pytest.approx([0.375 + 0.25 * s, 0.625])


def _naive_less(train, target, groups, lrs):
    """The definition with explicit loops: max_s mean_{z'∈s} Σ_i η̄_i cos(Γ_i(z), g_i(z'))."""
    eta = [x / sum(lrs) for x in lrs]
    out = []
    for n in range(len(train[0])):
        best = -math.inf
        for s in sorted(set(groups)):
            members = [j for j, gname in enumerate(groups) if gname == s]
            tot = 0.0
            for j in members:
                for i in range(len(lrs)):
                    a, b = train[i][n], target[i][j]
                    tot += eta[i] * float(np.dot(a, b) / (np.linalg.norm(a) * np.linalg.norm(b)))
            best = max(best, tot / len(members))
        out.append(best)
    return np.array(out)


def test_distributed_equals_single_process_and_naive():
    rng = np.random.default_rng(0)
    K, N, M, d = 3, 40, 9, 16
    unit = lambda a: a / np.linalg.norm(a, axis=1, keepdims=True)  # noqa: E731
    train = [unit(rng.normal(size=(N, d))) for _ in range(K)]
    target = [unit(rng.normal(size=(M, d))) for _ in range(K)]
    groups = ["x", "y", "z"] * 3
    lrs = [1e-5, 2e-5, 0.5e-5]
    single = less.less_scores(train, target, groups, lrs)
    assert single == pytest.approx(_naive_less(train, target, groups, lrs), abs=1e-10)
    # actor-style: one checkpoint per actor, training rows in blocks, combined on the driver
    per_ckpt = []
    for i in range(K):
        _, means = less.subtask_means(target[i], groups)
        per_ckpt.append(np.concatenate([less.subtask_cosines(train[i][b], means)
                                        for b in np.array_split(np.arange(N), 4)]))
    assert less.combine_checkpoints(per_ckpt, lrs) == pytest.approx(single, abs=1e-12)


# ----------------------------------------------------------------------------- model side
_TOK = None


def char_tokenizer():
    """A real offline byte-level BPE with no merges beyond its 300-id vocabulary."""
    global _TOK
    if _TOK is None:
        from effsft.models.tiny import build_tokenizer

        _TOK = build_tokenizer([_msgs(i)[0]["content"] + _msgs(i)[1]["content"] for i in range(50)],
                               vocab_size=300)
    return _TOK


def _tiny_llama(seed=0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=len(char_tokenizer()), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, intermediate_size=64, max_position_embeddings=128,
                      attn_implementation="eager")  # eager: vmap has batching rules for all of it
    return LlamaForCausalLM(cfg).eval()


LORA = less.LoraSettings(r=4, alpha=8, target_modules=("q_proj", "v_proj"))


def _msgs(i):
    return [{"role": "user", "content": f"add {i} and {i + 1}"},
            {"role": "assistant", "content": f"{i} + {i + 1} = {2 * i + 1}" + "!" * (i % 3)}]


def test_per_example_grads_equal_single_example_backward():
    model = less.attach_lora(_tiny_llama(), LORA).eval()
    torch.manual_seed(1)
    for n, p in model.named_parameters():
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.2)  # B = 0 at init would make A's gradient zero
    names = less.trainable_names(model)
    rows, status = less.encode_rows(char_tokenizer(), [_msgs(i) for i in (1, 22, 333)], max_len=64)
    assert status == ["ok"] * 3
    ids, labels, _ = _collate(rows, 0)
    for method in ("vmap", "loop"):
        g = less.per_example_grads(model, ids, labels, names, method)
        for b, (x, y) in enumerate(rows):
            model.zero_grad()
            # reference: HF's own shifted label loss on the unpadded row, autograd backward
            model(input_ids=torch.tensor([x]), labels=torch.tensor([y])).loss.backward()
            ref = torch.cat([dict(model.named_parameters())[n].grad.reshape(-1) for n in names])
            assert torch.allclose(g[b], ref, atol=1e-6, rtol=1e-4), method


def test_warmup_checkpoints_and_features(tmp_path):
    from effsft.train.schedule import lr_factor

    tok = char_tokenizer()
    s = less.WarmupSettings(lora=LORA, epochs=2, lr=1e-3, warmup_ratio=0.25, batch_size=4,
                            micro_batch_size=2, max_len=64, seed=0)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from effsft.train.tracking import Tracker, TrackingSpec

    tracker = Tracker.open(TrackingSpec(), tmp_path)
    paths = less.less_warmup(_tiny_llama(), tok, [_msgs(i) for i in range(10)], tmp_path, s, log_step=tracker.log)
    tracker.close()
    assert [p.name for p in paths] == ["epoch-0", "epoch-1"]
    acc = EventAccumulator(str(tmp_path / "tb"))  # the warm-up's metrics, for TensorBoard
    acc.Reload()
    assert {"loss", "lr", "tokens_per_s"} <= set(acc.Tags()["scalars"])
    assert [e.step for e in acc.Scalars("loss")] == [1, 2, 3, 4, 5, 6]
    # 3 steps per epoch, 6 total, 2 warm-up steps, linear decay
    lrs = [1e-3 * lr_factor(t, 2, 6, "linear") for t in range(6)]
    infos = [json.loads((p / "info.json").read_text()) for p in paths]
    assert [i["mean_lr"] for i in infos] == pytest.approx([np.mean(lrs[:3]), np.mean(lrs[3:])])
    assert less.eta_bar([i["mean_lr"] for i in infos]).sum() == pytest.approx(1.0)

    model, ck = less.load_checkpoint(_tiny_llama(), paths[1], LORA)
    P = sum(dict(model.named_parameters())[n].numel() for n in ck.names)
    assert ck.exp_avg.shape == ck.exp_avg_sq.shape == (P,)
    assert ck.exp_avg.abs().sum() > 0 and (ck.exp_avg_sq >= 0).all()
    lora_b = [n for n in ck.names if "lora_B" in n][0]
    assert dict(model.named_parameters())[lora_b].abs().sum() > 0  # trained adapters were loaded

    proj = less.RademacherProjector(P, dim=48, seed=0, block_rows=500)
    msgs = [_msgs(i) for i in (3, 4, 5)] + [[{"role": "user", "content": "no answer"}]]
    feats, status = less.gradient_features(model, tok, msgs, proj, ck, adam=True, max_len=64,
                                           micro_batch_size=2)
    assert status[:3] == ["ok"] * 3 and status[3] != "ok" and np.isnan(feats[3]).all()
    assert np.linalg.norm(feats[:3], axis=1) == pytest.approx(np.ones(3), abs=1e-5)
    # the same features by hand: loop gradients -> Γ formula -> dense projection -> normalise
    rows, _ = less.encode_rows(tok, msgs[:3], 64)
    R = _dense(proj)
    for b, (x, y) in enumerate(rows):
        g = less.per_example_grads(model, torch.tensor([x]), torch.tensor([y]), ck.names, "loop")[0]
        m2 = 0.9 * ck.exp_avg + 0.1 * g
        v2 = 0.999 * ck.exp_avg_sq + 0.001 * g * g
        z = (m2 / torch.sqrt(v2 + 1e-8)) @ R
        assert feats[b] == pytest.approx((z / z.norm()).numpy(), abs=1e-4)
