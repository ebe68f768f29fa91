"""Does SFT through effsft teach the real model a multi-step task? (SmolLM2-135M-Instruct)

Everything runs through effsft's own CLI on an embedded local Ray, as a user would run it:
``effsft synth`` (a corpus of worked multi-step problems: multi-digit arithmetic with its
partial sums, letter counting with the letters spelled out), ``effsft eval`` of the base model,
``effsft sft`` (full fine-tuning, 1 worker), ``effsft eval`` of the result. The eval rows are
held out (no eval prompt occurs in the training rows).

Exact match is reported under the corpus' rule (the text after ``Answer:``), on which the base
model scores 0 because it never writes ``Answer:``, and, so that "before" is fair, under
``last_number`` (the last number the model writes anywhere). The SFT run's ``report.md`` and
``loss.png`` hold the loss curve; tokens/s comes from its manifest.

    PYTHONPATH=$PWD .venv/bin/python benchmarks/bench_real_sft.py --steps 60 --out runs/bench_real_sft
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import common

FAIR = [{"format": "last_number"}]


def exact_match(model: Path, split: Path, out: Path, dtype: str) -> dict:
    common.effsft_job(["eval", "--model", str(model), "--eval_split", str(split), "--max_new_tokens", "96",
                       f"model.dtype={dtype}", f"also={json.dumps(FAIR)}"], out)
    em = json.loads((out / "manifest.json").read_text())["metrics"]["exact_match"]
    return {"answer_prefix": em["accuracy"], "last_number": em["also"]["last_number"]["accuracy"],
            "per_task": em["per_task"], "per_task_last_number": em["also"]["last_number"]["per_task"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="models/smollm2-135m-instruct")
    ap.add_argument("--out", default="runs/bench_real_sft")
    ap.add_argument("--rows", type=int, default=3000)
    ap.add_argument("--eval_rows", type=int, default=60)
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--micro_batch_size", type=int, default=8)
    ap.add_argument("--max_len", type=int, default=192)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    out = Path(a.out)
    from effsft.train.loop import read_metrics

    t0 = time.perf_counter()
    corpus = common.effsft_job(["synth", "--rows", str(a.rows), "--noise", "0", "--dup", "0", "--length_spread", "0",
                                "--eval_rows", str(a.eval_rows), "--grpo_rows", "8", "--seed", str(a.seed),
                                "task_mix={arith: 1.0, count: 1.0}"], out / "corpus")
    split = corpus / "eval.parquet"
    before = exact_match(Path(a.model), split, out / "eval_base", a.dtype)
    sft = common.effsft_job(["sft", "--model", a.model, "--data", str(corpus / "train"), f"model.dtype={a.dtype}",
                             "train.num_workers=1", f"train.max_steps={a.steps}", f"train.lr={a.lr}",
                             f"train.micro_batch_size={a.micro_batch_size}", f"tokenize.max_len={a.max_len}",
                             "train.warmup_steps=5", f"train.seed={a.seed}"], out / "sft")
    after = exact_match(sft / "model", split, out / "eval_sft", a.dtype)
    m = json.loads((sft / "manifest.json").read_text())
    losses = [r["loss"] for r in read_metrics(sft / "metrics.jsonl")]
    res = {"model": a.model, "steps": a.steps, "lr": a.lr, "micro_batch_size": a.micro_batch_size,
           "before": before, "after": after, "first_loss": losses[0], "final_loss": losses[-1],
           "loss_curve": [round(x, 4) for x in losses], "tokens_per_s": m["metrics"].get("tokens_per_s"),
           "train_s": m["metrics"].get("train_s"), "wall_s": round(time.perf_counter() - t0, 1),
           "loss_png": str(sft / "loss.png"), "report": str(sft / "report.md")}
    common.write_json(out / "result.json", res, indent=2)
    print(f"exact match (Answer: rule)  before {before['answer_prefix']:.3f} -> after {after['answer_prefix']:.3f}")
    print(f"exact match (last number)   before {before['last_number']:.3f} -> after {after['last_number']:.3f}")
    print("per task (last number):      before", before["per_task_last_number"], "after", after["per_task_last_number"])
    print(f"loss {losses[0]:.3f} -> {losses[-1]:.3f} over {len(losses)} steps; "
          f"{res['tokens_per_s']:.1f} tokens/s; loss curve: {res['loss_png']}")


if __name__ == "__main__":
    main()
