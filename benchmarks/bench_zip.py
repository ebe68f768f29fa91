"""ZIP exact vs window (ZIP-lite): time, and how well the window scores agree.

    PYTHONPATH=. python benchmarks/bench_zip.py --rows 3000 --budget 300 --k1 1000 --k2 50 --k3 25

Prints, for a synthetic corpus with templated / duplicated rows:
* wall time of the full selection in each mode and the overlap of the two selections;
* for step 2 against the exact-mode S at the end: Spearman of window vs exact C(S ⊕ x)
  over ``--sample`` candidates and the overlap of their K2 lowest (the numbers the
  manifest records as the window/exact agreement).
"""

from __future__ import annotations

import argparse

import numpy as np
from scipy.stats import spearmanr

import common
from effsft.select import zip as Z
from effsft.select.ranking import random_rank

TOPICS = ["python code", "sorting lists", "cooking pasta", "river ecology", "tax law", "music theory",
          "linear algebra", "poetry", "travel tips", "biology of cells"]


def synth_rows(n: int, seed: int) -> list[list[dict]]:
    rng = np.random.default_rng(seed)
    vocab = [f"w{i}" for i in range(3000)]
    rows = []
    for i in range(n):
        topic = TOPICS[rng.integers(len(TOPICS))]
        if rng.random() < 0.1 and rows:
            rows.append(rows[int(rng.integers(len(rows)))])  # near-duplicate pool
            continue
        body = " ".join(rng.choice(vocab, int(rng.integers(20, 400))))
        rep = " ".join([f"Step {j}: about {topic}." for j in range(int(rng.integers(1, 20)))])
        rows.append([{"role": "user", "content": f"Tell me about {topic} #{i}"},
                     {"role": "assistant", "content": f"{rep} {body}"}])
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=3000)
    ap.add_argument("--budget", type=int, default=300)
    ap.add_argument("--k1", type=int, default=1000)
    ap.add_argument("--k2", type=int, default=50)
    ap.add_argument("--k3", type=int, default=25)
    ap.add_argument("--sample", type=int, default=1000)
    ap.add_argument("--workers", type=int, default=1, help=">1: ProcessMap for steps 2 and 4")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    msgs = synth_rows(args.rows, args.seed)
    rows = Z.serialize_rows(msgs, "reference")
    ranks = random_rank([f"row{i}" for i in range(len(rows))], args.seed)
    fmt = Z.ser_format("reference")
    g, t_g = common.timed(Z.g_scores, rows, fmt)
    print(f"rows {len(rows)}, mean size {np.mean([len(r) for r in rows]):.0f} B, g in {t_g:.2f}s")

    pmap = Z.ProcessMap(args.workers) if args.workers > 1 else None
    results = {}
    for mode in ("exact", "window"):
        res, t_sel = common.timed(Z.zip_select, rows, args.budget, ranks, k1=args.k1, k2=args.k2, k3=args.k3,
                                  mode=mode, g=g, map_fn=pmap or Z.serial_map)
        results[mode] = res
        print(f"{mode:6s}: {t_sel:8.2f}s  final C(S) {res.trace_ratio[-1]:.3f}")
    if pmap:
        pmap.close()
    a, b = set(results["exact"].picked.tolist()), set(results["window"].picked.tolist())
    print(f"selection overlap |exact ∩ window| / B = {len(a & b) / args.budget:.3f}")

    S = Z._Stream(fmt)
    for i in results["exact"].picked:
        S.add(rows[i])
    rest = np.setdiff1d(np.arange(len(rows)), results["exact"].picked)
    cand = np.random.default_rng(args.seed).choice(rest, min(args.sample, len(rest)), replace=False)
    cands = [rows[i] for i in cand]
    ex, t_ex = common.timed(Z.score_exact, S.task("exact", cands))
    win, t_win = common.timed(Z.score_window, S.task("window", cands))
    k2 = min(args.k2, len(cand))
    overlap = len(set(np.argsort(ex)[:k2]) & set(np.argsort(win)[:k2])) / k2
    print(f"step 2 on {len(cand)} candidates vs |ser(S)| = {len(S.body) / 1e6:.2f} MB: exact {t_ex:.2f}s, "
          f"window {t_win:.2f}s ({t_ex / t_win:.1f}x)")
    print(f"agreement: Spearman {spearmanr(ex, win).statistic:.4f}, top-K2 ({k2}) overlap {overlap:.3f}, "
          f"max rel. error {np.max(np.abs(win - ex) / ex):.4f}")


if __name__ == "__main__":
    main()
