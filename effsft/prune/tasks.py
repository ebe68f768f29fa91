"""The Ray side of ``effsft prune``: the per-configuration task (load, perplexity, prune,
perplexity, save; peak memory) and its submission with at most ``max_parallel`` in flight,
reusing the finished runs of an interrupted job."""
from __future__ import annotations

import logging
from pathlib import Path

from effsft.config import to_dict
from effsft.prune.config import PruneConfig
from effsft.runtime import atomic_write_json

log = logging.getLogger("effsft.prune")


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
    from effsft.prune.blockwise import PruneSettings, prune_model
    from effsft.prune.streaming import perplexity

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
