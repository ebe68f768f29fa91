"""faiss k-means vs scikit-learn MiniBatchKMeans on blob vectors.

    PYTHONPATH=. python benchmarks/bench_kmeans.py --rows 1000000 --dim 64 --k 1000

Fits both on the same data (faiss subsamples to k·256 rows, as effsft's fit does), then
assigns all rows with each model, and prints wall times, their ratio and the objective
(mean squared distance to the assigned centroid) of each.
"""

from __future__ import annotations

import argparse

import numpy as np

import common


def blobs(rows: int, dim: int, n_centers: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(n_centers, dim)).astype(np.float32) * 4
    labels = rng.integers(0, n_centers, rows)
    return centers[labels] + rng.normal(size=(rows, dim)).astype(np.float32)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--k", type=int, default=1000)
    ap.add_argument("--niter", type=int, default=25)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    import faiss
    from sklearn.cluster import MiniBatchKMeans

    from effsft.select.kmeans import assign, fit_kmeans

    faiss.omp_set_num_threads(args.threads)
    x = blobs(args.rows, args.dim, 2 * args.k, args.seed)
    print(f"data: {x.shape} float32, k={args.k}, niter={args.niter}, threads={args.threads}")

    cent, t_fit_f = common.timed(fit_kmeans, x, args.k, niter=args.niter, seed=args.seed, n_threads=args.threads)
    (_, dist), t_asg_f = common.timed(assign, x, cent)
    obj_f = float(dist.mean())

    mbk = MiniBatchKMeans(n_clusters=args.k, max_iter=args.niter, batch_size=4096, n_init=1,
                          random_state=args.seed, init="random")
    _, t_fit_s = common.timed(mbk.fit, x)
    lab, t_asg_s = common.timed(mbk.predict, x)
    obj_s = float(((x - mbk.cluster_centers_[lab].astype(np.float32)) ** 2).sum(1).mean())

    print(f"faiss   fit {t_fit_f:8.2f}s  assign {t_asg_f:7.2f}s  objective {obj_f:.3f}")
    print(f"sklearn fit {t_fit_s:8.2f}s  assign {t_asg_s:7.2f}s  objective {obj_s:.3f}  (MiniBatchKMeans, batch 4096)")
    print(f"ratio sklearn/faiss: fit {t_fit_s / t_fit_f:.2f}x  assign {t_asg_s / t_asg_f:.2f}x  "
          f"total {(t_fit_s + t_asg_s) / (t_fit_f + t_asg_f):.2f}x")


if __name__ == "__main__":
    main()
