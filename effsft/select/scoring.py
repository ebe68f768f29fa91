"""Stage 2, scoring: the scorer (and its cache key) behind each score, one resumable Ray Data
pool per scorer, the score columns back in corpus order, and SelectIT's multi-model score."""
from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from effsft.select.config import SelectConfig

log = logging.getLogger("effsft.select")


def scorer_for(cfg: SelectConfig, score: str, model_path: str | None = None, extra: dict | None = None):
    """(name, factory, kwargs) of the scorer that produces ``score``."""
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

    name, factory, kwargs = scorer_for(cfg, score, model_path, extra)
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


def aligned_columns(store, shards: list[Path], ids_by_shard: list[pa.Array], columns: list[str]) -> dict:
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


def selectit_scores(cfg: SelectConfig, cache: Path, shards: list[Path], ids_by_shard: list[pa.Array],
                    corpus_fp: str, marker_dir: Path, scoring: dict) -> np.ndarray:
    """SelectIT's model-level score [N]: one scorer pool per rating model, combined by size."""
    from effsft.select.selectit import model_level_score

    models = cfg.selectit.models or [cfg.model.path]
    per_model, params = [], []
    for mp in models:
        store, stats = run_scorer(cfg, cache, shards, corpus_fp, "selectit", marker_dir, model_path=mp)
        scoring[store.key] = vars(stats) | {"rows_per_s": stats.rows_per_s}
        per_model.append(aligned_columns(store, shards, ids_by_shard, ["score_selectit"])["score_selectit"])
        params.append(_param_count(mp))
    return model_level_score(per_model, params)


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
