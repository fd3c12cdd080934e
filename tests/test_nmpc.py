"""NMPC (casadi/IPOPT): known optima, status mapping, agreement of the two transcriptions."""

from __future__ import annotations

import math

import casadi as ca
import numpy as np
import pytest
import torch

from mbrl.control import MPCController
from mbrl.control.nmpc import NMPC, status_from_ipopt
from mbrl.dynamics.systems import SystemModel
from mbrl.envs.systems import SYSTEMS, double_integrator, pendulum
from mbrl.planners.base import PlanningProblem, WarmStart


def _problem(system, horizon: int) -> PlanningProblem:
    return PlanningProblem(
        SystemModel(system),
        system.reward_fn(),
        None,
        horizon,
        torch.as_tensor(system.action_low),
        torch.as_tensor(system.action_high),
        value_fn=system.value_fn(),
    )


def _riccati(horizon: int, dt: float = 0.1) -> tuple[list[np.ndarray], np.ndarray]:
    """Finite-horizon LQR gains (u_t = -K_t x_t, t = 0..H-1) and cost-to-go P_0 of the
    double integrator with cost x'Qx + u'Ru, terminal x'Qf x."""
    a = np.array([[1.0, dt], [0.0, 1.0]])
    b = np.array([[0.5 * dt**2], [dt]])
    q, r, p = np.diag([1.0, 0.1]), np.array([[0.1]]), np.diag([10.0, 1.0])
    gains = []
    for _ in range(horizon):
        k = np.linalg.solve(r + b.T @ p @ b, b.T @ p @ a)
        p = q + a.T @ p @ (a - b @ k)
        gains.append(k)
    return gains[::-1], p


def _pendulum_ode(x, u):
    """Continuous Pendulum-v1 physics: th'' = 3 g / (2 l) sin th + 3 u / (m l^2), g=10."""
    return ca.vertcat(x[1], 15.0 * ca.sin(x[0]) + 3.0 * u[0])


def _double_integrator_ode(x, u):
    return ca.vertcat(x[1], u[0])


@pytest.mark.parametrize("method", ["multiple_shooting", "collocation"])
def test_double_integrator_equals_lqr(method):
    system = double_integrator(action_bound=100.0)  # bounds never active: the LQR optimum
    h = 20
    nmpc = NMPC(h, method=method, ode=_double_integrator_ode)
    x0 = torch.tensor([1.0, -0.5], dtype=torch.float64)
    plan = nmpc.plan(_problem(system, h), x0)
    gains, p0 = _riccati(h)
    x, want = x0.numpy(), []
    a = np.array([[1.0, 0.1], [0.0, 1.0]])
    b = np.array([[0.005], [0.1]])
    for k in gains:
        u = -k @ x
        want.append(u)
        x = a @ x + b @ u
    assert plan.status == "ok"
    np.testing.assert_allclose(plan.actions.numpy(), np.array(want), atol=1e-6)
    assert plan.expected_return == pytest.approx(-float(x0.numpy() @ p0 @ x0.numpy()), rel=1e-7)
    assert plan.actions.dtype == torch.float64 and plan.x_ref.shape == (h + 1, 2)


def test_state_bounds_hold_and_bind():
    system = double_integrator(action_bound=1.0)
    nmpc = NMPC(30, state_bounds=([-np.inf, -0.3], [np.inf, 0.3]))
    problem = _problem(system, 30)
    sol = nmpc.solve(problem, np.array([1.0, 0.0]))
    free = NMPC(30).solve(problem, np.array([1.0, 0.0]))
    assert sol.status == "ok" and free.status == "ok"
    assert np.abs(free.states[:, 1]).max() > 0.35  # the bound matters
    assert np.abs(sol.states[:, 1]).max() <= 0.3 + 1e-6
    assert np.abs(sol.states[:, 1]).max() >= 0.3 - 1e-4  # and it is active
    assert np.abs(sol.actions).max() <= 1.0 and sol.cost > free.cost


def test_infeasible_constraints_give_infeasible_status():
    system = double_integrator(action_bound=1.0)
    # p_1 = 1 + 0.005 u >= 0.995 cannot reach |p| <= 0.1.
    nmpc = NMPC(10, state_bounds=([-0.1, -10.0], [0.1, 10.0]))
    plan = nmpc.plan(_problem(system, 10), torch.tensor([1.0, 0.0]))
    assert plan.status == "infeasible"
    assert torch.isfinite(plan.actions).all() and plan.actions.abs().max() <= 1.0
    assert plan.actions.dtype == torch.float32


