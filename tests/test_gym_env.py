"""Any gymnasium env by id: ``EnvSpec.from_gym``, ``gym:ID?...`` names, and a PETS run on one
from the command line, resumed and evaluated."""

from __future__ import annotations

import csv
from pathlib import Path

import gymnasium as gym
import numpy as np
import pytest
import torch

from mbrl import cli, envs
from mbrl.envs.gym_env import GymEnvName, folder_name, gym_name
from mbrl.envs.spec import EnvSpec

HERE = Path(__file__).resolve().parent
THIS = "test_gym_env"  # this module's name once HERE is on sys.path


def mountain_car_reward(
    obs: torch.Tensor, act: torch.Tensor, next_obs: torch.Tensor
) -> torch.Tensor:
    """MountainCarContinuous-v0: ``-0.1 a^2``, plus 100 on the step that reaches the goal
    (position >= 0.45 with velocity >= 0); ``[B]``."""
    return 100.0 * mountain_car_done(next_obs).to(obs.dtype) - 0.1 * act[..., 0].square()


def mountain_car_done(next_obs: torch.Tensor) -> torch.Tensor:
    """MountainCarContinuous-v0's goal: position >= 0.45 and velocity >= 0; bool ``[B]``."""
    return (next_obs[..., 0] >= 0.45) & (next_obs[..., 1] >= 0.0)


def per_feature_reward(obs, act, next_obs):
    """A wrong reward: one value per feature instead of one per row."""
    return next_obs


@pytest.fixture
def importable(monkeypatch):
    """This module importable as ``test_gym_env`` (what a user's reward module would be)."""
    monkeypatch.syspath_prepend(str(HERE))


def test_from_gym_reads_spaces_bounds_and_time_limit():
    spec = EnvSpec.from_gym("MountainCarContinuous-v0", mountain_car_reward, mountain_car_done)
    assert (spec.name, spec.obs_dim, spec.act_dim) == ("gym:MountainCarContinuous-v0", 2, 1)
    np.testing.assert_array_equal(spec.action_low, [-1.0])
    np.testing.assert_array_equal(spec.action_high, [1.0])
    assert spec.max_episode_steps == 999 and spec.solved_return == 90.0
    assert not spec.discrete
    short = EnvSpec.from_gym("Pendulum-v1", max_episode_steps=50)
    assert (short.obs_dim, short.max_episode_steps, short.solved_return) == (3, 50, None)
    np.testing.assert_array_equal(short.action_high, [2.0])
    env = short.make()
    env.reset(seed=0)
    steps = sum(1 for _ in iter(lambda: env.step(np.zeros(1, np.float32))[3], True))
    assert steps == 49  # the 50th step truncates


def test_clip_action_keeps_the_inner_bounds():
    """ClipAction widens the action box to infinity; the spec keeps the env's own bounds."""
    spec = EnvSpec.from_gym("Pendulum-v1", wrappers=[gym.wrappers.ClipAction])
    np.testing.assert_array_equal(spec.action_low, [-2.0])
    env, chain = spec.make(), []
    while isinstance(env, gym.Wrapper):
        chain.append(type(env))
        env = env.env
    assert gym.wrappers.ClipAction in chain


def test_discrete_gym_env_gets_one_hot_actions():
    spec = EnvSpec.from_gym("CartPole-v1")
    assert spec.discrete and spec.num_actions == 2 and spec.act_dim == 2
    np.testing.assert_array_equal(spec.action_values, np.eye(2))
    env = spec.make()
    env.reset(seed=0)
    env.step(spec.env_action(np.array([0.0, 1.0], dtype=np.float32)))
    with pytest.raises(TypeError, match="takes an action index"):
        env.step(np.array([0.0, 1.0], dtype=np.float32))


