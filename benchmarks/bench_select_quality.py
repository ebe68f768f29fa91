"""Which rows does each ``effsft select`` method pick? Noise and duplicates vs the pool and random.

    PYTHONPATH=. python benchmarks/bench_select_quality.py --rows 20000 --budget 2000
    PYTHONPATH=. python benchmarks/bench_select_quality.py --quick          # 3k rows, < 2 min

The synthetic corpus labels every row: ``meta.noisy`` (the worked steps are right but the
final ``Answer:`` line is wrong) and ``meta.dup`` (a near-duplicate of an earlier row). A tiny
Llama is first TRAINED on the clean rows (plain torch AdamW over ``encode_chat``/``collate``,
response-only loss) so that CE-based scores mean something; ``--model DIR`` uses an existing
model instead. Then every method runs through ``run_select`` with the same budget, and the
table gives per method the fraction of noisy / duplicate rows among the picks, its ratio to
the pool, and its difference to ``random`` (mean ± std over seeds 0–4).

Score methods use their default direction (descending: highest CE / PPL / entropy / IFD /
SelectIT / length first, as in the paper); ``ce (ascending)`` is added as a contrast.
"""
from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np

import common


def clean_rows(train_dir: Path) -> list[list[dict]]:
    import pyarrow.parquet as pq

    out = []
    for p in sorted(train_dir.glob("shard-*.parquet")):
        t = pq.read_table(p, columns=["messages", "meta"])
        for msgs, meta in zip(t.column("messages").to_pylist(), t.column("meta").to_pylist()):
            m = json.loads(meta or "{}")
            if msgs and not (m.get("noisy") or m.get("dup") or m.get("garbage")):
                out.append(msgs)
    return out


def eval_loss(model, batches) -> float:
    import torch

    model.eval()
    tot, n = 0.0, 0
    with torch.no_grad():
        for b in batches:
            k = int((b["labels"][:, 1:] != -100).sum())
            tot += float(model(**b).loss) * k
            n += k
    model.train()
    return tot / max(n, 1)


def train_model(model_dir: Path, corpus: Path, steps: int, batch: int, lr: float, max_len: int,
                seed: int = 0) -> dict:
    """Plain AdamW on the clean train rows (response-only labels); saves over ``model_dir``."""
    import pyarrow.parquet as pq
    import torch

    from effsft.corpus.tokenize import collate, encode_chat
    from effsft.models.loading import load_model, load_tokenizer

    torch.manual_seed(seed)
    tok = load_tokenizer(model_dir)
    model = load_model(model_dir, dtype="float32").train()
    enc = [e for e in (encode_chat(tok, m, max_len) for m in clean_rows(corpus / "train")) if not e.too_long]
    ev_msgs = pq.read_table(corpus / "eval.parquet", columns=["messages"]).column("messages").to_pylist()
    ev = [collate([encode_chat(tok, m, max_len) for m in ev_msgs[i:i + 32]], tok.pad_token_id)
          for i in range(0, min(len(ev_msgs), 128), 32)]
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01, betas=(0.9, 0.95))
    warm = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warm) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))
    rng = np.random.default_rng(seed)
    loss0 = eval_loss(model, ev)
    t0 = time.perf_counter()
    losses = []
    for step in range(steps):
        b = collate([enc[i] for i in rng.choice(len(enc), batch, replace=False)], tok.pad_token_id)
        loss = model(**b).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if (step + 1) % max(1, steps // 5) == 0:
            print(f"  step {step + 1}/{steps}: train loss {np.mean(losses[-20:]):.3f} "
                  f"({time.perf_counter() - t0:.0f}s)", flush=True)
    loss1 = eval_loss(model, ev)
    model.eval().save_pretrained(model_dir, safe_serialization=True)
    return {"steps": steps, "batch": batch, "lr": lr, "clean_rows": len(enc), "seconds": time.perf_counter() - t0,
            "eval_loss_before": loss0, "eval_loss_after": loss1}


def picked_labels(out_dir: Path) -> tuple[np.ndarray, np.ndarray]:
    import pyarrow.parquet as pq

    metas = [json.loads(m or "{}") for m in pq.read_table(out_dir / "selected.parquet",
                                                          columns=["meta"]).column("meta").to_pylist()]
    return (np.array([bool(m.get("noisy")) for m in metas]), np.array([bool(m.get("dup")) for m in metas]))


def pool_labels(train_dir: Path) -> tuple[float, float, int]:
    import pyarrow.parquet as pq

    metas = [json.loads(m or "{}") for p in sorted(train_dir.glob("shard-*.parquet"))
             for m in pq.read_table(p, columns=["meta"]).column("meta").to_pylist()]
    return (float(np.mean([bool(m.get("noisy")) for m in metas])),
            float(np.mean([bool(m.get("dup")) for m in metas])), len(metas))


def method_runs(args) -> list[tuple[str, str, dict]]:
    """(label, method, config overrides) for every run."""
    runs = [(f"random (seed {s})", "random", {"seed": s}) for s in range(5)]
    for m in ("length", "ce", "ppl", "entropy", "ifd", "selectit", "zip", "diverseevol", "kmeans",
              "km_length", "km_ce"):
        runs.append((m, m, {}))
    runs.append(("ce (ascending)", "ce", {"direction": "ascending"}))
    return runs


def main() -> None:
    common.set_env_defaults(ray=True)
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=20_000)
    ap.add_argument("--noise", type=float, default=0.2)
    ap.add_argument("--dup", type=float, default=0.1)
    ap.add_argument("--budget", type=int, default=2000)
    ap.add_argument("--model", default=None, help="existing HF model dir (skips building + training)")
    ap.add_argument("--size", default="tiny", choices=["tiny", "small", "base"])
    ap.add_argument("--train-steps", type=int, default=300)
    ap.add_argument("--train-batch", type=int, default=32)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--concurrency", type=int, default=2)
    ap.add_argument("--zip-k", default="1000,100,50", help="k1,k2,k3 for zip (window mode)")
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--quick", action="store_true", help="3k rows, budget 300, 60 training steps (< 2 min)")
    args = ap.parse_args()
    if args.quick:
        args.rows, args.budget, args.train_steps, args.zip_k = 3000, 300, 60, "300,40,20"
    with common.work_dir(args.workdir, "selbench-quality-") as work:
        measure(args, work)


