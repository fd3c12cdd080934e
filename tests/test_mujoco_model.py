"""MujocoModel: rollouts equal the gymnasium env, Jacobians equal finite differences of the env."""

from __future__ import annotations

import gymnasium as gym
import numpy as np
import pytest
import torch

from mbrl.dynamics import DynamicsModel
from mbrl.dynamics.mujoco_model import MujocoModel
from mbrl.envs import make
from mbrl.envs.spec import never_terminates
from mbrl.planners.base import PlanningProblem, WarmStart

CHEETAH = ("HalfCheetah-v5", {"exclude_current_positions_from_observation": False})
PENDULUM = ("InvertedPendulum-v5", {})


def _env(spec: tuple[str, dict]) -> gym.Env:
    return gym.make(spec[0], **spec[1])


def _env_rollout(env: gym.Env, seed: int, actions: np.ndarray) -> np.ndarray:
    """Observations ``[T + 1, X]`` of stepping ``env`` with ``actions`` until termination."""
    obs, _ = env.reset(seed=seed)
    out = [obs]
    for a in actions:
        obs, _, terminated, _, _ = env.step(a)
        out.append(obs)
        if terminated:
            break
    return np.asarray(out, dtype=np.float64)


def _env_step_from(env: gym.Env, obs: np.ndarray, act: np.ndarray) -> np.ndarray:
    """One env step from the state of an identity-layout observation ``obs``."""
    base = env.unwrapped
    nq = base.model.nq
    base.set_state(obs[:nq], obs[nq:])
    return np.asarray(env.step(act)[0], dtype=np.float64)


@pytest.mark.parametrize("spec", [CHEETAH, PENDULUM])
def test_rollouts_equal_env_steps(spec):
    env, model = _env(spec), MujocoModel(_env(spec), nthread=2)
    assert isinstance(model, DynamicsModel)
    rng = np.random.default_rng(0)
    acts = rng.uniform(-1.0, 1.0, (40, model.act_dim)) * env.action_space.high
    truth = _env_rollout(env, 3, acts)  # [T + 1, X]
    steps = len(truth) - 1
    assert steps >= 5
    x0 = torch.as_tensor(truth[0])
    fast = model.rollout_actions(x0, torch.as_tensor(acts[None, :steps]))[0]
    np.testing.assert_allclose(fast.numpy(), truth, atol=1e-6)

    # The seam path: particles of one start follow the env exactly, step by step.
    state = model.rollout_start(x0[None], particles=3)
    for t in range(steps):
        state = model.rollout_step(state, torch.as_tensor(acts[t]).expand(3, -1))
        np.testing.assert_allclose(state.obs.numpy(), truth[t + 1][None].repeat(3, 0), atol=1e-6)

    # float32 in, float32 out, close to the truth for a few steps.
    short = model.rollout_actions(x0.float(), torch.as_tensor(acts[None, :3]).float())
    assert short.dtype == torch.float32 and short.shape == (1, 4, model.obs_dim)
    np.testing.assert_allclose(short[0].numpy(), truth[:4], atol=1e-3)


def test_planning_problem_scores_match_env_rewards():
    env, model = _env(CHEETAH), MujocoModel(_env(CHEETAH), nthread=2)
    obs, _ = env.reset(seed=5)
    dt = model.dt

    def reward(o, a, nxt):  # HalfCheetah-v5 with x in the observation
        return (nxt[:, 0] - o[:, 0]) / dt - 0.1 * (a**2).sum(-1)

    rng = np.random.default_rng(1)
    acts = rng.uniform(-1.0, 1.0, (4, 6, 6))  # [N, H, U]
    want = []
    for n in range(4):
        env.reset(seed=5)
        want.append(sum(env.step(a)[1] for a in acts[n]))
    low, high = env.action_space.low, env.action_space.high
    problem = PlanningProblem(model, reward, never_terminates, 6, low, high)
    got = problem.evaluate(torch.as_tensor(obs, dtype=torch.float64), torch.as_tensor(acts))
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-5)


