"""The GRPO controller's pure pieces (no Ray): which prompts a step uses, rewards, advantages,
sharding whole groups over ranks and micro-batches, per-step rollout statistics, and the loss
hook the shared training loop runs (docs/algorithms/prefix_grouper_grpo.md §3–§4).

One optimizer step consumes ``P = prompts_per_step`` prompt groups of ``G`` completions; the
P groups are split into ``W`` ranks x ``GA`` micro-batches of ``P / (W * GA)`` whole groups
(a group is never split: the shared-prefix forward packs one group per row, and the advantage
statistics are per group).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from effsft.grpo.loss import combine_rewards, group_advantages, grpo_loss, grpo_metrics, pad_logprobs
from effsft.grpo.prefix_grouper import completion_logprobs


# ---- prompts -------------------------------------------------------------------------------

def step_prompt_indices(step: int, n_prompts: int, per_step: int, seed: int) -> list[int]:
    """Indices of the prompts used by rollout batch ``step``.

    The prompt set is walked in a fresh seeded permutation per epoch; step ``s`` takes the
    global positions ``[s * per_step, (s + 1) * per_step)`` of the concatenated epochs, so the
    choice is a pure function of the step (a resumed run draws the same prompts).
    """
    out = []
    for g in range(step * per_step, (step + 1) * per_step):
        epoch, i = divmod(g, n_prompts)
        perm = np.random.default_rng([seed, epoch]).permutation(n_prompts)
        out.append(int(perm[i]))
    return out


# ---- rewards and advantages --------------------------------------------------------------

def rewards_column(values: Sequence, n: int) -> list[float]:
    """One function's rewards as floats (None -> NaN), checking the length."""
    values = list(values)
    if len(values) != n:
        raise ValueError(f"reward function returned {len(values)} values for {n} completions")
    return [math.nan if v is None else float(v) for v in values]


def combine_per_func(per: list[list[float]], weights: Sequence[float]) -> tuple[torch.Tensor, torch.Tensor]:
    """K reward columns of length N -> ``(weighted total [N], per_func [N, K])``."""
    per_func = torch.tensor(per, dtype=torch.float64).T.reshape(-1, len(per))  # [N, K]
    return combine_rewards(per_func, torch.tensor(list(weights), dtype=torch.float64)), per_func


def shard_groups(n_groups: int, world_size: int, grad_accum: int) -> list[list[list[int]]]:
    """Whole groups per rank and micro-batch: ``out[rank][micro] = [group indices]``.

    Rank r gets the contiguous block ``[r * P/W, (r+1) * P/W)``, cut into GA micro-batches.

    Raises:
        ValueError: ``n_groups`` not divisible by ``world_size * grad_accum``.
    """
    per_rank, rem = divmod(n_groups, world_size * grad_accum)
    if rem or per_rank == 0:
        raise ValueError(f"{n_groups} prompt groups do not split into {world_size} ranks x "
                         f"{grad_accum} micro-batches of whole groups")
    k = per_rank
    return [[list(range((r * grad_accum + m) * k, (r * grad_accum + m + 1) * k))
             for m in range(grad_accum)] for r in range(world_size)]


@dataclass
class Rollout:
    """One rollout batch: P prompts x G completions, as token ids (never re-tokenised)."""

    prompts: list[torch.Tensor]             # P 1-D LongTensors
    completions: list[list[torch.Tensor]]   # P groups of G 1-D LongTensors (EOS included)
    rewards: torch.Tensor                   # [P * G] combined (NaN = no reward)
    per_func: torch.Tensor                  # [P * G, K]
    advantages: torch.Tensor                # [P * G]


def make_rollout(prompts, completions, rewards, per_func, group_size: int, scale: str) -> Rollout:
    """Advantages over the whole batch (before any sharding: ``scale=batch`` needs all of it)."""
    adv = group_advantages(rewards.to(torch.float64), group_size, scale).to(torch.float32)
    return Rollout(prompts, completions, rewards, per_func, adv)


def micro_batch_payloads(ro: Rollout, shards: list[list[int]]) -> list[dict]:
    """This rank's micro-batches: dicts the loss hook reads.

    Each has ``prompts`` (k tensors), ``completions`` (k groups), ``advantages`` ``[k * G]``,
    ``num_tokens`` (tokens the grouped forward reads: Lp + sum Lr per group),
    ``num_response_tokens`` and ``step_active_tokens`` (completion tokens of the whole
    optimizer step on all ranks: dapo's N_tok).
    """
    G = len(ro.completions[0])
    n_active = sum(c.numel() for cs in ro.completions for c in cs)
    out = []
    for groups in shards:
        comps = [ro.completions[g] for g in groups]
        resp = sum(c.numel() for cs in comps for c in cs)
        out.append({
            "prompts": [ro.prompts[g] for g in groups],
            "completions": comps,
            "advantages": torch.cat([ro.advantages[g * G:(g + 1) * G] for g in groups]),
            "num_tokens": sum(ro.prompts[g].numel() for g in groups) + resp,
            "num_response_tokens": resp,
            "step_active_tokens": n_active,
        })
    return out


