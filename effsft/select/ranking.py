"""Seeded random ranks, bottom-k / top-k selection and quota allocation.

Everything here works on numpy columns so that the Ray pipeline can call it per block
(map) and then merge the per-block partial results on the driver (reduce). Ties are
always broken by the seeded random rank r(id), never by row position, so the result is
independent of how the pool was split into blocks, of the worker count and of the order.

Spec: docs `data_selection.md` §2 (random, random stratified, km_quality / km_length).
"""

from __future__ import annotations

import hashlib
from typing import Iterable, Sequence

import numpy as np

__all__ = [
    "random_rank",
    "bottom_k",
    "merge_bottom_k",
    "largest_remainder_quotas",
    "stratified_bottom_k",
    "top_k_indices",
    "top_k_by_score",
    "km_quotas",
    "km_select",
]


# ----------------------------------------------------------------------------- ranks
def _seed_bytes(seed: int) -> bytes:
    """Fixed-width encoding of the seed, so that seed‖id is unambiguous."""
    return int(seed).to_bytes(8, "little", signed=True)


def random_rank(ids: Iterable[str], seed: int) -> np.ndarray:
    """r(id) = first 8 bytes of BLAKE2b(seed‖id) read as a little-endian uint64.

    Args:
        ids: row ids (str; bytes are used as they are).
        seed: run seed; encoded as 8 little-endian signed bytes before the id.

    Returns:
        np.ndarray[uint64] of shape [N].
    """
    # Why full 64-byte BLAKE2b and not digest_size=8: the spec says "the first 8 bytes of
    # BLAKE2b", and digest_size is part of BLAKE2's parameter block (it changes all bytes).
    base = hashlib.blake2b(_seed_bytes(seed))
    out = bytearray()
    for i in ids:
        h = base.copy()
        h.update(i if isinstance(i, bytes) else str(i).encode("utf-8"))
        out += h.digest()[:8]
    return np.frombuffer(bytes(out), dtype="<u8").astype(np.uint64)


# ----------------------------------------------------------------------------- bottom-k
def _as_str_array(ids: Sequence[str] | np.ndarray) -> np.ndarray:
    return np.asarray(ids, dtype=object).astype(str)


def _order(primary: np.ndarray, ranks: np.ndarray, ids: np.ndarray | None) -> np.ndarray:
    """Indices sorted by (primary, rank, id) ascending; id only matters on a 64-bit collision."""
    keys = [ranks, primary] if ids is None else [ids, ranks, primary]
    return np.lexsort(keys)


def bottom_k(ranks: np.ndarray, k: int, ids: Sequence[str] | None = None) -> np.ndarray:
    """Indices of the k smallest ranks, in ascending rank order.

    Args:
        ranks: [N] uint64 ranks r(id).
        k: how many to keep (clipped to N).
        ids: optional [N] ids, only used to break an (astronomically rare) rank collision.

    Returns:
        [min(k, N)] int64 indices into ``ranks``.
    """
    ranks = np.asarray(ranks, dtype=np.uint64)
    n = ranks.shape[0]
    k = int(min(max(k, 0), n))
    if k == 0:
        return np.zeros(0, dtype=np.int64)
    cand = np.arange(n)
    if k < n:
        # Partition first (O(N)), but keep every row tied with the k-th rank so that the
        # id tie-break below sees all of them.
        kth = np.partition(ranks, k - 1)[k - 1]
        cand = np.flatnonzero(ranks <= kth)
    ids_c = None if ids is None else _as_str_array(ids)[cand]
    order = _order(np.zeros(len(cand), np.int8), ranks[cand], ids_c)
    return cand[order[:k]].astype(np.int64)


def merge_bottom_k(
    partials: Sequence[tuple[np.ndarray, Sequence[str]]], k: int
) -> tuple[np.ndarray, np.ndarray]:
    """Merge per-block bottom-k partials into the global bottom-k.

    Each block keeps its own bottom-k (``bottom_k``) as ``(ranks, ids)``; because the
    global bottom-k is a subset of the union of the per-block bottom-k, merging gives the
    same set for any block split.

    Args:
        partials: list of ``(ranks [n_i] uint64, ids [n_i])``.
        k: budget.

    Returns:
        ``(ranks [k], ids [k])`` in ascending rank order.
    """
    if not partials:
        return np.zeros(0, np.uint64), np.zeros(0, dtype=str)
    ranks = np.concatenate([np.asarray(r, dtype=np.uint64) for r, _ in partials])
    ids = np.concatenate([_as_str_array(i) for _, i in partials]) if len(ranks) else np.zeros(0, str)
    keep = bottom_k(ranks, k, ids)
    return ranks[keep], ids[keep]


