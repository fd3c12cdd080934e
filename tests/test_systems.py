"""Analytic systems: torch vs casadi twins, derivatives vs finite differences, the envs."""

from __future__ import annotations

import casadi as ca
import numpy as np
import pytest
import torch

from mbrl.control import RandomPolicy, run_episode
from mbrl.dynamics.systems import SystemModel
from mbrl.envs import make, names
from mbrl.envs.systems import SYSTEMS, AnalyticSystem, SystemEnv, double_integrator
from mbrl.planners.base import PlanningProblem
from mbrl.planners.derivatives import (
    QuadraticStageCost,
    autograd_cost_expansion,
    autograd_jacobian,
    dynamics_jacobians,
    finite_difference_jacobians,
    stage_cost_of,
)


def _t(n: int) -> torch.Tensor:
    return torch.arange(n)


ENV_NAMES = [
    "pendulum-swingup",
    "cartpole-swingup-analytic",
    "acrobot-swingup",
    "double-integrator",
]


def all_systems() -> list[AnalyticSystem]:
    A = np.array([[1.0, 0.1, 0.0], [0.0, 1.0, 0.1], [0.2, 0.0, 0.9]])
    B = np.array([[0.0, 0.1], [0.1, 0.0], [0.05, 0.05]])
    return [
        SYSTEMS["pendulum"](),
        SYSTEMS["cartpole"](),
        SYSTEMS["cartpole"](substeps=3),
        SYSTEMS["acrobot"](),
        SYSTEMS["linear"](A, B, goal=np.array([0.5, -0.2, 0.1])),
        double_integrator(),
    ]


