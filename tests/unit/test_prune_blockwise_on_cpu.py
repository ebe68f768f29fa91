"""Block-by-block pruning on tiny random HF models (spec dlp.md §5 items 1-3, 5, 6, 8)."""

import copy
import logging
import math

import pytest
import torch
import transformers as tf
from torch import nn

from effsft.prune import blocks, calibration
from effsft.prune import blockwise as bw
from effsft.prune.blockwise import PruneSettings, prune_model, signal_pass
from effsft.prune.streaming import perplexity, streaming_logits

VOCAB = 128


def _llama(hidden=64, inter=128, layers=2, seed=0):
    torch.manual_seed(seed)
    cfg = tf.LlamaConfig(vocab_size=VOCAB, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return tf.LlamaForCausalLM(cfg).eval()


def _opt(seed=0):
    torch.manual_seed(seed)
    cfg = tf.OPTConfig(vocab_size=VOCAB, hidden_size=32, ffn_dim=64, num_hidden_layers=2, num_attention_heads=4,
                       max_position_embeddings=64, word_embed_proj_dim=16)
    return tf.OPTForCausalLM(cfg).eval()


def _ids(n=4, t=24, seed=1):
    return torch.randint(0, VOCAB, (n, t), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # why: many tiny ops (SparseGPT's column loop); on a loaded 2-core box intra-op threads
    # oversubscribe and run ~10x slower than one thread
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture(scope="module")
def wide():
    # in_features >= 512 so that exact per-row counts land within 1e-3 of any s_l (error <= 0.5/in)
    return _llama(hidden=512, inter=512, layers=2, seed=3)


def _all_hooks(model):
    return [(n, h) for n, m in model.named_modules()
            for h in (m._forward_hooks, m._forward_pre_hooks, m._forward_hooks_with_kwargs) if len(h)]


@pytest.mark.parametrize("make", [_llama, _opt], ids=["llama", "opt"])
def test_streaming_forward_reproduces_logits(make):
    model = make()
    ids = _ids(3, 16)
    with torch.no_grad():
        ref = model(ids).logits
    got = streaming_logits(model, ids, batch_size=2)  # batch sizes 2 and 1: kwargs per size
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


def test_pass_a_mutates_nothing_and_leaves_no_hooks():
    model = _llama()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    st = signal_pass(model, _ids(), PruneSettings(method="dlp"))
    assert len(st) == 2 and all(s["mean"] > 0 and s["median"] > 0 for s in st)
    assert not _all_hooks(model)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    # naive: one ordinary forward with hooks on every Linear, pooled scores per block
    ids, acc, handles = _ids(), {}, []
    for name, m in model.named_modules():
        if isinstance(m, nn.Linear) and ".layers." in name:
            def hook(mod, inp, out, name=name):
                acc[name] = acc.get(name, 0) + inp[0].reshape(-1, inp[0].shape[-1]).double().pow(2).sum(0)
            handles.append(m.register_forward_hook(hook))
    with torch.no_grad():
        model(ids)
    for h in handles:
        h.remove()
    for l in range(2):
        names = [n for n in acc if n.startswith(f"model.layers.{l}.")]
        pooled = torch.cat([(model.get_parameter(n + ".weight").detach().double().abs() * (acc[n] / 4).sqrt()).flatten()
                            for n in names])
        assert st[l]["mean"] == pytest.approx(float(pooled.mean()), rel=1e-5)
        assert st[l]["median"] == pytest.approx(float(pooled.median()), rel=1e-5)
        naive_d = 100.0 * float((pooled > 5 * pooled.mean()).double().mean())
        assert st[l]["outlier_ratio"] == pytest.approx(naive_d, abs=100.0 / pooled.numel() + 1e-9)


@pytest.mark.parametrize("criterion", ["wanda", "sparsegpt"])
def test_alpha_zero_is_bit_identical_to_uniform(criterion):
    base, ids = _llama(), _ids()
    a, b = copy.deepcopy(base), copy.deepcopy(base)
    ra = prune_model(a, ids, PruneSettings(method="dlp", alpha=0.0, sparsity=0.6, criterion=criterion))
    rb = prune_model(b, ids, PruneSettings(method="uniform", sparsity=0.6, criterion=criterion))
    assert ra["blocks"][0]["S_median"] is not None and rb["blocks"][0]["S_median"] is None  # Pass A ran only in a
    sa, sb = a.state_dict(), b.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not _all_hooks(a)


def _check_report(model, rep, tol=1e-3):
    g = rep["global"]
    assert abs(g["achieved_prunable"] - g["target"]) <= 1e-3  # 0.1 percentage points
    for blk in rep["blocks"]:
        assert abs(blk["achieved"] - blk["target"]) <= tol
        for name, ach in blk["matrices"].items():
            w = model.get_parameter(name + ".weight")
            assert ach == pytest.approx(float((w == 0).float().mean()), abs=1e-12)
            assert abs(ach - blk["target"]) <= tol


@pytest.mark.parametrize("method,criterion", [
    ("dlp", "wanda"), ("owl", "wanda"), ("uniform", "wanda"), ("dlp", "sparsegpt"), ("dlp", "magnitude"),
])
def test_global_block_and_matrix_sparsity(wide, method, criterion):
    model = copy.deepcopy(wide)
    cfg = PruneSettings(method=method, criterion=criterion, sparsity=0.7, alpha=0.15, owl_lambda=0.08,
                        stat="median" if method == "dlp" else "mean")
    rep = prune_model(model, _ids(4, 16), cfg)
    _check_report(model, rep)
    if method != "uniform":
        assert len({round(b["target"], 9) for b in rep["blocks"]}) > 1  # a non-trivial allocation


def test_forced_clamping_global_sparsity(wide, monkeypatch):
    fake = [{"mean": 1.0, "median": 1.0, "outlier_ratio": 0.0, "numel": 1},
            {"mean": 1e6, "median": 1e6, "outlier_ratio": 0.0, "numel": 1}]
    monkeypatch.setattr(bw, "signal_pass", lambda *a, **k: fake)
    model = copy.deepcopy(wide)
    rep = prune_model(model, _ids(2, 16), PruneSettings(method="dlp", sparsity=0.9, alpha=0.45))
    # raw r = 0.9 -/+ 0.45 = [0.45, 1.35]; block 1 clamps at 0.99, so c = 1.8 - 0.99 - 0.45 = 0.36
    assert rep["blocks"][1]["clamped"] and rep["blocks"][1]["target"] == 0.99
    assert rep["shift_c"] == pytest.approx(0.36, abs=1e-9)
    assert rep["blocks"][0]["target"] == pytest.approx(0.81, abs=1e-9)
    _check_report(model, rep)


@pytest.mark.parametrize("criterion", ["wanda", "sparsegpt", "magnitude"])
def test_nm_every_group_has_n_zeros(criterion):
    model = _llama()
    with pytest.warns(UserWarning, match="overridden"):
        rep = prune_model(model, _ids(), PruneSettings(method="dlp", criterion=criterion, nm="2:4", sparsity=0.7))
    assert rep["effective"] == {"method": "uniform", "sparsity": 0.5, "nm": "2:4"}
    for blk in rep["blocks"]:
        for name in blk["matrices"]:
            w = model.get_parameter(name + ".weight")
            assert torch.all((w == 0).view(w.shape[0], -1, 4).sum(-1) == 2), name


def public_wanda_naive(model, calib, s):
    """Wanda's public ``prune_wanda`` re-done naively: full-model forwards, one sample at a time.

    Per block l (earlier blocks already pruned): hooks keep Wanda's running ``scaler_row``
    (``||x||² / nsamples``, updated per sample), then ``|W|·sqrt(scaler_row)`` is sorted per row
    (stable) and the first ``int(in·s)`` columns are zeroed.
    """
    for layer in model.model.layers:
        subset = {n: m for n, m in layer.named_modules() if isinstance(m, nn.Linear)}
        scaler = {n: torch.zeros(m.in_features) for n, m in subset.items()}
        seen = dict.fromkeys(subset, 0)

        def make(name):
            def hook(_, inp, out):
                x = inp[0].reshape(-1, inp[0].shape[-1]).t().float()  # [in, tokens]
                scaler[name] *= seen[name] / (seen[name] + 1)
                seen[name] += 1
                scaler[name] += torch.norm(x, p=2, dim=1) ** 2 / seen[name]
            return hook

        handles = [m.register_forward_hook(make(n)) for n, m in subset.items()]
        with torch.no_grad():
            for j in range(calib.shape[0]):
                model(calib[j : j + 1])
        for h in handles:
            h.remove()
        for n, m in subset.items():
            metric = m.weight.data.abs() * torch.sqrt(scaler[n].reshape(1, -1))
            idx = torch.sort(metric, dim=-1, stable=True)[1][:, : int(metric.shape[1] * s)]
            mask = torch.zeros_like(metric, dtype=torch.bool).scatter_(1, idx, True)
            m.weight.data[mask] = 0


def test_uniform_wanda_matches_public_wanda_recomputation():
    base, ids = _llama(seed=7), _ids(4, 24, seed=8)
    ours, ref = copy.deepcopy(base), copy.deepcopy(base)
    prune_model(ours, ids, PruneSettings(method="uniform", criterion="wanda", sparsity=0.5))
    public_wanda_naive(ref, ids, 0.5)
    so, sr = ours.state_dict(), ref.state_dict()
    mismatched = sum(int(((so[k] == 0) != (sr[k] == 0)).sum()) for k in so)
    assert mismatched == 0


def test_save_reload_sparsity_and_perplexity(tmp_path):
    model, ids = _llama(), _ids()
    dense_ppl = perplexity(model, _ids(3, 32, seed=5))
    rep = prune_model(model, ids, PruneSettings(method="dlp", sparsity=0.6, alpha=0.1))
    model.save_pretrained(tmp_path / "model", safe_serialization=True)
    assert list((tmp_path / "model").glob("*.safetensors"))
    loaded = tf.AutoModelForCausalLM.from_pretrained(tmp_path / "model").eval()
    pruned = 0
    for blk in rep["blocks"]:
        for name, ach in blk["matrices"].items():
            w = loaded.get_parameter(name + ".weight")
            assert float((w == 0).float().mean()) == pytest.approx(ach, abs=1e-12)
            pruned += int((w == 0).sum())
    assert pruned / rep["global"]["prunable_params"] == pytest.approx(rep["global"]["achieved_prunable"], abs=1e-12)
    windows = _ids(3, 32, seed=5)
    ppl = perplexity(loaded, windows, batch_size=2)
    assert math.isfinite(ppl) and math.isfinite(dense_ppl)
    assert ppl == pytest.approx(perplexity(model, windows), rel=1e-5)
    # streaming perplexity equals the one from an ordinary forward
    with torch.no_grad():
        logits = loaded(windows).logits
    nll = nn.functional.cross_entropy(logits[:, :-1].reshape(-1, VOCAB), windows[:, 1:].reshape(-1))
    assert ppl == pytest.approx(math.exp(float(nll)), rel=1e-5)


def test_sample_calibration_modes(caplog):
    docs = [list(range(i * 1000, i * 1000 + n)) for i, n in enumerate([5, 40, 8, 100])]
    a = calibration.sample_calibration(docs, 6, 16, seed=0, eos_id=1)
    assert a.shape == (6, 16) and torch.equal(a, calibration.sample_calibration(docs, 6, 16, seed=0, eos_id=1))
    for row in a.tolist():  # contiguous slice of one long document
        assert row == list(range(row[0], row[0] + 16)) and row[0] // 1000 in (1, 3)
    with caplog.at_level(logging.WARNING):
        b, info = calibration.sample_calibration_with_info(docs[:1] + docs[2:3], 3, 16, seed=0, eos_id=1)
    assert info["mode"] == "concatenated" and "concatenating" in caplog.text
    assert b.shape == (3, 16) and 1 in b.tolist()[0] + b.tolist()[1] + b.tolist()[2]


def test_find_layout_and_rejects_mixed_attention():
    lay = blocks.find_layout(_opt())
    assert lay.prefix == "model.decoder.layers" and len(lay.final) == 2  # final_layer_norm, project_out
    model = _llama()
    model.config.layer_types = ["full_attention", "sliding_attention"]
    with pytest.raises(NotImplementedError):
        blocks.find_layout(model)
