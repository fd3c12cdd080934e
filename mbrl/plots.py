"""Learning-curve plots (PNG, matplotlib's Agg backend: no display needed)."""

from __future__ import annotations

import csv
from collections.abc import Sequence
from pathlib import Path

import matplotlib
import numpy as np
import yaml

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
    return _finish(fig, ax, out, x, y, title, target)


def grouped_curves(
    groups: dict[str, Sequence[Path]],
    out: Path,
    x: str = "env_steps",
    y: str = "return",
    title: str = "",
    target: float | None = None,
) -> Path:
    """Plot the mean of ``y`` over each group's runs (seeds) with a min-max band, at the ``x``
    values all runs of the group have logged, and save a PNG."""
    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    for label, paths in groups.items():
        curves = [dict(zip(*read_curve(p, x, y), strict=True)) for p in paths]
        xs = sorted(set.intersection(*(set(c) for c in curves))) if curves else []
        if not xs:
            continue
        ys = np.array([[c[v] for v in xs] for c in curves])  # [runs, points]
        (line,) = ax.plot(
            xs, ys.mean(0), marker="o", markersize=3, label=f"{label} (n={len(paths)})"
        )
        if len(paths) > 1:
            ax.fill_between(xs, ys.min(0), ys.max(0), color=line.get_color(), alpha=0.2)
    return _finish(fig, ax, out, x, y, title, target)


def _finish(fig, ax, out: Path, x: str, y: str, title: str, target: float | None) -> Path:
    """Target line, labels, grid and legend; save the PNG and close the figure."""
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


def run_algo(run_path: Path) -> str | None:
    """The algorithm of a run folder (its ``run.yaml``), or None."""
    return _read_yaml(Path(run_path) / "run.yaml").get("algo")


def _read_yaml(path: Path) -> dict:
    try:
        return yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError):
        return {}


def related_runs(run_path: Path, keys: Sequence[str] = ("env", "seed", "learner.name")) -> list:
    """Sibling run folders of ``run_path`` (same parent) whose ``config.yaml`` agrees with this
    run's on every dotted key in ``keys`` and whose algorithm differs, as ``(algo, path)`` sorted
    by algorithm.

    With the default keys an MBPO run finds the SAC run of the same env and seed (both use
    ``learner.name: sac``), MVE finds TD3 and MBA finds NAF, and each baseline finds them back.
    """
    run_path = Path(run_path)

    def fields(path: Path) -> tuple | None:
        cfg = _read_yaml(path / "config.yaml")
        values = []
        for key in keys:
            node = cfg
            for part in key.split("."):
                if not isinstance(node, dict) or part not in node:
                    return None
                node = node[part]
            values.append(node)
        return tuple(values)

    mine = fields(run_path)
    algo = run_algo(run_path)
    if mine is None or not run_path.parent.is_dir():
        return []
    found = []
    for other in sorted(run_path.parent.iterdir()):
        if other == run_path or not (other / "metrics.csv").exists():
            continue
        other_algo = run_algo(other)
        if other_algo and other_algo != algo and fields(other) == mine:
            found.append((other_algo, other))
    return sorted(found, key=lambda t: t[0])
