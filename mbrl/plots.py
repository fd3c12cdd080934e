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
        xs, ys = _common_grid(paths, x, y)
        if not xs:
            continue
        (line,) = ax.plot(
            xs, ys.mean(0), marker="o", markersize=3, label=f"{label} (n={len(paths)})"
        )
        if len(paths) > 1:
            ax.fill_between(xs, ys.min(0), ys.max(0), color=line.get_color(), alpha=0.2)
    return _finish(fig, ax, out, x, y, title, target)


def summary_table(
    groups: dict[str, Sequence[Path]],
    x: str = "env_steps",
    y: str = "return",
    threshold: float | None = None,
) -> str:
    """A markdown table of each group over its runs (seeds): the mean of ``y`` over each run's
    logged points (the normalised area under its learning curve, a sample-efficiency measure at
    a common ``x`` grid), the last ``y``, and the first ``x`` at which ``y >= threshold``
    ("never" where a run does not reach it). Means are over runs, with the per-run values in
    brackets; only the ``x`` values every run of the group logged are used, and the table
    names the last of them (a run still going shortens its group's grid)."""
    head = f"| group | runs | {x} up to | mean {y} over the curve | last {y} |"
    rule = "| --- | --- | --- | --- | --- |"
    if threshold is not None:
        head += f" first {x} with {y} >= {threshold:g} |"
        rule += " --- |"
    lines = [head, rule]
    for label, paths in groups.items():
        xs, ys = _common_grid(paths, x, y)
        if not xs:
            blank = " |" if threshold is not None else ""
            lines.append(f"| {label} | {len(paths)} | no common {x} | | |{blank}")
            continue
        area, last = ys.mean(1), ys[:, -1]
        row = f"| {label} | {len(paths)} | {xs[-1]:g} | {_mean_and_each(area)} |"
        row += f" {_mean_and_each(last)} |"
        if threshold is not None:
            reached = ys >= threshold  # [runs, points]
            firsts = [xs[int(r.argmax())] if r.any() else None for r in reached]
            each = ", ".join("never" if f is None else f"{f:g}" for f in firsts)
            row += f" {each} |"
        lines.append(row)
    return "\n".join(lines)


def _common_grid(paths: Sequence[Path], x: str, y: str) -> tuple[list[float], np.ndarray]:
    """The ``x`` values every run logged, and ``y`` there ``[runs, points]``."""
    curves = [dict(zip(*read_curve(p, x, y), strict=True)) for p in paths]
    xs = sorted(set.intersection(*(set(c) for c in curves))) if curves else []
    return xs, np.array([[c[v] for v in xs] for c in curves])


def _mean_and_each(values: np.ndarray) -> str:
    each = ", ".join(f"{v:.4g}" for v in values)
    return f"{values.mean():.4g}" + (f" ({each})" if len(values) > 1 else "")


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