def test_test_reward_equals_the_env_reward_on_real_transitions():
    """The batched twins above equal MountainCarContinuous-v0's own reward and termination
    (random actions, plus a push towards the goal so that it is reached)."""
    spec = EnvSpec.from_gym("MountainCarContinuous-v0", mountain_car_reward, mountain_car_done)
    env = spec.make()
    rng = np.random.default_rng(0)
    rows, reached = [], False
    obs, _ = env.reset(seed=1)
    for t in range(999):
        # energy pumping: push along the velocity; reaches the goal within a few hundred steps
        act = np.array([np.sign(obs[1]) or 1.0], np.float32) if t % 3 else rng.uniform(-1, 1, 1)
        act = act.astype(np.float32)
        nxt, r, term, trunc, _ = env.step(act)
        rows.append((obs, act, nxt, r, term))
        obs = nxt
        if term or trunc:
            reached = bool(term)
            break
    assert reached, "the pumping policy should reach the goal"
    o, a, n, r, d = (np.array(x) for x in zip(*rows, strict=True))
    t = lambda x: torch.as_tensor(x, dtype=torch.float32)  # noqa: E731
    np.testing.assert_allclose(spec.reward_fn(t(o), t(a), t(n)).numpy(), r, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(spec.termination_fn(t(n)).numpy(), d)


def test_bad_reward_shape_is_refused_when_the_spec_is_made():
    with pytest.raises(
        ValueError, match=r"reward function must return one value per row.*\[2, 3\]"
    ):
        EnvSpec.from_gym("Pendulum-v1", per_feature_reward)


def test_missing_reward_fails_when_used_and_names_the_fix():
    spec = EnvSpec.from_gym("Pendulum-v1")
    x = torch.zeros(2, 3)
    with pytest.raises(ValueError, match="--reward module:function"):
        spec.reward_fn(x, torch.zeros(2, 1), x)


def test_gym_names_round_trip_and_resolve(importable):
    name = gym_name(
        "MountainCarContinuous-v0",
        reward=f"{THIS}:mountain_car_reward",
        termination=f"{THIS}:mountain_car_done",
        wrappers=("ClipAction",),
        max_episode_steps=100,
    )
    assert GymEnvName.parse(name).max_episode_steps == 100
    assert str(GymEnvName.parse(name)) == name
    assert folder_name(name) == "MountainCarContinuous-v0"
    assert folder_name("pendulum") == "pendulum"
    spec = envs.make(name)
    assert spec.name == name and spec.max_episode_steps == 100
    assert envs.make(spec.name).name == name  # the spec's name makes it again
    o = torch.tensor([[0.5, 0.01], [0.0, 0.0]])
    assert spec.termination_fn(o).tolist() == [True, False]


@pytest.mark.parametrize(
    "name, message",
    [
        ("gym:", "not of the form gym:ID"),
        ("gym:Pendulum-v1?foo=1", "'foo=1' is not an option; valid: reward=..."),
        ("gym:Pendulum-v1?reward=nofunction", "not of the form module:function"),
        ("gym:Pendulum-v1?max_episode_steps=0", "max_episode_steps must be an integer >= 1"),
        ("gym:Pendulum-v1?reward=no_such_module_xyz:f", "cannot import module"),
        ("gym:Pendulum-v1?reward=mbrl.envs.tasks:nothing", "has no 'nothing'"),
        ("gym:Pendulum-v1?wrappers=NoSuchWrapper", "unknown wrapper 'NoSuchWrapper'"),
        ("gym:Pendulum-v1?wrappers=RescaleAction", "needs arguments besides the env"),
        ("gym:NoSuchEnv-v0", "unknown gymnasium env id 'NoSuchEnv-v0'"),
    ],
)
def test_bad_gym_names_say_what_is_wrong(name, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace("[", r"\[")):
        envs.make(name)


def test_registry_knows_gym_names():
    from mbrl.envs.registry import known

    assert known("pendulum") and known("gym:Pendulum-v1?max_episode_steps=5")
    assert not known("pendulm") and not known("gym:Pendulum-v1?bad=1")


# -- a PETS run on a gym: env from the command line ----------------------------------------------

TINY = [
    "seed_steps=60",
    "random_episodes=0",
    "trials=2",
    "stop_when_solved=0",
    "horizon=5",
    "particles=2",
    "planner.population=20",
    "planner.iterations=1",
    "model.ensemble_size=2",
    "model.hidden_size=32",
    "model.num_layers=2",
    "model.max_epochs=2",
]


def _rows(path: Path) -> list[dict[str, str]]:
    with (path / "metrics.csv").open(newline="") as f:
        return [{k: v for k, v in r.items() if "seconds" not in k} for r in csv.DictReader(f)]


def test_pets_on_a_gym_env_runs_resumes_and_evaluates(tmp_path, importable, monkeypatch, capsys):
    """``--env gym:ID --reward --termination --wrapper`` is recorded in the run's config, so a
    killed run resumes to the same numbers and ``mbrl eval`` rebuilds the env."""
    env = "gym:MountainCarContinuous-v0?max_episode_steps=60"
    args = ["run", "pets", "--env", env, "--reward", f"{THIS}:mountain_car_reward",
            "--termination", f"{THIS}:mountain_car_done", "--wrapper", "ClipAction",
            "--runs-dir", str(tmp_path), *TINY]  # fmt: skip
    assert cli.main([*args, "--name", "full"]) == 0
    full = _rows(tmp_path / "full")
    assert [r["trial"] for r in full] == ["0", "1", "2"]
    config = (tmp_path / "full" / "config.yaml").read_text()
    expected = gym_name(
        "MountainCarContinuous-v0",
        reward=f"{THIS}:mountain_car_reward",
        termination=f"{THIS}:mountain_car_done",
        wrappers=("ClipAction",),
        max_episode_steps=60,
    )
    assert f"env: {expected}" in config

    from mbrl.runs import Run

    original, saves = Run.save_checkpoint, []

    def save_then_die(self, state):
        original(self, state)
        saves.append(1)
        if len(saves) == 2:  # after trial 1
            raise KeyboardInterrupt

    monkeypatch.setattr(Run, "save_checkpoint", save_then_die)
    assert cli.main([*args, "--name", "killed"]) != 0
    monkeypatch.setattr(Run, "save_checkpoint", original)
    assert _rows(tmp_path / "killed")[-1]["trial"] == "1"
    assert cli.main(["resume", str(tmp_path / "killed")]) == 0
    assert _rows(tmp_path / "killed") == full

    capsys.readouterr()
    assert cli.main(["eval", str(tmp_path / "full"), "--episodes", "2"]) == 0
    out = capsys.readouterr().out
    assert "over 2 episodes" in out and "MountainCarContinuous-v0" in out


def test_default_run_folder_is_named_after_the_gym_id(tmp_path, importable, capsys):
    reward = "mbrl.envs.tasks:pendulum_reward"
    args = ["run", "pets", "--env", "gym:Pendulum-v1", "--reward", reward,
            "--runs-dir", str(tmp_path), "--show-config"]  # fmt: skip
    assert cli.main(args) == 0
    assert "env: gym:Pendulum-v1?reward=mbrl.envs.tasks:pendulum_reward" in capsys.readouterr().out
    assert not list(tmp_path.iterdir())  # --show-config makes no run folder


def test_gym_options_without_a_gym_env_are_refused(tmp_path, capsys):
    argv = ["run", "pets", "--env", "pendulum", "--reward", "a:b", "--runs-dir", str(tmp_path)]
    assert cli.main(argv) == 2
    assert "--reward go with --env gym:ID" in capsys.readouterr().err


def test_mpc_on_a_gym_env_without_reward_is_refused_before_a_folder(tmp_path, capsys):
    argv = ["run", "pets", "--env", "gym:Pendulum-v1", "--runs-dir", str(tmp_path)]
    assert cli.main(argv) == 2
    assert "pass --reward module:function" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())
