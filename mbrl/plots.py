"""Learning-curve plots and image strips (PNG, matplotlib's Agg backend: no display needed)."""

from __future__ import annotations

import csv
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import matplotlib
import numpy as np
import yaml

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

RANDOM_PHASE_COLUMN = "trial"
"""The ``metrics.csv`` column whose value 0 marks the random-action episodes of an MPC run
(PETS, GP-MPC: :func:`mbrl.algorithms.mpc_loop.train_mpc` logs them before trial 1)."""

RANDOM_PHASE_KEY = "start_steps"
"""The ``config.yaml`` key of a Dyna run's uniform-random env steps (MBPO, MVE, MBA, SAC, ...)."""


@dataclass(frozen=True)
class RunCurve:
    """One run's logged learning curve.

    Fields:
        x: ``[K]`` the logged ``x`` values (env steps), increasing, one per point.
        y: ``[K]`` the logged ``y`` (return) at each, finite.
        random_until: the last ``x`` of the run's random-action phase (see
            :func:`random_phase_end`), or None when it has none or it is not known.
    """

    x: np.ndarray
    y: np.ndarray
    random_until: float | None = None


@dataclass(frozen=True)
class GroupCurve:
    """Runs (seeds) of one group aligned on a common grid of ``x``, with their mean and a
    bootstrap confidence band of the mean (``R`` runs, ``G`` grid points).

    Fields:
        grid: ``[G]`` every ``x`` some run logged, increasing (the union of the runs' points).
        values: ``[R, G]`` each run linearly interpolated between its own logged points; NaN
            outside the run's own ``[first x, last x]`` (never extrapolated).
        count: ``[G]`` runs that cover each grid point (the non-NaN entries of ``values``).
        mean: ``[G]`` mean over the runs covering each point.
        low, high: ``[G]`` the percentile bootstrap interval of that mean at level
            ``confidence`` (resampling the covering runs with replacement; equal to ``mean``
            where one run covers the point).
        confidence: the interval's level, 0.95 by default.
        random_until: the last ``x`` of the random-action phase, the largest over the runs
            (None when no run has one).
    """

    grid: np.ndarray
    values: np.ndarray
    count: np.ndarray
    mean: np.ndarray
    low: np.ndarray
    high: np.ndarray
    confidence: float
    random_until: float | None


def read_curve(metrics_csv: Path, x: str, y: str) -> tuple[list[float], list[float]]:
    """Columns ``x`` and ``y`` of a ``metrics.csv`` (rows where both are set), in file order."""
    xs, ys = [], []
    with Path(metrics_csv).open(newline="") as f:
        for row in csv.DictReader(f):
            if row.get(x) not in (None, "") and row.get(y) not in (None, ""):
                xs.append(float(row[x]))
                ys.append(float(row[y]))
    return xs, ys


def read_run(metrics_csv: Path, x: str = "env_steps", y: str = "return") -> RunCurve:
    """The run's curve: rows of ``metrics.csv`` with both ``x`` and a finite ``y`` (a NaN
    return is an epoch without an evaluation), sorted by ``x``; where ``x`` repeats, the last
    row logged wins. Raises ValueError when the file has no column ``x`` or ``y``."""
    path = Path(metrics_csv)
    with path.open(newline="") as f:
        columns = next(csv.reader(f), [])
    for name, flag in ((x, "--x"), (y, "--y")):
        if name not in columns:
            raise ValueError(
                f"{path} has no column {name!r}; pass {flag} one of: {', '.join(columns)}"
            )
    points: dict[float, float] = {}
    for a, b in zip(*read_curve(path, x, y), strict=True):
        if np.isfinite(a) and np.isfinite(b):
            points[a] = b
    xs = np.array(sorted(points), dtype=float)
    ys = np.array([points[v] for v in xs], dtype=float)
    return RunCurve(xs, ys, random_phase_end(path, x))


def random_phase_end(metrics_csv: Path, x: str = "env_steps") -> float | None:
    """The last ``x`` of a run's random-action phase, the steps before its first learned or
    MPC action, or None.

    An MPC run (PETS, GP-MPC) logs each random episode as a row with ``trial`` 0: the phase ends
    at the largest ``x`` of those rows. A Dyna run (MBPO, MVE, MBA and their model-free
    baselines) acts at random for its config's ``start_steps`` env steps (the run folder's
    ``config.yaml``), known only when ``x`` is ``env_steps``.
    """
    path = Path(metrics_csv)
    with path.open(newline="") as f:
        rows = list(csv.DictReader(f))
    if rows and RANDOM_PHASE_COLUMN in rows[0]:
        random = [
            float(r[x])
            for r in rows
            if r.get(RANDOM_PHASE_COLUMN) in ("0", "0.0") and r.get(x) not in (None, "")
        ]
        return max(random) if random else None
    start = _read_yaml(path.parent / "config.yaml").get(RANDOM_PHASE_KEY)
    if x == "env_steps" and isinstance(start, int) and not isinstance(start, bool) and start > 0:
        return float(start)
    return None


