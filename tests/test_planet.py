"""``mbrl run planet`` and ``mbrl run latent-mpc`` on a tiny pixel task: the run folder, exact
resume after a kill anywhere, every planner on both latent models through the MPC loop, the
exploration noise the filter observes, and bad input (a state env, chunks longer than the
episodes, a diverging model)."""

from __future__ import annotations

import csv

import numpy as np
import pytest
import torch
from state_compare import assert_same

from mbrl import cli, envs, runs
from mbrl.algorithms import planet
from mbrl.control import MPCController
from mbrl.dynamics import FitError
from mbrl.dynamics.rssm import RSSM
from mbrl.envs.pixels import PendulumRenderer, pixel_spec
from mbrl.planners import Plan, PlanningProblem

torch.set_num_threads(1)

ENV = "pendulum-pixels-16"  # Pendulum-v1 drawn at 16 x 16, action repeat 4: 50 steps


def _tiny_env() -> envs.EnvSpec:
    return pixel_spec(
        envs.make("pendulum"), ENV, size=(16, 16), action_repeat=4, renderer=PendulumRenderer
    )


if ENV not in envs.names():
    envs.register(ENV, _tiny_env)

LOOP = ["--env", ENV, "trials=2", "random_episodes=1", "updates_per_trial=2", "batch_size=3",
        "chunk_length=6", "horizon=4", "planner.population=16", "planner.iterations=2",
        "buffer_capacity=500", "strip_frames=6", "strip_context=2"]  # fmt: skip
RSSM_TINY = ["deterministic=8", "stochastic=3", "hidden=8", "depth=2", "conv_layers=2"]
SINGLE_TINY = ["latent=4", "hidden=8", "depth=2", "conv_layers=2"]
PLANET = ["planet", *LOOP, *(f"model.{k}" for k in RSSM_TINY)]


def _rows(path):
    with open(path / "metrics.csv", newline="") as f:
        return [{k: v for k, v in r.items() if "seconds" not in k} for r in csv.DictReader(f)]


def _state(path):
    state = torch.load(path / "checkpoint.pt", weights_only=True)["state"]
    state["counters"].pop("wall_seconds")
    return state


def _run(root, argv, name):
    return cli.main(["run", *argv, "--runs-dir", str(root), "--name", name])


@pytest.fixture(scope="module")
def full(tmp_path_factory):
    """The uninterrupted tiny PlaNet run."""
    root = tmp_path_factory.mktemp("planet")
    assert _run(root, PLANET, "full") == 0
    return root


def test_planet_writes_metrics_curve_strip_and_checkpoint(full):
    path = full / "full"
    rows = _rows(path)
    assert [r["trial"] for r in rows] == ["0", "1", "2"]  # the random episode, then 2 trials
    assert [r["env_steps"] for r in rows] == ["200", "400", "600"]  # 50 steps x repeat 4
    trained = rows[1]
    for key in ("recon_loss", "reward_loss", "kl_loss", "open_loop_mse", "grad_norm"):
        assert np.isfinite(float(trained[key])), key
    assert trained["exploration_noise"] == "0.3" and rows[0]["recon_loss"] == ""
    for name in ("open_loop.png", "learning_curve.png", "checkpoint.pt", "config.yaml"):
        assert (path / name).exists(), name
    state = _state(path)
    assert state["parts"]["buffer"]["obs"].dtype == torch.uint8  # the frames, as stored
    assert state["parts"]["buffer"]["obs"].shape == (150, 3, 16, 16)


class _Killed(BaseException):
    """A simulated kill that nothing in the library catches."""


@pytest.mark.parametrize("place, at", [("episode", 2), ("episode", 3), ("update", 3)])
def test_a_killed_run_resumes_to_the_uninterrupted_run(full, tmp_path, place, at, monkeypatch):
    calls = {"n": 0}

    def counted(original):
        def wrapped(*args, **kwargs):
            calls["n"] += 1
            if calls["n"] == at:
                raise _Killed(f"{place} call {at}")
            return original(*args, **kwargs)

        return wrapped

    with monkeypatch.context() as mp:
        if place == "episode":
            mp.setattr(planet, "run_episode", counted(planet.run_episode))
        else:
            mp.setattr(RSSM, "update", counted(RSSM.update))
        with pytest.raises(_Killed):
            _run(tmp_path, PLANET, "killed")
    assert cli.main(["resume", str(tmp_path / "killed")]) == 0
    assert _rows(tmp_path / "killed") == _rows(full / "full")
    assert_same(_state(tmp_path / "killed"), _state(full / "full"))


def test_eval_plans_in_the_latent_space_of_the_checkpoint(full):
    """``mbrl eval`` rebuilds the RSSM of the checkpoint and plans on it from the frames, with
    no exploration noise: full 50-step episodes, the same returns for the same seed."""
    from mbrl.control import MPCController
    from mbrl.evaluate import build_policy, evaluate_run, load_run

    path = full / "full"
    result = evaluate_run(path, episodes=2, seed=3)
    assert result.algo == "planet" and result.lengths == (50, 50)
    assert all(np.isfinite(result.returns))
    assert evaluate_run(path, episodes=2, seed=3).returns == result.returns
    loaded = load_run(path)
    policy = build_policy(loaded, envs.make(ENV), torch.device("cpu"), 0)
    assert isinstance(policy, MPCController) and policy.exploration_std == 0


