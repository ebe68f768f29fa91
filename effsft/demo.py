"""``effsft demo``: the pipeline end to end on an embedded local Ray.

Stages chain through their output directories (each atomic, each skipped when already
complete, so an interrupted demo resumes):
synth -> tiny-model -> prepare -> select (k-means + length) -> sft (DeepSpeed, Q-Tuning) ->
grpo (a few steps, Prefix Grouper forward) -> prune (DLP + Wanda, 50%) -> eval (base,
fine-tuned and pruned model).

With ``model`` (a real pretrained HF directory, e.g. ``make real-model``'s SmolLM2) the
tiny-model stage is skipped and the training stages use settings for a real model (1 worker,
lr 1e-4); ``make demo-real`` runs it on tasks SmolLM2-135M learns within minutes on 2 cores.
Every eval scores exact match under the corpus' ``Answer:`` rule and, fairly for a chat model
that never writes ``Answer:``, under ``last_number`` and a last-JSON-object regex too.
"""
from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Callable, Literal, Optional

from pydantic import Field

from effsft.config import ExistingPath, Strict, build_config

log = logging.getLogger("effsft.demo")


class DemoConfig(Strict):
    output: str = "runs/demo"
    rows: int = Field(4000, gt=100)
    eval_rows: int = Field(100, gt=0)
    sft_steps: int = Field(60, gt=0)
    grpo_steps: int = Field(5, gt=0)
    family: Literal["llama", "qwen2"] = "llama"
    model: Optional[ExistingPath] = None   # a real HF model directory instead of the tiny model
    task_mix: Optional[dict[str, float]] = None   # synth task weights (default: every task)
    seed: int = 0


# Fair answer rules beside the corpus' own (a chat model writes "42." or a JSON object, not "Answer:").
FAIR_RULES = [{"format": "last_number"}, {"format": "regex", "pattern": r"(\{[^{}]*\})"}]


def _training(cfg: DemoConfig) -> dict:
    """SFT / GRPO settings: the tiny model learns fast at a high lr on 2 ZeRO-2 workers; a real
    model wants lr 1e-4 and, on a small CPU machine, one worker with every core."""
    if cfg.model is None:
        return {"sft_train": {"num_workers": 2, "zero_stage": 2, "micro_batch_size": 8, "lr": 2e-3},
                "max_len": 256, "grpo_lr": 1e-4, "dtype": "auto"}
    return {"sft_train": {"num_workers": 1, "micro_batch_size": 8, "lr": 1e-4},
            "max_len": 128, "grpo_lr": 1e-5, "dtype": "float32"}


def _compact(res: dict, prefix: str = "") -> dict:
    """The scalars of a result, nested dicts flattened to dotted keys (``exact_match.accuracy``,
    ``exact_match.also.last_number.accuracy``); per-task tables and samples left out."""
    out = {}
    for k, v in res.items():
        if isinstance(v, dict) and k not in ("per_task", "samples"):
            out.update(_compact(v, f"{prefix}{k}."))
        elif isinstance(v, (int, float, str)) and not isinstance(v, bool):
            out[f"{prefix}{k}"] = v
    return out


def _stage(name: str, out: Path, cfg_cls, run: Callable, data: dict, summary: dict) -> Path:
    target = Path(data["output"])
    t0 = time.perf_counter()
    if (target / "_SUCCESS").exists():
        log.info("demo: %s already done, reusing %s", name, target)
        manifest = json.loads((target / "manifest.json").read_text())
        summary[name] = {"output": str(target), "reused": True, **_compact(manifest.get("metrics") or {})}
    else:
        from effsft.runtime import RUN

        log.info("demo: running %s", name)
        RUN.stage = name
        try:
            res = run(build_config(cfg_cls, data))
        finally:
            RUN.stage = None
        summary[name] = _compact(res)
    summary[name]["seconds"] = round(time.perf_counter() - t0, 2)
    return target


def summary_table(s: dict) -> str:
    """Markdown: exact match of the base, fine-tuned and pruned model under each answer rule,
    and the GRPO reward curve."""
    rows = [(n, s[n]) for n in ("eval_base", "eval_sft", "eval_pruned") if n in s]
    rules = sorted({k.split(".")[2] for _, r in rows for k in r if k.startswith("exact_match.also.")})
    head = "| model | EM (`Answer:`) | " + " | ".join(f"EM (`{r}`)" for r in rules) + " | ppl |"
    lines = [head, "|---" * (3 + len(rules)) + "|"]
    for name, r in rows:
        also = [r.get(f"exact_match.also.{x}.accuracy") for x in rules]
        cells = [r.get("exact_match.accuracy"), *also, r.get("perplexity.ppl")]
        lines.append(f"| {name[5:]} | " + " | ".join("" if c is None else f"{c:.3g}" for c in cells) + " |")
    curve = s.get("reward_curve") or []
    lines += ["", "GRPO mean reward per step: " + (", ".join(f"{x:.2f}" for x in curve) or "n/a")]
    return "\n".join(lines)