# ----------------------------------------------------------------------------- quotas
def largest_remainder_quotas(sizes: Sequence[int] | np.ndarray, budget: int) -> np.ndarray:
    """Hamilton / largest-remainder apportionment of ``budget`` proportional to ``sizes``.

    q_c = floor(B·n_c/n); the B − Σq_c leftover seats go to the largest fractional parts,
    ties to the lower index. Integer arithmetic, so no float rounding.

    Args:
        sizes: [C] non-negative group sizes (n = Σ sizes > 0).
        budget: B ≥ 0.

    Returns:
        [C] int64 quotas with Σq = B (and q_c ≤ n_c whenever B ≤ n).
    """
    sizes = np.asarray(sizes, dtype=np.int64)
    n = int(sizes.sum())
    if budget < 0 or n <= 0:
        raise ValueError(f"need budget >= 0 and a positive total size, got B={budget}, n={n}")
    num = sizes * int(budget)  # [C]
    q = num // n
    rem = num % n  # fractional parts scaled by n: comparable as integers
    left = int(budget - q.sum())
    if left > 0:
        # Largest remainder first, lower index on ties (lexsort: last key is primary).
        order = np.lexsort((np.arange(len(sizes)), -rem))
        q[order[:left]] += 1
    return q


def stratified_bottom_k(
    strata: np.ndarray, ranks: np.ndarray, budget: int, ids: Sequence[str] | None = None
) -> np.ndarray:
    """Random stratified selection: largest-remainder quotas, then the smallest r per stratum.

    Args:
        strata: [N] stratum labels (any hashable numpy dtype).
        ranks: [N] uint64 r(id).
        budget: B ≤ N.
        ids: optional ids for the rank-collision tie-break.

    Returns:
        int64 indices of the B picks, ascending r.
    """
    strata = np.asarray(strata)
    ranks = np.asarray(ranks, np.uint64)
    labels, inv = np.unique(strata, return_inverse=True)
    quotas = largest_remainder_quotas(np.bincount(inv, minlength=len(labels)), budget)
    tie = None if ids is None else _as_str_array(ids)
    picks = _first_q_per_group(inv, np.zeros(len(inv)), ranks, quotas, tie)
    return picks[_order(np.zeros(len(picks)), ranks[picks], None if tie is None else tie[picks])]


def _first_q_per_group(
    group: np.ndarray,
    key: np.ndarray,
    ranks: np.ndarray,
    quotas: np.ndarray,
    ids: np.ndarray | None = None,
) -> np.ndarray:
    """Indices of the first ``quotas[g]`` rows of each group g, ordered by (key, rank, id).

    One lexsort instead of a loop over groups (1M rows × 1000 clusters stays O(N log N)).

    Args:
        group: [N] int64 group ids in [0, G).
        key: [N] float sort key (ascending).
        ranks: [N] uint64 tie-break.
        quotas: [G] int64.
        ids: optional [N] str final tie-break.

    Returns:
        int64 indices, grouped by group id.
    """
    keys = [ranks, key, group] if ids is None else [ids, ranks, key, group]
    order = np.lexsort(keys)
    g_sorted = group[order]
    starts = np.searchsorted(g_sorted, np.arange(len(quotas)))  # [G] first slot of each group
    pos = np.arange(len(order)) - starts[g_sorted]  # rank of the row inside its group
    return order[pos < quotas[g_sorted]].astype(np.int64)


# ----------------------------------------------------------------------------- top-k by score
def _eligible(scores: np.ndarray) -> np.ndarray:
    return ~np.isnan(scores)


