"""The MuJoCo ground truth of Reacher-v5 and Pusher-v5 (mbrl.envs.truth): its rollouts are the
env's own steps, and its planning problem scores the env's own rewards."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mbrl.envs import make
from mbrl.envs.truth import PusherFullState, PusherTruth, ground_truth
from mbrl.planners import PlanningProblem


def _env_rollout(env, seed: int, acts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    obs, _ = env.reset(seed=seed)
    out, rewards = [obs], []
    for a in acts:
        obs, r, *_ = env.step(a)
        out.append(obs)
        rewards.append(r)
    return np.stack(out), np.array(rewards)


@pytest.mark.parametrize(("name", "scale", "atol"), [("reacher", 0.3, 1e-5), ("pusher", 1.0, 1e-9)])
def test_rollouts_and_rewards_equal_the_env(name, scale, atol):
    """Open loop from a reset and one step from every visited state, both against the env;
    the planning problem's returns are the env's summed rewards. (Reacher-v5 integrates with
    RK4, whose body positions after a step differ from the final state's by ~1e-6.)"""
    make_env, model = ground_truth(name)
    spec = make(name)
    env = make_env()
    rng = np.random.default_rng(2)
    acts = scale * rng.uniform(spec.action_low, spec.action_high, (40, spec.act_dim))
    truth, rewards = _env_rollout(env, 5, acts)
    x0, a = torch.as_tensor(truth[0]), torch.as_tensor(acts)
    got = model.rollout_actions(x0, a[None])[0].numpy()
    np.testing.assert_allclose(got, truth, atol=atol)
    step = model.step(torch.as_tensor(truth[:-1]), a).numpy()
    np.testing.assert_allclose(step, truth[1:], atol=atol)
    low, high = spec.action_bounds()
    problem = PlanningProblem(model, spec.reward_fn, spec.termination_fn, len(acts), low, high)
    ret = problem.evaluate(x0.float(), a[None].float())
    assert ret.item() == pytest.approx(rewards.sum(), rel=1e-4)


def test_pusher_full_state_keeps_the_env_observation_first():
    make_env, _ = ground_truth("pusher")
    env = make_env()
    obs, _ = env.reset(seed=1)
    plain, _ = make("pusher").make().reset(seed=1)
    assert obs.shape == (27,) and env.observation_space.shape == (27,)
    np.testing.assert_array_equal(obs[:23], plain)
    np.testing.assert_array_equal(obs[23:], 0.0)  # the object and goal start at rest


def test_pusher_truth_needs_the_full_state_wrapper():
    with pytest.raises(TypeError, match="PusherFullState"):
        PusherTruth(make("pusher").make())
    assert isinstance(ground_truth("pusher")[0](), PusherFullState)


def test_state_observation_tasks_use_the_plain_model():
    make_env, model = ground_truth("cartpole-swingup")
    assert model.obs_dim == make("cartpole-swingup").obs_dim
    make_env().close()
