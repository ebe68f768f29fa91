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

Driver: read + tokenise the corpus, sample windows, submit the Ray task(s), write the reports.
Task (``prune_task``, ``num_gpus=1`` when the cluster has GPUs): load the model, perplexity
before, ``prune_model`` (one block on the device at a time), perplexity after, save.

Outputs (atomic ``OutputDir``): ``manifest.json``, ``prune_report.json``, ``report.md``,
``sparsity.png`` and ``model/`` (single run); ``comparison.md`` / ``comparison.png`` /
``comparison.json`` and one sub-folder per configuration (sweep).
"""
from __future__ import annotations

import itertools
import logging
from pathlib import Path
from typing import Literal, Optional

from pydantic import BeforeValidator, ConfigDict, Field, ValidationInfo, field_validator
from typing_extensions import Annotated

from effsft.config import ConfigError, CorpusSpec, ModelSpec, OutputPath, Strict, to_dict
from effsft.runtime import OutputDir, atomic_write_json, init_ray, timed

log = logging.getLogger("effsft.prune")

Method = Literal["dlp", "owl", "uniform"]
Criterion = Literal["wanda", "sparsegpt", "magnitude"]
Stat = Literal["median", "mean"]
Sparsity = Annotated[float, Field(ge=0.01, le=0.99)]


def _nm_from_yaml(v):
    """Why: YAML 1.1 reads an unquoted ``2:4`` as the base-60 integer 124 (``nm=2:4`` on the
    command line included); map such an integer back to ``"N:M"``."""
    if isinstance(v, int) and not isinstance(v, bool) and v >= 60:
        return "{}:{}".format(*divmod(v, 60))
    return v


NM = Annotated[Optional[str], BeforeValidator(_nm_from_yaml)]


# ----------------------------------------------------------------------------- config


class OwlSpec(Strict):
    """OWL settings (``prune.owl``): outlier threshold ``M`` and band half-width ``lambda``."""

    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True,
                              populate_by_name=True, serialize_by_alias=True)

    M: float = Field(5.0, gt=0)
    lam: float = Field(0.08, ge=0, alias="lambda")


class SparseGPTSpec(Strict):
    blocksize: int = Field(128, gt=0)
    percdamp: float = Field(0.01, gt=0)


class CalibSpec(Strict):
    """Calibration windows: ``n_samples`` windows of ``min(seqlen, max_position_embeddings)``."""

    data: CorpusSpec
    n_samples: int = Field(128, gt=0)
    seqlen: int = Field(2048, gt=1)
    seed: int = 0
    max_docs: int = Field(20_000, gt=0)       # documents read from the corpus to sample from


class EvalSpec(Strict):
    """Perplexity windows (non-overlapping, same length as the calibration windows)."""

    data: Optional[CorpusSpec] = None         # None: held-out documents of prune.calib.data
    n_windows: int = Field(32, gt=0)
    max_docs: int = Field(2000, gt=0)


class PruneSection(Strict):
    method: Method = "dlp"
    criterion: Criterion = "wanda"
    sparsity: Sparsity = 0.7
    alpha: float = Field(0.15, ge=0, le=0.5)
    stat: Stat = "median"
    nm: NM = None                             # "2:4" | "4:8": uniform N:M (overrides method, s)
    owl: OwlSpec = OwlSpec()
    median_approx: bool = False
    calib: CalibSpec
    eval: EvalSpec = EvalSpec()
    device: str = "auto"                      # auto (cuda when visible to the task) | cpu | cuda[:i]
    batch_size: int = Field(8, gt=0)          # windows per block forward
    sparsegpt: SparseGPTSpec = SparseGPTSpec()
    # How a document becomes text: chat = the conversation through the model's template (the
    # one rule of every job); plain = its turns' contents joined by blank lines (prose corpora).
    render: Literal["chat", "plain"] = "chat"

    @field_validator("nm")
    @classmethod
    def _check_nm(cls, v):
        from effsft.prune.criteria import parse_nm

        parse_nm(v)  # its ValueError names the problem; pydantic adds the key
        return v


class SweepSpec(Strict):
    """Grid of configurations; a missing list means ``[prune.<key>]``. ``stat`` and ``alpha``
    only vary DLP."""

    sparsity: Optional[list[Sparsity]] = None
    method: Optional[list[Method]] = None
    criterion: Optional[list[Criterion]] = None
    stat: Optional[list[Stat]] = None
    alpha: Optional[list[Annotated[float, Field(ge=0, le=0.5)]]] = None
    save_models: bool = False                 # a pruned model/ per configuration
    max_parallel: Optional[int] = Field(None, gt=0)  # tasks in flight (None: as Ray schedules)


class PruneConfig(Strict):
    """``effsft prune``: one pruning run, or a sweep of runs with a comparison table."""

    model: ModelSpec
    output: OutputPath
    prune: PruneSection
    sweep: Optional[SweepSpec] = None
    save_model: bool = True                   # single run: write the pruned model/
    num_gpus: Optional[float] = Field(None, ge=0)  # None: 1 if the cluster has GPUs, else 0
    num_cpus: float = Field(1, gt=0)
    overwrite: bool = False

    @field_validator("sweep")
    @classmethod
    def _check_sweep(cls, v, info: ValidationInfo):
        prune = info.data.get("prune")
        if v is not None and prune is not None and prune.nm is not None:
            raise ValueError("cannot be combined with prune.nm (N:M fixes method and sparsity)")
        return v


# ----------------------------------------------------------------------------- settings


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


# ----------------------------------------------------------------------------- data (driver)


def read_conversations(spec: CorpusSpec, limit: int, unreadable: list | None = None) -> list[list[dict]]:
    """First ``limit`` good conversations of any corpus, through the normalising readers;
    files found unreadable on the way are appended to ``unreadable`` (for the manifest)."""
    from effsft.corpus.prepare import first_good_rows

    rows, bad = first_good_rows(spec, limit)
    if bad:
        log.warning("prune: unreadable files in %s (skipped, listed in the manifest): %s", spec.path,
                    [u["file"] for u in bad])
    if unreadable is not None:
        unreadable += bad
    return [r["messages"] for r in rows]


def tokenize_documents(tokenizer, conversations: list[list[dict]], how: str = "chat") -> list[list[int]]:
    """Token ids per document: the conversation rendered with the model's chat template
    (``chat``), or its turns' contents joined by blank lines (``plain``)."""
    from effsft.corpus.tokenize import render

    texts = [render(tokenizer, m) if how == "chat" else "\n\n".join(t["content"] for t in m)
             for m in conversations]
    return tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else []


