"""Learning-curve plots of several runs: alignment on env steps, the bootstrap band, the
random-action phase and the first-solved step, through ``mbrl plot`` and the pure functions."""

from __future__ import annotations

import csv

import numpy as np
import pytest

from mbrl import cli
from mbrl.plots import RunCurve, aggregate, first_reached, random_phase_end, read_run

# Three PETS-like runs: random episodes logged with trial 0, then one row per MPC trial; the
# episodes have different lengths (early termination), so no env_steps value is common to all.
PETS_RUNS = {
    "pets-a": [(0, 200, -1400.0), (1, 400, -1200.0), (2, 600, -600.0), (3, 800, -180.0),
               (4, 1000, -150.0)],
    "pets-b": [(0, 150, -1500.0), (0, 300, -1450.0), (1, 450, -900.0), (2, 600, -400.0),
               (3, 750, -190.0)],
    "pets-c": [(0, 200, -1300.0), (1, 260, -1250.0), (2, 380, -700.0), (3, 580, -350.0),
               (4, 780, -250.0), (5, 980, -120.0), (6, 1180, -100.0)],
}  # fmt: skip


def _write_run(folder, rows, algo="pets"):
    folder.mkdir()
    (folder / "run.yaml").write_text(f"algo: {algo}\n")
    with (folder / "metrics.csv").open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["trial", "env_steps", "return", "length"])
        last = 0
        for trial, steps, ret in rows:
            writer.writerow([trial, steps, ret, steps - last])
            last = steps
    return folder


def _read_plotted(path):
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def test_cli_plot_draws_every_trial_of_runs_of_different_lengths(tmp_path, capsys):
    runs = [_write_run(tmp_path / name, rows) for name, rows in PETS_RUNS.items()]
    out = tmp_path / "cmp.png"
    argv = ["plot", *map(str, runs), "--out", str(out), "--threshold", "-200"]
    assert cli.main(argv) == 0
    assert out.stat().st_size > 1000
    printed = capsys.readouterr().out

    rows = _read_plotted(out.with_suffix(".csv"))
    grid = [float(r["env_steps"]) for r in rows]
    logged = sorted({s for rows_ in PETS_RUNS.values() for _, s, _ in rows_})
    assert grid == logged  # every logged point of every run is on the plotted grid
    counts = {float(r["env_steps"]): int(r["runs"]) for r in rows}
    # each run counts from its first to its last logged step, never past its end
    for x, n in counts.items():
        expected = sum(rows_[0][1] <= x <= rows_[-1][1] for rows_ in PETS_RUNS.values())
        assert n == expected, x
    assert counts[150] == 1 and counts[200] == 3 and counts[800] == 2 and counts[1180] == 1
    mean = {float(r["env_steps"]): float(r["mean_return"]) for r in rows}
    # at 400: run a logged -1200, b interpolates 300 -> 450 (-1450 -> -900), c 380 -> 580
    b400 = -1450.0 + (400 - 300) / 150 * (-900.0 + 1450.0)
    c400 = -700.0 + (400 - 380) / 200 * (-350.0 + 700.0)
    assert mean[400] == pytest.approx((-1200.0 + b400 + c400) / 3, abs=1e-3)
    assert mean[1180] == pytest.approx(-100.0)  # only run c reaches 1180

    line = next(ln for ln in printed.splitlines() if ln.startswith("| PETS "))
    # each run's own first step at -200 or better, from its own rows: b's is its last point
    assert line.endswith("| 800, 750, 980 |")
    assert "never" not in line
    assert line.startswith("| PETS | 3 | 750 (1000, 750, 1180) |")


def test_first_solved_comes_from_each_runs_own_rows(tmp_path):
    run = read_run(_write_run(tmp_path / "b", PETS_RUNS["pets-b"]) / "metrics.csv")
    assert first_reached(run, -200.0) == 750.0
    assert first_reached(run, -100.0) is None
    assert first_reached(run, -1500.0) == 150.0


