"""DiverseEvol k-center selection on embeddings (Wu et al. 2023, github.com/OFA-Sys/DiverseEvol).

Each round adds rows far from the current set S: d(x) = min_{s∈S} ‖e(x) − e(s)‖².

* ``topn`` (the paper's code): the n largest d at once. Per block: local top-n; merge:
  top-n of the union (``merge_topn``).
* ``greedy`` (k-center 2-approximation, Gonzalez 1985): n times, add argmax d and update d
  with the new center. Block-wise: every block (a resident actor in the pipeline) keeps its
  own d (``GreedyBlock``); each step the driver takes the best local (d, r) and broadcasts
  the winning vector (``greedy_select_blocks``).

Squared distances are clamped at 0 (the reference takes sqrt of possibly negative
entries). Ties go to the smaller r(id). Rows already in S are ineligible.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from effsft.select.ranking import top_k_indices

__all__ = ["min_sq_dist", "topn_select", "merge_topn", "GreedyBlock", "greedy_select_blocks", "greedy_select"]


def _f32(x: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(np.asarray(x, dtype=np.float32))


def min_sq_dist(vectors: np.ndarray, centers: np.ndarray) -> np.ndarray:
    """d(x) = min over centers of ‖x − c‖², clamped at 0; +inf when there are no centers.

    Args:
        vectors: [n, d].
        centers: [m, d] (the embeddings of S, broadcast to every block).

    Returns:
        [n] float32.
    """
    import faiss

    x, c = _f32(vectors), _f32(centers).reshape(-1, _f32(vectors).shape[1])
    if len(c) == 0:
        return np.full(len(x), np.inf, np.float32)
    index = faiss.IndexFlatL2(x.shape[1])
    index.add(c)
    D, _ = index.search(x, 1)  # [n, 1] squared L2
    return np.maximum(D[:, 0], 0.0).astype(np.float32)


def topn_select(d: np.ndarray, ranks: np.ndarray, n: int, in_set: np.ndarray | None = None) -> np.ndarray:
    """Indices of the n largest d (ties: smaller r), excluding rows already in S.

    Args:
        d: [N] distances to S.
        ranks: [N] uint64 r(id).
        n: rows to add.
        in_set: [N] bool, True for rows already in S.

    Returns:
        int64 indices, largest d first.
    """
    d = np.asarray(d, np.float64).copy()
    if in_set is not None:
        d[np.asarray(in_set, bool)] = np.nan  # ineligible
    return top_k_indices(d, n, descending=True, tie_ranks=ranks)


def merge_topn(partials: Sequence[tuple[np.ndarray, np.ndarray, np.ndarray]], n: int) -> np.ndarray:
    """Merge per-block ``(d, ranks, ids)`` top-n partials into the global top-n ids."""
    d = np.concatenate([np.asarray(p[0], np.float64) for p in partials])
    r = np.concatenate([np.asarray(p[1], np.uint64) for p in partials])
    ids = np.concatenate([np.asarray(p[2]) for p in partials])
    return ids[topn_select(d, r, n)]


class GreedyBlock:
    """One block's state for block-wise greedy k-center (a resident actor holds one).

    Args:
        vectors: [n, d] embeddings of the block.
        ranks: [n] uint64 r(id).
        centers: [m, d] embeddings of the initial S (broadcast).
        in_set: [n] bool, rows of this block already in S.
    """

    def __init__(self, vectors: np.ndarray, ranks: np.ndarray, centers: np.ndarray,
                 in_set: np.ndarray | None = None):
        self.x = _f32(vectors)
        self.ranks = np.asarray(ranks, np.uint64)
        self.d = min_sq_dist(self.x, centers).astype(np.float64)  # [n]
        if in_set is not None:
            self.d[np.asarray(in_set, bool)] = -np.inf

    def best(self) -> tuple[float, int, int] | None:
        """Local candidate ``(d, r, local_index)``: max d, then min r; None if exhausted."""
        if len(self.d) == 0 or self.d.max() == -np.inf:  # -inf marks rows already in S
            return None
        i = int(top_k_indices(np.where(self.d == -np.inf, np.nan, self.d), 1, True, self.ranks)[0])
        return float(self.d[i]), int(self.ranks[i]), i

    def vector(self, i: int) -> np.ndarray:
        return self.x[i]

    def add_center(self, center: np.ndarray, local_index: int | None = None) -> None:
        """Update d with a new center; mark ``local_index`` as picked if it is in this block."""
        diff = self.x - _f32(center)[None, :]  # [n, d]
        self.d = np.minimum(self.d, np.maximum((diff.astype(np.float64) ** 2).sum(1), 0.0))
        if local_index is not None:
            self.d[local_index] = -np.inf


def greedy_select_blocks(blocks: Sequence[GreedyBlock], n: int) -> list[tuple[int, int]]:
    """Driver loop of block-wise greedy k-center.

    Returns:
        ``[(block, local_index), ...]`` in pick order (at most n).
    """
    picks = []
    for _ in range(n):
        cands = [(b, c) for b, blk in enumerate(blocks) if (c := blk.best()) is not None]
        if not cands:
            break
        # Largest d, then the smallest r: the same rule as inside each block.
        b, (_, _, i) = min(cands, key=lambda bc: (-bc[1][0], bc[1][1]))
        center = blocks[b].vector(i)
        for bb, blk in enumerate(blocks):
            blk.add_center(center, i if bb == b else None)
        picks.append((b, i))
    return picks


def greedy_select(vectors: np.ndarray, ranks: np.ndarray, init_idx: Sequence[int], n: int) -> np.ndarray:
    """Single-process greedy k-center: indices of the n rows added to S (pick order)."""
    in_set = np.zeros(len(vectors), bool)
    in_set[list(init_idx)] = True
    block = GreedyBlock(vectors, ranks, np.asarray(vectors)[list(init_idx)], in_set)
    return np.array([i for _, i in greedy_select_blocks([block], n)], np.int64)
