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
(:class:`GRPOSource`, the loop's step source): each rollout batch it asks the actors for G
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

import logging
import math
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from effsft.config import ConfigError, to_dict
from effsft.grpo.config import GRPOConfig
from effsft.grpo.prompts import PromptSet, read_prompts
from effsft.runtime import OutputDir, init_ray, timed, worker_path

log = logging.getLogger("effsft.grpo")


# ---- the controller: the loop's step source -------------------------------------------------

@dataclass
class GRPOSource:
    """Rank 0 drives rollouts; every rank gets its groups and syncs nothing but weights.

    Implements :class:`effsft.train.loop.StepSource` (picklable: the actor handles and prompts
    travel to the workers; per-worker state is built in :meth:`setup`).
    """

    actors: list
    prompts: PromptSet
    cfg: GRPOConfig
    grouped: bool
    out_dir: Optional[str] = None   # rank 0 appends reward_errors.jsonl here
    _state: dict = field(default_factory=dict, repr=False)

    # -- StepSource ---------------------------------------------------------------------------
    def setup(self, engine, tokenizer, ctx, start_step: int) -> None:
        self._state = {"tok": tokenizer, "batch": None, "metrics": {}, "checksum": None,
                       "version": start_step, "ref": self._reference_model(ctx)}
        self._sync(engine, ctx, start_step)  # actors get the trainer's (possibly restored) weights

    def micro_batches(self, step: int, ctx) -> list[dict]:
        st = self._state
        if st["batch"] is None or step % self.cfg.num_iterations == 0:
            payloads = self._rollout(step, ctx) if ctx.rank == 0 else None
            t0 = time.perf_counter()
            mine = _scatter(payloads, ctx)
            self._add_frozen_logprobs(mine, st["model"])
            if ctx.rank == 0:
                st["metrics"]["old_ref_logprobs_s"] = time.perf_counter() - t0
            st["batch"] = mine
        return st["batch"]

    def after_step(self, engine, step: int, ctx) -> dict:
        t0 = time.perf_counter()
        self._sync(engine, ctx, step)
        m, self._state["metrics"] = self._state["metrics"], {}
        return {**m, "sync_s": time.perf_counter() - t0, "weights_version": step} if ctx.rank == 0 else {}

    def summary(self) -> dict:
        return {"weights_checksum": self._state.get("checksum"),
                "weights_version": self._state.get("version"), "prefix_grouping": self.grouped}

    # -- pieces -------------------------------------------------------------------------------
    def _reference_model(self, ctx):
        if self.cfg.beta == 0:
            return None  # β = 0: no reference model at all (docs/algorithms/prefix_grouper_grpo.md §3)
        from effsft.models.loading import load_model

        m = self.cfg.model
        ref = load_model(m.path, dtype=m.dtype, device=ctx.device, trust_remote_code=m.trust_remote_code,
                         attn_implementation=m.attn_implementation)
        return ref.requires_grad_(False)

    def _sync(self, engine, ctx, version: int) -> None:
        """Full weights -> object store (once) -> every actor; a collective under ZeRO-3."""
        import ray

        from effsft.grpo.rollout import state_checksum
        from effsft.train.engine import _full_state_dict

        self._state["model"] = engine.module.model
        state = _full_state_dict(engine)  # every rank must call it (ZeRO-3 gathers)
        if ctx.rank != 0:
            return
        if state is None:
            state = engine.module.model.state_dict()
        state = {k: v.detach().to("cpu") for k, v in state.items()}
        ref = ray.put(state)
        ray.get([a.update_weights.remote(ref, version) for a in self.actors])
        self._state.update(checksum=state_checksum(state), version=version)

    def _rollout(self, step: int, ctx) -> list[list[dict]]:
        """Rank 0: sample, score, advantages; returns every rank's micro-batches."""
        import ray
        import torch

        from effsft.grpo import controller as C
        from effsft.grpo.rollout import score

        cfg, ps, tok = self.cfg, self.prompts, self._state["tok"]
        G, P = cfg.num_generations, cfg.rollout.prompts_per_step
        batch_idx = step // cfg.num_iterations
        idx = C.step_prompt_indices(batch_idx, len(ps.ids), P, cfg.train.seed)
        chunks = [c for c in _split(list(range(P)), len(self.actors)) if c]
        t0 = time.perf_counter()
        results = ray.get([a.generate.remote([ps.ids[idx[i]] for i in chunk], G, cfg.max_completion_length,
                                             cfg.temperature, cfg.top_p, cfg.train.seed + 7919 * step + k)
                           for k, (a, chunk) in enumerate(zip(self.actors, chunks))])
        rollout_s = time.perf_counter() - t0
        comps = []
        for res in results:
            flat = [row[m] for row, m in zip(res["completion_ids"], res["completion_mask"])]
            comps += [flat[j * G:(j + 1) * G] for j in range(len(flat) // G)]
        prompts = [torch.tensor(ps.ids[i], dtype=torch.long) for i in idx]
        texts = [tok.decode(c.tolist(), skip_special_tokens=True) for cs in comps for c in cs]
        cols = {k: [v[i] for i in idx for _ in range(G)] for k, v in ps.columns.items()}
        t1 = time.perf_counter()
        errors: list = []
        total, per = score([f.fn for f in cfg.reward_funcs], [f.weight for f in cfg.reward_funcs],
                           [ps.texts[i] for i in idx for _ in range(G)], texts, cols,
                           cfg.reward.mode, cfg.reward.num_cpus, cfg.answer.rule(), cfg.reward.timeout_s, errors)
        reward_s = time.perf_counter() - t1
        _log_reward_errors(self.out_dir, step, errors)
        ro = C.make_rollout(prompts, comps, total, per, G, cfg.scale_rewards)
        shards = C.shard_groups(P, ctx.world_size, ctx.grad_accum)
        n_tok = sum(r["tokens"] for r in results)
        self._state["metrics"] = {
            **C.rollout_metrics(ro, [f.fn.rsplit(":", 1)[-1] for f in cfg.reward_funcs]),
            "rollout_s": rollout_s, "reward_s": reward_s, "rollout_tokens": n_tok,
            "rollout_tokens_per_s": n_tok / rollout_s if rollout_s > 0 else math.nan,
            "rollout_version": min(r["version"] for r in results), "reward_errors": len(errors),
            "sample_completion": texts[0][:200]}
        return [C.micro_batch_payloads(ro, shards[r]) for r in range(ctx.world_size)]

    def _add_frozen_logprobs(self, micro: list[dict], engine_model) -> None:
        """Old log-probs with the current weights (μ > 1; μ = 1 uses ``s.detach()`` in the
        loss) and reference log-probs (β > 0), once per rollout batch (docs/algorithms/prefix_grouper_grpo.md §3 Updates)."""
        from effsft.grpo.controller import frozen_logprobs

        ref = self._state["ref"]
        for b in micro:
            if self.cfg.num_iterations > 1:
                b["old_logps"] = frozen_logprobs(engine_model, _on(b, engine_model), self.grouped,
                                                 self.cfg.temperature).cpu()
            if ref is not None:
                b["ref_logps"] = frozen_logprobs(ref, _on(b, ref), self.grouped, self.cfg.temperature).cpu()


def _log_reward_errors(out_dir: str | None, step: int, errors: list) -> None:
    """One line per failed reward call in ``<out>/reward_errors.jsonl`` (rank 0), and a warning."""
    import json

    for fn, err in errors:
        log.warning("step %d: reward function %s failed (scored 0 for the batch): %s", step + 1, fn, err)
        if out_dir:
            with open(Path(out_dir) / "reward_errors.jsonl", "a") as f:
                f.write(json.dumps({"step": step + 1, "fn": fn, "error": err}) + "\n")


def _on(batch: dict, model) -> dict:
    """The batch's token tensors on the model's device."""
    dev = next(model.parameters()).device
    return {"prompts": [p.to(dev) for p in batch["prompts"]],
            "completions": [[c.to(dev) for c in cs] for cs in batch["completions"]]}


def _split(items: list, n: int) -> list[list]:
    k, r = divmod(len(items), n)
    out, s = [], 0
    for i in range(n):
        e = s + k + (i < r)
        out.append(items[s:e])
        s = e
    return out


def _scatter(payloads: list | None, ctx) -> list[dict]:
    """Rank 0's per-rank payloads -> this rank's (a ``torch.distributed`` object scatter)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or ctx.world_size == 1:
        return payloads[0]
    out = [None]
    dist.scatter_object_list(out, payloads if ctx.rank == 0 else None, src=0)
    return out[0]


# ---- driver-side stages ---------------------------------------------------------------------

def check_rewards(cfg: GRPOConfig) -> None:
    """Resolve every reward function before any work (a bad import path is a config error)."""
    from effsft.grpo.rewards import load_reward_fn

    for i, f in enumerate(cfg.reward_funcs):
        try:
            load_reward_fn(f.fn, cfg.answer.rule())
        except ValueError as e:
            raise ConfigError(f"reward_funcs.{i}.fn: {e}") from None


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


def _train_tokens_per_s(r: dict) -> float:
    """Tokens through the update passes per second of update time (rollout, rewards, shipping,
    old/ref forwards and weight sync excluded)."""
    dt = r["step_s"] - r.get("data_s", 0.0) - r.get("sync_s", 0.0)
    return r["tokens"] / dt if dt > 0 else math.nan


def _report(cfg: GRPOConfig, work: Path, rows: list[dict], counts: dict, summary: dict, sync: dict) -> None:
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
        r["train_tokens_per_s"] = _train_tokens_per_s(r)
    sync = {"trainer_checksum": summary.get("weights_checksum"), "actors_in_sync":
            all(s == summary.get("weights_checksum") for s in rollout_sums), "actor_versions": versions}
    _report(cfg, work, rows, counts, summary, sync)
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