def build_windows(cfg: PruneConfig, tokenizer, max_positions: int | None):
    """Calibration windows ``[N, T]``, evaluation windows ``[W, T]`` and a data summary."""
    import torch

    from effsft.prune.blockwise import make_windows, sample_calibration_with_info

    c, e = cfg.prune.calib, cfg.prune.eval
    T = min(c.seqlen, max_positions) if max_positions else c.seqlen
    unreadable: list = []
    if e.data is None:  # held out: the documents after the calibration ones
        convs = read_conversations(c.data, c.max_docs + e.max_docs, unreadable)
        calib_convs, eval_convs = convs[: c.max_docs], convs[c.max_docs:]
        if not eval_convs:
            raise ConfigError(f"prune.eval.data: not set, and {c.data.path} has no documents beyond the "
                              f"{len(calib_convs)} read for calibration (lower prune.calib.max_docs)")
    else:
        calib_convs = read_conversations(c.data, c.max_docs, unreadable)
        eval_convs = read_conversations(e.data, e.max_docs, unreadable)
    if not calib_convs:
        raise ConfigError(f"prune.calib.data: no usable conversations in {c.data.path}")
    calib_docs = tokenize_documents(tokenizer, calib_convs, cfg.prune.render)
    calib, info = sample_calibration_with_info(calib_docs, c.n_samples, T, c.seed, tokenizer.eos_token_id)
    stream = [t for doc in tokenize_documents(tokenizer, eval_convs, cfg.prune.render) for t in doc]  # joined documents
    if len(stream) < T:
        raise ConfigError(f"prune.eval: {len(stream)} held-out tokens, fewer than one window of {T}")
    windows = make_windows(torch.tensor(stream), T, e.n_windows)
    summary = {"seqlen": T, "calib_docs": len(calib_docs), "calib_tokens": sum(map(len, calib_docs)),
               "calib_mode": info["mode"], "calib_deviation": info.get("deviation"),
               "eval_docs": len(eval_convs), "eval_tokens": len(stream), "eval_windows": int(windows.shape[0]),
               "unreadable_files": unreadable}
    return calib, windows, summary


