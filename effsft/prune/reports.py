"""The reports of ``effsft prune``: per configuration ``prune_report.json``, ``sparsity.png``
and ``report.md``; for a sweep ``comparison.json`` / ``.md`` / ``.png`` and its ``report.md``."""
from __future__ import annotations

from pathlib import Path

from effsft.runtime import atomic_write_json


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
