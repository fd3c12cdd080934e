"""Smoke and known-answer tests of the control comparison study."""

from __future__ import annotations

import csv
import math

import numpy as np
import pytest
import torch

from mbrl import cli
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


# ---------------------------------------------------------------- the success criterion


def _pendulum(scenario: str):
    from mbrl.control.study import make_system, success_criterion

    system = make_system("pendulum")
    return system, success_criterion(system, scenario)


def _episode(theta: np.ndarray, hold: int = 20) -> np.ndarray:
    """A pendulum episode ``[T + 1, 2]`` along the angles ``theta``, then ``hold`` steps at
    rest at the last angle."""
    theta = np.concatenate([theta, np.full(hold, theta[-1])])
    omega = np.append(np.diff(theta), 0.0) / 0.05
    return np.stack([theta, omega], 1)


def test_criterion_fails_the_full_turn_that_ends_upright_wrapped():
    """The old iLQR swing-around from the stabilize start: it ends at 2 pi, upright in wrapped
    coordinates (the system's own success test passes it), but it is a full turn away."""
    system, stabilize = _pendulum("stabilize")
    turn = _episode(np.linspace(0.08, 2 * np.pi, 60))
    assert system.success(turn[-1])  # what the study used to report
    assert stabilize.judge(system.goal, turn) == "turn"
    _, swingup = _pendulum("swingup")
    assert swingup.judge(system.goal, turn) == "turn"  # no extra turn in a swing-up either
    # the LQR-like episode passes; a drop below horizontal and back fails in "stabilize" only
    assert stabilize.judge(system.goal, _episode(np.linspace(0.08, 0.0, 30))) == ""
    dip = _episode(np.concatenate([np.linspace(0.08, 2.0, 20), np.linspace(2.0, 0.0, 20)]))
    assert stabilize.judge(system.goal, dip) == "basin"
    assert swingup.judge(system.goal, dip) == ""
    # swing-ups from hanging may end a half turn either way, not one and a half
    assert swingup.judge(system.goal, _episode(np.linspace(np.pi + 0.1, 0.0, 40))) == ""
    assert swingup.judge(system.goal, _episode(np.linspace(np.pi + 0.1, 2 * np.pi, 40))) == ""
    assert swingup.judge(system.goal, _episode(np.linspace(np.pi, 4 * np.pi, 80))) == "turn"
    # upright only at the very last step is not settled (the last 0.5 s must be)
    late = _episode(np.linspace(np.pi, 0.0, 40), hold=3)
    assert swingup.judge(system.goal, late) == "settled"


def test_settling_time_and_overshoot_known_answers():
    from mbrl.control.study import overshoot_percent, settling_time

    system, _ = _pendulum("stabilize")
    # theta from 0.5 past upright to -0.08 (16 % of 0.5), back to 0 at step 30, then at rest
    theta = np.concatenate([np.linspace(0.5, -0.08, 21), np.linspace(-0.08, 0.0, 10)[1:]])
    theta = np.concatenate([theta, np.zeros(10)])
    obs = np.stack([theta, np.zeros_like(theta)], 1)
    assert overshoot_percent(system, obs, (0,)) == pytest.approx(16.0)
    first_inside = int(np.flatnonzero(np.abs(theta) <= 0.1)[0])  # stays inside from there
    assert settling_time(system, obs) == pytest.approx(first_inside * system.dt)
    assert settling_time(system, obs[:5]) == math.inf  # still outside at the end
    assert math.isnan(overshoot_percent(system, obs[-5:], (0,)))  # starts inside: not counted


# ---------------------------------------------------------------- iLQR against LQR


def test_ilqr_mpc_from_the_stabilize_starts_is_within_5_percent_of_lqr(tmp_path):
    torch.set_num_threads(1)
    result = run_study(
        "pendulum", tmp_path, methods=["lqr", "ilqr"], scenarios=["stabilize"], progress=None
    )
    rows = {r.method: r for r in result.rows}
    assert rows["lqr"].success_rate == 1.0 and rows["ilqr"].success_rate == 1.0
    assert rows["ilqr"].cost_mean <= 1.05 * rows["lqr"].cost_mean, (rows["ilqr"], rows["lqr"])
    assert rows["ilqr"].cost_vs_lqr == pytest.approx(rows["ilqr"].cost_mean / rows["lqr"].cost_mean)
    for e in result.episodes:  # it never leaves the upright half
        assert np.abs(e.obs[:, 0]).max() < np.pi / 2, (e.method, e.initial_state)
    assert rows["ilqr"].budget_ms == pytest.approx(50.0)
    assert rows["ilqr"].solve_ms_max >= rows["ilqr"].solve_ms_p95 >= rows["ilqr"].solve_ms_median
    head = (tmp_path / "results.md").read_text()
    for fact in ("dt = 0.05 s", "T = 100 steps (5 s)", "Q = diag(1, 0.1)", "R = diag(0.01)",
                 "Qf = diag(10, 1)", "|theta| <= 0.1", "(3) basin", "theta [rad]"):  # fmt: skip
        assert fact in head, fact


