"""The GRPO job's ``report.md``, ``reward.png`` and ``loss.png`` (from the per-step metrics rows)."""

from __future__ import annotations

import math
from pathlib import Path

from effsft.grpo.config import GRPOConfig


def train_tokens_per_s(r: dict) -> float:
    """Tokens through the update passes per second of update time (rollout, rewards, shipping,
    old/ref forwards and weight sync excluded)."""
    dt = r["step_s"] - r.get("data_s", 0.0) - r.get("sync_s", 0.0)
    return r["tokens"] / dt if dt > 0 else math.nan


def write_grpo_report(cfg: GRPOConfig, work: Path, rows: list[dict], counts: dict, summary: dict, sync: dict) -> None:
    from effsft.report.plots import curve, md_table, write_report

    steps = [r["step"] for r in rows]
    mean = [r.get("reward_mean", math.nan) for r in rows]
    std = [r.get("reward_std", math.nan) for r in rows]
    curve(work / "reward.png", steps, {"mean reward": mean,
                                       "mean + std": [m + s for m, s in zip(mean, std)],
                                       "mean - std": [m - s for m, s in zip(mean, std)]},
          "grpo reward per step", "step", "reward (weighted sum)")
    curve(work / "loss.png", steps, {"loss": [r["loss"] for r in rows]}, "grpo loss", "step", "loss")
    tr = cfg.train
    setup = (f"{cfg.rollout.num_actors} rollout actors, {tr.num_workers} train workers (ZeRO-{tr.zero_stage}), "
             f"{cfg.rollout.prompts_per_step} prompts x G={cfg.num_generations} per step, "
             f"loss_type={cfg.loss_type}, scale_rewards={cfg.scale_rewards}, beta={cfg.beta}, "
             f"mu={cfg.num_iterations}, prefix grouping {'on' if summary.get('prefix_grouping') else 'off'}, "
             f"rewards {[(f.fn, f.weight) for f in cfg.reward_funcs]} ({cfg.reward.mode})")
    cols = ["step", "loss", "reward_mean", "reward_std", "frac_zero_adv_groups", "completion_len_mean",
            "clip_ratio/region", "kl", "rollout_tokens_per_s", "train_tokens_per_s"]
    write_report(work / "report.md", f"grpo of {cfg.model.path}", [
        ("Setup", setup),
        ("Result", md_table([{k: summary.get(k) for k in ("steps", "final_loss", "resumed_from_step")}
                             | {"first_reward": mean[0] if mean else None,
                                "last_reward": mean[-1] if mean else None}])),
        ("Weight sync", md_table([sync])),
        ("Prompts", md_table([counts])),
        ("Steps", md_table(rows[-20:], [c for c in cols if any(c in r for r in rows)]))],
        images=[("Reward", "reward.png"), ("Loss", "loss.png")])
