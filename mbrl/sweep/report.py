"""The report of a sweep: ``report.md`` (one aggregate table per setting, paired comparisons by
seed, the runs' own numbers) and ``report.png`` (mean and confidence band per setting), both in
the sweep folder.

Per setting, over its done runs: the final return (each run's last logged ``return``), the mean
return over the curve (each run's mean over the env steps every run of the setting covers, the
normalised area under its learning curve, as :func:`mbrl.plots.summary_table` computes it) and,
with a threshold, the first env step at which a run's return reaches it. Each is given as the
mean over runs, its standard error and the percentile bootstrap interval of the mean
(:func:`mbrl.plots.aggregate`'s resampling). Two settings that share seeds are compared seed by
seed: the mean paired difference, its standard error and the two-sided paired t-test.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mbrl.plots import RunCurve, aggregate, first_reached, grouped_curves, read_run, summary_table
from mbrl.sweep.manifest import Manifest

REPORT = "report.md"
PLOT = "report.png"


@dataclass(frozen=True)
class Estimate:
    """A mean over ``n`` runs: its standard error (NaN for one run) and the percentile
    bootstrap interval ``[low, high]`` of the mean at the report's confidence."""

    n: int
    mean: float
    se: float
    low: float
    high: float

    def text(self) -> str:
        se = "" if math.isnan(self.se) else f" ± {self.se:.4g}"
        return f"{self.mean:.4g}{se} [{self.low:.4g}, {self.high:.4g}]"


@dataclass(frozen=True)
class SettingStats:
    """One setting over its done runs (``final``, ``curve``: None when none is done;
    ``first``: over the runs that reach the threshold, ``reached`` of them)."""

    setting: str
    runs: int
    done: int
    final: Estimate | None
    curve: Estimate | None
    first: Estimate | None
    reached: int


@dataclass(frozen=True)
class Comparison:
    """Setting ``b`` against setting ``a`` on ``metric``, paired by seed over the ``n`` seeds
    both have done: the mean of ``b - a``, its standard error, the t statistic, the two-sided
    p-value of the paired t-test, and the seeds on which ``b`` is ahead."""

    a: str
    b: str
    metric: str
    n: int
    diff: float
    se: float
    t: float
    p: float
    ahead: int

    def text(self) -> str:
        ahead = f"ahead on {self.ahead} of {self.n}"
        return f"{self.diff:+.4g} ± {self.se:.4g} (p = {_p(self.p)}, {ahead})"


@dataclass(frozen=True)
class Report:
    """A sweep's report and where it was written (``plot``: None when no run is done)."""

    settings: tuple[SettingStats, ...]
    comparisons: tuple[Comparison, ...]
    markdown: Path
    plot: Path | None
    text: str


def estimate(values: Sequence[float], confidence: float = 0.95, seed: int = 0) -> Estimate:
    """The mean of ``values`` (one per run), its standard error and the bootstrap interval of
    the mean, from :func:`mbrl.plots.aggregate` on one point per run (2000 resamples drawn
    from ``numpy.random.default_rng(seed)``)."""
    v = np.asarray(values, dtype=float)
    if v.size == 0:
        raise ValueError("estimate needs at least one value")
    points = [RunCurve(np.zeros(1), np.array([x])) for x in v]
    g = aggregate(points, confidence, seed=seed)
    se = float(v.std(ddof=1) / math.sqrt(v.size)) if v.size > 1 else math.nan
    return Estimate(int(v.size), float(v.mean()), se, float(g.low[0]), float(g.high[0]))


