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
from effsft.runtime import OutputDir, init_ray, timed, worker_path

log = logging.getLogger("effsft.grpo")


# ---- the controller: the loop's step source -------------------------------------------------

@dataclass
class PromptSet:
    """Tokenised prompts (driver side) and the columns the reward functions receive."""

    ids: list                   # N token-id lists
    texts: list                 # N prompt strings (chat-templated)
    columns: dict               # column -> N values


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


MAX_PROMPT_ROW_BYTES = 1 << 20  # a prompt row larger than this is rejected (too_large)


def _prompt_messages(value) -> list[dict]:
    """A prompt cell -> chat messages (a trailing assistant turn, e.g. the reference answer, is
    dropped). Raises ``Reject`` for a cell that is neither a string nor a list of messages."""
    from effsft.corpus.normalize import Reject

    if isinstance(value, str):
        return [{"role": "user", "content": value}]
    if not isinstance(value, list) or not all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
            for m in value):
        raise Reject("wrong_type", "the prompt is neither a string nor a list of {role, content} messages")
    return value[:-1] if value and value[-1]["role"] == "assistant" else list(value)


def read_prompts(cfg: GRPOConfig, rejects_path) -> tuple[PromptSet, dict]:
    """Read, filter and tokenise the prompts (chat template, as at eval time).

    ``data.path`` (a file or a directory of shards) goes through the corpus readers
    (JSONL/JSON/Parquet/Arrow, compressed or not); rows
    outside ``data.tasks`` are counted as filtered; beyond ``data.limit`` nothing is read; every
    other row is a prompt or a line of ``rejects_path`` with its reason (``prompts_in =
    prompts_ok + prompts_rejected``, checked).
    """
    from effsft.corpus.normalize import Reject, parse_object
    from effsft.corpus.readers import iter_raw_file, resolve_files
    from effsft.corpus.rejects import RejectsWriter
    from effsft.corpus.tokenize import encode_prompt, render
    from effsft.models.loading import load_tokenizer

    d = cfg.data
    tok = load_tokenizer(cfg.model.path, trust_remote_code=cfg.model.trust_remote_code,
                         template=cfg.model.template)
    ids, texts, kept, unreadable = [], [], [], []
    n_in = n_filtered = 0
    seen_column = seen_task = False
    with RejectsWriter(rejects_path) as rejects:
        def reject(f, r, why: Reject, raw=None):
            rejects.write(src_file=[f], src_row=[r], reason=[why.reason], detail=[why.detail],
                          raw=[raw])

        def raw_rows():
            for name in resolve_files(d.path):
                for block in iter_raw_file(name, d.on_unreadable):
                    yield from zip(block["raw"].to_pylist(), block["src_file"].to_pylist(),
                                   block["src_row"].to_pylist(), block["read_error"].to_pylist())

        for raw, f, r, read_error in raw_rows():
            if d.limit and n_in >= d.limit:
                break
            if read_error is not None:  # a file the reader could not read (from row r on)
                n_in += 1
                reject(f, r, Reject("unreadable_file", f"{f}: {read_error}"))
                unreadable.append({"file": f, "rows_read": r, "error": read_error})
                continue
            try:
                row = parse_object(raw, MAX_PROMPT_ROW_BYTES)
            except Reject as e:
                n_in += 1
                reject(f, r, e, raw)
                continue
            seen_task |= "task" in row
            if d.tasks is not None and row.get("task") not in d.tasks:
                n_filtered += 1
                continue
            n_in += 1
            seen_column |= d.prompt_column in row
            try:
                if row.get(d.prompt_column) is None:
                    raise Reject("missing_field", f"no {d.prompt_column!r} (data.prompt_column)")
                msgs = _prompt_messages(row[d.prompt_column])
                enc = encode_prompt(tok, msgs)
                if not enc:
                    raise Reject("empty_prompt", "the prompt has no tokens")
                if len(enc) > d.max_prompt_tokens:
                    raise Reject("too_long", f"{len(enc)} prompt tokens > data.max_prompt_tokens="
                                             f"{d.max_prompt_tokens}")
            except Reject as e:
                reject(f, r, e, raw)
                continue
            ids.append(enc)
            texts.append(render(tok, msgs, add_generation_prompt=True))
            kept.append(row)
    if d.tasks is not None and not seen_task:
        raise ConfigError(f"data.tasks: {d.path} has no 'task' column")
    if n_in and not seen_column:
        raise ConfigError(f"data.prompt_column: {d.path} has no column {d.prompt_column!r}")
    if not ids:
        raise ConfigError(f"data.path: no usable prompts in {d.path} (after tasks/limit/max_prompt_tokens; "
                          f"rejected by reason: {dict(rejects.by_reason)})")
    if n_in != len(ids) + rejects.rows:
        raise RuntimeError(f"prompts lost: {n_in} in, {len(ids)} ok, {rejects.rows} rejected")
    extra = sorted({k for row in kept for k in row} - {d.prompt_column, "id"})
    cols = {c: [row.get(c) for row in kept] for c in extra}
    counts = {"prompts_in": n_in, "prompts_ok": len(ids), "prompts_rejected": rejects.rows,
              "prompts_too_long": rejects.by_reason.get("too_long", 0),
              "prompts_filtered_by_task": n_filtered,
              "prompts_rejected_by_reason": dict(sorted(rejects.by_reason.items())),
              "unreadable_files": unreadable}
    if unreadable:
        log.warning("grpo: unreadable files in data.path (listed in rejects.parquet and the manifest): %s",
                    [u["file"] for u in unreadable])
    return PromptSet(ids, texts, cols), counts


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
