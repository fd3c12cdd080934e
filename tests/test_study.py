"""Smoke and known-answer tests of the control comparison study."""

from __future__ import annotations

import csv

import pytest
import torch

from mbrl.control.study import METHODS, run_study


def test_tiny_study_on_the_linear_system(tmp_path):
    torch.set_num_threads(1)
    result = run_study(
        "linear",
        tmp_path,
        num_initial_states=1,
        horizon=10,
        episode_steps=8,
        planner_options={
            "cem": {"population": 64, "iterations": 2},
            "random_shooting": {"population": 64},
            "ilqr": {"max_iterations": 10},
        },
        progress=None,
    )
    names = {p.name for p in result.files}
    assert {"results.csv", "results.md", "trajectories_regulate.png", "cost_vs_time.png"} <= names
    assert all(p.exists() and p.stat().st_size > 0 for p in result.files)
    assert [r.method for r in result.rows] == list(METHODS)
    rows = {r.method: r for r in result.rows}
    # The Riccati-type controllers on the linear-quadratic problem reach nearly the same closed
    # loop (they differ only in horizon and in how they meet the action bound).
    assert rows["nmpc"].cost_mean == pytest.approx(rows["lqr"].cost_mean, rel=1e-2)
    assert rows["ilqr"].cost_mean == pytest.approx(rows["lqr"].cost_mean, rel=1e-2)
    assert rows["random_shooting"].cost_mean >= rows["nmpc"].cost_mean - 1e-6
    assert rows["cem"].cost_mean >= rows["nmpc"].cost_mean - 1e-6
    for r in result.rows:
        assert r.episodes == 1 and r.solve_ms_median > 0 and r.solve_ms_p95 >= r.solve_ms_median
        assert sum(int(c.split(":")[1]) for c in r.status_counts.split()) == 8  # one per step
    assert rows["nmpc"].violations == 0  # NMPC imposes the velocity bound
    with (tmp_path / "results.csv").open() as f:
        table = list(csv.DictReader(f))
    assert [t["method"] for t in table] == list(METHODS)
    assert float(table[0]["cost_mean"]) == pytest.approx(result.rows[0].cost_mean)
    # Same seed, same initial states: every method starts from one state.
    starts = {tuple(e.obs[0]) for e in result.episodes}
    assert len(starts) == 1


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="unknown system"):
        run_study("nope", "/tmp/unused")
    with pytest.raises(ValueError, match="unknown methods"):
        run_study("linear", "/tmp/unused", methods=["lqr", "mppi"])
    with pytest.raises(ValueError, match="scenarios"):
        run_study("linear", "/tmp/unused", scenarios=["swingup"])


def test_same_seed_same_study(tmp_path):
    def once(path):
        return run_study(
            "linear",
            path,
            num_initial_states=1,
            horizon=5,
            episode_steps=4,
            methods=["cem", "random_shooting"],
            planner_options={
                "cem": {"population": 32, "iterations": 2},
                "random_shooting": {"population": 32},
            },
            progress=None,
        )

    a, b = once(tmp_path / "a"), once(tmp_path / "b")
    for ea, eb in zip(a.episodes, b.episodes, strict=True):
        assert ea.cost == eb.cost
        assert (ea.act == eb.act).all()
    c = run_study(
        "linear",
        tmp_path / "c",
        num_initial_states=1,
        horizon=5,
        episode_steps=4,
        methods=["random_shooting"],
        seed=1,
        progress=None,
        planner_options={"random_shooting": {"population": 32}},
    )
    assert c.episodes[0].cost != a.episodes[1].cost
