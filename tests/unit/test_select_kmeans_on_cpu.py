"""faiss k-means assignment vs faiss flat indexes / sklearn, blobs ARI, block invariance."""

import numpy as np
import pytest
from sklearn.datasets import make_blobs
from sklearn.metrics import adjusted_rand_score, pairwise_distances_argmin

from effsft.select import kmeans as K


def _data(seed=0, n=600, d=16, k=20):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, d)).astype(np.float32), rng.normal(size=(k, d)).astype(np.float32)


def test_assign_l2_matches_sklearn_and_naive():
    x, c = _data()
    cl, dist = K.assign(x, c)
    assert np.array_equal(cl, pairwise_distances_argmin(x, c))
    d2 = ((x[:, None, :].astype(np.float64) - c[None]) ** 2).sum(-1)  # naive [n, k]
    assert np.array_equal(cl, d2.argmin(1))
    np.testing.assert_allclose(dist, d2.min(1), rtol=1e-4, atol=1e-4)


def test_assign_spherical_matches_inner_product():
    x, c = _data(1)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    c /= np.linalg.norm(c, axis=1, keepdims=True)
    cl, dist = K.assign(x, c, spherical=True)
    ip = x.astype(np.float64) @ c.T.astype(np.float64)
    assert np.array_equal(cl, ip.argmax(1))
    assert np.array_equal(cl, pairwise_distances_argmin(x, c, metric="cosine"))
    np.testing.assert_allclose(dist, 1 - ip.max(1), atol=1e-5)


@pytest.mark.parametrize("n_blocks", [1, 3, 17])
def test_multi_block_equals_single_block(n_blocks):
    x, c = _data(2)
    whole = K.assign(x, c)
    parts = [K.assign(b, c) for b in np.array_split(x, n_blocks)]
    assert np.array_equal(np.concatenate([p[0] for p in parts]), whole[0])
    assert np.array_equal(np.concatenate([p[1] for p in parts]), whole[1])


@pytest.mark.parametrize("spherical", [False, True])
def test_separated_blobs_ari_one(spherical):
    centers = np.eye(8, 32) * 50.0
    x, y = make_blobs(n_samples=800, centers=centers, cluster_std=0.5, random_state=0)
    if spherical:
        x = x / np.linalg.norm(x, axis=1, keepdims=True)
    c = K.fit_kmeans(x, 8, niter=25, seed=0, spherical=spherical, init="kmeans++")
    assert c.shape == (8, 32) and c.dtype == np.float32
    cl, _ = K.assign(x, c, spherical)
    assert adjusted_rand_score(y, cl) == 1.0


def test_fit_is_seeded_and_helpers():
    x, _ = _data(3, n=500)
    a, b = K.fit_kmeans(x, 10, seed=5), K.fit_kmeans(x, 10, seed=5)
    np.testing.assert_array_equal(a, b)
    assert K.default_k(10_000) == 1000 and K.default_k(5_000) == 500 and K.default_k(3) == 1
    ranks = np.array([9, 1, 5, 3], np.uint64)
    assert list(K.sample_indices(ranks, 2)) == [1, 3]
