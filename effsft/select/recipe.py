"""Recipe ``effsft select``: distributed, resumable data selection.

Stages (each a function below):
  1. ``prepare``   read + normalise the corpus once into fixed shards (cached by fingerprint)
  2. ``score``     per-row scorers on Ray Data actor pools, persisted per shard (resumable,
                   reused by any later budget or method with the same scorer settings)
  3. ``cluster``   embeddings -> faiss k-means fit on a sample -> assignment map (km_* only)
  4. ``choose``    the selection rule on the driver over N-length columns
  5. ``write``     selected.parquet/jsonl, scores.parquet, rejects.parquet, manifest, report

Methods: random, random_stratified, length, ce, ppl, entropy, ifd, selectit, less, zip,
diverseevol (k-center on embeddings), kmeans (= km_random), km_<score> for every score
(km_length, km_ce, km_ppl, km_entropy, km_ifd, km_selectit, km_less).
LESS runs a LoRA warm-up (one Ray task, cached) before its per-checkpoint scorer pools.
Ties are always broken by r(id) = BLAKE2b(seed‖id), never by position.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Literal, Optional

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from pydantic import Field, model_validator

from effsft.config import ConfigError, CorpusSpec, ModelSpec, OutputPath, Strict, to_dict
from effsft.runtime import OutputDir, init_ray, timed

log = logging.getLogger("effsft.select")

SCORES = ("length", "ce", "ppl", "entropy", "ifd", "selectit", "less")
METHODS = ("random", "random_stratified", "zip", "diverseevol", "kmeans") + SCORES + tuple(
    f"km_{s}" for s in SCORES)
# Default ranking direction per score (written into the manifest).
DESCENDING = {"length": True, "ce": True, "ppl": True, "entropy": True, "ifd": True, "selectit": True,
               "less": True}
LM_SCORES = ("ce", "ppl", "entropy", "ifd", "selectit")


class ScorerSection(Strict):
    concurrency: int = Field(1, ge=1)       # actors per scorer pool
    num_cpus: float = Field(0.5, gt=0)      # per actor (fractional: see ray_notes.md)
    num_gpus: float = Field(0.0, ge=0)
    batch_size: int = Field(256, gt=0)      # rows per actor call
    micro_batch_size: int = Field(8, gt=0)  # rows per forward (length-sorted inside a call)
    packing: bool = False                   # LM scorers: padding-free packed forwards (same scores)
    max_len: int = Field(4096, gt=8)
    threads: Optional[int] = None           # torch threads per actor


class LengthSection(Strict):
    field: Literal["total", "prompt", "response"] = "total"
    order: Literal["longest", "shortest"] = "longest"


class EmbedSection(Strict):
    kind: Literal["lexical", "sentence_transformers", "lm"] = "lexical"
    path: Optional[str] = None              # sentence-transformers dir (default: MiniLM package)
    dim: int = Field(64, gt=1)              # lexical embedder only
    max_len: int = Field(512, gt=8)


class KMeansSection(Strict):
    k: Optional[int] = Field(None, gt=0)    # default min(1000, B // 10)
    niter: int = Field(25, gt=0)
    spherical: bool = True                  # embeddings are L2-normalised
    sample_rows: int = Field(256_000, gt=0)


class KCenterSection(Strict):
    variant: Literal["topn", "greedy"] = "topn"   # topn is the paper's
    init_fraction: float = Field(0.1, gt=0, lt=1)  # |S_0| / B, seeded random
    rounds: int = Field(3, ge=1)                    # topn rounds after S_0


class ZipSection(Strict):
    mode: Literal["exact", "window"] = "exact"
    k1: int = Field(10_000, gt=0)
    k2: int = Field(200, gt=0)
    k3: int = Field(100, gt=0)
    ser: Literal["reference", "text"] = "reference"
    workers: int = Field(2, ge=1)           # processes for the candidate scoring


class SelectITSection(Strict):
    models: list[str] = Field(default_factory=list)  # rating models; default: model.path
    alpha: float = Field(0.2, ge=0)
    max_tokens: int = Field(8192, gt=8)


class LessLoraSection(Strict):
    r: int = Field(128, ge=1)
    alpha: float = Field(512, gt=0)
    target_modules: list[str] = Field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])


class LessSection(Strict):
    """LESS (docs/algorithms/data_selection.md §2.2): warm-up on a seeded slice, then gradient features per checkpoint."""

    warmup_fraction: float = Field(0.05, gt=0, le=1)  # of the usable rows, the smallest r(id)
    epochs: int = Field(4, ge=1)                      # one checkpoint per epoch
    lr: float = Field(2e-5, gt=0)                     # linear decay after warmup_ratio of the steps
    warmup_ratio: float = Field(0.03, ge=0, lt=1)
    batch_size: int = Field(32, ge=1)
    max_len: int = Field(2048, gt=8)
    lora: LessLoraSection = LessLoraSection()
    proj_dim: int = Field(8192, ge=1)
    proj_seed: int = 0
    target: str = "holdout"                 # "holdout" (a seeded slice of the pool) or a corpus path
    target_rows: int = Field(256, ge=1)     # holdout size / rows read from the target corpus
    subtask_key: Optional[str] = None       # meta key grouping target rows; null = one group
    grad_method: Literal["vmap", "loop"] = "vmap"


class FaultSection(Strict):
    kill_actor_after_batches: Optional[int] = None
    stop_after_shards: Optional[int] = None
    hold_after_shards: Optional[int] = None   # tests: the driver waits there once, to be signalled


class SelectConfig(Strict):
    """``effsft select``: choose ``budget`` rows of ``input`` with ``method``."""

    input: CorpusSpec
    output: OutputPath
    method: str
    budget: float = Field(gt=0)          # a row count (>= 1) or a fraction of the good rows (< 1)
    seed: int = 0
    model: Optional[ModelSpec] = None    # tokenizer / scoring LM
    cache_dir: Optional[OutputPath] = None      # default: <output's parent>/_effsft_cache
    direction: Optional[Literal["descending", "ascending"]] = None
    stratify_by: str = "task"            # meta key for random_stratified
    scorer: ScorerSection = ScorerSection()
    length: LengthSection = LengthSection()
    ifd_drop_gt1: bool = True
    embed: EmbedSection = EmbedSection()
    kmeans: KMeansSection = KMeansSection()
    kcenter: KCenterSection = KCenterSection()
    zip: ZipSection = ZipSection()
    selectit: SelectITSection = SelectITSection()
    less: LessSection = LessSection()
    fault: FaultSection = FaultSection()
    plots: bool = True
    overwrite: bool = False

    @model_validator(mode="after")
    def _check(self):
        if self.method not in METHODS:
            raise ValueError(f"method: unknown {self.method!r}; choose one of {', '.join(METHODS)}")
        if self.budget >= 1 and self.budget != int(self.budget):
            raise ValueError("budget: a count must be an integer (or give a fraction < 1)")
        base = self.method[3:] if self.method.startswith("km_") else self.method
        uses_emb = self.method in ("kmeans", "diverseevol") or self.method.startswith("km_")
        needs_model = (base in SCORES and base != "selectit") or (uses_emb and self.embed.kind == "lm")
        if needs_model and self.model is None:
            raise ValueError(f"model: method {self.method!r} needs model.path (tokenizer / scoring LM)")
        if base == "selectit" and not (self.selectit.models or self.model):
            raise ValueError("selectit.models: give rating models (or model.path)")
        return self


# ---------------------------------------------------------------------------------- stage 1
def prepare(cfg: SelectConfig, cache: Path, timings: dict) -> tuple[Path, dict, str]:
    """Canonical shards of the input, cached by the input fingerprint (reused across runs)."""
    from effsft.corpus.normalize import NormalizeOptions
    from effsft.corpus.prepare import prepare_corpus
    from effsft.report.manifest import fingerprint, write_manifest

    opts = NormalizeOptions.of(cfg.input)
    with timed(timings, "fingerprint"):
        fp = fingerprint(cfg.input.path, options=(opts, cfg.input.split, cfg.input.shard_rows))
    out = OutputDir(cache / f"corpus-{fp[:16]}", overwrite=True, wait=True)  # shared cache: wait
    if not out.done:
        out.claim()  # another job preparing the same corpus: wait for it, then reuse its result
    if out.done:
        out.release()
    else:
        work = out.open()
        with timed(timings, "prepare"):
            counts = prepare_corpus(cfg.input.path, work, opts=opts, shard_rows=cfg.input.shard_rows,
                                    split=cfg.input.split)
        write_manifest(work, "prepare", to_dict(cfg.input), counts=counts.as_dict(),
                       inputs={"corpus": {"path": cfg.input.path, "fingerprint": fp}})
        out.commit()
    counts = json.loads((out.final / "manifest.json").read_text())["counts"]
    return out.final, counts, fp


# ---------------------------------------------------------------------------------- stage 2
def _scorer_for(cfg: SelectConfig, score: str, model_path: str | None = None, extra: dict | None = None):
    """(name, factory, kwargs, key-spec) of the scorer that produces ``score``."""
    from effsft.select import scorers

    sc = cfg.scorer
    m = cfg.model
    common = dict(trust_remote_code=bool(m and m.trust_remote_code), threads=sc.threads,
                  template=m.template if m else "auto")
    if score == "length":
        return "length", scorers.LengthScorer, dict(model_path=m.path, **common)
    if score in ("ce", "ppl", "entropy", "ifd"):
        ifd = score == "ifd"
        return ("lm_ifd" if ifd else "lm"), scorers.LMScorer, dict(
            model_path=m.path, dtype=m.dtype, max_len=sc.max_len, micro_batch_size=sc.micro_batch_size,
            ifd=ifd, drop_gt1=cfg.ifd_drop_gt1, packing=sc.packing, **common)
    if score == "selectit":
        return "selectit", scorers.SelectITScorer, dict(
            model_path=model_path, dtype=m.dtype if m else "auto", alpha=cfg.selectit.alpha,
            max_tokens=cfg.selectit.max_tokens, micro_batch_size=sc.micro_batch_size, **common)
    if score == "less":  # extra: checkpoint, projector_checksum
        le = cfg.less
        return "less", scorers.LessScorer, dict(
            model_path=m.path, lora_r=le.lora.r, lora_alpha=le.lora.alpha,
            target_modules=list(le.lora.target_modules), proj_dim=le.proj_dim, proj_seed=le.proj_seed,
            max_len=le.max_len, micro_batch_size=sc.micro_batch_size, grad_method=le.grad_method,
            **(extra or {}), **common)
    if score == "zip_g":
        return "zip_g", scorers.ZipGScorer, dict(ser=cfg.zip.ser)
    if score == "emb":
        e = cfg.embed
        return f"emb_{e.kind}", scorers.EmbedScorer, dict(
            kind=e.kind, model_path=e.path if e.kind != "lm" else m.path, dim=e.dim, seed=0,
            max_len=e.max_len, micro_batch_size=max(sc.micro_batch_size, 32), **common)
    raise ValueError(score)


def run_scorer(cfg: SelectConfig, cache: Path, shards: list[Path], corpus_fp: str, score: str,
               marker_dir: Path, model_path: str | None = None, extra: dict | None = None):
    """Score every shard (reusing finished ones); returns the store and run statistics."""
    from effsft.report.manifest import fingerprint
    from effsft.select.pipeline import Fault, PoolSpec, score_shards
    from effsft.select.store import ScoreStore

    name, factory, kwargs = _scorer_for(cfg, score, model_path, extra)
    spec_kwargs = {k: v for k, v in kwargs.items() if k not in ("threads",)}
    model_dir = kwargs.get("model_path")
    spec = {"params": spec_kwargs, "corpus": corpus_fp,
            "model": fingerprint(model_dir) if model_dir and os.path.isdir(model_dir) else None}
    store = ScoreStore(cache, name, spec)
    cpu_only = name in ("length", "zip_g") or (name.startswith("emb_") and cfg.embed.kind == "lexical")
    # LESS does a forward + backward per row: smaller actor calls keep the pipeline visibly moving
    # (Ray Data fails a pipeline whose blocks do not move for RAY_DATA_EXECUTION_NO_PROGRESS_TIMEOUT_S).
    rows_per_call = min(cfg.scorer.batch_size, 4 * cfg.scorer.micro_batch_size) if name == "less" \
        else cfg.scorer.batch_size
    pool = PoolSpec(concurrency=cfg.scorer.concurrency, num_cpus=cfg.scorer.num_cpus,
                    num_gpus=0.0 if cpu_only else cfg.scorer.num_gpus, batch_size=rows_per_call)
    fault = Fault(cfg.fault.kill_actor_after_batches, cfg.fault.stop_after_shards, str(marker_dir),
                  cfg.fault.hold_after_shards)
    stats = score_shards(store, shards, factory, kwargs, pool, fault)
    log.info("scorer %s: %d shards reused, %d scored (%.1f rows/s)", store.key, stats.shards_reused,
             stats.shards_scored, stats.rows_per_s)
    return store, stats


def _aligned(store, shards: list[Path], ids_by_shard: list[pa.Array], columns: list[str]) -> dict:
    """Score columns in corpus order (score shards are in actor-arrival order)."""
    out: dict[str, list] = {c: [] for c in columns}
    for path, ids in zip(shards, ids_by_shard):
        t = pq.read_table(store.path(path.stem), columns=["id"] + columns)
        pos = pc.index_in(ids, value_set=t.column("id"))  # corpus row -> score row
        if pos.null_count:
            raise RuntimeError(f"{store.key}/{path.stem}: rows without a score")
        t = t.take(pos)
        for c in columns:
            out[c].append(t.column(c))
    res = {}
    for c in columns:
        col = pa.chunked_array([x for ch in out[c] for x in ch.chunks], type=out[c][0].type) if out[c] else None
        if c == "emb":
            from effsft.select.store import emb_to_numpy

            first = col[0].as_py()
            res[c] = emb_to_numpy(col, len(first) // 2)
        elif c == "less_sub":  # one list of S subtask cosines per row
            res[c] = np.asarray(col.to_pylist(), dtype=np.float64)
        elif c == "status":
            res[c] = np.asarray(col.to_pylist(), dtype=object)
        else:
            res[c] = col.to_numpy(zero_copy_only=False).astype(np.float64)
    return res


def less_warmup(cfg: SelectConfig, cache: Path, shards: list[Path], ranks: np.ndarray, corpus_fp: str,
                model_fp: str) -> tuple[dict, np.ndarray]:
    """LESS warm-up + target features in one Ray task, cached under ``cache/less-<key>/``.

    Warm-up rows: the ``warmup_fraction`` of usable rows with the smallest r(id); holdout
    target: the next ``target_rows`` (docs/algorithms/data_selection.md §2.2 steps 1 and 3). Returns the warm-up info
    (checkpoints, mean lrs, projector checksum, subtasks) and the pool indices of the holdout
    rows (empty for a target corpus), which are ineligible for selection.
    """
    import hashlib

    import ray

    from effsft.select import less

    le = cfg.less
    order = np.argsort(ranks, kind="stable")
    n_warm = max(1, int(round(le.warmup_fraction * len(ranks))))
    warm_idx = np.sort(order[:n_warm])
    hold_idx = np.sort(order[n_warm:n_warm + le.target_rows]) if le.target == "holdout" else np.zeros(0, np.int64)
    blob = json.dumps({"corpus": corpus_fp, "model": model_fp, "less": le.model_dump(), "seed": cfg.seed,
                       "template": cfg.model.template},
                      sort_keys=True)
    out = OutputDir(cache / f"less-{hashlib.blake2b(blob.encode(), digest_size=8).hexdigest()}", overwrite=True,
                    wait=True)
    if not out.done:
        out.claim()  # another job warming up the same LESS model: wait for it
    if out.done:
        out.release()
    else:
        work = out.open()
        warm_rows = _read_rows(shards, warm_idx)
        tgt_rows = _read_rows(shards, hold_idx) if le.target == "holdout" else _read_target(le.target, le.target_rows)
        groups = [_meta_value(r.get("meta"), le.subtask_key) if le.subtask_key else "all" for r in tgt_rows]
        settings = less.WarmupSettings(
            lora=less.LoraSettings(le.lora.r, le.lora.alpha, tuple(le.lora.target_modules)), epochs=le.epochs,
            lr=le.lr, warmup_ratio=le.warmup_ratio, batch_size=le.batch_size,
            micro_batch_size=cfg.scorer.micro_batch_size, max_len=le.max_len, seed=cfg.seed)
        task = ray.remote(num_cpus=cfg.scorer.num_cpus, num_gpus=cfg.scorer.num_gpus or None)(_less_task)
        info = ray.get(task.remote(cfg.model.path, [r["messages"] for r in warm_rows],
                                   [r["messages"] for r in tgt_rows], groups, str(work), settings, cfg))
        info.update(warmup_rows=int(len(warm_idx)))
        # checkpoint paths relative to the committed directory
        for c in info["checkpoints"]:
            c["path"] = Path(c["path"]).name
        (work / "less.json").write_text(json.dumps(info, indent=1))
        out.commit()
    info = json.loads((out.final / "less.json").read_text())
    for c in info["checkpoints"]:
        c["path"] = str(out.final / c["path"])
    return info, hold_idx


def _less_task(model_path, warm_msgs, tgt_msgs, groups, work, settings, cfg: SelectConfig) -> dict:
    """Runs in a Ray worker: the pure warm-up + target features (effsft.select.less)."""
    from effsft.select import less, scorers

    scorers._threads(cfg.scorer.threads)
    return less.prepare_checkpoints(
        model_path, warm_msgs, tgt_msgs, groups, work, settings, proj_dim=cfg.less.proj_dim,
        proj_seed=cfg.less.proj_seed, device=scorers._device("auto"), method=cfg.less.grad_method,
        trust_remote_code=bool(cfg.model.trust_remote_code), template=cfg.model.template)


def less_scores(cfg: SelectConfig, cache: Path, shards: list[Path], ids_by_shard: list[pa.Array],
                ranks: np.ndarray, corpus_fp: str, marker_dir: Path,
                scoring: dict) -> tuple[np.ndarray, np.ndarray, dict]:
    """(score [N], status [N], details): one scorer pool per checkpoint, combined on the driver."""
    from effsft.report.manifest import fingerprint
    from effsft.select.less import combine_checkpoints, eta_bar

    info, hold_idx = less_warmup(cfg, cache, shards, ranks, corpus_fp, fingerprint(cfg.model.path))
    per_ckpt, status = [], None
    for c in info["checkpoints"]:
        store, stats = run_scorer(cfg, cache, shards, corpus_fp, "less", marker_dir, extra={
            "checkpoint": c["path"], "projector_checksum": info["projector_checksum"]})
        scoring[store.key] = vars(stats) | {"rows_per_s": stats.rows_per_s}
        got = _aligned(store, shards, ids_by_shard, ["less_sub", "status"])
        per_ckpt.append(got["less_sub"])
        status = got["status"]
    lrs = [c["mean_lr"] for c in info["checkpoints"]]
    score = combine_checkpoints(per_ckpt, lrs)
    score[hold_idx] = np.nan  # the holdout is the target, not a candidate
    status[hold_idx] = "less_target"
    details = {k: info[k] for k in ("projector_checksum", "n_params", "subtasks", "target_rows", "warmup_rows")}
    details.update(mean_lrs=lrs, eta_bar=eta_bar(lrs).tolist(), proj_dim=cfg.less.proj_dim,
                   target=cfg.less.target)
    return score, status, details


# ---------------------------------------------------------------------------------- stage 3
def cluster_rows(cfg: SelectConfig, emb: np.ndarray, ranks: np.ndarray, budget: int) -> dict:
    """faiss k-means fit on the smallest-r sample (in a Ray task), then assignment."""
    import ray

    from effsft.select.kmeans import assign, default_k, fit_kmeans, sample_indices

    k = cfg.kmeans.k or default_k(budget)
    sample = sample_indices(ranks, cfg.kmeans.sample_rows)
    fit = ray.remote(num_cpus=1)(fit_kmeans)
    centroids = ray.get(fit.remote(emb[sample], k, niter=cfg.kmeans.niter, seed=cfg.seed,
                                   spherical=cfg.kmeans.spherical))
    # Assignment: a map over blocks with the centroids broadcast.
    cref = ray.put(centroids)
    blocks = np.array_split(np.arange(len(emb)), max(1, len(emb) // 100_000))
    task = ray.remote(num_cpus=0.5)(assign)
    parts = ray.get([task.remote(emb[b], cref, cfg.kmeans.spherical) for b in blocks])
    cluster = np.concatenate([p[0] for p in parts]).astype(np.int64)
    dist = np.concatenate([p[1] for p in parts])
    return {"cluster": cluster, "dist": dist, "k": int(len(centroids)), "sample_rows": int(len(sample))}


# ---------------------------------------------------------------------------------- stage 4
def choose(cfg: SelectConfig, budget: int, ids: np.ndarray, ranks: np.ndarray, cols: dict,
           meta_strata: np.ndarray | None, cluster: dict | None) -> tuple[np.ndarray, dict]:
    """Indices of the picks (pick order) and method details for the manifest."""
    from effsft.select import ranking

    method = cfg.method
    info: dict = {}
    if method == "random":
        return ranking.bottom_k(ranks, budget), info
    if method == "random_stratified":
        return ranking.stratified_bottom_k(meta_strata, ranks, budget), {"stratify_by": cfg.stratify_by}
    base = method[3:] if method.startswith("km_") else method
    if method == "kmeans":
        base = None
    score = None
    if base in SCORES:
        score = cols["score"]
        desc = DESCENDING[base] if cfg.direction is None else cfg.direction == "descending"
        if base == "length" and cfg.direction is None:
            desc = cfg.length.order == "longest"
        info["direction"] = "descending" if desc else "ascending"
    if method.startswith("km_") or method == "kmeans":
        s = score if score is not None else -ranks.astype(np.float64)  # kmeans: random within clusters
        picks = ranking.km_select(cluster["cluster"], s, ranks, budget,
                                  descending=True if score is None else desc)
        sizes = np.bincount(cluster["cluster"], minlength=cluster["k"])
        info.update(k=cluster["k"], cluster_sizes=sizes.tolist(),
                    cluster_selected=np.bincount(cluster["cluster"][picks], minlength=cluster["k"]).tolist())
        return picks, info
    if base in SCORES:
        return ranking.top_k_indices(score, budget, descending=desc, tie_ranks=ranks), info
    if method == "diverseevol":
        return _kcenter(cfg, budget, cols["emb"], ranks, info), info
    if method == "zip":
        return _zip(cfg, budget, cols, ranks, info), info
    raise ValueError(method)


def _kcenter(cfg: SelectConfig, budget: int, emb: np.ndarray, ranks: np.ndarray, info: dict) -> np.ndarray:
    from effsft.select import kcenter, ranking

    n0 = max(1, min(budget, int(round(cfg.kcenter.init_fraction * budget))))
    init = ranking.bottom_k(ranks, n0)
    picks = list(init)
    in_set = np.zeros(len(emb), bool)
    in_set[init] = True
    rest = budget - n0
    if cfg.kcenter.variant == "greedy":
        picks += kcenter.greedy_select(emb, ranks, init, rest).tolist()
    else:
        per_round = [rest // cfg.kcenter.rounds + (i < rest % cfg.kcenter.rounds)
                     for i in range(cfg.kcenter.rounds)]
        for n in per_round:
            d = kcenter.min_sq_dist(emb, emb[np.asarray(picks)])
            add = kcenter.topn_select(d, ranks, n, in_set)
            in_set[add] = True
            picks += add.tolist()
    info.update(variant=cfg.kcenter.variant, init_rows=n0)
    return np.asarray(picks, np.int64)


def _zip(cfg: SelectConfig, budget: int, cols: dict, ranks: np.ndarray, info: dict) -> np.ndarray:
    from effsft.select.zip import ProcessMap, serial_map, zip_select

    z = cfg.zip
    rows = cols["zip_rows"]
    mp = ProcessMap(z.workers) if z.workers > 1 else None
    try:
        res = zip_select(rows, budget, ranks, k1=z.k1, k2=z.k2, k3=z.k3, ser=z.ser, mode=z.mode,
                         g=cols["score"], map_fn=mp or serial_map)
    finally:
        if mp:
            mp.close()
    info.update(mode=z.mode, k1=z.k1, k2=z.k2, k3=z.k3, trace_size=res.trace_size,
                trace_ratio=res.trace_ratio)
    return res.picked


# ---------------------------------------------------------------------------------- helpers
def _read_ids(shards: list[Path]) -> list[pa.Array]:
    return [pq.read_table(p, columns=["id"]).column("id").combine_chunks() for p in shards]


def _read_strata(shards: list[Path], key: str) -> np.ndarray:
    vals = []
    for p in shards:
        vals += [_meta_value(m, key) for m in pq.read_table(p, columns=["meta"]).column("meta").to_pylist()]
    return np.asarray(vals)


def _meta_value(meta: str | None, key: str) -> str:
    try:
        return str(json.loads(meta or "{}").get(key))
    except json.JSONDecodeError:
        return "None"


def _read_rows(shards: list[Path], idx: np.ndarray) -> list[dict]:
    """Rows (``messages``, ``meta``) at sorted global positions ``idx`` of the shards."""
    out, start = [], 0
    for p in shards:
        n = pq.read_metadata(p).num_rows
        local = idx[(idx >= start) & (idx < start + n)] - start
        if len(local):
            out += pq.read_table(p, columns=["messages", "meta"]).take(pa.array(local)).to_pylist()
        start += n
    return out


def _read_target(path: str, limit: int) -> list[dict]:
    """The first ``limit`` usable rows of a target corpus, through the normalising readers."""
    from effsft.corpus.normalize import NormalizeOptions
    from effsft.corpus.prepare import good_rows

    rows, unreadable = good_rows(path, NormalizeOptions(), limit, columns=("messages", "meta"))
    if unreadable:
        log.warning("less.target: unreadable files in %s (skipped): %s", path, [u["file"] for u in unreadable])
    return rows


def _read_zip_rows(shards: list[Path], ser: str) -> list[bytes]:
    from effsft.select.zip import serialize_rows

    out: list[bytes] = []
    for p in shards:
        out += serialize_rows(pq.read_table(p, columns=["messages"]).column("messages").to_pylist(), ser)
    return out


def resolve_budget(budget: float, n_ok: int) -> int:
    """A count (>= 1) or a fraction (< 1, at least one row) -> the number of rows to pick."""
    b = int(round(budget * n_ok)) if budget < 1 else int(budget)
    if b > n_ok:
        raise ConfigError(f"budget: {b} exceeds the {n_ok} usable rows of the input "
                          "(give a count <= that, or a fraction < 1)")
    return max(1, b)


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


# ---------------------------------------------------------------------------------- recipe
def needed_scores(cfg: SelectConfig) -> list[str]:
    m = cfg.method
    base = m[3:] if m.startswith("km_") else m
    need = []
    if base in SCORES:
        need.append(base)
    if m.startswith("km_") or m in ("kmeans", "diverseevol"):
        need.append("emb")
    if m == "zip":
        need.append("zip_g")
    return need


def run_select(cfg: SelectConfig) -> dict:
    from effsft.models.loading import describe_model
    from effsft.report.manifest import write_manifest
    from effsft.report.plots import md_table, write_report
    from effsft.select.ranking import random_rank
    from effsft.select.selectit import model_level_score

    out = OutputDir(cfg.output, overwrite=cfg.overwrite)
    work = out.open()
    faults = work / ".faults"  # fault-injection markers (fire once per job), removed at commit
    faults.mkdir(exist_ok=True)
    t_start = time.perf_counter()
    timings: dict = {}
    ray_desc = init_ray()
    cache = Path(cfg.cache_dir) if cfg.cache_dir else Path(cfg.output).resolve().parent / "_effsft_cache"
    cache.mkdir(parents=True, exist_ok=True)
    corpus, corpus_counts, corpus_fp = prepare(cfg, cache, timings)
    from effsft.corpus.prepare import shard_paths

    shards = shard_paths(corpus)
    ids_by_shard = _read_ids(shards)
    ids = np.asarray(pa.chunked_array(ids_by_shard).to_pylist(), dtype=object)
    n_ok = len(ids)
    budget = resolve_budget(cfg.budget, n_ok)
    with timed(timings, "ranks"):
        ranks = random_rank(ids, cfg.seed)
    cols: dict = {}
    scoring: dict = {}
    less_details: dict = {}
    for score in needed_scores(cfg):
        with timed(timings, f"score_{score}"):
            if score == "less":
                cols["score"], cols["status"], less_details = less_scores(
                    cfg, cache, shards, ids_by_shard, ranks, corpus_fp, faults, scoring)
                continue
            if score == "selectit":
                models = cfg.selectit.models or [cfg.model.path]
                per_model, params = [], []
                for mp in models:
                    store, stats = run_scorer(cfg, cache, shards, corpus_fp, score, faults, model_path=mp)
                    scoring[store.key] = vars(stats) | {"rows_per_s": stats.rows_per_s}
                    per_model.append(_aligned(store, shards, ids_by_shard, ["score_selectit"])["score_selectit"])
                    params.append(_param_count(mp))
                cols["score"] = model_level_score(per_model, params)
                continue
            store, stats = run_scorer(cfg, cache, shards, corpus_fp, score, faults)
            scoring[store.key] = vars(stats) | {"rows_per_s": stats.rows_per_s}
            if score == "emb":
                cols["emb"] = _aligned(store, shards, ids_by_shard, ["emb"])["emb"]
            else:
                col = {"length": f"score_length_{cfg.length.field}", "zip_g": "score_zip_g"}.get(
                    score, f"score_{score}")
                got = _aligned(store, shards, ids_by_shard, [col, "status"])
                cols["score"], cols["status"] = got[col], got["status"]
    if cfg.method == "zip":
        with timed(timings, "zip_read"):
            cols["zip_rows"] = _read_zip_rows(shards, cfg.zip.ser)
    cluster = None
    if cfg.method.startswith("km_") or cfg.method == "kmeans":
        with timed(timings, "kmeans"):
            cluster = cluster_rows(cfg, cols["emb"], ranks, budget)
    strata = _read_strata(shards, cfg.stratify_by) if cfg.method == "random_stratified" else None
    with timed(timings, "choose"):
        picks, info = choose(cfg, budget, ids, ranks, cols, strata, cluster)
    if len(picks) != budget or len(set(picks.tolist())) != budget:
        raise RuntimeError(f"selection returned {len(picks)} rows ({len(set(picks.tolist()))} distinct), "
                           f"budget {budget}")
    with timed(timings, "write"):
        write_outputs(work, shards, ids, picks, {k: v for k, v in cols.items() if k != "zip_rows"}, cluster)
        shutil.copyfile(corpus / "rejects.parquet", work / "rejects.parquet")
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
    metrics = {}
    if "score" in cols:
        metrics["score_pool"] = score_stats(cols["score"])
        metrics["score_selected"] = score_stats(cols["score"][picks])
    imgs = make_plots(work, cfg, picks, cols, cluster, info) if cfg.plots else []
    timings["total"] = round(time.perf_counter() - t_start, 3)
    details = {k: v for k, v in info.items() if k not in ("trace_size", "trace_ratio")}
    if less_details:
        details["less"] = less_details
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
    shutil.rmtree(faults, ignore_errors=True)
    final = out.commit()
    return {"output": str(final), "method": cfg.method, **counts, "timings": timings}


def _param_count(path: str) -> int:
    """Exact parameter count from the safetensors headers (no weights loaded)."""
    from safetensors import safe_open

    files = sorted(Path(path).glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{path}: no safetensors files to count parameters")
    n = 0
    for f in files:
        with safe_open(str(f), "pt") as h:
            for k in h.keys():
                n += int(np.prod(h.get_slice(k).get_shape()))
    return n