def measure(args, work: Path) -> None:
    print(common.machine_line())
    t_all = time.perf_counter()
    corpus = common.make_corpus(work / f"synth-{args.rows}-{args.noise}-{args.dup}", args.rows,
                                -(-args.rows // 4), noise=args.noise, dup=args.dup)
    if args.model:
        model_dir = Path(args.model)
    else:
        model_dir = work / f"model-{args.size}-trained{args.train_steps}"
        if not (model_dir / "trained.json").exists():
            common.tiny_model(model_dir, corpus, size=args.size)
            print(f"training the {args.size} model on the clean rows ({common.load_line()})", flush=True)
            info = train_model(model_dir, corpus, args.train_steps, args.train_batch, args.lr, max_len=512)
            common.write_json(model_dir / "trained.json", info, indent=1)
        info = json.loads((model_dir / "trained.json").read_text())
        print(f"trained: {info}")

    from effsft.config import build_config
    from effsft.select.config import SelectConfig
    from effsft.select.recipe import run_select

    common.init_local_ray()
    k1, k2, k3 = (int(x) for x in args.zip_k.split(","))
    p_noisy, p_dup, n_pool = pool_labels(corpus / "train")
    res: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    secs: dict[str, float] = {}
    cache = work / "cache"  # shared: ce/ppl/entropy/km_ce reuse one scoring pass
    for label, method, extra in method_runs(args):
        data = {"input": {"path": str(corpus / "train"), "shard_rows": -(-args.rows // 4)}, "method": method,
                "budget": args.budget, "seed": 0, "model": {"path": str(model_dir)},
                "output": str(work / "out" / label.replace(" ", "_").replace("(", "").replace(")", "")),
                "cache_dir": str(cache), "scorer": {"concurrency": args.concurrency, "batch_size": 512,
                                                    "micro_batch_size": 16, "max_len": 1024},
                "zip": {"mode": "window", "workers": 2, "k1": k1, "k2": k2, "k3": k3},
                "embed": {"kind": "lexical"}, "plots": False, "overwrite": True, **extra}
        out, secs[label] = common.timed(run_select, build_config(SelectConfig, data))
        res[label] = picked_labels(Path(out["output"]))
        print(f"{label}: {secs[label]:.1f}s noisy {res[label][0].mean():.3f} dup {res[label][1].mean():.3f} "
              f"({common.load_line()})", flush=True)

    rnd = np.array([[res[f"random (seed {s})"][0].mean(), res[f"random (seed {s})"][1].mean()] for s in range(5)])
    rm, rs = rnd.mean(0), rnd.std(0, ddof=1)
    print(f"\npool: {n_pool:,} rows, noisy {p_noisy:.3f}, dup {p_dup:.3f}; budget {args.budget}; model "
          f"{model_dir.name}; total {time.perf_counter() - t_all:.0f}s; {common.load_line()}\n")
    print("| method | noisy in picks | ÷ pool | − random (pp) | dup in picks | ÷ pool | − random (pp) | seconds |")
    print("|---|---|---|---|---|---|---|---|")
    print(f"| pool | {p_noisy:.3f} | 1.00 | | {p_dup:.3f} | 1.00 | | |")
    print(f"| random (5 seeds, mean ± std) | {rm[0]:.3f} ± {rs[0]:.3f} | {rm[0] / p_noisy:.2f} | 0 | "
          f"{rm[1]:.3f} ± {rs[1]:.3f} | {rm[1] / p_dup:.2f} | 0 | "
          f"{np.mean([secs[f'random (seed {s})'] for s in range(5)]):.1f} |")
    for label, (noisy, dup) in res.items():
        if label.startswith("random"):
            continue
        n, d = noisy.mean(), dup.mean()
        print(f"| {label} | {n:.3f} | {n / p_noisy:.2f} | {100 * (n - rm[0]):+.1f} ± {100 * rs[0]:.1f} | "
              f"{d:.3f} | {d / p_dup:.2f} | {100 * (d - rm[1]):+.1f} ± {100 * rs[1]:.1f} | {secs[label]:.1f} |")


if __name__ == "__main__":
    main()
