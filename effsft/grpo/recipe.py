"""Recipe ``effsft grpo``: GRPO with rollout actors, on the shared DeepSpeed/Ray Train loop.

Features (each a config key):
* prompts (``data.*``): a Parquet/JSONL file with a prompt column (chat ``messages`` or a
  string) and the reward functions' columns (``answer`` for ``math_exact_match``), e.g. the
  synthetic corpus' ``grpo.parquet``; ``data.tasks`` keeps only some ``task`` values.
* GRPO (docs/algorithms/prefix_grouper_grpo.md §3, TRL formulas; top-level keys): ``num_generations`` G, ``scale_rewards``,
  ``loss_type``, ``epsilon``/``epsilon_high``, ``beta`` (a frozen reference model is loaded
  in every trainer worker only when β > 0), ``num_iterations`` μ, ``max_completion_length``,
  ``temperature``/``top_p``, ``reward_funcs`` (``fn`` + ``weight``: built-in name or
  ``pkg.mod:callable``), ``prefix_grouping`` (shared-prefix forward: auto|on|off).
* rollout (``rollout.*``): ``num_actors`` HF-``generate`` actors of ``num_cpus``/``num_gpus``;
  ``prompts_per_step`` groups per rollout batch (divisible by ``train.num_workers x
  train.grad_accum``). Rewards run as Ray tasks or inline (``reward.mode``).
* training (``train.*``, the sft loop's keys): DeepSpeed ZeRO 0-3 workers, AdamW, schedule,
  ``max_steps`` (else ``epochs`` over the prompts), ``checkpoint_every``/resume,
  ``max_failures``; ``fault.kill_rank_at_step`` for tests.

Layout (docs/algorithms/prefix_grouper_grpo.md §4): synchronous and on-policy. Rank 0 of the Ray Train loop is the controller
(:class:`~effsft.grpo.source.GRPOSource`, the loop's step source): each rollout batch it asks the actors for G
samples per prompt (token ids), scores them, computes advantages over the whole batch and
scatters whole groups to the ranks; each rank computes old (μ > 1) and reference (β > 0)
log-probs, then runs μ optimizer steps of :class:`~effsft.grpo.controller.GRPOLoss`. After
every optimizer step rank 0 gathers the full weights, ``ray.put``s them once and waits until
every actor has loaded them.

Why the groups travel through a ``torch.distributed`` scatter rather than as object refs:
an ``ObjectRef`` pickled outside Ray's own serializer is pinned for the worker's lifetime (a
leak per step); the token ids of a batch are small.

Output: ``model/`` (HF directory), ``metrics.jsonl``, ``reward.png``, ``loss.png``,
``report.md``, ``manifest.json`` (incl. the trainer's and every actor's weight checksum),
``_SUCCESS``.
"""

from __future__ import annotations

import math
import shutil
from pathlib import Path

from effsft.config import ConfigError, to_dict
from effsft.grpo.config import GRPOConfig
from effsft.grpo.prompts import read_prompts
from effsft.grpo.report import train_tokens_per_s, write_grpo_report
from effsft.grpo.source import GRPOSource
from effsft.runtime import OutputDir, init_ray, timed, worker_path


# ---- config: what pydantic cannot check -----------------------------------------------------

def check_rewards(cfg: GRPOConfig) -> None:
    """Resolve every reward function before any work (a bad import path is a config error)."""
    from effsft.grpo.rewards import load_reward_fn

    for i, f in enumerate(cfg.reward_funcs):
        try:
            load_reward_fn(f.fn, cfg.answer.rule())
        except ValueError as e:
            raise ConfigError(f"reward_funcs.{i}.fn: {e}") from None


# ---- plan: steps and the forward ------------------------------------------------------------

def total_steps(cfg: GRPOConfig, n_prompts: int) -> int:
    """``train.max_steps``, else ``epochs`` passes over the prompts (μ steps per rollout batch)."""
    if cfg.train.max_steps:
        return cfg.train.max_steps
    return max(1, math.ceil(cfg.train.epochs * n_prompts / cfg.rollout.prompts_per_step)) * cfg.num_iterations


