"""The planning step: start/step/evaluate over batches of starts, discount and terminal value,
termination and non-finite rows, one start per plan, bad starts, shift_warm, discrete refusal."""

from __future__ import annotations

import pytest
import torch

from mbrl.dynamics import KnownModel, RolloutState
from mbrl.dynamics.base import Belief
from mbrl.planners import (
    CEM,
    MPPI,
    Plan,
    PlanningProblem,
    RandomShooting,
    Step,
    WarmStart,
    shift_warm,
)
from mbrl.shapes import ShapeError


def _integrator(x: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    return x + u


def _next_obs_reward(obs: torch.Tensor, act: torch.Tensor, nxt: torch.Tensor) -> torch.Tensor:
    return nxt[:, 0]


def _problem(model=None, horizon=3, particles=1, termination=None, reward=None, **kw):
    return PlanningProblem(
        model if model is not None else KnownModel(_integrator, 1, 1),
        reward if reward is not None else _next_obs_reward,
        termination,
        horizon,
        torch.tensor([-1.0]),
        torch.tensor([1.0]),
        particles,
        torch.Generator().manual_seed(0),
        **kw,
    )


class _CountingModel(KnownModel):
    """A known model that counts its rollout starts."""

    def __init__(self, fn, obs_dim: int = 1, act_dim: int = 1) -> None:
        super().__init__(fn, obs_dim, act_dim)
        self.starts = 0

    def rollout_start(self, obs, particles, generator=None):
        self.starts += 1
        return super().rollout_start(obs, particles, generator)


# ----------------------------------------------------------------------------- start / step


def test_start_gives_b_times_p_rows_start_major_and_step_reports():
    problem = _problem(particles=3, termination=lambda x: x[:, 0] >= 1.5)
    one = problem.start(torch.tensor([0.5]))
    assert one.obs.shape == (3, 1)
    many = problem.start(torch.tensor([[0.0], [1.0]]))
    assert many.obs[:, 0].tolist() == [0.0, 0.0, 0.0, 1.0, 1.0, 1.0]
    assert problem.start(many) is many  # already started
    s = problem.step(many, torch.ones(6, 1))
    assert isinstance(s, Step)
    assert s.state.obs[:, 0].tolist() == [1.0] * 3 + [2.0] * 3
    assert s.reward.dtype == torch.float32 and s.reward.tolist() == [1.0] * 3 + [2.0] * 3
    assert s.alive.tolist() == [True] * 3 + [False] * 3
    assert s.finite.all()


def test_evaluate_of_b_starts_equals_b_single_evaluations():
    def wobble(x, u):
        return torch.sin(x) + u * x.cos()

    model = KnownModel(wobble, 2, 2)
    problem = PlanningProblem(
        model,
        lambda o, a, n: -(n**2).sum(-1) - 0.1 * (a**2).sum(-1),
        lambda n: n[:, 0] > 1.2,
        4,
        -torch.ones(2),
        torch.ones(2),
        particles=2,
        discount=0.9,
        value_fn=lambda s: -s.obs.abs().sum(-1),
    )
    gen = torch.Generator().manual_seed(1)
    x0 = torch.randn(3, 2, generator=gen)  # [B, X]
    actions = torch.rand(3, 5, 4, 2, generator=gen) * 2 - 1  # [B, N, H, U]
    batched = problem.evaluate(x0, actions)
    assert batched.shape == (3, 5)
    for b in range(3):
        assert torch.equal(batched[b], problem.evaluate(x0[b], actions[b]))
    root = problem.start(x0)  # the started state is the same B starts
    assert torch.equal(problem.evaluate(root, actions), batched)


def test_discount_and_value_fn_known_returns():
    # x' = x + u, reward x', value 10 x: from 0 under u = 1 the rewards are 1, 2, 3, value 30
    problem = _problem(discount=0.5, value_fn=lambda s: 10 * s.obs[:, 0])
    returns = problem.evaluate(torch.tensor([0.0]), torch.ones(1, 3, 1))
    assert returns.tolist() == [1 + 0.5 * 2 + 0.25 * 3 + 0.125 * 30]
    # termination at x >= 2: the terminating step counts, nothing after it, no value
    ended = _problem(
        discount=0.5, value_fn=lambda s: 10 * s.obs[:, 0], termination=lambda x: x[:, 0] >= 2
    )
    assert ended.evaluate(torch.tensor([0.0]), torch.ones(1, 3, 1)).tolist() == [1 + 0.5 * 2]
    # no discount, no value: the plain sum
    assert _problem().evaluate(torch.tensor([0.0]), torch.ones(1, 3, 1)).tolist() == [6.0]


def test_nan_after_termination_is_ignored_but_before_scores_minus_infinity():
    def reward(obs, act, nxt):  # NaN once the row starts from x >= 2 (after termination)
        r = nxt[:, 0]
        return torch.where((obs[:, 0] >= 2) | (act[:, 0] > 0.9), float("nan"), r)

    problem = _problem(reward=reward, termination=lambda x: x[:, 0] >= 2)
    actions = torch.tensor([[[0.9], [0.9], [0.9]], [[1.0], [0.0], [0.0]], [[0.5], [0.5], [0.5]]])
    returns = problem.evaluate(torch.tensor([1.0]), actions)  # [N=3]
    # candidate 0: 1.9, then 2.8 terminates; the NaN of step 3 comes after termination
    assert returns[0].item() == pytest.approx(1.9 + 2.8)
    assert returns[1].item() == float("-inf")  # NaN on the first step, while alive
    assert returns[2].item() == pytest.approx(1.5 + 2.0)  # terminates at step 2
    assert problem.nonfinite == 1
    # a non-finite terminal value counts only for rows still alive
    valued = _problem(
        value_fn=lambda s: torch.where(s.obs[:, 0] > 2.5, float("inf"), 0.0),
        termination=lambda x: x[:, 0] >= 3.5,
    )
    v = valued.evaluate(torch.tensor([0.0]), torch.tensor([[[1.0]] * 3, [[0.9]] * 3, [[0.1]] * 3]))
    assert v.tolist() == [float("-inf"), float("-inf"), pytest.approx(0.6)]
    assert valued.nonfinite == 2
    late = _problem(
        value_fn=lambda s: torch.where(s.obs[:, 0] > 2.5, float("inf"), 0.0),
        termination=lambda x: x[:, 0] >= 2.5,
    )
    assert late.evaluate(torch.tensor([0.0]), torch.ones(1, 3, 1)).tolist() == [1 + 2 + 3]
    assert late.nonfinite == 0


@pytest.mark.parametrize(
    "planner",
    [
        RandomShooting(population=20),
        CEM(population=20, iterations=3),
        CEM(population=20, iterations=3, return_mean_or_best="mean", keep_elites_fraction=0.5),
        MPPI(population=20, iterations=3),
    ],
    ids=["random_shooting", "cem", "cem_mean", "mppi"],
)
def test_each_plan_starts_the_model_once(planner):
    model = _CountingModel(_integrator)
    problem = _problem(model, particles=2)
    planner.plan(problem, torch.tensor([0.0]))
    assert model.starts == 1
    planner.plan(problem, torch.tensor([0.0]), WarmStart(torch.zeros(3, 1)))
    assert model.starts == 2


# ----------------------------------------------------------------------------- bad starts


def test_belief_for_a_model_that_is_no_filter_is_a_type_error():
    problem = _problem()
    belief = Belief(mean=torch.zeros(1, 1))
    with pytest.raises(TypeError, match="not a Filter"):
        problem.start(belief)
    with pytest.raises(TypeError, match="Filter"):
        problem.evaluate(belief, torch.zeros(2, 3, 1))
    with pytest.raises(TypeError, match="Filter"):
        CEM(population=10, iterations=1).plan(problem, belief)


def test_start_batch_of_the_wrong_shape_names_expected_and_actual():
    problem = _problem()
    with pytest.raises(
        ShapeError, match=r"expected \[B=2, N, H, U\] for 2 starts, got \[4, 3, 1\]"
    ):
        problem.evaluate(torch.zeros(2, 1), torch.zeros(4, 3, 1))
    with pytest.raises(ShapeError, match=r"x0: expected a start \[X\] or starts \[B, X\], got"):
        problem.evaluate(torch.zeros(2, 1, 1), torch.zeros(2, 4, 3, 1))
    with pytest.raises(ShapeError, match=r"actions: expected \[2, N, 3, 1\], got \[3, 4, 3, 1\]"):
        problem.evaluate(torch.zeros(2, 1), torch.zeros(3, 4, 3, 1))
    with pytest.raises(ShapeError, match=r"actions: expected \[N, 3, 1\], got \[4, 2, 1\]"):
        problem.evaluate(torch.zeros(1), torch.zeros(4, 2, 1))


# ----------------------------------------------------------------------------- warm starts


def test_shift_warm_shifts_every_horizon_tensor_and_keeps_the_rest():
    h, u = 4, 2
    actions = torch.arange(h * u, dtype=torch.float32).view(h, u)  # [H, U]
    elites = torch.stack([actions, actions + 100])  # [K, H, U]
    noise = torch.ones(3, 5, h, u)  # [.., H, U]
    scale = torch.tensor([2.0, 3.0])  # [U]: not a horizon tensor
    other = torch.zeros(h, u + 1)  # [H, U + 1]: not a horizon tensor
    warm = WarmStart(actions, elites, carry={"noise": noise, "scale": scale, "other": other})
    fill = torch.tensor([-1.0, -2.0])
    out = shift_warm(warm, 1, fill)
    assert torch.equal(out.actions[:-1], actions[1:]) and torch.equal(out.actions[-1], fill)
    assert torch.equal(out.elites[:, :-1], elites[:, 1:])
    assert torch.equal(out.elites[:, -1], fill.expand(2, u))
    assert out.carry["noise"].shape == noise.shape
    assert torch.equal(out.carry["noise"][..., -1, :], fill.expand(3, 5, u))
    assert out.carry["scale"] is scale and out.carry["other"] is other
    assert warm.actions[0].tolist() == [0.0, 1.0]  # the input is not changed
    assert shift_warm(WarmStart(actions), 2, fill).elites is None
    assert Plan(actions, 0.0).warm_start() == WarmStart(actions)


# ----------------------------------------------------------------------------- discrete problems


@pytest.mark.parametrize(
    "planner",
    [RandomShooting(population=5), CEM(population=5, iterations=1), MPPI(population=5)],
    ids=["random_shooting", "cem", "mppi"],
)
def test_sampling_planners_refuse_discrete_problems(planner):
    problem = _problem(action_values=torch.tensor([[-1.0], [0.0], [1.0]]))
    assert problem.discrete
    with pytest.raises(ValueError, match="discrete.*MCTS"):
        planner.plan(problem, torch.tensor([0.0]))


def test_started_state_of_p_rows_is_one_start():
    problem = _problem(particles=2)
    root = problem.start(torch.tensor([0.0]))
    assert isinstance(root, RolloutState) and root.obs.shape == (2, 1)
    actions = torch.ones(3, 3, 1)
    assert torch.equal(problem.evaluate(root, actions), problem.evaluate(torch.zeros(1), actions))