def top_k_indices(
    scores: np.ndarray, k: int, descending: bool = True, tie_ranks: np.ndarray | None = None
) -> np.ndarray:
    """Indices of the k best eligible scores, in pick order.

    Args:
        scores: [N] float; NaN (null) rows are ineligible.
        k: how many to keep (clipped to the eligible count).
        descending: True = largest score first.
        tie_ranks: [N] uint64 r(id) breaking ties (smaller r first). Required by the
            spec; if None ties fall back to row position (only for callers that have
            already made positions meaningful).

    Returns:
        int64 indices into ``scores``.
    """
    scores = np.asarray(scores, dtype=np.float64)
    elig = np.flatnonzero(_eligible(scores))
    key = -scores[elig] if descending else scores[elig]
    tie = elig if tie_ranks is None else np.asarray(tie_ranks, np.uint64)[elig]
    order = np.lexsort((tie, key))
    return elig[order[: max(int(k), 0)]].astype(np.int64)


def top_k_by_score(
    ids: Sequence[str],
    scores: np.ndarray,
    k: int,
    descending: bool = True,
    tie_ranks: np.ndarray | None = None,
) -> np.ndarray:
    """Ids of the k best eligible rows (pick order); ties by r(id), nulls ineligible.

    Block-wise use: run it per block with the same k, then run it again on the
    concatenated partial results (the global top-k is within the union of local top-k).
    """
    return _as_str_array(ids)[top_k_indices(scores, k, descending, tie_ranks)]


# ----------------------------------------------------------------------------- k-means quotas
def km_quotas(
    cluster_sizes: Sequence[int] | np.ndarray,
    budget: int,
    capacity: Sequence[int] | np.ndarray | None = None,
) -> np.ndarray:
    """Per-cluster quotas for km_quality / km_length (arXiv 2410.09335 §3; docs/algorithms/data_selection.md §2).

    q_c = floor(B·n_c/n) plus largest-remainder leftovers (ties to the lower cluster id).
    If a cluster cannot fill its quota (``capacity`` = its eligible rows, e.g. rows whose
    score is not null), the shortfall is re-quota'd, again proportionally to size, over
    the clusters that still have spare eligible rows, until Σq = B.

    Args:
        cluster_sizes: [C] rows per cluster (the proportionality weights).
        budget: B.
        capacity: [C] eligible rows per cluster; defaults to ``cluster_sizes``.

    Returns:
        [C] int64 quotas, Σq = B, q_c ≤ capacity_c.

    Raises:
        ValueError: if B exceeds the total capacity.
    """
    sizes = np.asarray(cluster_sizes, dtype=np.int64)
    cap = sizes.copy() if capacity is None else np.asarray(capacity, dtype=np.int64)
    if budget > int(cap.sum()):
        raise ValueError(f"budget {budget} exceeds the {int(cap.sum())} eligible rows")
    q = np.minimum(largest_remainder_quotas(sizes, budget), cap)
    while (short := int(budget - q.sum())) > 0:
        open_ = cap > q  # clusters with spare eligible rows
        # Weight open clusters by size (at least 1, so a zero-size open cluster still counts).
        weights = np.where(open_, np.maximum(sizes, 1), 0)
        # Each open cluster has spare >= 1 and at least one gets a seat: strictly progresses.
        q = np.minimum(q + largest_remainder_quotas(weights, short), cap)
    return q


def km_select(
    cluster: np.ndarray,
    score: np.ndarray,
    ranks: np.ndarray,
    budget: int,
    descending: bool = True,
) -> np.ndarray:
    """k-means + quality selection: the top-q_c rows by score inside each cluster.

    Quotas are proportional to the full cluster sizes; clusters with too few eligible
    (non-null) rows hand their shortfall to the others (``km_quotas``).

    Args:
        cluster: [N] int cluster ids (≥ 0).
        score: [N] float score, NaN = ineligible (km_length passes token lengths).
        ranks: [N] uint64 r(id) for ties.
        budget: B.
        descending: True = larger score is better.

    Returns:
        int64 indices of the B picks in global pick order (score, then r).
    """
    cluster = np.asarray(cluster, dtype=np.int64)
    score = np.asarray(score, dtype=np.float64)
    n_clusters = int(cluster.max()) + 1 if len(cluster) else 0
    sizes = np.bincount(cluster, minlength=n_clusters)
    cap = np.bincount(cluster[_eligible(score)], minlength=n_clusters)
    quotas = km_quotas(sizes, budget, cap)
    ranks = np.asarray(ranks, np.uint64)
    elig = np.flatnonzero(_eligible(score))
    key = -score[elig] if descending else score[elig]
    picks = elig[_first_q_per_group(cluster[elig], key, ranks[elig], quotas)]
    return picks[top_k_indices(score[picks], len(picks), descending, ranks[picks])]
