"""Tokens/s of effsft SFT (Ray Train + DeepSpeed, 1 and 2 workers) vs a plain single-process
HF + torch AdamW loop on the same model, rows, micro-batch size and max_len, in one run.

    PYTHONPATH=$PWD python benchmarks/bench_sft.py --rows 400 --steps 12 --size tiny

Throughput is steady-state: tokens (non-pad, summed over workers) / wall time of the optimizer
steps after the first (start-up, checkpoint saves and model export excluded for both sides).
Each Ray worker gets 1 torch thread (Ray sets OMP_NUM_THREADS from its fractional CPU); the
baseline is shown with 1 thread and with all threads.
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import torch

import common


def run_effsft(model: Path, data: Path, out: Path, workers: int, args) -> dict:
    from effsft.config import build_config
    from effsft.sft.recipe import SFTConfig, run_sft
    from effsft.train.loop import read_metrics

    cfg = build_config(SFTConfig, {
        "model": {"path": str(model)}, "data": {"path": str(data)}, "output": str(out),
        "tokenize": {"max_len": args.max_len},
        "train": {"num_workers": workers, "zero_stage": args.zero_stage,
                  "micro_batch_size": args.mbs, "grad_accum": 1, "lr": 1e-4,
                  "max_steps": args.steps, "checkpoint_every": 0, "schedule": "constant"}})
    t0 = time.perf_counter()
    run_sft(cfg)
    rows = read_metrics(out / "metrics.jsonl")
    return {"tokens_per_s": common.steady_state(rows)[0], "wall_s": time.perf_counter() - t0,
            "final_loss": rows[-1]["loss"]}


def run_baseline(model_dir: Path, data: Path, args, threads: int) -> dict:
    """Plain HF loop: model(**batch).loss (labels -100 on the prompt), AdamW, clip, step."""
    import pyarrow.parquet as pq
    from transformers import AutoModelForCausalLM

    from effsft.corpus.tokenize import collate, encode_chat
    from effsft.models.loading import load_tokenizer

    torch.set_num_threads(threads)
    tok = load_tokenizer(model_dir)
    msgs = [m for f in sorted(Path(data).glob("*.parquet"))
            for m in pq.read_table(f, columns=["messages"]).column("messages").to_pylist()]
    enc = [e for e in (encode_chat(tok, m, args.max_len) for m in msgs)
           if not e.too_long and e.n_response]
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    rows = []
    for step in range(args.steps):
        batch = collate(enc[step * args.mbs:(step + 1) * args.mbs], tok.pad_token_id)
        t0 = time.perf_counter()
        loss = model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        rows.append({"tokens": int(batch["attention_mask"].sum()), "step_s": time.perf_counter() - t0,
                     "loss": float(loss)})
    return {"tokens_per_s": common.steady_state(rows)[0], "final_loss": rows[-1]["loss"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", type=int, default=400)
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--mbs", type=int, default=4, help="micro-batch size per worker")
    ap.add_argument("--max-len", type=int, default=256)
    ap.add_argument("--size", default="tiny", choices=["tiny", "small", "base"])
    ap.add_argument("--zero-stage", type=int, default=2)
    ap.add_argument("--workers", default="1,2")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    from effsft.runtime import init_ray, setup_logging

    setup_logging("WARNING")
    tmp = Path(tempfile.mkdtemp(prefix="bench-sft-"))
    corpus = common.synth_corpus(tmp / "corpus", clean=True, rows=args.rows, eval_rows=8, grpo_rows=8,
                                 seed=args.seed)
    data, model = corpus / "train", common.tiny_model(tmp / "model", corpus, size=args.size, seed=args.seed)
    init_ray()
    results = {"baseline_1thread": run_baseline(model, data, args, 1),
               f"baseline_{os.cpu_count()}threads": run_baseline(model, data, args, os.cpu_count() or 1)}
    for w in [int(x) for x in args.workers.split(",")]:
        results[f"effsft_{w}worker"] = run_effsft(model, data, tmp / f"sft{w}", w, args)
    base = results["baseline_1thread"]["tokens_per_s"]
    print(f"\nbench_sft: model={args.size} rows={args.rows} steps={args.steps} mbs={args.mbs} "
          f"max_len={args.max_len} zero={args.zero_stage} cpus={os.cpu_count()}")
    print(f"{'run':<22}{'tokens/s':>12}{'x baseline(1 thr)':>20}{'final loss':>12}")
    for name, r in results.items():
        print(f"{name:<22}{r['tokens_per_s']:>12.1f}{r['tokens_per_s'] / base:>20.2f}{r['final_loss']:>12.3f}")
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
