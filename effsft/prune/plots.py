"""Plot of per-block target vs achieved sparsity (``sparsity.png`` of the prune job)."""

from __future__ import annotations

from pathlib import Path


def plot_block_sparsity(report: dict, path: str | Path, title: str | None = None) -> Path:
    """Write a PNG with target ``s_l`` and achieved sparsity per block and a line at ``s``.

    Args:
        report: the dict returned by :func:`effsft.prune.blockwise.prune_model`.
        path: output PNG path.
        title: optional title (default: method, criterion and ``s``).

    Returns:
        The written path.
    """
    from effsft.report.plots import plt, save  # pyplot on the headless Agg backend

    blocks = report["blocks"]
    idx = [b["index"] for b in blocks]
    target = [b["target"] for b in blocks]
    achieved = [b["achieved"] for b in blocks]
    s = report["global"]["target"]
    eff = report.get("effective", {})
    crit = report.get("settings", {}).get("criterion", "")

    fig, ax = plt.subplots(figsize=(max(5.0, 0.25 * len(idx) + 3), 3.5))
    ax.plot(idx, target, "o-", label="target $s_l$")
    ax.plot(idx, achieved, "x--", label="achieved")
    ax.axhline(s, color="grey", lw=1, ls=":", label=f"global s = {s:g}")
    clamped = [i for i, b in zip(idx, blocks) if b.get("clamped")]
    if clamped:
        ax.plot(clamped, [target[idx.index(i)] for i in clamped], "rs", mfc="none", ms=9, label="clamped")
    ax.set_xlabel("block")
    ax.set_ylabel("sparsity")
    ax.set_ylim(0, 1)
    ax.set_title(title or f"{eff.get('method', '')} / {crit}, s = {s:g}")
    ax.legend(fontsize=8)
    return Path(save(fig, path, dpi=120))


def plot_sweep(rows: list[dict], path: str | Path, ppl_dense: float | None = None) -> Path:
    """Perplexity vs target sparsity, one line per (method, stat, criterion), log scale.

    Args:
        rows: comparison rows with ``run`` (e.g. ``dlp-median_wanda_s0.70``), ``sparsity``, ``ppl``.
        path: output PNG path.
        ppl_dense: drawn as a horizontal line when given.

    Returns:
        The written path.
    """
    from effsft.report.plots import plt, save

    import re

    series: dict[str, list[tuple[float, float]]] = {}
    for r in rows:
        label = re.sub(r"_s[0-9.]+", "", r["run"])  # the run's name without its sparsity
        series.setdefault(label, []).append((r["sparsity"], r["ppl"]))
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for label, pts in sorted(series.items()):
        pts.sort()
        ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", label=label)
    if ppl_dense is not None:
        ax.axhline(ppl_dense, color="grey", lw=1, ls=":", label=f"dense {ppl_dense:.3g}")
    ax.set_yscale("log")
    ax.set_xlabel("target sparsity")
    ax.set_ylabel("perplexity (log)")
    ax.set_title("pruned perplexity")
    ax.legend(fontsize=7)
    return Path(save(fig, path, dpi=120))