def test_random_phase_of_mpc_and_dyna_runs(tmp_path):
    runs = [_write_run(tmp_path / n, rows) for n, rows in PETS_RUNS.items()]
    ends = [random_phase_end(p / "metrics.csv") for p in runs]
    assert ends == [200.0, 300.0, 200.0]  # the last trial-0 row of each run
    group = aggregate([read_run(p / "metrics.csv") for p in runs])
    assert group.random_until == 300.0

    dyna = tmp_path / "mbpo"
    dyna.mkdir()
    (dyna / "config.yaml").write_text("env: pendulum\nstart_steps: 500\n")
    (dyna / "metrics.csv").write_text("epoch,env_steps,return\n1,1000,-900\n2,2000,-300\n")
    assert random_phase_end(dyna / "metrics.csv") == 500.0
    assert random_phase_end(dyna / "metrics.csv", x="epoch") is None  # steps, not epochs
    (dyna / "config.yaml").write_text("env: pendulum\n")
    assert random_phase_end(dyna / "metrics.csv") is None


def test_bootstrap_band_known_answers_and_seed():
    two = [RunCurve(np.array([0.0, 1.0]), np.array([a, a])) for a in (-300.0, -100.0)]
    g = aggregate(two, resamples=4000)
    # the resampled mean of two runs is -300, -200 or -100 (1/4, 1/2, 1/4): a 95% interval
    # spans both runs
    np.testing.assert_allclose(g.mean, [-200.0, -200.0])
    np.testing.assert_allclose(g.low, [-300.0, -300.0])
    np.testing.assert_allclose(g.high, [-100.0, -100.0])

    rng = np.random.default_rng(1)
    values = rng.normal(0.0, 1.0, size=40)
    many = [RunCurve(np.array([5.0]), np.array([v])) for v in values]
    a, b = aggregate(many, seed=3), aggregate(many, seed=3)
    np.testing.assert_array_equal(a.low, b.low)  # seeded: the same band twice
    assert aggregate(many, seed=4).low[0] != a.low[0]
    # a normal-theory 95% interval of the mean: +-1.96 s / sqrt(n); the bootstrap agrees
    half = 1.96 * values.std() / np.sqrt(values.size)
    assert a.low[0] == pytest.approx(values.mean() - half, abs=0.25 * half)
    assert a.high[0] == pytest.approx(values.mean() + half, abs=0.25 * half)

    one = aggregate([RunCurve(np.array([0.0, 2.0]), np.array([-5.0, -1.0]))])
    np.testing.assert_array_equal(one.low, one.mean)  # one run: no spread to show
    np.testing.assert_array_equal(one.high, one.mean)


def test_runs_are_never_extrapolated():
    short = RunCurve(np.array([100.0, 200.0]), np.array([-10.0, -20.0]))
    long = RunCurve(np.array([50.0, 150.0, 400.0]), np.array([-1.0, -2.0, -3.0]))
    g = aggregate([short, long])
    np.testing.assert_array_equal(g.grid, [50.0, 100.0, 150.0, 200.0, 400.0])
    np.testing.assert_array_equal(g.count, [1, 2, 2, 2, 1])
    assert np.isnan(g.values[0, [0, 4]]).all()  # short run: nothing before 100 or after 200
    np.testing.assert_allclose(g.values[0, 1:4], [-10.0, -15.0, -20.0])
    np.testing.assert_allclose(g.values[1, 1:4], [-1.5, -2.0, -2.0 - 50.0 / 250.0])


def test_cli_plot_names_a_missing_column_and_a_bad_confidence(tmp_path, capsys):
    run = _write_run(tmp_path / "a", PETS_RUNS["pets-a"])
    out = str(tmp_path / "p.png")
    assert cli.main(["plot", str(run), "--out", out, "--y", "reward"]) == 2
    err = capsys.readouterr().err
    assert "no column 'reward'" in err and "--y" in err and "return" in err
    assert cli.main(["plot", str(run), "--out", out, "--confidence", "95"]) == 2
    assert "--confidence must be in (0, 1), got 95.0" in capsys.readouterr().err
