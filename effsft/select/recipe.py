"""Recipe ``effsft select``: distributed, resumable data selection.

:func:`run_select` reads the config (``select.config``: the sections and each method's plan of
scores, embeddings and clusters), then runs the stages in order:
  1. ``prepare``   read + normalise the corpus once into fixed shards (cached by fingerprint;
                   ``select.shards``)
  2. ``score``     per-row scorers on Ray Data actor pools, persisted per shard (resumable,
                   reused by any later budget or method with the same scorer settings;
                   ``select.scoring``, LESS in ``select.less.stage``)
  3. ``cluster``   embeddings -> faiss k-means fit on a sample -> assignment map (km_* only;
                   ``select.choose``)
  4. ``choose``    the selection rule on the driver over N-length columns (``select.choose``)
  5. ``write``     selected.parquet/jsonl, scores.parquet, rejects.parquet (``select.outputs``),
                   then the manifest and report (here)

Methods: random, random_stratified, length, ce, ppl, entropy, ifd, selectit, less, zip,
diverseevol (k-center on embeddings), kmeans (= km_random), km_<score> for every score
(km_length, km_ce, km_ppl, km_entropy, km_ifd, km_selectit, km_less).
LESS runs a LoRA warm-up (one Ray task, cached) before its per-checkpoint scorer pools.
Ties are always broken by r(id) = BLAKE2b(seed‖id), never by position.
"""
from __future__ import annotations

import shutil
import time
from pathlib import Path

import numpy as np
import pyarrow as pa

from effsft.config import to_dict
from effsft.runtime import OutputDir, init_ray, timed
from effsft.select.choose import choose, cluster_rows, resolve_budget
from effsft.select.config import SelectConfig
from effsft.select.outputs import make_plots, score_stats, write_outputs
from effsft.select.scoring import aligned_columns, run_scorer, selectit_scores
from effsft.select.shards import prepare, read_ids, read_strata, read_zip_rows


def run_select(cfg: SelectConfig) -> dict:
    from effsft.corpus.prepare import shard_paths
    from effsft.select.ranking import random_rank

    out = OutputDir(cfg.output, overwrite=cfg.overwrite)
    work = out.open()
    faults = work / ".faults"  # fault-injection markers (fire once per job), removed at commit
    faults.mkdir(exist_ok=True)
    t_start = time.perf_counter()
    timings: dict = {}
    ray_desc = init_ray()
    cache = Path(cfg.cache_dir) if cfg.cache_dir else Path(cfg.output).resolve().parent / "_effsft_cache"
    cache.mkdir(parents=True, exist_ok=True)
    # 1. prepare: the canonical shards, the budget and the tie-breaking ranks r(id)
    corpus, corpus_counts, corpus_fp = prepare(cfg, cache, timings)
    shards = shard_paths(corpus)
    ids_by_shard = read_ids(shards)
    ids = np.asarray(pa.chunked_array(ids_by_shard).to_pylist(), dtype=object)
    n_ok = len(ids)
    budget = resolve_budget(cfg.budget, n_ok)
    with timed(timings, "ranks"):
        ranks = random_rank(ids, cfg.seed)
    # 2. score: the columns the method's plan needs
    cols, scoring, less_details = score_columns(cfg, cache, shards, ids_by_shard, ranks, corpus_fp, faults,
                                                timings)
    if cfg.method == "zip":
        with timed(timings, "zip_read"):
            cols["zip_rows"] = read_zip_rows(shards, cfg.zip.ser)
    # 3. cluster
    cluster = None
    if cfg.plan.clusters:
        with timed(timings, "kmeans"):
            cluster = cluster_rows(cfg, cols["emb"], ranks, budget)
    # 4. choose
    strata = read_strata(shards, cfg.stratify_by) if cfg.method == "random_stratified" else None
    with timed(timings, "choose"):
        picks, info = choose(cfg, budget, ids, ranks, cols, strata, cluster)
    if len(picks) != budget or len(set(picks.tolist())) != budget:
        raise RuntimeError(f"selection returned {len(picks)} rows ({len(set(picks.tolist()))} distinct), "
                           f"budget {budget}")
    # 5. write
    with timed(timings, "write"):
        write_outputs(work, shards, ids, picks, {k: v for k, v in cols.items() if k != "zip_rows"}, cluster)
        shutil.copyfile(corpus / "rejects.parquet", work / "rejects.parquet")
    counts = row_counts(corpus_counts, cols, budget, n_ok)
    metrics = {}
    if "score" in cols:
        metrics["score_pool"] = score_stats(cols["score"])
        metrics["score_selected"] = score_stats(cols["score"][picks])
    imgs = make_plots(work, cfg, picks, cols, cluster, info) if cfg.plots else []
    timings["total"] = round(time.perf_counter() - t_start, 3)
    details = {k: v for k, v in info.items() if k not in ("trace_size", "trace_ratio")}
    if less_details:
        details["less"] = less_details
    write_manifest_and_report(work, cfg, corpus_fp, budget, counts, metrics, timings, details, scoring,
                              ray_desc, imgs)
    shutil.rmtree(faults, ignore_errors=True)
    final = out.commit()
    return {"output": str(final), "method": cfg.method, **counts, "timings": timings}