# ---------------------------------------------------------------- a user's system and options

USER_SYSTEM = '''
import numpy as np
from mbrl.envs.systems import AnalyticSystem


def make_system():
    """A damped pendulum hanging at theta = 0, torque in [-1, 1]."""
    dt = 0.05

    def step(x, u, ops):
        th, w = ops.split(x)[:2]
        (tau,) = ops.split(u)[:1]
        w_next = w + (-4.0 * ops.sin(th) - 0.5 * w + tau) * dt
        return ops.stack([th + w_next * dt, w_next])

    def cost(x, u, ops):
        th, w = ops.split(x)[:2]
        (tau,) = ops.split(u)[:1]
        return 2.0 * (1.0 - ops.cos(th)) + 0.1 * w**2 + 0.01 * tau**2

    return AnalyticSystem(
        name="damped", obs_dim=2, act_dim=1, dt=dt, action_low=np.array([-1.0]),
        action_high=np.array([1.0]), goal=np.zeros(2), start=np.array([0.6, 0.0]),
        start_noise=0.05, angle_dims=(0,), success_tolerance=np.array([0.1, 0.2]),
        step_expr=step, cost_expr=cost, terminal_expr=lambda x, ops: 10.0 * cost(x, x[:1] * 0, ops),
        max_episode_steps=12,
    )


def not_a_system():
    return 3
'''


@pytest.fixture
def user_module(tmp_path, monkeypatch):
    (tmp_path / "study_user_system.py").write_text(USER_SYSTEM)
    monkeypatch.syspath_prepend(str(tmp_path))
    return "study_user_system"


def test_cli_runs_a_users_system_with_planner_options(tmp_path, user_module, capsys):
    argv = ["study", "control", "--system", f"{user_module}:make_system", "--initial-states", "1"]
    argv += ["--horizon", "8", "--methods", "lqr", "ilqr", "nmpc", "--runs-dir", str(tmp_path)]
    argv += ["--option", "ilqr.max_iterations=1", "nmpc.max_iter=30", "--name", "u"]
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    assert "# Control study: damped" in out and "x[0]" in out
    with (tmp_path / "u" / "results.csv").open() as f:
        rows = {(r["scenario"], r["method"]): r for r in csv.DictReader(f)}
    assert set(rows) == {(s, m) for s in ("swingup", "stabilize") for m in ("ilqr", "nmpc")} | {
        ("stabilize", "lqr")
    }
    # ilqr.max_iterations=1 reached the planner: one iteration never meets the stopping rule
    assert "max_iterations:" in rows[("swingup", "ilqr")]["status_counts"]
    assert int(rows[("swingup", "ilqr")]["episodes"]) == 1


def test_bad_systems_and_options_are_named(user_module):
    from mbrl.control.study import check_planner_options, load_system, parse_planner_options

    assert load_system("pendulum") == "pendulum"
    assert load_system(f"{user_module}:make_system").name == "damped"
    with pytest.raises(ValueError, match="unknown system 'pendulm'; valid names: pendulum"):
        load_system("pendulm")
    with pytest.raises(ValueError, match="cannot import module 'no_such_mod'"):
        load_system("no_such_mod:make")
    with pytest.raises(ValueError, match="has no function 'make'"):
        load_system(f"{user_module}:make")
    with pytest.raises(ValueError, match="returned int, not an mbrl.envs.systems.AnalyticSystem"):
        load_system(f"{user_module}:not_a_system")
    opts = parse_planner_options(["ilqr.max_iterations=50", "cem.alpha=0.2", "nmpc.method=x"])
    assert opts == {"ilqr": {"max_iterations": 50}, "cem": {"alpha": 0.2}, "nmpc": {"method": "x"}}
    with pytest.raises(ValueError, match="expected METHOD.NAME=VALUE"):
        parse_planner_options(["ilqr.max_iterations"])
    with pytest.raises(ValueError, match="unknown planner option ilqr.iterations; valid .*"):
        check_planner_options({"ilqr": {"iterations": 50}}, METHODS)
    with pytest.raises(ValueError, match="unknown method 'mppi'; valid: lqr, ilqr"):
        check_planner_options({"mppi": {"population": 5}}, METHODS)
    with pytest.raises(ValueError, match="not among the methods run"):
        check_planner_options({"cem": {"population": 5}}, ["lqr"])
    with pytest.raises(ValueError, match="lqr.goal is set by the study"):
        check_planner_options({"lqr": {"goal": [0, 0]}}, METHODS)
    with pytest.raises(ValueError, match=r"ilqr.max_iterations=0: max_iterations must be >= 1"):
        run_study("linear", "/tmp/unused", planner_options={"ilqr": {"max_iterations": 0}})


def test_cli_refuses_an_unknown_option(capsys):
    argv = ["study", "control", "--system", "linear", "--option", "cem.popsize=3"]
    assert cli.main(argv) == 2
    assert (
        "unknown planner option cem.popsize; valid for cem: population" in capsys.readouterr().err
    )