# ----------------------------------------------------------------------------- the Ray task


def _reset_peak_memory(device: str) -> None:
    """Start this task's memory high-water marks afresh (Ray reuses worker processes).

    Why ``clear_refs``: writing 5 resets the kernel's peak RSS (VmHWM) of the process (Linux
    >= 4.0), so the peak we report is this run's, not an earlier task's in the same worker.
    """
    import torch

    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass  # not Linux / not permitted: the peak then covers the worker's lifetime
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats(device)


def _peak_memory_mib(device: str) -> dict:
    import re
    import resource

    import torch

    try:
        with open("/proc/self/status") as f:
            kib = int(re.search(r"VmHWM:\s+(\d+)", f.read()).group(1))
    except (OSError, AttributeError):
        kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    out = {"peak_host_mib": kib / 1024}
    if device.startswith("cuda"):
        out["peak_device_mib"] = torch.cuda.max_memory_allocated(device) / 2**20
    return out


def prune_task(model_spec: dict, settings: dict, calib, windows, save_dir: str | None,
               eval_dense: bool, threads: int = 1) -> dict:
    """Load, measure, prune, measure, save. Runs inside a Ray task.

    Args:
        model_spec: ``ModelSpec`` as a dict.
        settings: ``PruneSettings`` kwargs; ``device="auto"`` becomes cuda when visible.
        calib: ``[N, T]`` calibration windows; windows: ``[W, T]`` evaluation windows.
        save_dir: where to write the pruned HF model (None: do not save).
        eval_dense: also measure the dense model's perplexity (once per job is enough).

    Returns:
        ``{"report": prune_model's report, "ppl_dense", "ppl_pruned", "device", memory}``.
    """
    import time

    import torch

    from effsft.models.loading import load_model, load_tokenizer, resolve_dtype
    from effsft.prune.blockwise import PruneSettings, perplexity, prune_model

    torch.set_num_threads(max(1, threads))
    device = settings["device"]
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    cfg = PruneSettings(**{**settings, "device": device})
    _reset_peak_memory(device)
    # The model lives in host RAM; only the current block moves to `device` (docs/algorithms/dlp.md §4).
    dtype = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}[
        resolve_dtype(model_spec["dtype"], device)]
    t0 = time.perf_counter()
    model = load_model(model_spec["path"], dtype=dtype, device="cpu",
                       trust_remote_code=model_spec["trust_remote_code"],
                       attn_implementation=model_spec["attn_implementation"])
    timings = {"load_s": time.perf_counter() - t0}
    res: dict = {"device": device, "dtype": dtype, "ppl_dense": None}
    with torch.no_grad():
        if eval_dense:
            t0 = time.perf_counter()
            res["ppl_dense"] = perplexity(model, windows, device, cfg.batch_size)
            timings["ppl_dense_s"] = time.perf_counter() - t0
        res["report"] = prune_model(model, calib, cfg)
        timings["prune_s"] = res["report"]["timings"]["total_s"]
        t0 = time.perf_counter()
        res["ppl_pruned"] = perplexity(model, windows, device, cfg.batch_size)
        timings["ppl_pruned_s"] = time.perf_counter() - t0
    res.update(_peak_memory_mib(device))
    if save_dir is not None:
        t0 = time.perf_counter()
        model.save_pretrained(save_dir, safe_serialization=True)  # zeros stored densely, dtype unchanged
        load_tokenizer(model_spec["path"], trust_remote_code=model_spec["trust_remote_code"],
                       template=model_spec["template"]).save_pretrained(save_dir)
        timings["save_s"] = time.perf_counter() - t0
    res["timings"] = timings
    return res


