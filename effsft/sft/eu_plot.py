"""Plot of one micro-batch on the error-uncertainty plane (Q-Tuning, arXiv:2509.23873, Fig. 1).

x = log PPL, y = mean entropy; points coloured by decision; dashed lines at the corner thresholds
(P_lo, P_hi, E_lo, E_hi) and dotted lines at the midpoints used to label Q1/Q3.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from effsft.report.plots import plt, save  # pyplot on the headless Agg backend

DECISION_COLOURS = {
    "Q2": "tab:red",
    "Q2-like": "lightcoral",
    "Q4": "tab:blue",
    "Q4-like": "lightskyblue",
    "Q1": "tab:gray",
    "Q3": "darkgray",
    "other": "silver",
    "kept": "tab:green",
    "dropped": "silver",
}


def _vline(ax, value: float, style: str, label: str) -> None:
    if value is not None and math.isfinite(value) and value > 0:
        ax.axvline(math.log(value), color="k", linestyle=style, linewidth=0.8, label=label)


def _hline(ax, value: float, style: str, label: str) -> None:
    if value is not None and math.isfinite(value):
        ax.axhline(value, color="k", linestyle=style, linewidth=0.8, label=label)


def plot_eu_plane(info: dict, path: str | Path, title: str | None = None) -> Path:
    """Write the EU-plane scatter of one selection to a PNG.

    Args:
        info: the ``info`` dict of :func:`effsft.sft.qtuning.eu_prune` / ``eu_select`` (uses ``ppl``,
            ``ent``, ``decision`` and the thresholds ``P_lo``, ``P_hi``, ``E_lo``, ``E_hi``,
            ``P_mid``, ``E_mid``).
        path: output PNG path (parent directories are created).
        title: optional title (e.g. ``"step 500"``).

    Returns:
        The written path.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    log_ppl = np.log(np.maximum(np.asarray(info["ppl"], dtype=np.float64), 1e-300))
    ent = np.asarray(info["ent"], dtype=np.float64)
    decision = np.asarray(info["decision"], dtype=object)
    fig, ax = plt.subplots(figsize=(5.5, 4.5), dpi=100)
    for name, colour in DECISION_COLOURS.items():
        sel = decision == name
        if sel.any():
            ax.scatter(log_ppl[sel], ent[sel], s=28, color=colour, edgecolors="k", linewidths=0.3, label=f"{name} ({int(sel.sum())})")
    _vline(ax, info.get("P_lo"), "--", "P_lo / P_hi")
    _vline(ax, info.get("P_hi"), "--", None)
    _hline(ax, info.get("E_lo"), "--", "E_lo / E_hi")
    _hline(ax, info.get("E_hi"), "--", None)
    _vline(ax, info.get("P_mid"), ":", "midpoints")
    _hline(ax, info.get("E_mid"), ":", None)
    ax.set_xlabel("log PPL (error)")
    ax.set_ylabel("mean entropy (uncertainty)")
    ax.set_title(title or f"EU plane ({info.get('method', 'qtuning')}, B={len(ent)})")
    ax.legend(fontsize=7, loc="best")
    save(fig, path, dpi=100)
    return path
