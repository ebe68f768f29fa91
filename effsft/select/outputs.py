"""Stage 5, outputs: selected.parquet/jsonl and scores.parquet, the score statistics of the
manifest and the report's plots (score histogram, cluster sizes, PCA, ZIP trace)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from effsft.select.config import SelectConfig


def score_stats(x: np.ndarray) -> dict:
    x = np.asarray(x, np.float64)
    f = x[np.isfinite(x)]
    if not len(f):
        return {"n": int(len(x)), "nulls": int(len(x))}
    q = np.percentile(f, [1, 5, 25, 50, 75, 95, 99])
    return {"n": int(len(x)), "nulls": int(len(x) - len(f)), "min": float(f.min()), "max": float(f.max()),
            "mean": float(f.mean()), "std": float(f.std()),
            **{f"p{p}": float(v) for p, v in zip((1, 5, 25, 50, 75, 95, 99), q)}}


# ---------------------------------------------------------------------------------- stage 5
def write_outputs(work: Path, shards: list[Path], ids: np.ndarray, picks: np.ndarray, cols: dict,
                  cluster: dict | None) -> None:
    """selected.parquet (canonical rows in pick order, + pick_order and scores), selected.jsonl,
    scores.parquet (every row: scores, cluster, selected)."""
    order = np.full(len(ids), -1, np.int64)
    order[picks] = np.arange(len(picks))
    chosen = []
    start = 0
    for p in shards:
        t = pq.read_table(p)
        n = t.num_rows
        sl = order[start:start + n]
        mask = sl >= 0
        if mask.any():
            sub = t.filter(pa.array(mask)).append_column("pick_order", pa.array(sl[mask], pa.int64()))
            if "score" in cols:
                sub = sub.append_column("score", pa.array(cols["score"][start:start + n][mask], pa.float64()))
            chosen.append(sub)
        start += n
    sel = pa.concat_tables(chosen).sort_by("pick_order")
    pq.write_table(sel, work / "selected.parquet")
    with open(work / "selected.jsonl", "w") as f:
        for r in sel.select(["id", "messages", "meta", "pick_order"]).to_pylist():
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    table = {"id": pa.array(ids, pa.string()), "selected": pa.array(order >= 0),
             "pick_order": pa.array(np.where(order >= 0, order, -1), pa.int64())}
    if "status" in cols:
        table["status"] = pa.array(cols["status"].tolist(), pa.string())
    for k, v in cols.items():
        if k.startswith("score") and isinstance(v, np.ndarray) and v.ndim == 1:
            table[k] = pa.array(v, pa.float64(), mask=~np.isfinite(v))
    if cluster:
        table["cluster"] = pa.array(cluster["cluster"], pa.int64())
        table["dist"] = pa.array(cluster["dist"], pa.float32())
    pq.write_table(pa.table(table), work / "scores.parquet")


def make_plots(work: Path, cfg: SelectConfig, picks: np.ndarray, cols: dict, cluster: dict | None,
               info: dict) -> list[tuple[str, str]]:
    from effsft.report import plots

    imgs = []
    if "score" in cols:
        s = cols["score"]
        plots.histogram(work / "score_hist.png", {"pool": s, "selected": s[picks]},
                        f"{cfg.method}: score distribution", "score")
        imgs.append(("Score histogram (pool vs selected)", "score_hist.png"))
    if cluster:
        k = cluster["k"]
        sizes = np.asarray(info["cluster_sizes"])
        top = np.argsort(-sizes)[:60]
        plots.bars(work / "clusters.png", [str(c) for c in top],
                   {"rows / 100": (sizes[top] / 100.0).tolist(),
                    "selected": np.asarray(info["cluster_selected"])[top].tolist()},
                   f"k-means clusters (largest {len(top)} of {k})", "rows")
        imgs.append(("Cluster sizes vs selected", "clusters.png"))
    if "emb" in cols:
        _pca_plot(work / "pca.png", cols["emb"], picks, cfg.seed)
        imgs.append(("PCA of embeddings (≤50k rows), selected highlighted", "pca.png"))
    if "trace_size" in info:
        plots.curve(work / "zip_trace.png", info["trace_size"], {"C(S)": info["trace_ratio"]},
                    "ZIP: compression ratio of the selection", "|S|", "C(S)")
        imgs.append(("ZIP C(S) against |S|", "zip_trace.png"))
    return imgs


def _pca_plot(path: Path, emb: np.ndarray, picks: np.ndarray, seed: int) -> None:
    from effsft.report.plots import plt, save  # pyplot on the headless Agg backend

    rng = np.random.default_rng(seed)
    sel = np.zeros(len(emb), bool)
    sel[picks] = True
    idx = np.arange(len(emb)) if len(emb) <= 50_000 else np.sort(rng.choice(len(emb), 50_000, replace=False))
    x = emb[idx] - emb[idx].mean(0)
    _, _, vt = np.linalg.svd(x[: min(len(x), 20_000)], full_matrices=False)
    xy = x @ vt[:2].T
    fig, ax = plt.subplots(figsize=(6, 5))
    s = sel[idx]
    ax.scatter(xy[~s, 0], xy[~s, 1], s=2, c="#bbbbbb", label="pool")
    ax.scatter(xy[s, 0], xy[s, 1], s=4, c="#d62728", label="selected")
    ax.legend()
    ax.set_title("PCA of row embeddings")
    save(fig, path)
