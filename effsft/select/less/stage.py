"""The select job's LESS stage: the cached LoRA warm-up + target features as one Ray task,
then one scorer pool per warm-up checkpoint, combined on the driver (docs/algorithms/data_selection.md §2.2)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa

from effsft.runtime import OutputDir
from effsft.select.config import SelectConfig
from effsft.select.scoring import aligned_columns, run_scorer
from effsft.select.shards import meta_value, read_rows, read_target


def run_warmup(cfg: SelectConfig, cache: Path, shards: list[Path], ranks: np.ndarray, corpus_fp: str,
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
        warm_rows = read_rows(shards, warm_idx)
        tgt_rows = read_rows(shards, hold_idx) if le.target == "holdout" else read_target(le.target, le.target_rows)
        groups = [meta_value(r.get("meta"), le.subtask_key) if le.subtask_key else "all" for r in tgt_rows]
        settings = less.WarmupSettings(
            lora=less.LoraSettings(le.lora.r, le.lora.alpha, tuple(le.lora.target_modules)), epochs=le.epochs,
            lr=le.lr, warmup_ratio=le.warmup_ratio, batch_size=le.batch_size,
            micro_batch_size=cfg.scorer.micro_batch_size, max_len=le.max_len, seed=cfg.seed)
        task = ray.remote(num_cpus=cfg.scorer.num_cpus, num_gpus=cfg.scorer.num_gpus or None)(_warmup_task)
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


def _warmup_task(model_path, warm_msgs, tgt_msgs, groups, work, settings, cfg: SelectConfig) -> dict:
    """Runs in a Ray worker: the pure warm-up + target features (effsft.select.less)."""
    from effsft.select import less, scorers

    scorers._threads(cfg.scorer.threads)
    return less.prepare_checkpoints(
        model_path, warm_msgs, tgt_msgs, groups, work, settings, proj_dim=cfg.less.proj_dim,
        proj_seed=cfg.less.proj_seed, device=scorers._device("auto"), method=cfg.less.grad_method,
        trust_remote_code=bool(cfg.model.trust_remote_code), template=cfg.model.template)


def run_less_scoring(cfg: SelectConfig, cache: Path, shards: list[Path], ids_by_shard: list[pa.Array],
                ranks: np.ndarray, corpus_fp: str, marker_dir: Path,
                scoring: dict) -> tuple[np.ndarray, np.ndarray, dict]:
    """(score [N], status [N], details): one scorer pool per checkpoint, combined on the driver."""
    from effsft.report.manifest import fingerprint
    from effsft.select.less import combine_checkpoints, eta_bar

    info, hold_idx = run_warmup(cfg, cache, shards, ranks, corpus_fp, fingerprint(cfg.model.path))
    per_ckpt, status = [], None
    for c in info["checkpoints"]:
        store, stats = run_scorer(cfg, cache, shards, corpus_fp, "less", marker_dir, extra={
            "checkpoint": c["path"], "projector_checksum": info["projector_checksum"]})
        scoring[store.key] = vars(stats) | {"rows_per_s": stats.rows_per_s}
        got = aligned_columns(store, shards, ids_by_shard, ["less_sub", "status"])
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
