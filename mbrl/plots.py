"""Learning-curve plots (PNG, matplotlib's Agg backend: no display needed)."""

from __future__ import annotations

import csv
from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def read_curve(metrics_csv: Path, x: str, y: str) -> tuple[list[float], list[float]]:
    """Columns ``x`` and ``y`` of a ``metrics.csv`` (rows where both are set)."""
    xs, ys = [], []
    with Path(metrics_csv).open(newline="") as f:
        for row in csv.DictReader(f):
            if row.get(x) not in (None, "") and row.get(y) not in (None, ""):
                xs.append(float(row[x]))
                ys.append(float(row[y]))
    return xs, ys


def learning_curve(
    runs: Sequence[tuple[str, Path]],
    out: Path,
    x: str = "env_steps",
    y: str = "return",
    title: str = "",
    target: float | None = None,
) -> Path:
    """Plot ``y`` against ``x`` for each ``(label, metrics.csv)`` on one axes and save a PNG."""
    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    for label, path in runs:
        xs, ys = read_curve(path, x, y)
        ax.plot(xs, ys, marker="o", markersize=3, label=label)
    if target is not None:
        ax.axhline(target, color="gray", linestyle="--", linewidth=1, label=f"solved ({target:g})")
    ax.set_xlabel(x.replace("_", " "))
    ax.set_ylabel(y.replace("_", " "))
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(loc="best", fontsize=8)
    fig.tight_layout()
    out = Path(out)
    fig.savefig(out)
    plt.close(fig)
    return out