def score_columns(cfg: SelectConfig, cache: Path, shards: list[Path], ids_by_shard: list[pa.Array],
                  ranks: np.ndarray, corpus_fp: str, faults: Path, timings: dict) -> tuple[dict, dict, dict]:
    """Stage 2: (columns in corpus order — ``score``, ``status``, ``emb`` —, run statistics per
    scorer, LESS details) for the scorers of the method's plan."""
    cols: dict = {}
    scoring: dict = {}
    less_details: dict = {}
    for score in cfg.plan.scorers:
        with timed(timings, f"score_{score}"):
            if score == "less":
                from effsft.select.less.stage import run_less_scoring  # imports torch: only for LESS

                cols["score"], cols["status"], less_details = run_less_scoring(
                    cfg, cache, shards, ids_by_shard, ranks, corpus_fp, faults, scoring)
                continue
            if score == "selectit":
                cols["score"] = selectit_scores(cfg, cache, shards, ids_by_shard, corpus_fp, faults, scoring)
                continue
            store, stats = run_scorer(cfg, cache, shards, corpus_fp, score, faults)
            scoring[store.key] = vars(stats) | {"rows_per_s": stats.rows_per_s}
            if score == "emb":
                cols["emb"] = aligned_columns(store, shards, ids_by_shard, ["emb"])["emb"]
            else:
                col = {"length": f"score_length_{cfg.length.field}", "zip_g": "score_zip_g"}.get(
                    score, f"score_{score}")
                got = aligned_columns(store, shards, ids_by_shard, [col, "status"])
                cols["score"], cols["status"] = got[col], got["status"]
    return cols, scoring, less_details


def row_counts(corpus_counts: dict, cols: dict, budget: int, n_ok: int) -> dict:
    """The manifest's row accounting: in = selected + not selected + rejected, checked."""
    eligible = int(np.isfinite(cols["score"]).sum()) if "score" in cols else n_ok
    counts = {
        "rows_in": corpus_counts["rows_in"], "rows_rejected": corpus_counts["rows_rejected"],
        "rows_selected": budget, "rows_not_selected": n_ok - budget,
        "rows_not_selected_eligible": eligible - budget if eligible >= budget else 0,
        "rows_not_selected_ineligible": n_ok - eligible,
        "rejected_by_reason": corpus_counts["rejected_by_reason"],
        "unreadable_files": corpus_counts.get("unreadable_files", []),
    }
    if counts["rows_in"] != counts["rows_selected"] + counts["rows_not_selected"] + counts["rows_rejected"]:
        raise RuntimeError(f"accounting: {counts}")
    if "status" in cols:
        vals, cnt = np.unique(cols["status"].astype(str), return_counts=True)
        counts["status"] = dict(zip(vals.tolist(), cnt.tolist()))
    return counts


def write_manifest_and_report(work: Path, cfg: SelectConfig, corpus_fp: str, budget: int, counts: dict,
                              metrics: dict, timings: dict, details: dict, scoring: dict, ray_desc: dict,
                              imgs: list[tuple[str, str]]) -> None:
    from effsft.models.loading import describe_model
    from effsft.report.manifest import write_manifest
    from effsft.report.plots import md_table, write_report

    write_manifest(work, "select", to_dict(cfg), inputs={"corpus": {"path": cfg.input.path,
                   "fingerprint": corpus_fp}, "model": describe_model(cfg.model) if cfg.model else None},
                   counts=counts, metrics=metrics, timings=timings,
                   extra={"method": cfg.method, "seed": cfg.seed, "budget": budget,
                          "method_details": details, "scoring": scoring,
                          "ray": {"mode": ray_desc["mode"]}})
    sections = [("Summary", md_table([{"method": cfg.method, "budget": budget, "rows_in": counts["rows_in"],
                                       "rejected": counts["rows_rejected"], "selected": budget,
                                       "seconds": timings["total"]}])),
                ("Scoring", md_table([{"scorer": k, **{kk: (round(vv, 2) if isinstance(vv, float) else vv)
                                                      for kk, vv in v.items() if kk != "extra"}}
                                      for k, v in scoring.items()]) if scoring else "(no model scorer)")]
    if metrics:
        sections.append(("Score statistics", md_table([{"set": "pool", **metrics["score_pool"]},
                                                        {"set": "selected", **metrics["score_selected"]}])))
    write_report(work / "report.md", f"effsft select: {cfg.method}", sections, imgs)
