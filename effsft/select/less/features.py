"""LESS scoring math: the Rademacher JL projector, the Adam features Γ, η̄ and the subtask
mean/max combination of checkpoints (paper Eq. 2-3). Tensors in, tensors out; no Ray."""
from __future__ import annotations

import hashlib
import json
import math
from typing import Sequence

import numpy as np
import torch

PROJECTOR_VERSION = "rademacher-blake2b-v1"
BETA1, BETA2, ADAM_EPS = 0.9, 0.999, 1e-8


# ----------------------------------------------------------------------------- projection
class RademacherProjector:
    """x ↦ x·R/√d with R ∈ {−1, +1}^{P×d}, generated in row blocks from a seed.

    Block b (rows ``b·block_rows …``) comes from its own ``torch.Generator`` seeded with
    BLAKE2b(version‖seed‖b), so any process — and any split of the P parameters into blocks —
    builds the same matrix without storing the dense P×d matrix. With the 1/√d scale,
    E‖xR/√d‖² = ‖x‖² (Johnson–Lindenstrauss; Achlioptas 2003).

    Args:
        n_params: P, the length of the vectors to project.
        dim: d, the projected dimension (LESS: 8192).
        seed: projector seed (LESS: 0).
        block_rows: rows of R generated at a time.
        cache_bytes: keep generated blocks in memory while their total stays under this.
    """

    def __init__(self, n_params: int, dim: int = 8192, seed: int = 0, block_rows: int = 4096,
                 cache_bytes: int = 256 << 20):
        if n_params < 1 or dim < 1 or block_rows < 1:
            raise ValueError("n_params, dim and block_rows must be positive")
        self.n_params, self.dim, self.seed, self.block_rows = int(n_params), int(dim), int(seed), int(block_rows)
        self.n_blocks = math.ceil(self.n_params / self.block_rows)
        self._cache: dict[int, torch.Tensor] = {}
        self._cache_ok = self.n_params * self.dim * 4 <= cache_bytes

    def block_range(self, b: int) -> tuple[int, int]:
        lo = b * self.block_rows
        return lo, min(self.n_params, lo + self.block_rows)

    def _block_seed(self, b: int) -> int:
        h = hashlib.blake2b(f"{PROJECTOR_VERSION}|{self.seed}|{b}".encode(), digest_size=8).digest()
        return int.from_bytes(h, "little") & ((1 << 63) - 1)

    def block(self, b: int) -> torch.Tensor:
        """Rows ``block_range(b)`` of R as ±1 fp32 on CPU. Returns [rows_b, d]."""
        if b in self._cache:
            return self._cache[b]
        lo, hi = self.block_range(b)
        g = torch.Generator(device="cpu").manual_seed(self._block_seed(b))
        r = torch.randint(0, 2, (hi - lo, self.dim), generator=g, dtype=torch.int8)
        r = r.to(torch.float32).mul_(2).sub_(1)  # {0,1} -> {-1,+1}
        if self._cache_ok:
            self._cache[b] = r
        return r

    def project_block(self, x: torch.Tensor, b: int) -> torch.Tensor:
        """Partial projection of the parameter slice ``block_range(b)``: [N, rows_b] -> [N, d].

        Summing this over every block equals :meth:`project` (what a distributed caller does).
        """
        return x.float() @ self.block(b).to(x.device) / math.sqrt(self.dim)

    def project(self, x: torch.Tensor) -> torch.Tensor:
        """[N, P] -> [N, d] fp32."""
        if x.shape[-1] != self.n_params:
            raise ValueError(f"projector built for {self.n_params} params, got vectors of {x.shape[-1]}")
        out = torch.zeros(x.shape[0], self.dim, dtype=torch.float32, device=x.device)
        for b in range(self.n_blocks):
            lo, hi = self.block_range(b)
            out += self.project_block(x[:, lo:hi], b)
        return out

    @property
    def checksum(self) -> str:
        """BLAKE2b of the construction (version, P, d, seed, block size) and of the first and
        last blocks' bits: equal checksums mean equal matrices, and a different RNG stream
        on another machine shows up (hashing all P·d entries would cost a full generation)."""
        h = hashlib.blake2b(digest_size=16)
        h.update(json.dumps([PROJECTOR_VERSION, self.n_params, self.dim, self.seed, self.block_rows]).encode())
        for b in sorted({0, self.n_blocks - 1}):
            h.update(self.block(b).to(torch.int8).numpy().tobytes())
        return h.hexdigest()