def _submit_all(remote_fn, calls: dict[int, tuple], max_parallel: int | None, on_done) -> None:
    """Run ``remote_fn.remote(*args)`` for every call, at most ``max_parallel`` in flight;
    ``on_done(i, result)`` as each finishes (so a crash loses only the runs in flight)."""
    import ray

    refs, pending = {}, list(calls.items())
    while pending or refs:
        while pending and (max_parallel is None or len(refs) < max_parallel):
            i, args = pending.pop(0)
            refs[remote_fn.remote(*args)] = i
        done, _ = ray.wait(list(refs), num_returns=1)
        on_done(refs.pop(done[0]), ray.get(done[0]))


RESULT_FILE = "_task_result.json"   # a finished run's raw result (resume); "_" keeps it out of fingerprints
CONFIG_FILE = "_config.json"        # the config the partial results belong to


def _reusable_results(work: Path, cfg: PruneConfig, dirs: list[Path]) -> dict[int, dict]:
    """Finished runs of an interrupted job with the same config (resume); else nothing."""
    import json

    now = {k: v for k, v in to_dict(cfg).items() if k != "overwrite"}
    f = work / CONFIG_FILE
    same = f.exists() and json.loads(f.read_text()) == now
    atomic_write_json(f, now)
    if not same:
        return {}
    return {i: json.loads((d / RESULT_FILE).read_text()) for i, d in enumerate(dirs) if (d / RESULT_FILE).exists()}


def run_tasks(cfg: PruneConfig, work: Path, grid: list[dict], names: list[str], dirs: list[Path], calib,
              windows, num_gpus: float) -> list[dict]:
    """One Ray task per configuration (finished ones of an interrupted run are reused)."""
    import ray

    results = _reusable_results(work, cfg, dirs)
    if results:
        log.info("prune: resuming, reusing %d finished run(s)", len(results))
    task = ray.remote(num_cpus=cfg.num_cpus, num_gpus=num_gpus)(prune_task)
    spec, threads = cfg.model.model_dump(), max(1, int(cfg.num_cpus))
    calib_ref, windows_ref = ray.put(calib), ray.put(windows)
    save = cfg.sweep.save_models if cfg.sweep else cfg.save_model
    need_dense = not any(r.get("ppl_dense") is not None for r in results.values())
    calls = {}
    for i, (s, d) in enumerate(zip(grid, dirs)):
        if i not in results:
            calls[i] = (spec, s, calib_ref, windows_ref, str(d / "model") if save else None, need_dense, threads)
            need_dense = False  # the dense model is measured once, by the first task submitted

    def done(i: int, res: dict) -> None:
        dirs[i].mkdir(parents=True, exist_ok=True)
        atomic_write_json(dirs[i] / RESULT_FILE, res)
        results[i] = res
        log.info("prune: %d/%d runs done (%s: ppl %.4g)", len(results), len(grid), names[i], res["ppl_pruned"])

    _submit_all(task, calls, cfg.sweep.max_parallel if cfg.sweep else 1, done)
    return [results[i] for i in range(len(grid))]


# ----------------------------------------------------------------------------- reports (driver)


def _block_table(report: dict) -> str:
    from effsft.report.plots import md_table

    rows = [{"block": b["index"], "S_mean": b["S_mean"], "S_median": b["S_median"], "D (%)": b["D"],
             "r_l": b["r"], "target s_l": b["target"], "achieved": b["achieved"], "params": b["params"],
             "clamped": "yes" if b["clamped"] else ""} for b in report["blocks"]]
    return md_table(rows, floatfmt=".4f")