def test_iteration_limit_gives_max_iterations():
    system = pendulum()
    nmpc = NMPC(40, max_iter=3)
    plan = nmpc.plan(_problem(system, 40), torch.tensor([math.pi - 0.05, 0.0]))
    assert plan.status == "max_iterations" and plan.iterations == 3
    assert torch.isfinite(plan.actions).all() and plan.actions.abs().max() <= 2.0


def test_status_mapping():
    assert status_from_ipopt("Solve_Succeeded") == "ok"
    assert status_from_ipopt("Infeasible_Problem_Detected") == "infeasible"
    assert status_from_ipopt("Maximum_Iterations_Exceeded") == "max_iterations"
    assert status_from_ipopt("Invalid_Number_Detected") == "error"


def test_shooting_and_collocation_agree_on_pendulum_swingup():
    system = pendulum()
    h, x0, guess = 60, np.array([math.pi - 0.05, 0.0]), np.ones((60, 1))
    problem = _problem(system, h)
    shooting = NMPC(h).solve(problem, x0, guess)
    assert shooting.status == "ok"
    assert abs(np.cos(shooting.states[-1, 0]) - 1.0) < 1e-2  # swung up
    assert shooting.cost < 200.0  # staying down costs 4 * 60 + 10 * 4 = 280
    for scheme in ("legendre", "radau"):
        colloc = NMPC(h, "collocation", collocation=scheme, ode=_pendulum_ode)
        sol = colloc.solve(problem, x0, guess)
        assert sol.status == "ok"
        assert sol.cost == pytest.approx(shooting.cost, rel=0.03)


def test_warm_start_saves_iterations():
    system = pendulum()
    h = 40
    nmpc, problem = NMPC(h), _problem(system, h)
    x0 = torch.tensor([math.pi - 0.05, 0.0], dtype=torch.float64)
    first = nmpc.plan(problem, x0, WarmStart(torch.ones(h, 1, dtype=torch.float64)))
    x1 = system.step(x0[None], first.actions[:1])[0]
    shifted = torch.cat([first.actions[1:], first.actions[-1:]])
    warm = nmpc.plan(problem, x1, WarmStart(shifted))
    cold = nmpc.plan(problem, x1, WarmStart(torch.ones(h, 1, dtype=torch.float64)))
    assert warm.status == cold.status == "ok"
    assert warm.iterations < cold.iterations
    # Both are local optima of the swing-up; the warm start is not a worse one.
    assert warm.expected_return >= cold.expected_return - 1e-3 * abs(cold.expected_return)


def test_closed_loop_mpc_regulates_double_integrator():
    system = double_integrator(action_bound=1.0)
    problem = _problem(system, 15)
    controller = MPCController(NMPC(15), problem)
    x = torch.tensor([1.0, 0.0])
    for _ in range(60):
        u = torch.as_tensor(controller.act(x.numpy()))
        assert np.isfinite(u.numpy()).all() and abs(float(u)) <= 1.0
        x = system.step(x[None], u[None])[0]
    assert controller.stats.not_ok == 0 and x.abs().max() < 0.05


def test_bad_input_raises():
    system = double_integrator()
    with pytest.raises(ValueError, match="unknown NMPC method"):
        NMPC(5, method="shooting")
    discrete_only = SYSTEMS["linear"](np.eye(2), np.ones((2, 1)))  # no ODE to collocate
    with pytest.raises(ValueError, match="ode"):
        NMPC(5, method="collocation").plan(_problem(discrete_only, 5), torch.zeros(2))
    nmpc = NMPC(5)
    with pytest.raises(ValueError, match="horizon"):
        nmpc.plan(_problem(system, 6), torch.zeros(2))
    with pytest.raises(ValueError, match="warm.actions"):
        nmpc.plan(_problem(system, 5), torch.zeros(2), WarmStart(torch.zeros(4, 1)))
    with pytest.raises(ValueError, match="x0"):
        nmpc.solve(_problem(system, 5), np.array([np.nan, 0.0]))


def test_cold_start_near_upright_stays_up():
    # A cold start must not commit IPOPT to the fall that zero actions would produce: the
    # optimum from near upright costs about what LQR's stabilization costs (well below one
    # swing, which costs > 50).
    system = pendulum()
    plan = NMPC(40).plan(_problem(system, 40), torch.tensor([0.082, -0.138]))
    assert plan.status == "ok" and -plan.expected_return < 0.1
    assert float(plan.actions[0, 0]) < 0.0  # push back toward upright