def use_grouping(cfg: GRPOConfig) -> bool:
    """``auto``: the shared-prefix forward on the eager/sdpa backends (exact and tested there)."""
    if cfg.prefix_grouping != "auto":
        return cfg.prefix_grouping == "on"
    return (cfg.model.attn_implementation or "sdpa") in ("sdpa", "eager")


# ---- run: actors, the loop, then the outputs (report, manifest, commit) ---------------------

def start_actors(cfg: GRPOConfig) -> list:
    import ray

    from effsft.grpo.rollout import RolloutWorker

    r, m = cfg.rollout, cfg.model
    Actor = ray.remote(num_cpus=r.num_cpus, num_gpus=r.num_gpus)(RolloutWorker)
    return [Actor.remote(worker_path(m.path), m.dtype, "cuda" if r.num_gpus > 0 else "cpu", m.trust_remote_code,
                         m.attn_implementation, r.num_threads) for _ in range(r.num_actors)]


def _loop_spec(cfg: GRPOConfig, steps: int, work: Path, source: GRPOSource):
    from effsft.grpo.controller import GRPOLoss
    from effsft.train.loop import LoopSpec

    tr = cfg.train
    groups = cfg.rollout.prompts_per_step // (tr.num_workers * tr.grad_accum)
    # DeepSpeed only records it; a GRPO micro-batch is `groups` whole groups of G completions.
    tr = tr.model_copy(update={"micro_batch_size": groups * cfg.num_generations})
    loss = GRPOLoss(cfg.loss_type, cfg.epsilon, cfg.eps_high, cfg.beta, cfg.max_completion_length,
                    cfg.temperature, source.grouped)
    return LoopSpec.for_job(cfg, loss, steps, work, train=tr, step_source=source)


def run_grpo(cfg: GRPOConfig) -> dict:
    """Set up actors and the controller, fit, write manifest + report, commit the output."""
    import ray

    from effsft.models.loading import describe_model
    from effsft.report.manifest import fingerprint, write_manifest
    from effsft.train.loop import METRICS_FILE, read_metrics
    from effsft.train.trainer import fit

    check_rewards(cfg)
    out = OutputDir(cfg.output, overwrite=cfg.overwrite)
    work = out.open()
    init_ray()
    timings: dict = {}
    with timed(timings, "prompts"):
        prompts, counts = read_prompts(cfg, work / "rejects.parquet")
    steps = total_steps(cfg, counts["prompts_ok"])
    actors = start_actors(cfg)
    try:
        source = GRPOSource(actors, prompts, cfg, use_grouping(cfg), str(work))
        with timed(timings, "train"):
            summary = fit(_loop_spec(cfg, steps, work, source), None, work / "checkpoints", name="train")
        rollout_sums = ray.get([a.weights_checksum.remote() for a in actors])
        versions = ray.get([a.get_version.remote() for a in actors])
    finally:
        for a in actors:
            ray.kill(a)
    rows = read_metrics(work / METRICS_FILE)
    for r in rows:
        r["train_tokens_per_s"] = train_tokens_per_s(r)
    sync = {"trainer_checksum": summary.get("weights_checksum"), "actors_in_sync":
            all(s == summary.get("weights_checksum") for s in rollout_sums), "actor_versions": versions}
    write_grpo_report(cfg, work, rows, counts, summary, sync)
    inputs = {"model": describe_model(cfg.model),
              "data": {"path": cfg.data.path, "fingerprint": fingerprint(cfg.data.path)}}
    rewards = [r.get("reward_mean") for r in rows]
    errs = sum(int(r.get("reward_errors", 0)) for r in rows)
    if errs:
        counts["reward_errors"] = errs
    metrics = {**summary, "first_reward": rewards[0] if rewards else None,
               "last_reward": rewards[-1] if rewards else None, "rollout_checksums": rollout_sums,
               **{k: v for k, v in sync.items() if k != "trainer_checksum"}}
    write_manifest(work, "grpo", to_dict(cfg), inputs=inputs, counts={**counts, "steps": steps},
                   metrics=metrics, timings=timings)
    shutil.rmtree(work / "checkpoints", ignore_errors=True)
    out.commit()
    return {"output": str(out.final), "steps": summary.get("steps"), "final_loss": summary.get("final_loss"),
            "first_reward": metrics["first_reward"], "last_reward": metrics["last_reward"],
            "actors_in_sync": sync["actors_in_sync"]}
