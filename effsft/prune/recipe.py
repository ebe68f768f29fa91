"""Recipe ``effsft prune``: DLP / OWL / uniform layerwise sparsity as a post-training job.

Features (each a config key, see ``jobs/prune.yaml``):
  * ``prune.method`` dlp | owl | uniform, ``prune.criterion`` wanda | sparsegpt | magnitude,
    ``prune.sparsity``, ``prune.alpha``, ``prune.stat``, ``prune.nm`` (uniform N:M),
    ``prune.owl.{M,lambda}``, ``prune.sparsegpt.{blocksize,percdamp}`` (spec ``dlp.md`` §3).
  * Calibration windows from any corpus the foundation readers take (``prune.calib.data``),
    rendered with the model's chat template and sampled like Wanda/DLP's C4 loader.
  * Perplexity before and after on held-out windows (``prune.eval.data``; by default the
    documents of the calibration corpus that follow the ones read for calibration).
  * ``sweep``: sparsities x methods x criteria x stats in ONE job, one Ray task per
    configuration, one ``comparison.md`` table (+ PNG).

Driver (this module, top to bottom): parse the config (:mod:`effsft.prune.config`), read +
tokenise the corpus and sample windows (:mod:`effsft.prune.calibration`), plan the
configurations, submit the Ray task(s) (:mod:`effsft.prune.tasks`), write the reports
(:mod:`effsft.prune.reports`) and the manifest.
Task (``prune_task``, ``num_gpus=1`` when the cluster has GPUs): load the model, perplexity
before, ``prune_model`` (one block on the device at a time), perplexity after, save.

Outputs (atomic ``OutputDir``): ``manifest.json``, ``prune_report.json``, ``report.md``,
``sparsity.png`` and ``model/`` (single run); ``comparison.md`` / ``comparison.png`` /
``comparison.json`` and one sub-folder per configuration (sweep).
"""
from __future__ import annotations

import itertools
import logging

from effsft.config import to_dict
from effsft.prune.config import PruneConfig, PruneSection
from effsft.prune.reports import comparison_row, write_comparison, write_run
from effsft.prune.tasks import run_tasks
from effsft.runtime import OutputDir, init_ray, timed

log = logging.getLogger("effsft.prune")


# ----------------------------------------------------------------------------- plan


def settings_dict(p: PruneSection, **override) -> dict:
    """Keyword arguments of :class:`effsft.prune.blockwise.PruneSettings` (device unresolved)."""
    d = dict(method=p.method, criterion=p.criterion, sparsity=p.sparsity, alpha=p.alpha, stat=p.stat,
             nm=p.nm, owl_m=p.owl.M, owl_lambda=p.owl.lam, median_approx=p.median_approx,
             sparsegpt_blocksize=p.sparsegpt.blocksize, sparsegpt_percdamp=p.sparsegpt.percdamp,
             device=p.device, batch_size=p.batch_size, seed=p.calib.seed)
    d.update(override)
    return d


def sweep_grid(cfg: PruneConfig) -> list[dict]:
    """The sweep's configurations as ``PruneSettings`` kwargs, in a stable order, deduplicated.

    ``stat`` and ``alpha`` only matter for DLP, so uniform and OWL appear once per
    (criterion, sparsity).
    """
    p, sw = cfg.prune, cfg.sweep
    grid, seen = [], set()
    for s, crit, method, stat, alpha in itertools.product(
            sw.sparsity or [p.sparsity], sw.criterion or [p.criterion], sw.method or [p.method],
            sw.stat or [p.stat], sw.alpha or [p.alpha]):
        key = (s, crit, method) + ((stat, alpha) if method == "dlp" else ())
        if key not in seen:
            seen.add(key)
            grid.append(settings_dict(p, sparsity=s, criterion=crit, method=method, stat=stat, alpha=alpha))
    return grid


def run_name(s: dict, with_alpha: bool = False) -> str:
    """Folder name of one configuration, e.g. ``dlp-median_wanda_s0.70`` (``..._a0.15``)."""
    method = f"dlp-{s['stat']}" if s["method"] == "dlp" else s["method"]
    alpha = f"_a{s['alpha']:g}" if with_alpha and s["method"] == "dlp" else ""
    return f"{method}_{s['criterion']}_s{s['sparsity']:.2f}{alpha}"


# ----------------------------------------------------------------------------- entry point


def _cluster_gpus() -> float:
    import ray

    return float(ray.cluster_resources().get("GPU", 0))


def _load_data(cfg: PruneConfig) -> tuple:
    from transformers import AutoConfig

    from effsft.models.loading import load_tokenizer
    from effsft.prune.calibration import build_windows

    tok = load_tokenizer(cfg.model.path, trust_remote_code=cfg.model.trust_remote_code, template=cfg.model.template)
    mcfg = AutoConfig.from_pretrained(cfg.model.path, trust_remote_code=cfg.model.trust_remote_code)
    return build_windows(cfg, tok, getattr(mcfg, "max_position_embeddings", None))


def run_prune(cfg: PruneConfig) -> dict:
    """Set up (Ray, data), run the pruning task(s), write the reports, commit the output."""
    from effsft.models.loading import describe_model
    from effsft.report.manifest import write_manifest

    out = OutputDir(cfg.output, overwrite=cfg.overwrite)
    ray_desc = init_ray()
    timings: dict = {}
    with timed(timings, "data"):
        calib, windows, data = _load_data(cfg)  # may raise ConfigError: before any directory exists
    work = out.open()
    num_gpus = cfg.num_gpus if cfg.num_gpus is not None else (1.0 if _cluster_gpus() > 0 else 0.0)
    grid = sweep_grid(cfg) if cfg.sweep else [settings_dict(cfg.prune)]
    names = [run_name(s, with_alpha=bool(cfg.sweep and cfg.sweep.alpha)) for s in grid]
    dirs = [work / n if cfg.sweep else work for n in names]
    with timed(timings, "prune_tasks"):
        results = run_tasks(cfg, work, grid, names, dirs, calib, windows, num_gpus)
    ppl_dense = next((r["ppl_dense"] for r in results if r.get("ppl_dense") is not None), None)
    with timed(timings, "reports"):
        for d, n, res in zip(dirs, names, results):
            d.mkdir(parents=True, exist_ok=True)
            write_run(d, res, ppl_dense, f"prune {n} of {cfg.model.path}")
        rows = [comparison_row(n, r) for n, r in zip(names, results)]
        if cfg.sweep:
            write_comparison(work, rows, ppl_dense, f"prune sweep of {cfg.model.path}")
    metrics = {"ppl_dense": ppl_dense, "runs": rows} if cfg.sweep else {
        "ppl_dense": ppl_dense, "ppl_pruned": results[0]["ppl_pruned"], **{k: v for k, v in rows[0].items()
                                                                         if k not in ("run", "ppl")},
        "global": results[0]["report"]["global"]}
    inputs = {"model": describe_model(cfg.model),
              "calib": {"path": cfg.prune.calib.data.path}}
    if cfg.prune.eval.data is not None:
        inputs["eval"] = {"path": cfg.prune.eval.data.path}
    write_manifest(work, "prune", to_dict(cfg), inputs=inputs, metrics=metrics, timings=timings,
                   counts={**data, "runs": len(grid), "num_gpus": num_gpus},
                   extra={"ray": {"mode": ray_desc["mode"]}})
    out.commit()
    summary = {"output": str(out.final), "ppl_dense": ppl_dense, "runs": len(grid)}
    if not cfg.sweep:
        summary.update(ppl_pruned=results[0]["ppl_pruned"], achieved_sparsity=rows[0]["achieved"])
    return summary