@pytest.mark.parametrize(
    "spec,method", [(CHEETAH, "transition_fd"), (CHEETAH, "rollout_fd"), (PENDULUM, "auto")]
)
def test_linearize_matches_env_finite_differences(spec, method):
    env = _env(spec)
    model = MujocoModel(_env(spec), nthread=2, linearize_method=method)
    rng = np.random.default_rng(2)
    obs, _ = env.reset(seed=0)
    acts = rng.uniform(-0.5, 0.5, (3, model.act_dim))
    xs = [obs]
    for a in acts[:-1]:
        xs.append(env.step(a)[0])
    x, u = np.asarray(xs, dtype=np.float64), acts
    a_mat, b_mat = model.linearize(torch.as_tensor(x), torch.as_tensor(u))
    assert a_mat.shape == (3, model.obs_dim, model.obs_dim)
    assert b_mat.shape == (3, model.obs_dim, model.act_dim)
    eps = 1e-6
    for i in range(3):
        for j in range(model.obs_dim):
            dx = np.zeros(model.obs_dim)
            dx[j] = eps
            col = _env_step_from(env, x[i] + dx, u[i]) - _env_step_from(env, x[i] - dx, u[i])
            scale = 1e-4 * max(1.0, np.abs(col / (2 * eps)).max())
            np.testing.assert_allclose(a_mat[i, :, j].numpy(), col / (2 * eps), atol=scale)
        for j in range(model.act_dim):
            du = np.zeros(model.act_dim)
            du[j] = eps
            col = _env_step_from(env, x[i], u[i] + du) - _env_step_from(env, x[i], u[i] - du)
            np.testing.assert_allclose(b_mat[i, :, j].numpy(), col / (2 * eps), atol=1e-4)


class _AngleObs(gym.ObservationWrapper):
    """InvertedPendulum with the pole angle as (cos, sin): obs [x, cos th, sin th, xd, thd]."""

    def __init__(self, env: gym.Env) -> None:
        super().__init__(env)
        self.observation_space = gym.spaces.Box(-np.inf, np.inf, (5,), np.float64)

    def observation(self, obs):
        return np.array([obs[0], np.cos(obs[1]), np.sin(obs[1]), obs[2], obs[3]])


def _o2s(obs):
    return np.stack([obs[:, 0], np.arctan2(obs[:, 2], obs[:, 1])], 1), obs[:, 3:]


def _s2o(qpos, qvel):
    return np.stack([qpos[:, 0], np.cos(qpos[:, 1]), np.sin(qpos[:, 1]), qvel[:, 0], qvel[:, 1]], 1)


def test_custom_observation_mapping():
    env = _AngleObs(_env(PENDULUM))
    model = MujocoModel(_AngleObs(_env(PENDULUM)), obs_to_state=_o2s, state_to_obs=_s2o, nthread=2)
    acts = np.random.default_rng(3).uniform(-3, 3, (8, 1))
    truth = _env_rollout(env, 0, acts)
    got = model.rollout_actions(
        torch.as_tensor(truth[0]), torch.as_tensor(acts[None, : len(truth) - 1])
    )
    np.testing.assert_allclose(got[0].numpy(), truth, atol=1e-6)
    # Jacobians in (cos, sin) coordinates, checked along a move on the circle.
    a_mat, b_mat = model.linearize(torch.as_tensor(truth[:2]), torch.as_tensor(acts[:2]))
    assert a_mat.shape == (2, 5, 5) and b_mat.shape == (2, 5, 1)
    th, d = np.arctan2(truth[0, 2], truth[0, 1]), 1e-5
    x_plus = _s2o(np.array([[truth[0, 0], th + d]]), truth[0, 3:][None])
    x_minus = _s2o(np.array([[truth[0, 0], th - d]]), truth[0, 3:][None])
    one = torch.as_tensor(acts[:1])
    fd = model.step(torch.as_tensor(x_plus), one) - model.step(torch.as_tensor(x_minus), one)
    tangent = torch.as_tensor((x_plus - x_minus)[0])
    np.testing.assert_allclose((a_mat[0] @ tangent).numpy(), fd[0].numpy(), atol=1e-8)


