"""The GRPO controller as the Ray Train loop's step source: rank 0 samples on the rollout actors, scores
and scatters whole groups; every rank adds frozen log-probs; weights go to the actors after each step."""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from effsft.grpo.config import GRPOConfig
from effsft.grpo.prompts import PromptSet

log = logging.getLogger("effsft.grpo")


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