def rollout_metrics(ro: Rollout, fn_names: Sequence[str]) -> dict[str, float]:
    """Per-step statistics of a rollout batch (rank 0 logs them)."""
    G = len(ro.completions[0])
    r = ro.rewards
    lens = torch.tensor([c.numel() for cs in ro.completions for c in cs], dtype=torch.float64)
    zero = (ro.advantages.view(-1, G) == 0).all(dim=1).to(torch.float64)
    out = {"reward_mean": float(r.nanmean()),
           "reward_std": float(r[~r.isnan()].std()) if int((~r.isnan()).sum()) > 1 else 0.0,
           "frac_zero_adv_groups": float(zero.mean()),
           "completion_len_mean": float(lens.mean()), "completion_len_max": float(lens.max()),
           "completion_len_min": float(lens.min())}
    for k, name in enumerate(fn_names):
        col = ro.per_func[:, k]
        out[f"reward/{name}"] = float(col.nanmean()) if bool((~col.isnan()).any()) else math.nan
    return out


# ---- log-probs and the loss hook -----------------------------------------------------------

def padded_logprobs(model, batch: dict, grouped: bool, temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``[N, T]`` right-padded per-token log-probs of the batch's completions and their mask."""
    lps = completion_logprobs(model, batch["prompts"], batch["completions"], grouped=grouped,
                              temperature=temperature)
    return pad_logprobs(lps)


@torch.no_grad()
def frozen_logprobs(model, batch: dict, grouped: bool, temperature: float) -> torch.Tensor:
    """No-grad ``[N, T]`` log-probs (old policy before the μ updates, or the reference model)."""
    return padded_logprobs(model, batch, grouped, temperature)[0].detach()


def deepspeed_ga_compensation(grad_accum: int) -> float:
    """Factor applied to the pure loss before ``engine.backward``.

    ``grpo_loss`` already applies the docs/algorithms/prefix_grouper_grpo.md §3 GA scaling (÷GA for grpo/bnpo/dr_grpo; none for
    dapo, whose N_tok spans the whole step); DeepSpeed's ``engine.backward`` divides every
    micro-loss by GA once more (``scale_wrt_gas``). Multiplying by GA undoes exactly that one
    extra division (checked on the installed DeepSpeed by a test).
    """
    return float(grad_accum)


@dataclass(frozen=True)
class GRPOLoss:
    """The grpo loss hook: ``GRPOLoss(...)(model, batch, ctx) -> (loss, metrics)``.

    ``batch`` is one of :func:`micro_batch_payloads`' dicts, plus optional ``old_logps`` (μ > 1;
    absent: ``s_old = s.detach()``) and ``ref_logps`` (β > 0), both ``[N, T]``.
    """

    loss_type: str = "dapo"
    epsilon: float = 0.2
    epsilon_high: float = 0.2
    beta: float = 0.0
    max_completion_length: int | None = None
    temperature: float = 1.0
    grouped: bool = True
    engine_divides_by_ga: bool = True   # DeepSpeed: True; a plain torch loop: False

    def __call__(self, model, batch: dict, ctx) -> tuple[torch.Tensor, dict]:
        logps, mask = padded_logprobs(model, batch, self.grouped, self.temperature)  # [N, T]
        old = batch.get("old_logps")
        old = logps.detach() if old is None else old.to(logps)
        ref = batch.get("ref_logps")
        ref = None if ref is None else ref.to(logps)
        adv = batch["advantages"].to(logps)
        loss = grpo_loss(logps, old, adv, mask, self.loss_type, self.epsilon, self.epsilon_high,
                         ref_logps=ref, beta=self.beta, max_completion_length=self.max_completion_length,
                         num_active_tokens=batch.get("step_active_tokens"),
                         grad_accum=ctx.grad_accum, world_size=ctx.world_size)
        if self.engine_divides_by_ga:
            loss = loss * deepspeed_ga_compensation(ctx.grad_accum)
        metrics = {k: float(v) for k, v in grpo_metrics(logps.detach(), old, adv, mask, self.epsilon,
                                                         self.epsilon_high, ref).items()}
        return loss, metrics