def test_bad_envs_raise_clear_errors():
    with pytest.raises(ValueError, match="does not determine the simulator state"):
        MujocoModel(gym.make("Reacher-v5"))
    with pytest.raises(ValueError, match="exclude_current_positions_from_observation"):
        MujocoModel(gym.make("HalfCheetah-v5"))
    with pytest.raises(TypeError, match="not a MuJoCo env"):
        MujocoModel(gym.make("Pendulum-v1"))
    with pytest.raises(ValueError, match="both"):
        MujocoModel(_env(PENDULUM), obs_to_state=_o2s)
    with pytest.raises(ValueError, match="inverse"):
        MujocoModel(
            _AngleObs(_env(PENDULUM)), obs_to_state=_o2s, state_to_obs=lambda q, v: _s2o(q, 2 * v)
        )
    model = MujocoModel(_env(PENDULUM), nthread=0)
    with pytest.raises(ValueError, match="actions"):
        model.rollout_actions(torch.zeros(4), torch.zeros(2, 3, 2))


def test_nonfinite_and_diverged_rows_become_nan_and_score_minus_infinity():
    env = _env(PENDULUM)
    model = MujocoModel(_env(PENDULUM), nthread=2)
    obs, _ = env.reset(seed=0)
    x0 = torch.as_tensor(obs)
    acts = torch.zeros(3, 4, 1, dtype=torch.float64)
    acts[1, 2, 0] = float("nan")
    out = model.rollout_actions(x0, acts)
    assert torch.isfinite(out[0]).all() and torch.isfinite(out[2]).all()
    assert torch.isfinite(out[1, :3]).all() and torch.isnan(out[1, 3:]).all()
    # A state MuJoCo cannot integrate is reset by the simulator; that must not look valid.
    wild = torch.tensor([[0.0, 0.0, 0.0, 1e30]], dtype=torch.float64)
    assert torch.isnan(model.rollout_actions(wild, acts[:1])).all(dim=-1)[0, 1:].all()

    def reward(o, a, nxt):
        return -(nxt**2).sum(-1)

    problem = PlanningProblem(model, reward, None, 4, np.array([-3.0]), np.array([3.0]))
    returns = problem.evaluate(x0, acts)
    assert torch.isinf(returns[1]) and returns[1] < 0 and torch.isfinite(returns[[0, 2]]).all()
    assert problem.nonfinite == 1


@pytest.mark.parametrize("name", ["cartpole-swingup", "hopper", "inverted-pendulum"])
def test_registry_entries_roll_out_like_their_envs(name):
    spec = make(name)
    env, model = spec.make(), MujocoModel.from_spec(spec, nthread=2)
    rng = np.random.default_rng(4)
    acts = rng.uniform(spec.action_low, spec.action_high, (25, spec.act_dim))
    truth = _env_rollout(env, 1, acts)
    got = model.rollout_actions(
        torch.as_tensor(truth[0]), torch.as_tensor(acts[None, : len(truth) - 1])
    )
    np.testing.assert_allclose(got[0].numpy(), truth, atol=1e-6)


def test_registry_entries_without_state_in_obs_are_refused():
    for name in ("reacher", "pusher"):
        with pytest.raises(ValueError, match="does not determine"):
            MujocoModel.from_spec(make(name))


def test_ilqr_plans_on_the_simulator_through_linearize():
    from mbrl.planners.ilqr import ILQR

    spec = make("cartpole-swingup")
    model = MujocoModel.from_spec(spec, nthread=2)
    problem = PlanningProblem(model, spec.reward_fn, None, 20, *spec.action_bounds())
    x0 = torch.tensor([0.0, 2.8, 0.0, 0.5], dtype=torch.float64)
    # (From zero actions the PETS reward is too flat near hanging for iLQR's gradient test.)
    warm = WarmStart(torch.full((20, 1), 0.3, dtype=torch.float64))
    plan = ILQR(max_iterations=10).plan(problem, x0, warm)
    assert plan.diagnostics["cost"] < plan.diagnostics["initial_cost"] - 0.1
    # The plan's predicted states are the simulator's own rollout of its actions.
    sim = model.rollout_actions(x0, plan.actions[None].double())[0]
    np.testing.assert_allclose(plan.x_ref.numpy(), sim.numpy(), atol=1e-8)