def write_run(run_dir: Path, res: dict, ppl_dense: float | None, title: str) -> dict:
    """``prune_report.json``, ``sparsity.png`` and ``report.md`` of one configuration."""
    from effsft.prune.plots import plot_block_sparsity
    from effsft.report.plots import write_report

    rep = res["report"]
    g = rep["global"]
    full = {**rep, "perplexity": {"dense": ppl_dense, "pruned": res["ppl_pruned"]},
            "device": res["device"], "dtype": res["dtype"],
            "memory_mib": {k: v for k, v in res.items() if k.startswith("peak_")},
            "task_timings": res["timings"]}
    atomic_write_json(run_dir / "prune_report.json", full)
    plot_block_sparsity(rep, run_dir / "sparsity.png")
    dense = f"{ppl_dense:.4g}" if ppl_dense is not None else "n/a"
    summary = (f"method **{rep['effective']['method']}** ({rep['settings']['stat']}), criterion "
               f"**{rep['settings']['criterion']}**, target s = {g['target']:.4f}, shift c = {rep['shift_c']:.4g}\n\n"
               f"achieved sparsity: {g['achieved_prunable']:.4f} of the prunable set "
               f"({g['prunable_params']} weights), {g['achieved_all_params']:.4f} of all {g['total_params']} parameters\n\n"
               f"perplexity: dense {dense} -> pruned **{res['ppl_pruned']:.4g}** "
               f"({rep['n_calib']} calibration windows of {rep['seqlen']} tokens)\n\n"
               f"prune time {rep['timings']['total_s']:.2f} s; peak host RSS {res['peak_host_mib']:.0f} MiB"
               + (f"; peak device {res['peak_device_mib']:.0f} MiB" if "peak_device_mib" in res else ""))
    if rep["warnings"]:
        summary += "\n\nwarnings: " + "; ".join(rep["warnings"])
    write_report(run_dir / "report.md", title, [("Summary", summary), ("Per block: target vs achieved", _block_table(rep))],
                 images=[("Sparsity per block", "sparsity.png")])
    return full


def comparison_row(name: str, res: dict) -> dict:
    rep = res["report"]
    s = rep["settings"]
    dlp = s["method"] == "dlp"
    return {"run": name, "method": rep["effective"]["method"], "stat": s["stat"] if dlp else "-",
            "alpha": s["alpha"] if dlp else "-", "criterion": s["criterion"], "sparsity": rep["global"]["target"],
            "achieved": rep["global"]["achieved_prunable"], "ppl": res["ppl_pruned"],
            "prune_s": rep["timings"]["total_s"], "peak_host_mib": res["peak_host_mib"],
            "peak_device_mib": res.get("peak_device_mib")}


def write_comparison(out: Path, rows: list[dict], ppl_dense: float | None, title: str) -> None:
    from effsft.prune.plots import plot_sweep
    from effsft.report.plots import md_table, write_report

    atomic_write_json(out / "comparison.json", {"ppl_dense": ppl_dense, "rows": rows})
    cols = ["run", "method", "stat", "alpha", "criterion", "sparsity", "achieved", "ppl", "prune_s", "peak_host_mib"]
    if any(r["peak_device_mib"] is not None for r in rows):
        cols.append("peak_device_mib")
    dense = f"dense perplexity: **{ppl_dense:.4g}**" if ppl_dense is not None else ""
    table = md_table(rows, cols, floatfmt=".4g")
    (out / "comparison.md").write_text(f"# {title}\n\n{dense}\n\n{table}\n\n![perplexity](comparison.png)\n")
    plot_sweep(rows, out / "comparison.png", ppl_dense)
    write_report(out / "report.md", title, [("Comparison", f"{dense}\n\n{table}")],
                 images=[("Perplexity vs sparsity", "comparison.png")])


# ----------------------------------------------------------------------------- entry point


def _cluster_gpus() -> float:
    import ray

    return float(ray.cluster_resources().get("GPU", 0))


def _load_data(cfg: PruneConfig) -> tuple:
    from transformers import AutoConfig

    from effsft.models.loading import load_tokenizer

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


def demo_config(model_dir: str, corpus_dir: str, output: str, sparsity: float = 0.5) -> dict:
    """Config data for the demo's prune stage (tiny model, small calibration; needs >= 300
    good rows in ``corpus_dir``: 200 for calibration, the next 100 held out for perplexity).

    ``effsft.demo`` can run it as ``_stage("prune", out, PruneConfig, run_prune,
    demo_config(model, prepared / "data", out / "prune"), summary)``.
    """
    return {"model": {"path": str(model_dir)}, "output": str(output),
            "prune": {"method": "dlp", "criterion": "wanda", "sparsity": sparsity, "stat": "median",
                      "calib": {"data": {"path": str(corpus_dir)}, "n_samples": 16, "seqlen": 128,
                                "max_docs": 200},
                      "eval": {"n_windows": 8, "max_docs": 100}, "batch_size": 8}}