# ----------------------------------------------------------------------------- features
def adam_features(g: torch.Tensor, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor,
                  beta1: float = BETA1, beta2: float = BETA2, eps: float = ADAM_EPS) -> torch.Tensor:
    """Γ = m'/√(v'+ε), m' = β1·m + (1−β1)·g, v' = β2·v + (1−β2)·g² (LESS Eq. 2, no bias correction).

    Args:
        g: [N, P] per-example gradients.
        exp_avg / exp_avg_sq: [P] AdamW moments m, v of the checkpoint.
    Returns:
        [N, P] fp32.
    """
    g = g.float()
    m = beta1 * exp_avg.float().to(g.device) + (1 - beta1) * g
    v = beta2 * exp_avg_sq.float().to(g.device) + (1 - beta2) * g * g
    return m / torch.sqrt(v + eps)


def normalize_rows(x: torch.Tensor) -> torch.Tensor:
    """Row-wise L2 normalisation ([N, d]); a zero row stays zero (cosine 0 with anything)."""
    return x / x.norm(dim=-1, keepdim=True).clamp_min(1e-30)


def eta_bar(mean_lrs: Sequence[float]) -> np.ndarray:
    """η̄_i = η_i / Σ_j η_j: the checkpoints' mean learning rates normalised to sum to 1."""
    lr = np.asarray(mean_lrs, np.float64)
    if lr.ndim != 1 or not len(lr) or (lr < 0).any() or lr.sum() <= 0:
        raise ValueError(f"mean learning rates must be non-negative with a positive sum, got {mean_lrs}")
    return lr / lr.sum()


def subtask_means(target: np.ndarray, groups: Sequence) -> tuple[list[str], np.ndarray]:
    """Mean target feature per subtask, subtasks in sorted name order.

    Why means suffice: mean_{z'∈s} cos(Γ, g(z')) = Γ̂ · mean_{z'∈s} ĝ(z') for unit vectors.

    Args:
        target: [M, d] L2-normalised target features.
        groups: M subtask labels.
    Returns:
        (names [S], means [S, d] fp64).
    """
    labels = np.asarray([str(x) for x in groups])
    names = sorted(set(labels.tolist()))
    t = np.asarray(target, np.float64)
    return names, np.stack([t[labels == s].mean(0) for s in names])


def subtask_cosines(train: np.ndarray, means: np.ndarray) -> np.ndarray:
    """One checkpoint's mean cosine of each training row with each subtask.

    Args:
        train: [N, d] L2-normalised Γ features.
        means: [S, d] from :func:`subtask_means`.
    Returns:
        [N, S] fp64.
    """
    return np.asarray(train, np.float64) @ np.asarray(means, np.float64).T


def combine_checkpoints(per_ckpt: Sequence[np.ndarray], mean_lrs: Sequence[float]) -> np.ndarray:
    """score = max_s Σ_i η̄_i · C_i[:, s] (LESS Eq. 3, then the max over subtasks).

    Args:
        per_ckpt: K arrays [N, S] of :func:`subtask_cosines` (NaN rows stay NaN).
        mean_lrs: K mean learning rates.
    Returns:
        [N] fp64.
    """
    w = eta_bar(mean_lrs)
    if len(per_ckpt) != len(w):
        raise ValueError(f"{len(per_ckpt)} checkpoints but {len(w)} learning rates")
    total = sum(wi * np.asarray(c, np.float64) for wi, c in zip(w, per_ckpt))  # [N, S]
    return total.max(axis=1)


def less_scores(train: Sequence[np.ndarray], target: Sequence[np.ndarray], groups: Sequence,
                mean_lrs: Sequence[float]) -> np.ndarray:
    """The whole score in one process from K checkpoints' normalised features.

    Args:
        train: K arrays [N, d] (normalised Γ_i).
        target: K arrays [M, d] (normalised g_i of the target rows).
        groups: M subtask labels.
        mean_lrs: K mean learning rates.
    Returns:
        [N] fp64.
    """
    per = [subtask_cosines(tr, subtask_means(tg, groups)[1]) for tr, tg in zip(train, target)]
    return combine_checkpoints(per, mean_lrs)
