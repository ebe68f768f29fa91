"""``effsft demo``: the pipeline end to end on an embedded local Ray with a tiny model.

Stages chain through their output directories (each atomic, each skipped when already
complete, so an interrupted demo resumes):
synth -> tiny-model -> prepare -> select (k-means + length) -> sft (DeepSpeed, 2 Ray Train
workers, Q-Tuning) -> grpo (a few steps, Prefix Grouper forward) -> prune (DLP + Wanda, 50%)
-> eval (base, fine-tuned and pruned model).
"""
from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Callable, Literal

from pydantic import Field

from effsft.config import Strict, build_config

log = logging.getLogger("effsft.demo")


class DemoConfig(Strict):
    output: str = "runs/demo"
    rows: int = Field(4000, gt=100)
    eval_rows: int = Field(100, gt=0)
    sft_steps: int = Field(60, gt=0)
    grpo_steps: int = Field(5, gt=0)
    family: Literal["llama", "qwen2"] = "llama"
    seed: int = 0


def _compact(res: dict) -> dict:
    """Scalars, and the scalar entries of nested dicts (e.g. accuracy, ppl), for the summary."""
    out = {}
    for k, v in res.items():
        if isinstance(v, dict):
            out.update({f"{k}.{kk}": vv for kk, vv in v.items() if isinstance(vv, (int, float, str))})
        elif isinstance(v, (int, float, str)):
            out[k] = v
    return out


def _stage(name: str, out: Path, cfg_cls, run: Callable, data: dict, summary: dict) -> Path:
    target = Path(data["output"])
    t0 = time.perf_counter()
    if (target / "_SUCCESS").exists():
        log.info("demo: %s already done, reusing %s", name, target)
        summary[name] = {"output": str(target), "reused": True}
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


def run_demo(cfg: DemoConfig) -> dict:
    from effsft.corpus.jobs import PrepareConfig, SynthConfig, run_prepare, run_synth
    from effsft.eval.recipe import EvalConfig, run_eval
    from effsft.models.jobs import TinyModelConfig, run_tiny_model
    from effsft.grpo.recipe import GRPOConfig, run_grpo
    from effsft.prune.recipe import PruneConfig, demo_config, run_prune
    from effsft.select.recipe import SelectConfig, run_select
    from effsft.sft.recipe import SFTConfig, run_sft

    out = Path(cfg.output)
    out.mkdir(parents=True, exist_ok=True)
    s: dict = {}
    corpus = _stage("synth", out, SynthConfig, run_synth, {
        "output": str(out / "corpus"), "rows": cfg.rows, "garbage": 0.01, "seed": cfg.seed,
        "eval_rows": cfg.eval_rows, "grpo_rows": cfg.eval_rows, "progress": False}, s)
    model = _stage("tiny_model", out, TinyModelConfig, run_tiny_model, {
        "output": str(out / "model"), "family": cfg.family, "corpus": str(corpus),
        "seed": cfg.seed}, s)
    prepared = _stage("prepare", out, PrepareConfig, run_prepare, {
        "input": {"path": str(corpus / "train")}, "output": str(out / "prepared")}, s)
    selected = _stage("select", out, SelectConfig, run_select, {
        "input": {"path": str(prepared / "data")}, "output": str(out / "selected"),
        "method": "km_length", "budget": 0.5, "seed": cfg.seed, "model": {"path": str(model)},
        "cache_dir": str(out / "cache"), "kmeans": {"k": 8}}, s)
    sft = _stage("sft", out, SFTConfig, run_sft, {
        "model": {"path": str(model)}, "data": {"path": str(selected / "selected.parquet")},
        "output": str(out / "sft"), "tokenize": {"max_len": 256},
        "train": {"num_workers": 2, "zero_stage": 2, "micro_batch_size": 8, "lr": 2e-3,
                  "warmup_steps": 5, "max_steps": cfg.sft_steps, "checkpoint_every": 20, "seed": cfg.seed},
        "qtuning": {"method": "qtuning", "sample_ratio": 0.5, "token_ratio": 0.5, "plot_every": 20}}, s)
    _stage("grpo", out, GRPOConfig, run_grpo, {
        "model": {"path": str(sft / "model")},
        "data": {"path": str(corpus / "grpo.parquet"), "tasks": ["count", "arith"], "limit": 64},
        "output": str(out / "grpo"), "num_generations": 4, "max_completion_length": 24,
        "reward_funcs": [{"fn": "math_exact_match", "weight": 1.0},
                         {"fn": "effsft.grpo.shaping:answer_format", "weight": 0.2}],
        "reward": {"mode": "inline"},
        "rollout": {"num_actors": 1, "num_cpus": 0.5, "num_threads": 1, "prompts_per_step": 2},
        "train": {"num_workers": 1, "cpus_per_worker": 0.5, "zero_stage": 0, "lr": 1e-4,
                  "schedule": "constant", "max_steps": cfg.grpo_steps, "checkpoint_every": 0}}, s)
    pruned = _stage("prune", out, PruneConfig, run_prune,
                    demo_config(sft / "model", prepared / "data", out / "prune", sparsity=0.5), s)
    for name, m in (("eval_base", model), ("eval_sft", sft / "model"), ("eval_pruned", pruned / "model")):
        _stage(name, out, EvalConfig, run_eval, {
            "model": {"path": str(m)}, "output": str(out / name),
            "data": {"path": str(corpus / "eval.parquet")}, "eval_split": str(corpus / "eval.parquet"),
            "limit": cfg.eval_rows, "max_new_tokens": 32}, s)
    (out / "demo_summary.json").write_text(json.dumps(s, indent=2, default=str))
    return s
