"""faiss k-means: fit centroids on a sample, assign rows block-wise with broadcast centroids.

Spec §2 "kmeans": k = min(1000, ⌊B/10⌋), niter 25, seed = run seed, fit on the min(N, 256k)
rows with the smallest r(id); ``spherical`` (inner product) for L2-normalised vectors,
otherwise L2. One actor fits; a map assigns ``cluster`` and ``dist``. Results are
bit-identical only for the same hardware and thread count (faiss BLAS reductions).
"""

from __future__ import annotations

import numpy as np

__all__ = ["default_k", "sample_indices", "kmeans_pp_init", "fit_kmeans", "assign"]

DEFAULT_SAMPLE_ROWS = 256_000


def default_k(budget: int, max_k: int = 1000) -> int:
    """k = min(max_k, ⌊B/10⌋), at least 1 (so each cluster can get ~10 picks)."""
    return max(1, min(int(max_k), int(budget) // 10))


def sample_indices(ranks: np.ndarray, n_max: int = DEFAULT_SAMPLE_ROWS) -> np.ndarray:
    """Fit sample: the min(N, n_max) rows with the smallest r(id) (block-independent)."""
    from effsft.select.ranking import bottom_k

    return np.sort(bottom_k(np.asarray(ranks, np.uint64), n_max))


def _f32(x: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(np.asarray(x, dtype=np.float32))


def kmeans_pp_init(x: np.ndarray, k: int, seed: int = 0) -> np.ndarray:
    """k-means++ seeding (Arthur & Vassilvitskii 2007): O(n·k·d), seeded.

    faiss seeds with k random rows, which can put two centroids in one well-separated
    cluster; ``init="kmeans++"`` avoids that at the cost of k passes over the sample.

    Args:
        x: [n, d] float32.
        k: number of centroids.
        seed: numpy seed.

    Returns:
        [k, d] float32 initial centroids (rows of x).
    """
    rng = np.random.default_rng(seed)
    x = _f32(x)
    sq = (x.astype(np.float64) ** 2).sum(1)  # [n]
    chosen = [int(rng.integers(len(x)))]
    d2 = np.maximum(sq - 2 * x @ x[chosen[0]] + sq[chosen[0]], 0)  # [n] to the nearest chosen
    for _ in range(1, k):
        total = d2.sum()
        nxt = int(rng.choice(len(x), p=d2 / total)) if total > 0 else int(rng.integers(len(x)))
        chosen.append(nxt)
        d2 = np.minimum(d2, np.maximum(sq - 2 * x @ x[nxt] + sq[nxt], 0))
    return x[chosen].copy()


def fit_kmeans(
    vectors: np.ndarray,
    k: int,
    niter: int = 25,
    seed: int = 0,
    spherical: bool = False,
    max_points_per_centroid: int = 256,
    n_threads: int | None = None,
    init: str = "random",
    nredo: int = 1,
) -> np.ndarray:
    """Lloyd k-means with faiss.

    Args:
        vectors: [n, d] sample (any float dtype; fp16 storage is upcast).
        k: number of clusters (clipped to n).
        niter: Lloyd iterations.
        seed: faiss seed (initial centroids).
        spherical: normalise centroids each iteration (use with L2-normalised inputs).
        max_points_per_centroid: faiss subsamples above k·this many rows.
        n_threads: OpenMP threads for faiss (None = faiss default).
        init: "random" (faiss: k random rows) or "kmeans++" (``kmeans_pp_init``).
        nredo: faiss restarts, keeping the lowest objective (random init only).

    Returns:
        [k, d] float32 centroids.
    """
    import faiss

    x = _f32(vectors)
    if n_threads is not None:
        faiss.omp_set_num_threads(int(n_threads))
    k = int(min(k, len(x)))
    if init not in ("random", "kmeans++"):
        raise ValueError(f"init must be 'random' or 'kmeans++', got {init!r}")
    km = faiss.Kmeans(x.shape[1], k, niter=int(niter), seed=int(seed), spherical=bool(spherical),
                      max_points_per_centroid=int(max_points_per_centroid), nredo=int(nredo), verbose=False)
    km.train(x, init_centroids=kmeans_pp_init(x, k, seed) if init == "kmeans++" else None)
    return np.asarray(km.centroids, dtype=np.float32).reshape(k, x.shape[1])


def assign(vectors: np.ndarray, centroids: np.ndarray, spherical: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Nearest centroid of each row (a pure per-block map; centroids are broadcast).

    Args:
        vectors: [n, d].
        centroids: [k, d] float32.
        spherical: True = maximum inner product (IndexFlatIP); False = L2 (IndexFlatL2).

    Returns:
        ``(cluster [n] int64, dist [n] float32)``; ``dist`` is the squared L2 distance, or
        1 − inner product when spherical (cosine distance for normalised vectors).
    """
    import faiss

    x, c = _f32(vectors), _f32(centroids)
    index = faiss.IndexFlatIP(c.shape[1]) if spherical else faiss.IndexFlatL2(c.shape[1])
    index.add(c)
    if len(x) == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.float32)
    D, I = index.search(x, 1)  # [n, 1] each
    dist = (1.0 - D[:, 0]) if spherical else np.maximum(D[:, 0], 0.0)
    return I[:, 0].astype(np.int64), dist.astype(np.float32)
