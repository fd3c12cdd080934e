"""The planning problem's scoring rules and the MPC controller's warm start and feedback."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mbrl.control import MPCController, run_episode
from mbrl.dynamics import KnownModel
from mbrl.planners import Plan, PlanningProblem, WarmStart
from mbrl.shapes import ShapeError


def _integrator(x, u):
    return x + u


def _reward(obs, act, next_obs):
    return next_obs[:, 0]


class _CountingModel(KnownModel):
    def __init__(self, fn):
        super().__init__(fn, 1, 1)
        self.calls = []

    def rollout_step(self, state, act, generator=None):
        self.calls.append(act.shape[0])
        return super().rollout_step(state, act, generator)


def _problem(model, horizon=3, particles=2, termination=None):
    return PlanningProblem(
        model,
        _reward,
        termination,
        horizon,
        torch.tensor([-1.0]),
        torch.tensor([1.0]),
        particles,
        torch.Generator().manual_seed(0),
    )


def test_evaluate_sums_rewards_with_one_model_call_per_step():
    model = _CountingModel(_integrator)
    problem = _problem(model)
    actions = torch.tensor([[[1.0], [1.0], [1.0]], [[0.0], [-1.0], [0.5]]])  # [N=2, H=3, U=1]
    returns = problem.evaluate(torch.tensor([0.0]), actions)
    assert returns.tolist() == [1 + 2 + 3, 0 - 1 - 0.5]
    assert model.calls == [4, 4, 4]  # N * P rows, once per horizon step


def test_rewards_after_termination_count_zero():
    problem = _problem(KnownModel(_integrator, 1, 1), termination=lambda x: x[:, 0] >= 2)
    actions = torch.ones(1, 3, 1)
    assert problem.evaluate(torch.tensor([0.0]), actions).tolist() == [1 + 2]


def test_nonfinite_candidates_score_minus_infinity_and_are_counted():
    def blows_up(x, u):
        return torch.where(u > 0.9, torch.full_like(x, float("nan")), x + u)

    # a termination function that NaN would slip past (NaN >= 5 is False)
    problem = _problem(KnownModel(blows_up, 1, 1), termination=lambda x: x[:, 0] >= 5)
    actions = torch.tensor([[[1.0], [0.0], [0.0]], [[0.5], [0.0], [0.0]]])
    returns = problem.evaluate(torch.tensor([0.0]), actions)
    assert returns[0] == float("-inf") and returns[1] == 1.5
    assert problem.nonfinite == 1


def test_nonfinite_after_termination_is_ignored():
    def blows_up_late(x, u):
        return torch.where(x >= 1, torch.full_like(x, float("inf")), x + u)

    problem = _problem(KnownModel(blows_up_late, 1, 1), termination=lambda x: x[:, 0] >= 1)
    assert problem.evaluate(torch.tensor([0.0]), torch.ones(1, 3, 1)).tolist() == [1.0]
    assert problem.nonfinite == 0


def test_wrong_action_shape_names_expected_and_actual():
    problem = _problem(KnownModel(_integrator, 1, 1))
    with pytest.raises(ShapeError, match=r"actions: expected \[N, 3, 1\], got \[5, 4, 1\]"):
        problem.evaluate(torch.tensor([0.0]), torch.zeros(5, 4, 1))


class _ScriptedPlanner:
    """Returns a fixed plan and records the warm starts it was given."""

    def __init__(self, plan):
        self.fixed, self.warm_starts = plan, []

    def plan(self, problem, x0, warm=None):
        self.warm_starts.append(warm)
        return self.fixed


def test_mpc_replans_every_k_and_shifts_the_warm_start():
    actions = torch.tensor([[0.1], [0.2], [0.3], [0.4]])
    planner = _ScriptedPlanner(Plan(actions=actions, expected_return=0.0))
    problem = _problem(KnownModel(_integrator, 1, 1), horizon=4)
    mpc = MPCController(planner, problem, replan_every=2)
    played = [float(mpc.act(np.zeros(1, dtype=np.float32))[0]) for _ in range(4)]
    assert played == pytest.approx([0.1, 0.2, 0.1, 0.2])
    assert planner.warm_starts[0] is None
    assert isinstance(planner.warm_starts[1], WarmStart)
    assert planner.warm_starts[1].actions.flatten().tolist() == pytest.approx([0.3, 0.4, 0.0, 0.0])
    assert mpc.stats.plans == 2
    mpc.reset()  # a new episode starts cold
    mpc.act(np.zeros(1, dtype=np.float32))
    assert planner.warm_starts[2] is None


def test_mpc_hands_back_what_the_plan_declared_shifted():
    """Every [..., H, U] tensor of the plan's warm (elites, carry) comes back shifted by the
    steps played; other carry entries come back as they were."""
    actions = torch.tensor([[0.1], [0.2], [0.3], [0.4]])  # [H, U]
    elites = torch.stack([actions, -actions])  # [K=2, H, U]
    step_size = torch.tensor([0.5])
    warm = WarmStart(actions, elites, carry={"noise": 2 * actions, "step_size": step_size})
    planner = _ScriptedPlanner(Plan(actions=actions, expected_return=0.0, warm=warm))
    problem = _problem(KnownModel(_integrator, 1, 1), horizon=4)
    mpc = MPCController(planner, problem, replan_every=3)
    for _ in range(4):
        mpc.act(np.zeros(1, dtype=np.float32))
    handed = planner.warm_starts[1]
    assert handed.actions.flatten().tolist() == pytest.approx([0.4, 0.0, 0.0, 0.0])
    expected = torch.tensor([[0.4, 0.0, 0.0, 0.0], [-0.4, 0.0, 0.0, 0.0]])
    assert torch.allclose(handed.elites[:, :, 0], expected)
    assert handed.carry["noise"].flatten().tolist() == pytest.approx([0.8, 0.0, 0.0, 0.0])
    assert handed.carry["step_size"] is step_size


def test_mpc_applies_feedback_gains_and_clips_to_bounds():
    plan = Plan(
        actions=torch.zeros(2, 1),
        expected_return=0.0,
        K=torch.full((2, 1, 1), -0.5),
        x_ref=torch.zeros(3, 1),
    )
    problem = _problem(KnownModel(_integrator, 1, 1), horizon=2)
    mpc = MPCController(_ScriptedPlanner(plan), problem, replan_every=2)
    assert mpc.act(np.array([0.4], dtype=np.float32))[0] == pytest.approx(-0.2)
    assert mpc.act(np.array([10.0], dtype=np.float32))[0] == pytest.approx(-1.0)


def test_mpc_rejects_replan_interval_beyond_horizon():
    problem = _problem(KnownModel(_integrator, 1, 1), horizon=2)
    with pytest.raises(ValueError, match=r"replan_every must be in \[1, horizon=2\]"):
        MPCController(_ScriptedPlanner(None), problem, replan_every=3)


def test_mpc_on_a_discrete_problem_plays_action_vectors_and_fills_with_a_valid_one():
    values = torch.tensor([[-1.0], [0.25], [1.0]])  # [A, U]: the middle of [-1, 1] is no choice
    actions = values[[2, 0, 2, 1]]  # [H, U] a plan of action vectors
    problem = PlanningProblem(
        KnownModel(_integrator, 1, 1),
        _reward,
        None,
        4,
        torch.tensor([-1.0]),
        torch.tensor([1.0]),
        action_values=values,
    )
    planner = _ScriptedPlanner(Plan(actions=actions, expected_return=0.0))
    mpc = MPCController(planner, problem, replan_every=2)
    played = [mpc.act(np.zeros(1, dtype=np.float32)) for _ in range(3)]
    assert all(u.shape == (1,) for u in played)
    assert [float(u[0]) for u in played] == [1.0, -1.0, 1.0]
    assert planner.warm_starts[1].actions.flatten().tolist() == [1.0, 0.25, 0.25, 0.25]


def test_run_episode_maps_vectors_to_a_discrete_envs_index():
    """A discrete env is stepped with the index of the policy's action vector; the episode
    records the vector. Without the mapping the env refuses the vector with a clear error."""
    from mbrl.envs import make

    spec = make("CartPole-v1")

    class Right:
        def reset(self) -> None:
            pass

        def act(self, obs: np.ndarray) -> np.ndarray:
            return np.asarray(spec.action_values[-1], dtype=np.float32)

    episode = run_episode(spec.make(), Right(), seed=0, env_action=spec.env_action)
    assert episode.act.shape == (len(episode), 1)
    np.testing.assert_array_equal(
        episode.act, np.broadcast_to(spec.action_values[-1], (len(episode), 1))
    )
    assert episode.terminated[-1] and len(episode) < 50  # always pushing right tips the pole
    with pytest.raises(TypeError, match="env_action"):
        run_episode(spec.make(), Right(), seed=0)