def _reward_curve(grpo_dir: Path) -> list:
    """Mean reward per GRPO step (from its metrics.jsonl), for the summary."""
    from effsft.train.loop import read_metrics

    return [round(r.get("reward_mean", float("nan")), 3) for r in read_metrics(grpo_dir / "metrics.jsonl")]


def run_demo(cfg: DemoConfig) -> dict:
    from effsft.corpus.jobs import PrepareConfig, SynthConfig, run_prepare, run_synth
    from effsft.eval.recipe import EvalConfig, run_eval
    from effsft.models.jobs import TinyModelConfig, run_tiny_model
    from effsft.grpo.config import GRPOConfig
    from effsft.grpo.recipe import run_grpo
    from effsft.prune.config import PruneConfig, demo_config
    from effsft.prune.recipe import run_prune
    from effsft.select.config import SelectConfig
    from effsft.select.recipe import run_select
    from effsft.sft.recipe import SFTConfig, run_sft

    out = Path(cfg.output)
    out.mkdir(parents=True, exist_ok=True)
    s: dict = {}
    t = _training(cfg)
    synth = {"output": str(out / "corpus"), "rows": cfg.rows, "garbage": 0.01, "seed": cfg.seed,
             "eval_rows": cfg.eval_rows, "grpo_rows": cfg.eval_rows, "progress": False}
    corpus = _stage("synth", out, SynthConfig, run_synth,
                    {**synth, **({"task_mix": cfg.task_mix} if cfg.task_mix else {})}, s)
    if cfg.model is None:
        model = _stage("tiny_model", out, TinyModelConfig, run_tiny_model, {
            "output": str(out / "model"), "family": cfg.family, "corpus": str(corpus),
            "seed": cfg.seed}, s)
    else:
        model = Path(cfg.model)
    prepared = _stage("prepare", out, PrepareConfig, run_prepare, {
        "input": {"path": str(corpus / "train")}, "output": str(out / "prepared")}, s)
    selected = _stage("select", out, SelectConfig, run_select, {
        "input": {"path": str(prepared / "data")}, "output": str(out / "selected"),
        "method": "km_length", "budget": 0.5, "seed": cfg.seed, "model": {"path": str(model)},
        "cache_dir": str(out / "cache"), "kmeans": {"k": 8}}, s)
    sft = _stage("sft", out, SFTConfig, run_sft, {
        "model": {"path": str(model), "dtype": t["dtype"]},
        "data": {"path": str(selected / "selected.parquet")},
        "output": str(out / "sft"), "tokenize": {"max_len": t["max_len"]},
        "train": {**t["sft_train"], "warmup_steps": 5, "max_steps": cfg.sft_steps, "checkpoint_every": 20,
                  "seed": cfg.seed},
        "qtuning": {"method": "qtuning", "sample_ratio": 0.5, "token_ratio": 0.5, "plot_every": 20}}, s)
    tasks = [k for k in ("count", "arith", "format") if not cfg.task_mix or cfg.task_mix.get(k, 0) > 0]
    _stage("grpo", out, GRPOConfig, run_grpo, {
        "model": {"path": str(sft / "model"), "dtype": t["dtype"]},
        "data": {"path": str(corpus / "grpo.parquet"), "tasks": tasks or None, "limit": 64},
        "output": str(out / "grpo"), "num_generations": 4, "max_completion_length": 24,
        "reward_funcs": [{"fn": "exact_match", "weight": 1.0},
                         {"fn": "effsft.grpo.shaping:answer_format", "weight": 0.2}],
        "reward": {"mode": "inline"},
        "rollout": {"num_actors": 1, "num_cpus": 0.5, "num_threads": 1, "prompts_per_step": 2},
        "train": {"num_workers": 1, "cpus_per_worker": 0.5, "zero_stage": 0, "lr": t["grpo_lr"],
                  "schedule": "constant", "max_steps": cfg.grpo_steps, "checkpoint_every": 0}}, s)
    pruned = _stage("prune", out, PruneConfig, run_prune,
                    demo_config(sft / "model", prepared / "data", out / "prune", sparsity=0.5), s)
    for name, m in (("eval_base", model), ("eval_sft", sft / "model"), ("eval_pruned", pruned / "model")):
        _stage(name, out, EvalConfig, run_eval, {
            "model": {"path": str(m), "dtype": t["dtype"]}, "output": str(out / name),
            "data": {"path": str(corpus / "eval.parquet")}, "eval_split": str(corpus / "eval.parquet"),
            "limit": cfg.eval_rows, "max_new_tokens": 48, "also": FAIR_RULES}, s)
    s["reward_curve"] = _reward_curve(out / "grpo")
    (out / "demo_summary.md").write_text(summary_table(s) + "\n")
    log.info("demo summary (%s):\n%s", out / "demo_summary.md", summary_table(s))
    (out / "demo_summary.json").write_text(json.dumps(s, indent=2, default=str))
    # the console already has the table: the result names where the detail is (one line each)
    return {"output": str(out), "summary": str(out / "demo_summary.md"), "detail": str(out / "demo_summary.json"),
            "stages": [k for k in s if isinstance(s[k], dict)]}