def aggregate(
    runs: Sequence[RunCurve], confidence: float = 0.95, resamples: int = 2000, seed: int = 0
) -> GroupCurve:
    """Align ``runs`` on the union of their logged ``x`` (interpolating each run only within its
    own range) and bootstrap the mean over runs at every grid point (as rliable's interval
    estimates do, over runs): ``resamples`` resamples of the covering runs, drawn from
    ``numpy.random.default_rng(seed)``, so the same runs give the same band."""
    if not runs:
        raise ValueError("aggregate needs at least one run")
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    if resamples < 1:
        raise ValueError(f"resamples must be >= 1, got {resamples}")
    grid = np.unique(np.concatenate([r.x for r in runs]))  # [G]
    values = np.full((len(runs), grid.size), np.nan)  # [R, G]
    for i, r in enumerate(runs):
        if r.x.size:
            inside = (grid >= r.x[0]) & (grid <= r.x[-1])
            values[i, inside] = np.interp(grid[inside], r.x, r.y)
    covered = ~np.isnan(values)
    count = covered.sum(0)  # [G]
    mean = np.full(grid.size, np.nan)
    low, high = mean.copy(), mean.copy()
    # covering runs first in every column, then one multinomial resample per distinct count
    ordered = np.take_along_axis(values, np.argsort(~covered, axis=0, kind="stable"), axis=0)
    rng = np.random.default_rng(seed)
    tail = (1.0 - confidence) / 2.0
    for c in np.unique(count[count > 0]):
        cols = count == c
        sub = ordered[:c, cols]  # [c, Gc]
        weights = rng.multinomial(c, np.full(c, 1.0 / c), size=resamples) / c  # [resamples, c]
        boot = weights @ sub  # [resamples, Gc] resampled means
        mean[cols] = sub.mean(0)
        low[cols], high[cols] = np.quantile(boot, [tail, 1.0 - tail], axis=0)
    ends = [r.random_until for r in runs if r.random_until is not None]
    return GroupCurve(grid, values, count, mean, low, high, confidence, max(ends) if ends else None)


def first_reached(run: RunCurve, threshold: float) -> float | None:
    """The first logged ``x`` at which the run's own ``y >= threshold``, or None."""
    hit = np.flatnonzero(run.y >= threshold)
    return float(run.x[hit[0]]) if hit.size else None


def learning_curve(
    runs: Sequence[tuple[str, Path]],
    out: Path,
    x: str = "env_steps",
    y: str = "return",
    title: str = "",
    target: float | None = None,
) -> Path:
    """Plot ``y`` against ``x`` for each ``(label, metrics.csv)`` on one axes, each run's
    random-action phase shaded in its colour, and save a PNG."""
    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    for label, path in runs:
        run = read_run(path, x, y)
        (line,) = ax.plot(run.x, run.y, marker="o", markersize=3, label=label)
        _shade_random(ax, run.random_until, line.get_color(), label)
    return _finish(fig, ax, out, x, y, title, target)


def grouped_curves(
    groups: dict[str, Sequence[Path]],
    out: Path,
    x: str = "env_steps",
    y: str = "return",
    title: str = "",
    target: float | None = None,
    confidence: float = 0.95,
    seed: int = 0,
) -> dict[str, GroupCurve]:
    """Plot each group's runs (seeds) aligned by :func:`aggregate`: the mean of ``y`` with its
    bootstrap band where two or more runs cover ``x``, the number of runs covering it written
    where it changes, and the group's random-action phase shaded. Saves the PNG at ``out`` and
    the plotted numbers at ``out`` with suffix ``.csv`` (group, x, runs, mean, low, high);
    returns the aligned groups."""
    curves = {
        label: aggregate([read_run(p, x, y) for p in paths], confidence, seed=seed)
        for label, paths in groups.items()
    }
    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    for label, g in curves.items():
        (line,) = ax.plot(
            g.grid, g.mean, marker="o", markersize=2, label=f"{label} (n={g.values.shape[0]})"
        )
        color = line.get_color()
        band = g.count >= 2
        if band.any():
            ax.fill_between(
                g.grid,
                g.low,
                g.high,
                where=band,
                color=color,
                alpha=0.2,
                linewidth=0,
                label=f"{label} {g.confidence:.0%} CI of the mean",
            )
        changes = np.flatnonzero(np.diff(g.count, prepend=-1))
        if changes.size > 1:  # the number of runs covering x is not constant: say where
            for i in changes:
                ax.annotate(
                    f"n={g.count[i]}",
                    (g.grid[i], g.mean[i]),
                    textcoords="offset points",
                    xytext=(0, 6),
                    fontsize=7,
                    color=color,
                    ha="center",
                )
        _shade_random(ax, g.random_until, color, label)
    _finish(fig, ax, out, x, y, title, target)
    with Path(out).with_suffix(".csv").open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["group", x, "runs", f"mean_{y}", "low", "high"])
        for label, g in curves.items():
            for i in range(g.grid.size):
                writer.writerow(
                    [
                        label,
                        _num(g.grid[i]),
                        int(g.count[i]),
                        *(f"{v[i]:.6g}" for v in (g.mean, g.low, g.high)),
                    ]
                )
    return curves


