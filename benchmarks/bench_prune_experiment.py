"""DLP experiment on a small *trained* model: the prune sweep {uniform, OWL, DLP(mean),
DLP(median)} x {Wanda, SparseGPT} x sparsity {0.5, 0.6, 0.7}, like the DLP paper's table
(perplexity, prune time, peak memory), run through the ``effsft prune`` job itself.

Stages (each cached in ``--work``; a re-run reuses finished stages):
  1. ``effsft synth``-style clean synthetic corpus (no noise / dups / garbage).
  2. A Llama from the tiny-model family (8 blocks; default hidden 128 / intermediate 344, byte-level BPE
     trained on the corpus), trained from scratch with a plain single-process AdamW loop on
     random windows of the rendered conversations (next-token loss on every token).
  3. The prune job with a ``sweep`` section: one Ray task per configuration, one comparison
     table. Calibration windows come from the train corpus; perplexity is measured on windows
     of the held-out ``eval.parquet`` (prompts never seen in training).

Usage:
    PYTHONPATH=$PWD python benchmarks/bench_prune_experiment.py --work /tmp/effsft-prune-exp
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import common  # noqa: E402
from effsft.corpus.tokenize import render  # noqa: E402
from effsft.models.tiny import build_tiny_model, build_tokenizer, corpus_texts  # noqa: E402


def token_stream(tok, corpus: Path) -> torch.Tensor:
    """All train conversations rendered with the chat template, tokenised and concatenated."""
    import pyarrow.parquet as pq

    texts = []
    for f in sorted((corpus / "train").glob("*.parquet")):
        texts += [render(tok, m) for m in pq.read_table(f, columns=["messages"]).column("messages").to_pylist()]
    ids = tok(texts, add_special_tokens=False)["input_ids"]
    return torch.tensor([t for doc in ids for t in doc], dtype=torch.long)


def train_model(work: Path, corpus: Path, args) -> Path:
    """Train the 8-block Llama and save it (HF dir); returns the directory."""
    out = work / "model"
    if (out / "model.safetensors").exists():
        return out
    tok = build_tokenizer(corpus_texts(corpus), vocab_size=512)
    model = build_tiny_model("llama", tok, seed=args.seed, size="small", num_hidden_layers=args.layers,
                             hidden_size=args.hidden, intermediate_size=args.intermediate,
                             max_position_embeddings=1024)
    stream = token_stream(tok, corpus)  # [n_tokens]
    n_params = sum(p.numel() for p in model.parameters())
    print(f"# train: {n_params / 1e6:.2f}M params, {stream.numel() / 1e6:.2f}M tokens, "
          f"{args.steps} steps x {args.batch} x {args.seqlen}", flush=True)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.01)
    g = torch.Generator().manual_seed(args.seed)
    model.train()
    t0 = time.perf_counter()
    for step in range(args.steps):
        starts = torch.randint(0, stream.numel() - args.seqlen - 1, (args.batch,), generator=g)
        x = torch.stack([stream[s : s + args.seqlen] for s in starts.tolist()])  # [B, T]
        for group in opt.param_groups:
            group["lr"] = common.warmup_cosine_lr(step, args.steps, args.lr, warmup=max(1, args.steps // 20))
        loss = model(input_ids=x, labels=x).loss  # HF shifts the labels inside
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % 10 == 0 or step == args.steps - 1:
            print(f"  step {step:4d} loss {loss.item():.4f} ppl {math.exp(loss.item()):8.2f} "
                  f"({time.perf_counter() - t0:6.1f}s)", flush=True)
    model.eval()
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    (out / "train_log.json").write_text(json.dumps({"steps": args.steps, "final_loss": loss.item(),
                                                    "seconds": time.perf_counter() - t0,
                                                    "params": n_params}))
    return out


def run_sweep(work: Path, corpus: Path, model_dir: Path, args) -> dict:
    """The prune job with a sweep section (one Ray task per configuration)."""
    from effsft.config import build_config
    from effsft.prune.config import PruneConfig
    from effsft.prune.recipe import run_prune

    data = {
        "model": {"path": str(model_dir), "dtype": "float32"},
        "output": str(work / "sweep"), "overwrite": True, "num_cpus": 1,
        "prune": {"alpha": args.alpha, "batch_size": 16,
                  "calib": {"data": {"path": str(corpus / "train")}, "n_samples": args.n_calib,
                            "seqlen": args.seqlen, "seed": args.seed, "max_docs": 5000},
                  "eval": {"data": {"path": str(corpus / "eval.parquet")}, "n_windows": args.eval_windows,
                           "max_docs": 1000}},
        "sweep": {"sparsity": args.sparsities, "method": ["uniform", "owl", "dlp"], "stat": ["mean", "median"],
                  "criterion": ["wanda", "sparsegpt"], "max_parallel": args.parallel},
    }
    return run_prune(build_config(PruneConfig, data))


def paper_table(sweep_dir: Path) -> str:
    """Rows criterion x method, columns sparsity: perplexity, like the DLP README table."""
    res = json.loads((sweep_dir / "comparison.json").read_text())
    rows = res["rows"]
    sps = sorted({r["sparsity"] for r in rows})
    methods = ["uniform", "owl", "dlp-mean", "dlp-median"]
    lines = [f"dense perplexity: {res['ppl_dense']:.3f}", "",
             "| criterion | method | " + " | ".join(f"ppl @ {s:.0%}" for s in sps) + " | prune s (mean) | peak RSS MiB (max) |",
             "|---|---|" + "---|" * (len(sps) + 2)]
    for crit in ("wanda", "sparsegpt"):
        for m in methods:
            sel = [r for r in rows if r["criterion"] == crit and
                   (r["method"] if r["stat"] == "-" else f"{r['method']}-{r['stat']}") == m]
            if not sel:
                continue
            by_s = {r["sparsity"]: r for r in sel}
            cells = [f"{by_s[s]['ppl']:.3f}" if s in by_s else "" for s in sps]
            t = sum(r["prune_s"] for r in sel) / len(sel)
            mem = max(r["peak_host_mib"] for r in sel)
            lines.append(f"| {crit} | {m} | " + " | ".join(cells) + f" | {t:.2f} | {mem:.0f} |")
    return "\n".join(lines)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", default="/tmp/effsft-prune-exp")
    p.add_argument("--rows", type=int, default=20_000)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--intermediate", type=int, default=344)
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seqlen", type=int, default=128)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--train-only", action="store_true")
    p.add_argument("--sparsities", type=float, nargs="+", default=[0.5, 0.6, 0.7])
    p.add_argument("--alpha", type=float, default=0.15)
    p.add_argument("--n-calib", type=int, default=64)
    p.add_argument("--eval-windows", type=int, default=64)
    p.add_argument("--parallel", type=int, default=2, help="prune tasks in flight")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    random.seed(args.seed)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    corpus = common.synth_corpus(work / "corpus", clean=True, rows=args.rows, eval_rows=1000, grpo_rows=8,
                                 shard_rows=10_000, seed=args.seed)
    model_dir = train_model(work, corpus, args)
    print(f"# model: {model_dir}", flush=True)
    if args.train_only:
        return
    t0 = time.perf_counter()
    summary = run_sweep(work, corpus, model_dir, args)
    print(f"# sweep: {summary['runs']} runs in {time.perf_counter() - t0:.0f}s -> {summary['output']}")
    print(paper_table(Path(summary["output"])))


if __name__ == "__main__":
    main()