def t_test_p(t: float, df: int) -> float:
    """The two-sided p-value ``P(|T| >= |t|)`` of Student's t with integer ``df >= 1`` degrees
    of freedom, from the closed forms of its distribution for integer ``df`` (Abramowitz and
    Stegun 26.7.3 and 26.7.4): with ``c = cos(atan(|t| / sqrt(df)))`` the probability inside is
    a finite series in ``c``."""
    if df < 1:
        raise ValueError(f"df must be an integer >= 1, got {df}")
    if math.isnan(t):
        return math.nan
    if math.isinf(t):
        return 0.0
    theta = math.atan(abs(t) / math.sqrt(df))
    s, c = math.sin(theta), math.cos(theta)
    if df % 2:  # odd: 2/pi (theta + s (c + 2/3 c^3 + ... + c^(df-2) ...))
        term, total = c, 0.0
        for k in range(1, (df - 1) // 2 + 1):
            total += term
            term *= c * c * (2 * k) / (2 * k + 1)
        inside = 2.0 / math.pi * (theta + s * total) if df > 1 else 2.0 * theta / math.pi
    else:  # even: s (1 + 1/2 c^2 + 1*3/(2*4) c^4 + ... + c^(df-2) ...)
        term, total = 1.0, 0.0
        for k in range(1, df // 2 + 1):
            total += term
            term *= c * c * (2 * k - 1) / (2 * k)
        inside = s * total
    return min(1.0, max(0.0, 1.0 - inside))


def paired(a: Sequence[float], b: Sequence[float]) -> tuple[float, float, float, float, int]:
    """``b - a`` paired (equal lengths >= 2): mean, standard error, t, two-sided p, and how
    many pairs have ``b > a``."""
    d = np.asarray(b, dtype=float) - np.asarray(a, dtype=float)
    if d.size < 2:
        raise ValueError(f"a paired comparison needs at least 2 pairs, got {d.size}")
    mean, se = float(d.mean()), float(d.std(ddof=1) / math.sqrt(d.size))
    if se == 0.0:
        t = 0.0 if mean == 0.0 else math.copysign(math.inf, mean)
    else:
        t = mean / se
    return mean, se, t, t_test_p(t, d.size - 1), int((d > 0).sum())


def sweep_report(
    folder: Path, threshold: float | None = None, confidence: float = 0.95, seed: int = 0
) -> Report:
    """Write the report of the sweep in ``folder`` (its done runs) and return it; ``threshold``
    defaults to the sweep's own (``--threshold``), ``seed`` seeds the bootstrap resamples.

    Raises:
        SweepFolderError: ``folder`` is not a sweep folder.
        ValueError: ``confidence`` outside (0, 1).
    """
    folder = Path(folder)
    manifest = Manifest.load(folder)
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}; e.g. 0.95")
    threshold = manifest.threshold if threshold is None else threshold
    settings = list(dict.fromkeys(r.spec.setting for r in manifest.runs))
    groups: dict[str, list[Path]] = {s: [] for s in settings}
    per_seed: dict[str, dict[str, dict[int, float]]] = {"final": {}, "curve": {}}
    stats = []
    for s in settings:
        runs = [r for r in manifest.runs if r.spec.setting == s]
        done = [
            r for r in runs if r.state == "done" and (folder / r.spec.name / "metrics.csv").exists()
        ]
        groups[s] = [folder / r.spec.name / "metrics.csv" for r in done]
        curves = [read_run(p) for p in groups[s]]
        curves_ok = [(r, c) for r, c in zip(done, curves, strict=True) if c.y.size]
        if not curves_ok:
            stats.append(SettingStats(s, len(runs), len(done), None, None, None, 0))
            continue
        finals = {r.spec.seed: float(c.y[-1]) for r, c in curves_ok}
        areas = dict(
            zip(
                (r.spec.seed for r, _ in curves_ok),
                _curve_means([c for _, c in curves_ok]),
                strict=True,
            )
        )
        per_seed["final"][s], per_seed["curve"][s] = finals, areas
        firsts = []
        if threshold is not None:
            firsts = [f for _, c in curves_ok if (f := first_reached(c, threshold)) is not None]
        stats.append(
            SettingStats(
                s,
                len(runs),
                len(done),
                estimate(list(finals.values()), confidence, seed),
                estimate(list(areas.values()), confidence, seed),
                estimate(firsts, confidence, seed) if firsts else None,
                len(firsts),
            )
        )
    comparisons = []
    for a, b in itertools.combinations(settings, 2):
        for metric, label in (("final", "final return"), ("curve", "mean return over the curve")):
            va, vb = per_seed[metric].get(a, {}), per_seed[metric].get(b, {})
            common = [k for k in va if k in vb]
            if len(common) >= 2:
                stat = paired([va[k] for k in common], [vb[k] for k in common])
                comparisons.append(Comparison(a, b, label, len(common), *stat))
    plotted = {s: paths for s, paths in groups.items() if paths}
    plot = None
    if plotted:
        plot = folder / PLOT
        grouped_curves(
            plotted,
            plot,
            title=f"sweep {manifest.name}",
            target=threshold,
            confidence=confidence,
            seed=seed,
        )
    text = _markdown(manifest, stats, comparisons, plotted, threshold, confidence, plot)
    md = folder / REPORT
    md.write_text(text)
    return Report(tuple(stats), tuple(comparisons), md, plot, text)


def _curve_means(curves: list[RunCurve]) -> list[float]:
    """Each run's mean return over the grid points every run covers (as summary_table)."""
    g = aggregate(curves, resamples=1)
    common = g.count == len(curves)
    if not common.any():
        return [math.nan] * len(curves)
    return [float(v) for v in g.values[:, common].mean(1)]


def _markdown(
    manifest: Manifest,
    stats: list[SettingStats],
    comparisons: list[Comparison],
    groups: dict[str, list[Path]],
    threshold: float | None,
    confidence: float,
    plot: Path | None,
) -> str:
    counts = manifest.counts()
    failed = [r.spec.name for r in manifest.runs if r.state == "failed"]
    lines = [
        f"# Sweep {manifest.name}",
        "",
        f"`mbrl sweep {' '.join(manifest.command)}`",
        "",
        f"{counts['done']} of {len(manifest.runs)} runs done"
        + (f"; failed: {', '.join(failed)}" if failed else "")
        + (
            f"; {counts['pending'] + counts['running']} not finished"
            if counts["pending"] + counts["running"]
            else ""
        )
        + ". Only done runs are counted below.",
        "",
        "## Per setting",
        "",
        f"Mean ± standard error over the runs [{confidence:.0%} bootstrap interval of the mean]. "
        "Final return: each run's last logged return; mean return over the curve: each run's "
        "mean over the env steps every run of its setting covers.",
        "",
    ]
    head = "| setting | runs done | final return | mean return over the curve |"
    rule = "| --- | --- | --- | --- |"
    if threshold is not None:
        head += f" first env step with return >= {threshold:g} |"
        rule += " --- |"
    lines += [head, rule]
    for st in stats:
        row = f"| {st.setting} | {st.done} of {st.runs} |"
        row += f" {st.final.text() if st.final else '-'} | {st.curve.text() if st.curve else '-'} |"
        if threshold is not None:
            first = f"{st.first.text()}, " if st.first else ""
            row += f" {first}{st.reached} of {st.done} reach it |"
        lines.append(row)
    if comparisons:
        lines += [
            "",
            "## Paired by seed",
            "",
            "B - A over the seeds both settings have done: mean ± standard error (two-sided "
            "paired t-test).",
            "",
            "| B - A | seeds | final return | mean return over the curve |",
            "| --- | --- | --- | --- |",
        ]
        pairs = dict.fromkeys((c.a, c.b) for c in comparisons)
        for a, b in pairs:
            by = {c.metric: c for c in comparisons if (c.a, c.b) == (a, b)}
            fin, cur = by.get("final return"), by.get("mean return over the curve")
            n = (fin or cur).n
            lines.append(
                f"| {b} - {a} | {n} | {fin.text() if fin else '-'} | {cur.text() if cur else '-'} |"
            )
    if groups:
        lines += ["", "## Per run", "", summary_table(groups, threshold=threshold)]
    if plot is not None:
        lines += ["", f"![mean and {confidence:.0%} band per setting]({plot.name})"]
    return "\n".join(lines) + "\n"


def _p(p: float) -> str:
    if math.isnan(p):
        return "nan"
    return "< 1e-6" if p < 1e-6 else f"{p:.2g}"