def random_points(system: AnalyticSystem, n: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = 2 * torch.randn(n, system.obs_dim, generator=g, dtype=torch.float64)
    u = torch.randn(n, system.act_dim, generator=g, dtype=torch.float64)
    return x, u


@pytest.mark.parametrize("system", all_systems(), ids=lambda s: s.name)
def test_torch_and_casadi_twins_agree(system: AnalyticSystem) -> None:
    x, u = random_points(system, 8)
    xs, us = ca.SX.sym("x", system.obs_dim), ca.SX.sym("u", system.act_dim)
    fn = ca.Function(
        "twin",
        [xs, us],
        [system.step_casadi(xs, us), system.cost_casadi(xs, us), system.terminal_cost_casadi(xs)],
    )
    nxt, cost, term = system.step(x, u), system.cost(x, u), system.terminal_cost(x)
    assert nxt.shape == (8, system.obs_dim) and cost.shape == (8,) and term.shape == (8,)
    assert nxt.dtype == torch.float64
    for i in range(8):
        n_ca, c_ca, t_ca = fn(x[i].numpy(), u[i].numpy())
        np.testing.assert_allclose(np.asarray(n_ca).ravel(), nxt[i].numpy(), atol=1e-6, rtol=0)
        assert abs(float(c_ca) - float(cost[i])) < 1e-6
        assert abs(float(t_ca) - float(term[i])) < 1e-6


@pytest.mark.parametrize("system", all_systems(), ids=lambda s: s.name)
def test_model_fast_path_equals_torch_step(system: AnalyticSystem) -> None:
    """The model's compiled casadi step (no grad) equals the torch step, float32 and float64."""
    model = SystemModel(system)
    x, u = random_points(system, 5, seed=1)
    with torch.no_grad():
        torch.testing.assert_close(model.mean_dynamics(x, u), system.step(x, u), atol=1e-12, rtol=0)
        y = model.mean_dynamics(x.float(), u.float())
    assert y.dtype == torch.float32
    torch.testing.assert_close(y, system.step(x, u).float(), atol=1e-5, rtol=1e-5)
    # with gradients requested, the torch path runs and gradients flow
    xg = x.clone().requires_grad_(True)
    model.mean_dynamics(xg, u).sum().backward()
    assert xg.grad is not None and torch.isfinite(xg.grad).all()


@pytest.mark.parametrize("system", all_systems(), ids=lambda s: s.name)
def test_dynamics_jacobians_match_finite_differences(system: AnalyticSystem) -> None:
    x, u = random_points(system, 6, seed=2)
    A_fd, B_fd = finite_difference_jacobians(system.step, x, u, eps=1e-6)
    A_ca, B_ca = SystemModel(system).linearize(x, u)  # casadi AD
    assert A_ca.shape == (6, system.obs_dim, system.obs_dim)
    assert B_ca.shape == (6, system.obs_dim, system.act_dim)
    nx = system.obs_dim
    jac = autograd_jacobian(lambda z: system.step(z[:, :nx], z[:, nx:]), torch.cat([x, u], -1))
    for A, B in [(A_ca, B_ca), (jac[..., :nx], jac[..., nx:])]:
        torch.testing.assert_close(A, A_fd, atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(B, B_fd, atol=1e-6, rtol=1e-6)
    # a model without linearize goes through autograd: same numbers
    A_ag, B_ag = dynamics_jacobians(_PlainModel(system), x, u)
    torch.testing.assert_close(A_ag, A_ca, atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(B_ag, B_ca, atol=1e-10, rtol=1e-10)


class _PlainModel:
    """Mean dynamics only: derivatives must come from autograd."""

    learns_reward = False

    def __init__(self, system: AnalyticSystem) -> None:
        self.obs_dim, self.act_dim = system.obs_dim, system.act_dim
        self.mean_dynamics = system.step


def _fd_grad(fn, z: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    eye = torch.eye(z.shape[-1], dtype=z.dtype)
    cols = [(fn(z + eps * e) - fn(z - eps * e)) / (2 * eps) for e in eye]
    return torch.stack(cols, dim=-1)  # [B, Z] or [B, Y, Z]


@pytest.mark.parametrize("system", all_systems(), ids=lambda s: s.name)
def test_cost_derivatives_match_finite_differences(system: AnalyticSystem) -> None:
    x, u = random_points(system, 6, seed=3)
    nx = system.obs_dim
    z = torch.cat([x, u], -1)

    def stage(w: torch.Tensor) -> torch.Tensor:
        return system.cost(w[:, :nx], w[:, nx:])

    def stage_grad(w: torch.Tensor) -> torch.Tensor:
        return autograd_cost_expansion(stage, w).grad

    g_fd = _fd_grad(stage, z)
    h_fd = _fd_grad(stage_grad, z)
    e = system.stage_cost().expansion(x, u, _t(6))  # casadi AD
    c, g, h = e.cost, e.grad, e.hess
    auto = autograd_cost_expansion(stage, z)
    torch.testing.assert_close(c, system.cost(x, u), atol=1e-12, rtol=0)
    for grad, hess in [(g, h), (auto.grad, auto.hess)]:
        torch.testing.assert_close(grad, g_fd, atol=1e-5, rtol=1e-6)
        torch.testing.assert_close(hess, h_fd, atol=1e-5, rtol=1e-6)
    e = system.stage_cost().terminal_expansion(x)
    c, g, h = e.cost, e.grad, e.hess
    term = autograd_cost_expansion(system.terminal_cost, x)
    torch.testing.assert_close(g, _fd_grad(system.terminal_cost, x), atol=1e-5, rtol=1e-6)
    torch.testing.assert_close(h, term.hess, atol=1e-8, rtol=1e-8)
    torch.testing.assert_close(term.grad, g, atol=1e-8, rtol=1e-8)


def test_problem_cost_expansions_agree_across_paths() -> None:
    """reward_fn's casadi expansion, the quadratic closed form and plain autograd of
    ``-reward_fn(x, u, f(x, u))`` give the same expansion."""
    system = double_integrator()
    x, u = random_points(system, 4, seed=4)

    def problem(reward_fn, value_fn, stage_cost=None) -> PlanningProblem:
        low, high = system.action_low, system.action_high
        return PlanningProblem(
            SystemModel(system), reward_fn, None, 5, low, high, value_fn=value_fn,
            stage_cost=stage_cost,
        )  # fmt: skip

    full = problem(system.reward_fn(), system.value_fn())
    q = system.quadratic
    quad = QuadraticStageCost(q.Q, q.R, q.Qf, q.goal)  # the quadratic closed form
    closed = problem(system.reward_fn(), None, stage_cost=quad)
    plain = problem(
        lambda o, a, n: -system.cost(o, a), lambda state: -system.terminal_cost(state.obs)
    )
    costs = [stage_cost_of(p) for p in (full, closed, plain)]
    expansions = [c.expansion(x, u, _t(4)) for c in costs]
    terminals = [c.terminal_expansion(x) for c in costs]
    for e in expansions[1:]:
        torch.testing.assert_close(e.grad, expansions[0].grad)
        torch.testing.assert_close(e.hess, expansions[0].hess)
    for e in terminals[1:]:
        torch.testing.assert_close(e.grad, terminals[0].grad)
        torch.testing.assert_close(e.hess, terminals[0].hess)


@pytest.mark.parametrize("name", ENV_NAMES)
def test_env_reward_fn_equals_env_reward_on_rollouts(name: str) -> None:
    assert name in names()
    spec = make(name)
    assert isinstance(spec.dynamics, AnalyticSystem)
    env = spec.make()
    policy = RandomPolicy(spec.action_low * 1.5, spec.action_high * 1.5, np.random.default_rng(0))
    ep = run_episode(env, policy, seed=3, max_steps=60)
    obs = torch.as_tensor(ep.obs, dtype=torch.float64)
    act = torch.as_tensor(ep.act, dtype=torch.float64)
    reward = spec.reward_fn(obs[:-1], act, obs[1:])
    np.testing.assert_allclose(reward.numpy(), ep.reward, rtol=1e-4, atol=1e-4)
    # the env steps the system's dynamics (actions clipped to the bounds)
    clipped = act.clamp(torch.as_tensor(spec.action_low), torch.as_tensor(spec.action_high))
    pred = spec.dynamics.step(obs[:-1], clipped)
    np.testing.assert_allclose(pred.numpy(), ep.obs[1:], rtol=1e-4, atol=1e-4)
    assert not ep.terminated.any()


def test_env_is_reproducible_and_truncates() -> None:
    spec = make("pendulum-swingup")
    a = spec.make().reset(seed=7)[0]
    b = spec.make().reset(seed=7)[0]
    c = spec.make().reset(seed=8)[0]
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    assert abs(a[0] - np.pi) <= 0.05 + 1e-6
    env = spec.make()
    ep = run_episode(env, RandomPolicy(spec.action_low, spec.action_high, np.random.default_rng(1)))
    assert len(ep) == spec.max_episode_steps and ep.truncated


def test_pendulum_matches_gymnasium_pendulum_physics() -> None:
    """Same update as Pendulum-v1 (theta 0 upright), below its speed clip."""
    system = SYSTEMS["pendulum"]()
    th, w, u = 0.7, -1.3, 1.5
    w_next = w + (3 * 10.0 / 2 * np.sin(th) + 3.0 * u) * 0.05
    expected = np.array([th + w_next * 0.05, w_next])
    got = system.step(torch.tensor([[th, w]]), torch.tensor([[u]]))[0].numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-6)


def test_success_and_initial_state() -> None:
    for factory in (SYSTEMS["pendulum"], SYSTEMS["cartpole"], SYSTEMS["acrobot"]):
        system = factory(start_noise=0.1)
        assert system.success(system.goal)
        assert not system.success(system.start)
        wrapped = system.goal.copy()
        wrapped[system.angle_dims[0]] += 2 * np.pi
        assert system.success(wrapped)
        rows = np.stack([system.goal, system.start])
        np.testing.assert_array_equal(system.success(rows), [True, False])
        s1 = system.initial_state(np.random.default_rng(5))
        s2 = system.initial_state(np.random.default_rng(5))
        np.testing.assert_array_equal(s1, s2)
        assert np.all(np.abs(s1 - system.start) <= 0.1)
    assert set(SYSTEMS) == {"pendulum", "cartpole", "acrobot", "linear"}


def test_bad_input_raises() -> None:
    with pytest.raises(ValueError, match="A \\[X, X\\] and B \\[X, U\\]"):
        SYSTEMS["linear"](np.eye(2), np.ones((3, 1)))
    with pytest.raises(ValueError, match="render"):
        SystemEnv(SYSTEMS["pendulum"](), render_mode="human")


@pytest.mark.parametrize("factory", [double_integrator, SYSTEMS["cartpole"]])
def test_reward_on_next_obs_is_chained_through_the_jacobians(factory) -> None:
    """``l(x, u) = -r(x, u, f(x, u))``: exact gradient; Hessian exact for linear ``f``
    (Gauss-Newton otherwise), whether the model has autograd or only ``linearize``."""
    system = factory()
    x, u = random_points(system, 5, seed=6)
    nx = system.obs_dim

    def reward(obs: torch.Tensor, act: torch.Tensor, nxt: torch.Tensor) -> torch.Tensor:
        return -system.cost(obs, act) - (torch.sin(nxt) ** 2).sum(-1) - 0.3 * nxt[:, 0] * act[:, 0]

    def composite(w: torch.Tensor) -> torch.Tensor:
        return -reward(w[:, :nx], w[:, nx:], system.step(w[:, :nx], w[:, nx:]))

    z = torch.cat([x, u], -1)
    for model in (_PlainModel(system), SystemModel(system)):
        problem = PlanningProblem(model, reward, None, 5, system.action_low, system.action_high)
        e = stage_cost_of(problem).expansion(x, u, _t(5))
        torch.testing.assert_close(e.cost, composite(z))
        torch.testing.assert_close(e.grad, _fd_grad(composite, z), atol=1e-6, rtol=1e-6)
        if system.quadratic is not None:  # linear dynamics: the Hessian is exact too
            exact = autograd_cost_expansion(composite, z).hess
            torch.testing.assert_close(e.hess, exact, atol=1e-8, rtol=1e-8)


@pytest.mark.parametrize("name", ENV_NAMES)
def test_envs_pass_the_gymnasium_checker(name: str) -> None:
    from gymnasium.utils.env_checker import check_env

    check_env(make(name).make().unwrapped, skip_render_check=True)