@pytest.mark.parametrize(
    "model, planner",
    [("single_step", "cem"), ("single_step", "icem"), ("single_step", "ilqr"),
     ("rssm", "mppi"), ("rssm", "ilqr"), ("rssm", "random")],
)  # fmt: skip
def test_latent_mpc_plans_both_models_with_every_planner(tmp_path, model, planner):
    sizes = RSSM_TINY if model == "rssm" else SINGLE_TINY
    argv = ["latent-mpc", *LOOP, "trials=1", f"model={model}", f"planner.name={planner}",
            "planner.max_iterations=3", *(f"{model}.{k}" for k in sizes)]  # fmt: skip
    assert _run(tmp_path, argv, "run") == 0
    (row,) = [r for r in _rows(tmp_path / "run") if r["trial"] == "1"]
    assert np.isfinite(float(row["return"])) and int(row["length"]) == 50
    assert row["nonfinite"] == "0"


def test_exploration_noise_is_played_and_the_filter_sees_the_played_action():
    model = RSSM((3, 16, 16), 1, deterministic=8, stochastic=3, hidden=8, depth=2, conv_layers=2)
    seen = []
    observe = model.observe

    def recording(belief, obs, prev_act):
        seen.append((obs.dtype, None if prev_act is None else prev_act.clone()))
        return observe(belief, obs, prev_act)

    model.observe = recording

    class Zeros:
        def plan(self, problem, x0, warm=None):
            return Plan(torch.zeros(problem.horizon, 1), 0.0)

    problem = PlanningProblem(model, None, None, 3, -torch.ones(1), torch.ones(1))
    gen = torch.Generator().manual_seed(0)
    controller = MPCController(Zeros(), problem, 1, "cpu", 0.5, gen)
    frame = np.zeros((3, 16, 16), dtype=np.uint8)
    played = [controller.act(frame) for _ in range(4)]
    noise = torch.randn(4, 1, generator=torch.Generator().manual_seed(0))
    expected = torch.clamp(0.5 * noise, -1, 1)  # half range 1: the std in action units
    assert np.allclose(np.stack(played), expected.numpy())
    assert seen[0] == (torch.uint8, None)  # the frame reaches the filter as uint8
    for (_, prev), act in zip(seen[1:], played[:-1], strict=True):
        assert np.allclose(prev.numpy()[0], act)  # the noisy action, as played
    controller.exploration_std = 0.0
    assert controller.act(frame) == 0.0


def test_bad_settings_are_refused_before_anything_runs(tmp_path, capsys):
    assert _run(tmp_path, ["planet", "--env", "pendulum"], "a") != 0
    assert "latent image models plan from pixels" in capsys.readouterr().err
    assert _run(tmp_path, [*PLANET, "chunk_length=60"], "b") != 0
    err = capsys.readouterr().err
    assert "chunk_length=60 exceeds the 50 steps" in err and not (tmp_path / "b").exists()
    assert _run(tmp_path, [*PLANET, "planner.name=mcts"], "c") != 0
    assert "planner.actions=widening" in capsys.readouterr().err  # the box needs a rule


@pytest.mark.parametrize("actions", ["sampled", "widening"])
def test_mcts_plans_in_latent_space_from_the_belief(tmp_path, actions):
    """MCTS searches the RSSM's latent rollouts from the filter's belief over box actions it
    samples or widens: the run plays its episodes to the end with every action in the box."""
    argv = [*PLANET, "planner.name=mcts", f"planner.actions={actions}",
            "planner.simulations=8", "planner.rollout_depth=2"]  # fmt: skip
    played = []
    step = MPCController.act

    def act(self, obs):
        played.append(step(self, obs))
        return played[-1]

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(MPCController, "act", act)
        assert _run(tmp_path, argv, actions) == 0
    rows = _rows(tmp_path / actions)
    assert [int(r["length"]) for r in rows[1:]] == [50, 50]  # two MPC trials of 50 steps
    acts = np.stack(played)
    assert acts.shape == (100, 1) and np.isfinite(acts).all() and np.abs(acts).max() <= 2.0
    assert len(np.unique(acts.round(4))) > 10  # searched the box, not a grid


def test_a_diverging_model_stops_the_run_on_its_last_checkpoint(tmp_path, capsys, monkeypatch):
    calls = {"n": 0}
    update = RSSM.update

    def diverging(self, chunks, generator=None):
        calls["n"] += 1
        if calls["n"] == 3:  # the first update of trial 2
            raise FitError("RSSM update diverged: the training loss is nan; lr=0.001")
        return update(self, chunks, generator)

    monkeypatch.setattr(RSSM, "update", diverging)
    assert _run(tmp_path, PLANET, "nan") != 0
    err = capsys.readouterr().err
    assert "model.lr" in err and "last checkpoint (after trial 1)" in err
    assert _state(tmp_path / "nan")["counters"]["trial"] == 1
    assert runs.numbered_checkpoints(tmp_path / "nan")
