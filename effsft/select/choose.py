"""Stages 3 and 4: the budget, k-means clusters on the embeddings (a Ray task) and the
selection rule on the driver (random, stratified, top-k by score, per-cluster, k-center, ZIP)."""
from __future__ import annotations

import numpy as np

from effsft.config import ConfigError
from effsft.select.config import DESCENDING, SelectConfig


def resolve_budget(budget: float, n_ok: int) -> int:
    """A count (>= 1) or a fraction (< 1, at least one row) -> the number of rows to pick."""
    b = int(round(budget * n_ok)) if budget < 1 else int(budget)
    if b > n_ok:
        raise ConfigError(f"budget: {b} exceeds the {n_ok} usable rows of the input "
                          "(give a count <= that, or a fraction < 1)")
    return max(1, b)


# ---------------------------------------------------------------------------------- stage 3
def cluster_rows(cfg: SelectConfig, emb: np.ndarray, ranks: np.ndarray, budget: int) -> dict:
    """faiss k-means fit on the smallest-r sample (in a Ray task), then assignment."""
    import ray

    from effsft.select.kmeans import assign, default_k, fit_kmeans, sample_indices

    k = cfg.kmeans.k or default_k(budget)
    sample = sample_indices(ranks, cfg.kmeans.sample_rows)
    fit = ray.remote(num_cpus=1)(fit_kmeans)
    centroids = ray.get(fit.remote(emb[sample], k, niter=cfg.kmeans.niter, seed=cfg.seed,
                                   spherical=cfg.kmeans.spherical))
    # Assignment: a map over blocks with the centroids broadcast.
    cref = ray.put(centroids)
    blocks = np.array_split(np.arange(len(emb)), max(1, len(emb) // 100_000))
    task = ray.remote(num_cpus=0.5)(assign)
    parts = ray.get([task.remote(emb[b], cref, cfg.kmeans.spherical) for b in blocks])
    cluster = np.concatenate([p[0] for p in parts]).astype(np.int64)
    dist = np.concatenate([p[1] for p in parts])
    return {"cluster": cluster, "dist": dist, "k": int(len(centroids)), "sample_rows": int(len(sample))}


# ---------------------------------------------------------------------------------- stage 4
def choose(cfg: SelectConfig, budget: int, ids: np.ndarray, ranks: np.ndarray, cols: dict,
           meta_strata: np.ndarray | None, cluster: dict | None) -> tuple[np.ndarray, dict]:
    """Indices of the picks (pick order) and method details for the manifest."""
    from effsft.select import ranking

    method = cfg.method
    info: dict = {}
    if method == "random":
        return ranking.bottom_k(ranks, budget), info
    if method == "random_stratified":
        return ranking.stratified_bottom_k(meta_strata, ranks, budget), {"stratify_by": cfg.stratify_by}
    plan = cfg.plan
    score = None
    if plan.score is not None:
        score = cols["score"]
        desc = DESCENDING[plan.score] if cfg.direction is None else cfg.direction == "descending"
        if plan.score == "length" and cfg.direction is None:
            desc = cfg.length.order == "longest"
        info["direction"] = "descending" if desc else "ascending"
    if plan.clusters:
        s = score if score is not None else -ranks.astype(np.float64)  # kmeans: random within clusters
        picks = ranking.km_select(cluster["cluster"], s, ranks, budget,
                                  descending=True if score is None else desc)
        sizes = np.bincount(cluster["cluster"], minlength=cluster["k"])
        info.update(k=cluster["k"], cluster_sizes=sizes.tolist(),
                    cluster_selected=np.bincount(cluster["cluster"][picks], minlength=cluster["k"]).tolist())
        return picks, info
    if plan.score is not None:
        return ranking.top_k_indices(score, budget, descending=desc, tie_ranks=ranks), info
    if method == "diverseevol":
        return _kcenter(cfg, budget, cols["emb"], ranks, info), info
    if method == "zip":
        return _zip(cfg, budget, cols, ranks, info), info
    raise ValueError(method)


def _kcenter(cfg: SelectConfig, budget: int, emb: np.ndarray, ranks: np.ndarray, info: dict) -> np.ndarray:
    from effsft.select import kcenter, ranking

    n0 = max(1, min(budget, int(round(cfg.kcenter.init_fraction * budget))))
    init = ranking.bottom_k(ranks, n0)
    picks = list(init)
    in_set = np.zeros(len(emb), bool)
    in_set[init] = True
    rest = budget - n0
    if cfg.kcenter.variant == "greedy":
        picks += kcenter.greedy_select(emb, ranks, init, rest).tolist()
    else:
        per_round = [rest // cfg.kcenter.rounds + (i < rest % cfg.kcenter.rounds)
                     for i in range(cfg.kcenter.rounds)]
        for n in per_round:
            d = kcenter.min_sq_dist(emb, emb[np.asarray(picks)])
            add = kcenter.topn_select(d, ranks, n, in_set)
            in_set[add] = True
            picks += add.tolist()
    info.update(variant=cfg.kcenter.variant, init_rows=n0)
    return np.asarray(picks, np.int64)


def _zip(cfg: SelectConfig, budget: int, cols: dict, ranks: np.ndarray, info: dict) -> np.ndarray:
    from effsft.select.zip import ProcessMap, serial_map, zip_select

    z = cfg.zip
    rows = cols["zip_rows"]
    mp = ProcessMap(z.workers) if z.workers > 1 else None
    try:
        res = zip_select(rows, budget, ranks, k1=z.k1, k2=z.k2, k3=z.k3, ser=z.ser, mode=z.mode,
                         g=cols["score"], map_fn=mp or serial_map)
    finally:
        if mp:
            mp.close()
    info.update(mode=z.mode, k1=z.k1, k2=z.k2, k3=z.k3, trace_size=res.trace_size,
                trace_ratio=res.trace_ratio)
    return res.picked
