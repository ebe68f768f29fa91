"""GRPO learning check: mean exact-match reward per step of ``effsft grpo`` starting from a
tiny model that was first SFT'd (``effsft sft``) on the synthetic corpus, so that the reward
is not always 0. Everything goes through the real jobs (synth -> tiny-model -> sft -> grpo) on
an embedded local Ray.

    PYTHONPATH=$PWD python benchmarks/bench_grpo_learning.py --grpo-steps 30 --out /tmp/grpo-bench

Prints and writes ``<out>/grpo_learning.json`` (reward curve, first/last-5 means) and the grpo
run's own ``report.md`` / ``reward.png``. The tiny model cannot do 4-digit arithmetic after a
short SFT; the ``count`` task (small integer answers) gives a non-zero starting reward, so the
default prompt mix is ``count`` + ``arith`` (per-task rewards are in the metrics log only as
the total: run with ``--tasks arith`` to see arithmetic alone).
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import common


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="/tmp/effsft-grpo-bench")
    ap.add_argument("--rows", type=int, default=4000)
    ap.add_argument("--tasks", default="count,arith")
    ap.add_argument("--size", default="tiny")
    ap.add_argument("--sft-steps", type=int, default=300)
    ap.add_argument("--grpo-steps", type=int, default=30)
    ap.add_argument("--G", type=int, default=8)
    ap.add_argument("--prompts-per-step", type=int, default=8)
    ap.add_argument("--max-completion-length", type=int, default=40)
    ap.add_argument("--lr", type=float, default=2e-4)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    from effsft.config import build_config
    from effsft.grpo.config import GRPOConfig
    from effsft.grpo.recipe import run_grpo
    from effsft.runtime import init_ray
    from effsft.sft.recipe import SFTConfig, run_sft
    from effsft.train.loop import read_metrics

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tasks = args.tasks.split(",")
    t0 = time.perf_counter()
    corpus = common.synth_corpus(out / "corpus", clean=True, rows=args.rows, eval_rows=16, grpo_rows=256,
                                 length_spread=0, task_mix={t: 1.0 for t in tasks}, seed=args.seed)
    model = common.tiny_model(out / "tiny", corpus, size=args.size, seed=args.seed)
    init_ray()
    sft_out = out / "sft"
    if not (sft_out / "_SUCCESS").exists():
        run_sft(build_config(SFTConfig, {
            "model": {"path": str(model)}, "data": {"path": str(corpus / "train")}, "output": str(sft_out),
            "tokenize": {"max_len": 128}, "overwrite": True,
            "train": {"num_workers": 1, "zero_stage": 0, "micro_batch_size": 16, "lr": 3e-3,
                      "warmup_steps": 10, "schedule": "cosine", "min_lr_ratio": 0.1,
                      "max_steps": args.sft_steps, "checkpoint_every": 0, "seed": args.seed}}))
    t_sft = time.perf_counter() - t0
    grpo_out = out / "grpo"
    res = run_grpo(build_config(GRPOConfig, {
        "model": {"path": str(sft_out / "model")},
        "data": {"path": str(corpus / "grpo.parquet"), "tasks": tasks},
        "output": str(grpo_out), "overwrite": True,
        "num_generations": args.G, "max_completion_length": args.max_completion_length,
        "loss_type": "dapo", "scale_rewards": "group", "beta": 0.0, "temperature": 1.0,
        "reward_funcs": [{"fn": "math_exact_match", "weight": 1.0}],
        "reward": {"mode": "inline"},
        "rollout": {"num_actors": 2, "num_cpus": 0.5, "num_threads": 1,
                    "prompts_per_step": args.prompts_per_step},
        "train": {"num_workers": 2, "cpus_per_worker": 0.5, "zero_stage": 2, "lr": args.lr,
                  "schedule": "constant", "max_steps": args.grpo_steps, "checkpoint_every": 0,
                  "betas": [0.9, 0.99], "seed": args.seed}}))
    rows = read_metrics(grpo_out / "metrics.jsonl")
    curve = [r["reward_mean"] for r in rows]
    k = min(5, len(curve))
    summary = {
        "command": "PYTHONPATH=$PWD python benchmarks/bench_grpo_learning.py " + " ".join(
            f"--{a.replace('_', '-')} {v}" for a, v in vars(args).items()),
        "tasks": tasks, "steps": len(rows), "reward_curve": curve,
        "first5_mean": sum(curve[:k]) / k, "last5_mean": sum(curve[-k:]) / k,
        "frac_zero_adv_groups": [r["frac_zero_adv_groups"] for r in rows],
        "completion_len_mean": [r["completion_len_mean"] for r in rows],
        "rollout_tokens_per_s_median": sorted(r["rollout_tokens_per_s"] for r in rows)[len(rows) // 2],
        "step_s_median": sorted(r["step_s"] for r in rows)[len(rows) // 2],
        "actors_in_sync": res["actors_in_sync"], "sft_wall_s": round(t_sft, 1),
        "total_wall_s": round(time.perf_counter() - t0, 1)}
    common.write_json(out / "grpo_learning.json", summary, indent=2)
    print(json.dumps({k: v for k, v in summary.items() if k not in ("frac_zero_adv_groups",)}, indent=2))


if __name__ == "__main__":
    main()