def summary_table(
    groups: dict[str, Sequence[Path]],
    x: str = "env_steps",
    y: str = "return",
    threshold: float | None = None,
) -> str:
    """A markdown table of each group over its runs (seeds), from the runs aligned by
    :func:`aggregate`:

    - ``{x} up to``: the last ``x`` every run covers (the shortest run's end), followed by each
      run's own last ``x`` in brackets when they differ;
    - ``mean {y} over the curve``: each run's mean of ``y`` (interpolated) over the grid points
      every run covers, from the latest first ``x`` to there (the normalised area under its
      learning curve, a sample-efficiency measure on a range and grid common to the group's
      runs), and their mean;
    - ``last {y}``: each run's last logged ``y``, and their mean;
    - with ``threshold``: each run's first logged ``x`` at which its own ``y >= threshold``
      (:func:`first_reached`, from its own rows, not the aligned grid), "never" where it does
      not reach it.
    """
    head = f"| group | runs | {x} up to | mean {y} over the curve | last {y} |"
    rule = "| --- | --- | --- | --- | --- |"
    if threshold is not None:
        head += f" first {x} with {y} >= {threshold:g} |"
        rule += " --- |"
    lines = [head, rule]
    for label, paths in groups.items():
        runs = [read_run(p, x, y) for p in paths]
        row = f"| {label} | {len(paths)} |"
        g = aggregate(runs, resamples=1)
        common = g.count == len(runs)
        if not common.any():
            row += f" no common {x} | |"
        else:
            ends = [_num(r.x[-1]) for r in runs]
            upto = _num(g.grid[common][-1])
            row += f" {upto}" + (f" ({', '.join(ends)})" if len(set(ends)) > 1 else "") + " |"
            area = g.values[:, common].mean(1)  # the covered range is one interval
            row += f" {_mean_and_each(area)} |"
        last = np.array([r.y[-1] if r.y.size else np.nan for r in runs])  # nan: no rows yet
        row += f" {_mean_and_each(last)} |"
        if threshold is not None:
            firsts = [first_reached(r, threshold) for r in runs]
            row += " " + ", ".join("never" if f is None else _num(f) for f in firsts) + " |"
        lines.append(row)
    return "\n".join(lines)


def _num(v: float) -> str:
    """``v`` without an exponent for env-step counts (1000000, not 1e+06)."""
    return f"{v:.12g}"


def _mean_and_each(values: np.ndarray) -> str:
    each = ", ".join(f"{v:.4g}" for v in values)
    return f"{values.mean():.4g}" + (f" ({each})" if len(values) > 1 else "")


def _shade_random(ax, until: float | None, color: str, label: str) -> None:
    """Mark the random-action phase, ``x`` from 0 to ``until``: a grey span that ends at a
    dotted line in the curve's ``color``."""
    if until is not None:
        ax.axvspan(0.0, until, color="gray", alpha=0.08, linewidth=0)
        ax.axvline(
            until,
            color=color,
            linestyle=":",
            linewidth=1.2,
            label=f"{label}: random actions up to {_num(until)}",
        )


def _finish(fig, ax, out: Path, x: str, y: str, title: str, target: float | None) -> Path:
    """Target line, labels, grid and legend; save the PNG and close the figure."""
    if target is not None:
        ax.axhline(target, color="gray", linestyle="--", linewidth=1, label=f"solved ({target:g})")
    ax.set_xlabel(x.replace("_", " "))
    ax.set_ylabel(y.replace("_", " "))
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.margins(y=0.1)  # room for the run counts written above the curves
    ax.legend(loc="best", fontsize=8)
    fig.tight_layout()
    out = Path(out)
    fig.savefig(out)
    plt.close(fig)
    return out


def image_strip(rows: Sequence[tuple[str, np.ndarray]], out: Path, title: str = "") -> Path:
    """Rows of frames side by side, one labelled row per ``(label, uint8 [T, H, W, 3])`` (real
    frames against a model's predictions, say), saved as a PNG; rows may differ in ``T``."""
    cols = max(len(frames) for _, frames in rows)
    fig, axes = plt.subplots(
        len(rows), cols, figsize=(0.9 * cols, 1.0 * len(rows) + 0.4), dpi=100, squeeze=False
    )
    for r, (label, frames) in enumerate(rows):
        for c in range(cols):
            ax = axes[r, c]
            ax.set_xticks([]), ax.set_yticks([])
            if c < len(frames):
                ax.imshow(frames[c], interpolation="nearest")
            else:
                ax.axis("off")
        axes[r, 0].set_ylabel(label, fontsize=8)
    fig.suptitle(title, fontsize=9)
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
