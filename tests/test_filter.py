"""Planning from a belief: an exact Kalman filter on a noisy double integrator behind the
Filter capability, and the MPC controller that observes every step and plans from the belief."""

from __future__ import annotations

import gymnasium as gym
import numpy as np
import pytest
import torch

from mbrl.control import MPCController, run_episode
from mbrl.dynamics import FitReport, KnownModel, Prediction, RolloutState, Transitions
from mbrl.dynamics.base import Belief, DynamicsModel, Filter
from mbrl.planners import CEM, Plan, PlanningProblem
from mbrl.shapes import ShapeError

torch.set_num_threads(1)

DT = 0.1
A = torch.tensor([[1.0, DT], [0.0, 1.0]])  # [X, X]
B = torch.tensor([[0.5 * DT**2], [DT]])  # [X, U]
Q = torch.diag(torch.tensor([1e-4, 1e-4]))  # [X, X] process noise covariance
R = torch.diag(torch.tensor([0.3**2, 0.3**2]))  # [X, X] noise of the observed position, velocity
START = np.array([0.5, 0.0])


def mean_step(x: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """``x' = A x + B u`` for rows ``x [R, X]``, ``u [R, U]``."""
    return x @ A.T + u @ B.T


class KalmanModel:
    """The linear-Gaussian system ``x' = A x + B u + w``, ``w ~ N(0, Q)``, observed as
    ``y = x + v``, ``v ~ N(0, R)``, with the exact Kalman filter as its belief.

    Planning rows live in state space (``X = 2``). ``rollout_start`` takes observations
    ``[B, X]`` or a :class:`Belief` (its mean, or with ``sample_start`` a draw from
    ``N(mean, cov)``); ``rollout_step`` is the mean step (certainty equivalence), plus process
    noise with ``sample_steps``.
    """

    obs_dim, act_dim, learns_reward = 2, 1, False

    def __init__(self, sample_start: bool = False, sample_steps: bool = False) -> None:
        self.sample_start, self.sample_steps = sample_start, sample_steps
        self.observed: list[tuple[torch.Tensor, torch.Tensor | None]] = []

    def fit(self, data: Transitions, generator: torch.Generator | None = None) -> FitReport:
        return FitReport((), (), 0, 0, (0,), 0.0)

    def predict(self, obs: torch.Tensor, act: torch.Tensor) -> Prediction:
        mean = mean_step(obs, act)
        return Prediction(mean=mean, var=torch.diagonal(Q).expand_as(mean))

    def rollout_start(
        self, obs: torch.Tensor | Belief, particles: int, generator: torch.Generator | None
    ) -> RolloutState:
        if not isinstance(obs, Belief):
            return RolloutState(obs=obs.repeat_interleave(particles, dim=0))
        mean = obs.mean.repeat_interleave(particles, dim=0)  # [B * P, X]
        if not self.sample_start:
            return RolloutState(obs=mean)
        chol = torch.linalg.cholesky(obs.cov).repeat_interleave(particles, dim=0)  # [B*P, X, X]
        eps = torch.randn(mean.shape, generator=generator)  # [B * P, X]
        return RolloutState(obs=mean + (chol @ eps[..., None])[..., 0])

    def rollout_step(
        self, state: RolloutState, act: torch.Tensor, generator: torch.Generator | None
    ) -> RolloutState:
        nxt = mean_step(state.obs, act)
        if self.sample_steps:
            nxt = nxt + torch.randn(nxt.shape, generator=generator) @ Q.sqrt().T
        return RolloutState(obs=nxt)

    def reset_belief(self, batch: int = 1) -> Belief:
        mean = torch.zeros(batch, 2)
        return Belief(mean=mean, cov=torch.eye(2).expand(batch, 2, 2) * 4.0)

    def observe(self, belief: Belief, obs: torch.Tensor, prev_act: torch.Tensor | None) -> Belief:
        self.observed.append((obs.clone(), None if prev_act is None else prev_act.clone()))
        mean, cov = belief.mean, belief.cov  # [B, X], [B, X, X]
        if prev_act is not None:  # predict
            mean = mean_step(mean, prev_act.to(mean))
            cov = A @ cov @ A.T + Q
        innovation = obs.to(mean) - mean  # [B, X] (the observation matrix is the identity)
        gain = torch.linalg.solve(cov + R, cov).transpose(-1, -2)  # [B, X, X] P (P + R)^-1
        mean = mean + (gain @ innovation[..., None])[..., 0]
        cov = cov - gain @ cov
        return Belief(mean=mean, cov=0.5 * (cov + cov.transpose(-1, -2)))


def cost_reward(obs: torch.Tensor, act: torch.Tensor, nxt: torch.Tensor) -> torch.Tensor:
    return -(nxt[:, 0] ** 2 + 0.1 * nxt[:, 1] ** 2 + 0.01 * act[:, 0] ** 2)


class NoisyIntegrator(gym.Env):
    """The true system, stepped with process noise and observed with noise (numpy RNG from the
    reset seed); the reward is the quadratic cost on the true state."""

    def __init__(self) -> None:
        self.observation_space = gym.spaces.Box(-np.inf, np.inf, (2,), np.float32)
        self.action_space = gym.spaces.Box(-1.0, 1.0, (1,), np.float32)

    def _observe(self) -> np.ndarray:
        return (self.x + self.rng.normal(0.0, 0.3, 2)).astype(np.float32)

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self.rng = np.random.default_rng(seed)
        self.x = START.copy()
        return self._observe(), {}

    def step(self, action):
        u = np.clip(np.asarray(action, dtype=np.float64), -1.0, 1.0)
        self.x = A.double().numpy() @ self.x + B.double().numpy() @ u
        self.x = self.x + self.rng.normal(0.0, 1e-2, 2)
        cost = self.x[0] ** 2 + 0.1 * self.x[1] ** 2 + 0.01 * float(u[0]) ** 2
        return self._observe(), -float(cost), False, False, {}


def _problem(model: DynamicsModel, seed: int = 0) -> PlanningProblem:
    return PlanningProblem(
        model,
        cost_reward,
        None,
        10,
        -torch.ones(1),
        torch.ones(1),
        generator=torch.Generator().manual_seed(seed),
    )


def test_kalman_model_is_a_dynamics_model_and_a_filter():
    model = KalmanModel()
    assert isinstance(model, DynamicsModel) and isinstance(model, Filter)
    assert not isinstance(KnownModel(mean_step, 2, 1), Filter)


def test_kalman_filter_converges_on_a_constant_state():
    model = KalmanModel()
    belief = model.reset_belief(2)
    gen = torch.Generator().manual_seed(0)
    truth = torch.tensor([[0.5, 0.0], [-0.2, 0.0]])  # at rest, zero action: stays put
    for t in range(200):
        obs = truth + 0.3 * torch.randn(2, 2, generator=gen)
        belief = model.observe(belief, obs, None if t == 0 else torch.zeros(2, 1))
    assert torch.allclose(belief.mean, truth, atol=0.1)
    assert bool((torch.diagonal(belief.cov, dim1=-2, dim2=-1) < 0.3**2 / 10).all())


def test_belief_start_from_mean_or_sampled_from_the_covariance():
    belief = Belief(
        mean=torch.tensor([[1.0, -1.0]]), cov=torch.tensor([[[0.04, 0.0], [0.0, 0.01]]])
    )
    problem = _problem(KalmanModel())
    assert torch.equal(problem.start(belief, 3).obs, belief.mean.expand(3, 2))
    sampled = _problem(KalmanModel(sample_start=True), seed=5)
    rows = sampled.start(belief, 20_000).obs  # [P, X]
    assert torch.allclose(rows.mean(0), belief.mean[0], atol=0.01)
    assert torch.allclose(rows.var(0), torch.tensor([0.04, 0.01]), rtol=0.05)
    again = _problem(KalmanModel(sample_start=True), seed=5).start(belief, 20_000).obs
    assert torch.equal(rows, again)  # drawn from the problem's generator


def test_mpc_observes_every_step_with_the_previous_action_and_plans_from_the_belief():
    model = KalmanModel()
    seen: list[object] = []

    class Recording(CEM):
        def plan(self, problem, x0, warm=None):
            seen.append(x0)
            return super().plan(problem, x0, warm)

    controller = MPCController(Recording(population=30, iterations=2), _problem(model), 3)
    episode = run_episode(NoisyIntegrator(), controller, seed=0, max_steps=7)
    assert len(model.observed) == 7  # every env step, also between replans
    assert model.observed[0][1] is None  # right after reset_belief
    for t in range(1, 7):
        obs, prev = model.observed[t]
        assert obs.shape == (1, 2) and prev.shape == (1, 1)
        assert np.allclose(prev[0].numpy(), episode.act[t - 1])
        assert np.allclose(obs[0].numpy(), episode.obs[t])
    assert len(seen) == 3 and all(isinstance(b, Belief) and b.batch == 1 for b in seen)
    assert controller.stats.plans == 3
    controller.reset()  # a new episode: the belief restarts from the prior
    assert torch.equal(controller.belief.mean, model.reset_belief(1).mean)


def test_feedback_gains_act_on_the_belief_mean():
    class Scripted:
        def plan(self, problem, x0, warm=None):
            return Plan(
                torch.zeros(10, 1), 0.0, K=torch.full((10, 1, 2), -0.5), x_ref=torch.zeros(11, 2)
            )

    controller = MPCController(Scripted(), _problem(KalmanModel()), replan_every=5)
    obs = np.array([0.8, -0.4], dtype=np.float32)
    u = controller.act(obs)
    mean = controller.belief.mean[0]
    assert u[0] == pytest.approx(float(-0.5 * mean.sum()), abs=1e-6)
    assert not np.allclose(mean.numpy(), obs)  # the prior pulled the mean away from obs


def _mean_cost(model: DynamicsModel, seeds: range) -> float:
    costs = []
    for seed in seeds:
        planner = CEM(population=60, iterations=3, elite_fraction=0.2)
        controller = MPCController(planner, _problem(model, seed))
        episode = run_episode(NoisyIntegrator(), controller, seed=seed, max_steps=40)
        costs.append(-episode.ret)
    return float(np.mean(costs))


def test_planning_from_the_filtered_belief_beats_the_raw_observation():
    seeds = range(4)
    filtered = _mean_cost(KalmanModel(), seeds)
    raw = _mean_cost(KnownModel(mean_step, 2, 1), seeds)
    assert filtered < raw, (filtered, raw)


def test_sampling_planners_plan_from_one_belief_row_only():
    problem = _problem(KalmanModel())
    two = KalmanModel().reset_belief(2)
    with pytest.raises(
        ShapeError, match=r"x0: expected a belief of one row \(batch 1\), got batch 2"
    ):
        CEM(population=10, iterations=1).plan(problem, two)
    one = KalmanModel().reset_belief(1)
    plan = CEM(population=10, iterations=1).plan(problem, one)
    assert plan.actions.shape == (10, 1) and plan.ok
