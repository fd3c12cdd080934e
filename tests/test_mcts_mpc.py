"""MCTS in the algorithms: ``mbrl run mcts-mpc`` on known models (with resume),
``planner.name=mcts`` from a config, PETS with MCTS on a discrete env, MCTS in the control
study, the known models against their envs, and quality tests on a line world (known and GP
models) and on MuJoCo's inverted pendulum (the simulator as the model)."""

from __future__ import annotations

import csv

import numpy as np
import pytest
import torch

from mbrl import cli, envs
from mbrl.algorithms import get, mpc_loop
from mbrl.algorithms.factory import PlannerConfig, make_planner
from mbrl.algorithms.mcts_mpc import known_model
from mbrl.config import ConfigError, load_config
from mbrl.control import MPCController
from mbrl.dynamics.known import KnownModel
from mbrl.planners import PlanningProblem
from mbrl.planners.mcts import MCTS

torch.set_num_threads(1)


def _rows(path):
    with open(path / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    return [{k: v for k, v in r.items() if "seconds" not in k} for r in rows]


@pytest.mark.parametrize("env", ["CartPole-v1", "pendulum"])
def test_known_models_step_like_their_envs(env):
    spec = envs.make(env)
    model, _ = known_model(env)
    rng = np.random.default_rng(0)
    gym_env = spec.make()
    obs, _ = gym_env.reset(seed=3)
    for _ in range(60):
        if spec.discrete:
            index = int(rng.integers(spec.num_actions))
            act, played = spec.action_vector(index), index
        else:
            act = played = rng.uniform(spec.action_low, spec.action_high).astype(np.float32)
        nxt, _, terminated, _, _ = gym_env.step(played)
        pred = model.predict(torch.as_tensor(obs)[None], torch.as_tensor(act)[None]).mean[0]
        np.testing.assert_allclose(pred.numpy(), nxt, atol=1e-5)
        obs = nxt
        if terminated:
            obs, _ = gym_env.reset(seed=4)


def test_an_env_without_a_known_model_is_refused_naming_the_known_ones():
    with pytest.raises(ConfigError, match=r"env=reacher has no known model.*CartPole-v1"):
        load_config(get("mcts-mpc").Config, None, ["env=reacher"])
    with pytest.raises(ValueError, match="has no known model"):
        known_model("reacher")


TINY = ["planner.simulations=8", "horizon=10", "--seed", "1"]


def test_mcts_mpc_run_resumes_to_the_same_numbers(tmp_path, monkeypatch):
    args = ["run", "mcts-mpc", "--env", "CartPole-v1", "--runs-dir", str(tmp_path), *TINY,
            "trials=2"]  # fmt: skip
    assert cli.main([*args, "--name", "full"]) == 0
    full = _rows(tmp_path / "full")
    assert [r["trial"] for r in full] == ["1", "2"]
    assert all(int(r["length"]) > 0 and r["return"] == r["length"] for r in full)

    from mbrl.runs import Run

    original = Run.save_checkpoint

    def save_then_die(self, state):
        original(self, state)
        raise KeyboardInterrupt  # after trial 1

    monkeypatch.setattr(Run, "save_checkpoint", save_then_die)
    assert cli.main([*args, "--name", "killed"]) == 130
    monkeypatch.setattr(Run, "save_checkpoint", original)
    assert [r["trial"] for r in _rows(tmp_path / "killed")] == ["1"]
    assert cli.main(["resume", str(tmp_path / "killed")]) == 0
    assert _rows(tmp_path / "killed") == full


def test_mcts_mpc_plans_a_box_env_on_its_action_grid(tmp_path):
    """An analytic system (a box env) searched on a grid of 5 values."""
    args = ["run", "mcts-mpc", "--env", "double-integrator", "--runs-dir", str(tmp_path),
            "trials=1", "planner.simulations=4", "horizon=4", "action_grid=3",
            "--name", "di"]  # fmt: skip
    assert cli.main(args) == 0
    (row,) = _rows(tmp_path / "di")
    assert int(row["length"]) == envs.make("double-integrator").max_episode_steps


def test_eval_of_an_mcts_mpc_run_replays_its_trial(tmp_path):
    """``mbrl eval`` plans on the known model with the run's planner: from trial 1's reset
    seed and the run's planning seed it plays trial 1 again, on the action grid."""
    from mbrl.evaluate import evaluate_run

    args = ["run", "mcts-mpc", "--env", "double-integrator", "--runs-dir", str(tmp_path),
            "trials=1", "planner.simulations=4", "horizon=4", "action_grid=3",
            "--name", "di"]  # fmt: skip
    assert cli.main(args) == 0
    (row,) = _rows(tmp_path / "di")
    result = evaluate_run(tmp_path / "di", episodes=1, seed=0)  # episode_seed(0, 0) == 0
    assert result.algo == "mcts-mpc" and result.lengths == (int(row["length"]),)
    assert result.mean == pytest.approx(float(row["return"]), rel=1e-6)


def test_planner_name_mcts_builds_from_config():
    cfg = load_config(
        get("pets").Config,
        None,
        ["planner.name=mcts", "planner.simulations=16", "planner.rule=puct",
         "planner.actions=widening", "planner.widening_alpha=0.4", "planner.rollout_depth=3",
         "planner.leaves_per_wave=4", "planner.virtual_loss=0.5"],
    )  # fmt: skip
    planner = make_planner(cfg.planner)
    assert isinstance(planner, MCTS)
    assert planner.simulations == 16 and planner.rule == "puct" and planner.actions == "widening"
    assert planner.leaves_per_wave == 4 and planner.virtual_loss == 0.5
    assert isinstance(make_planner(PlannerConfig(name="mcts")), MCTS)


@pytest.mark.parametrize(
    "override, message",
    [
        ("planner.simulations=0", "planner.simulations must be an integer >= 1, got 0"),
        ("planner.rule=ucb", "unknown planner.rule 'ucb'; valid: uct, puct"),
        ("planner.actions=box", "valid: discrete, widening, sampled"),
        ("planner.widening_alpha=0", "planner.widening_alpha must be in (0, 1], got 0"),
        ("planner.exploration=-1", "planner.exploration must be >= 0 and finite, got -1"),
        ("planner.dirichlet_fraction=2", "planner.dirichlet_fraction must be in [0, 1]"),
        ("planner.rollout_depth=-1", "planner.rollout_depth must be an integer >= 0"),
        ("planner.leaves_per_wave=0", "planner.leaves_per_wave must be an integer >= 1, got 0"),
        ("planner.virtual_loss=-1", "planner.virtual_loss must be >= 0 and finite, got -1"),
        ("action_grid=1", "action_grid=1: give >= 2 values per action dim"),
        ("replan_every=30", "replan_every=30 exceeds horizon=25"),
    ],
)
def test_bad_mcts_config_values_are_refused(override, message):
    with pytest.raises(ConfigError) as e:
        load_config(get("mcts-mpc").Config, None, [override])
    assert message in str(e.value) and "\n" not in str(e.value)


def test_pets_with_mcts_runs_on_a_discrete_env(tmp_path):
    """The MPC loop plans a discrete env over its action values and plays their indices."""
    args = ["run", "pets", "--env", "CartPole-v1", "--runs-dir", str(tmp_path), "--name", "p",
            "planner.name=mcts", "planner.simulations=8", "horizon=8", "particles=5",
            "model.hidden_size=32", "model.max_epochs=2", "seed_steps=40", "trials=1"]  # fmt: skip
    assert cli.main(args) == 0
    rows = _rows(tmp_path / "p")
    assert rows[-1]["trial"] == "1" and int(rows[-1]["length"]) > 0


def test_mcts_in_the_control_study_on_the_pendulum(tmp_path):
    from mbrl.control.study import run_study

    result = run_study(
        "pendulum",
        tmp_path,
        num_initial_states=1,
        horizon=10,
        episode_steps=5,
        methods=["mcts"],
        planner_options={"mcts": {"simulations": 16}},
        scenarios=("stabilize",),
        progress=None,
    )
    (row,) = result.rows
    assert row.method == "mcts" and row.episodes == 1 and np.isfinite(row.cost_mean)
    assert sum(int(c.split(":")[1]) for c in row.status_counts.split()) == 5
    (episode,) = result.episodes
    torques = np.linspace(-2.0, 2.0, 11)
    assert np.abs(episode.act[:, :, None] - torques).min(axis=-1).max() < 1e-6  # on the grid


def _walk_line_world(model) -> float:
    """Line world x' = x + u, u in {-1, 0, 1}, reward -|x' - 5|, planned on ``model``: the
    return of 10 steps from 0 played on the true line world."""
    goal = 5.0

    def reward(obs, act, nxt):
        return -(nxt[..., 0] - goal).abs()

    values = torch.tensor([[-1.0], [0.0], [1.0]])
    problem = PlanningProblem(
        model, reward, None, 8, torch.tensor([-1.0]), torch.tensor([1.0]), 1,
        torch.Generator().manual_seed(0), action_values=values,
    )  # fmt: skip
    controller = MPCController(MCTS(simulations=32), problem)
    x, ret = np.zeros(1, dtype=np.float32), 0.0
    for _ in range(10):
        u = controller.act(x)
        assert np.abs(values.numpy() - u).min() < 1e-6
        x = x + u
        ret += -abs(float(x[0]) - goal)
    return ret


def test_mcts_mpc_walks_a_line_world_to_its_goal():
    """From 0 the best return over 10 steps is -(4 + 3 + 2 + 1) = -10; MCTS with 32
    simulations on the true model must find it."""
    assert _walk_line_world(KnownModel(lambda x, u: x + u, 1, 1)) == pytest.approx(-10.0)


def test_mcts_on_a_gp_walks_the_line_world_to_its_goal():
    """The same search on a GP fitted to 90 transitions of the line world (its posterior mean,
    ``propagation="expectation"``) finds the same best return."""
    from mbrl.data import Transitions
    from mbrl.dynamics.gp import GaussianProcessModel

    gen = torch.Generator().manual_seed(0)
    obs = torch.rand(90, 1, generator=gen) * 9.0 - 2.0
    act = torch.randint(-1, 2, (90, 1), generator=gen).float()
    data = Transitions(obs, act, obs + act, torch.zeros(90), torch.zeros(90, dtype=torch.bool))
    gp = GaussianProcessModel(1, 1, iterations=50, propagation="expectation")
    gp.fit(data)
    assert _walk_line_world(gp) == pytest.approx(-10.0, abs=1e-3)


def test_mcts_on_mujoco_ground_truth_holds_the_inverted_pendulum_up():
    """InvertedPendulum-v5 planned on its own simulator (MujocoModel) over 3 forces with 16
    simulations and 5-step random rollouts keeps the pole up (reward 1 per step alive) for 60
    steps from the env's reset, where zero force lets it fall by step 25. (Over longer
    episodes the survival reward does not see the cart drifting to the rail within a 10-step
    horizon: CEM at horizon 20 falls too, at step 107.)"""
    spec = envs.discretize(envs.make("inverted-pendulum"), 3)
    model, value_fn = known_model("inverted-pendulum")
    problem = mpc_loop.planning_problem(
        spec, model, 10, 1, torch.Generator().manual_seed(0), torch.device("cpu"), value_fn
    )
    controller = MPCController(MCTS(simulations=16, rollout_depth=5), problem)
    env = spec.make()
    obs, _ = env.reset(seed=0)
    for t in range(60):
        obs, reward, terminated, truncated, _ = env.step(spec.env_action(controller.act(obs)))
        assert not terminated, f"the pole fell at step {t}"
    env.close()
