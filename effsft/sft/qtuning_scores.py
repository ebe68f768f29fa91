"""Q-Tuning scores, computed on each rank's own batch: per-sample PPL and entropy (:class:`SampleStats`)
and the neighbour-smoothed token PPL that ranks drop candidates (docs/algorithms/qtuning.md §2.1, §2.5).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Sequence

import numpy as np
import torch


@dataclass(frozen=True)
class SampleStats:
    """Per-sample scores, all ``[B]`` numpy arrays (the only thing global scope must gather).

    Attributes:
        ppl: float64, ``exp(mean NLL over response tokens)`` (1 for a row without response).
        ent: float64, mean predictive entropy over the entropy scope.
        n_nonpad: int64, non-pad label positions (prompt + response), the ``T_all`` unit.
        n_resp: int64, response label positions.
    """

    ppl: np.ndarray
    ent: np.ndarray
    n_nonpad: np.ndarray
    n_resp: np.ndarray

    def __len__(self) -> int:
        return int(self.ppl.shape[0])

    @classmethod
    def concat(cls, parts: Sequence["SampleStats"]) -> "SampleStats":
        """Concatenate the stats of several ranks in rank order."""
        return cls(*(np.concatenate([getattr(p, f) for p in parts]) for f in ("ppl", "ent", "n_nonpad", "n_resp")))

    def to_array(self) -> np.ndarray:
        """``[B, 4]`` float64 (ppl, ent, n_nonpad, n_resp) for a single all-gather."""
        return np.stack([self.ppl, self.ent, self.n_nonpad, self.n_resp], axis=1).astype(np.float64)

    @classmethod
    def from_array(cls, arr: np.ndarray) -> "SampleStats":
        """Inverse of :meth:`to_array`."""
        arr = np.asarray(arr, dtype=np.float64).reshape(-1, 4)
        return cls(arr[:, 0].copy(), arr[:, 1].copy(), arr[:, 2].astype(np.int64), arr[:, 3].astype(np.int64))


def np_bool(mask: torch.Tensor | np.ndarray) -> np.ndarray:
    """A mask as a numpy bool array (torch tensors are detached and moved to the CPU)."""
    if isinstance(mask, torch.Tensor):
        return mask.detach().cpu().numpy().astype(bool)
    return np.asarray(mask, dtype=bool)


def np_f64(x: torch.Tensor | np.ndarray) -> np.ndarray:
    """An array as numpy float64 (torch tensors are detached and moved to the CPU)."""
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().to(torch.float64).numpy()
    return np.asarray(x, dtype=np.float64)


def sample_stats(
    token_nll: torch.Tensor | np.ndarray,
    token_entropy: torch.Tensor | np.ndarray,
    response_mask: torch.Tensor | np.ndarray,
    nonpad_mask: torch.Tensor | np.ndarray | None = None,
    entropy_scope: Literal["response", "all"] = "response",
) -> SampleStats:
    """Per-sample PPL and entropy (docs/algorithms/qtuning.md §2.1), in float64.

    Args:
        token_nll: ``[B, T]`` label-aligned NLL.
        token_entropy: ``[B, T]`` label-aligned predictive entropy.
        response_mask: ``[B, T]`` bool, response label positions.
        nonpad_mask: ``[B, T]`` bool, all non-pad label positions (prompt + response); default
            ``response_mask``.
        entropy_scope: ``response`` (effsft default, the paper's formula) or ``all`` (non-pad
            positions, prompt included: the authors' code).

    Returns:
        :class:`SampleStats`.
    """
    resp = np_bool(response_mask)
    nonpad = resp if nonpad_mask is None else np_bool(nonpad_mask)
    nll, ent = np_f64(token_nll), np_f64(token_entropy)
    n_resp = resp.sum(axis=1)
    ppl = np.exp(np.where(resp, nll, 0.0).sum(axis=1) / np.maximum(n_resp, 1))
    if entropy_scope == "response":
        ent_mask = resp
    elif entropy_scope == "all":
        ent_mask = nonpad
    else:
        raise ValueError(f"qtuning.entropy_scope must be 'response' or 'all', got {entropy_scope!r}")
    ent_s = np.where(ent_mask, ent, 0.0).sum(axis=1) / np.maximum(ent_mask.sum(axis=1), 1)
    return SampleStats(ppl=ppl, ent=ent_s, n_nonpad=nonpad.sum(axis=1).astype(np.int64), n_resp=n_resp.astype(np.int64))


def token_scores(
    token_nll: torch.Tensor | np.ndarray,
    response_mask: torch.Tensor | np.ndarray,
    nonpad_mask: torch.Tensor | np.ndarray | None = None,
    lam: float = 0.5,
    neighbor_div2: bool = False,
) -> np.ndarray:
    """Neighbour-smoothed token PPL ``s_t`` (docs/algorithms/qtuning.md §2.5), float64 ``[B, T]``.

    ``τ_t = exp(ℓ_t)`` on response positions, 1 on other non-pad positions (prompt: ℓ = 0), 0 on
    padding and outside the row; ``s_t = (1-λ) τ_t + λ (τ_{t-1} + τ_{t+1})`` (the sum is halved
    only with ``neighbor_div2``, the third-party variant).
    """
    resp = np_bool(response_mask)
    nonpad = resp if nonpad_mask is None else np_bool(nonpad_mask) | resp
    tau = np.where(resp, np.exp(np_f64(token_nll)), np.where(nonpad, 1.0, 0.0))  # [B, T]
    neighbours = np.zeros_like(tau)
    neighbours[:, 1:] += tau[:, :-1]
    neighbours[:, :-1] += tau[:, 1:]
    if neighbor_div2:
        neighbours /= 2.0
    return (1.0 - lam) * tau + lam * neighbours
