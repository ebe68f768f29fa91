"""Small matplotlib helpers shared by job reports (headless, Agg backend)."""
from __future__ import annotations

import os
from typing import Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def save(fig, path: str | os.PathLike, dpi: int = 110) -> str:
    """Lay out, write (creating the parent directory) and close a figure; return the path."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return str(path)


def histogram(path: str | os.PathLike, series: dict[str, Sequence[float]], title: str,
              xlabel: str, bins: int = 50, log: bool = False) -> str:
    """Overlaid histograms of one or more named series (e.g. pool vs selected)."""
    fig, ax = plt.subplots(figsize=(6, 4))
    finite = [np.asarray(v, dtype=float) for v in series.values()]
    finite = [v[np.isfinite(v)] for v in finite]
    allv = np.concatenate(finite) if finite and sum(len(v) for v in finite) else np.zeros(1)
    edges = np.histogram_bin_edges(allv, bins=bins)
    for (name, _), v in zip(series.items(), finite):
        ax.hist(v, bins=edges, alpha=0.55, label=f"{name} (n={len(v)})", density=True)
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("density")
    if log:
        ax.set_yscale("log")
    ax.legend()
    return save(fig, path)


def bars(path: str | os.PathLike, labels: Sequence[str], values: dict[str, Sequence[float]],
         title: str, ylabel: str) -> str:
    """Grouped bar chart: one group per label, one bar per named series."""
    fig, ax = plt.subplots(figsize=(max(6, 0.35 * len(labels)), 4))
    x = np.arange(len(labels))
    width = 0.8 / max(1, len(values))
    for i, (name, v) in enumerate(values.items()):
        ax.bar(x + i * width, v, width, label=name)
    ax.set_xticks(x + 0.4 - width / 2)
    ax.set_xticklabels(labels, rotation=60 if len(labels) > 12 else 0, fontsize=8)
    ax.set_title(title)
    ax.set_ylabel(ylabel)
    ax.legend()
    return save(fig, path)


def curve(path: str | os.PathLike, xs: Sequence[float], ys: dict[str, Sequence[float]],
          title: str, xlabel: str, ylabel: str) -> str:
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, y in ys.items():
        ax.plot(xs[: len(y)], y, label=name)
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.legend()
    return save(fig, path)


def write_report(path: str | os.PathLike, title: str, sections: list[tuple[str, str]],
                 images: Sequence[tuple[str, str]] = ()) -> None:
    """A short ``report.md``: titled markdown sections, then the PNGs (relative names)."""
    lines = [f"# {title}", ""]
    for head, body in sections:
        lines += [f"## {head}", "", body.rstrip(), ""]
    for caption, rel in images:
        lines += [f"### {caption}", "", f"![{caption}]({rel})", ""]
    with open(path, "w") as f:
        f.write("\n".join(lines))


def md_table(rows: list[dict], columns: Sequence[str] | None = None, floatfmt: str = ".4g") -> str:
    if not rows:
        return "(none)"
    columns = list(columns or rows[0].keys())

    def fmt(v):
        return format(v, floatfmt) if isinstance(v, float) else str(v)

    out = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    out += ["| " + " | ".join(fmt(r.get(c, "")) for c in columns) + " |" for r in rows]
    return "\n".join(out)
