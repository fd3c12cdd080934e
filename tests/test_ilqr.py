"""iLQR / box-DDP against known answers: LQR, IPOPT, bounds, failures, regularization."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.optimize
import torch

from mbrl.control import MPCController, run_episode
from mbrl.control.nmpc import ipopt_reference
from mbrl.dynamics.systems import SystemModel
from mbrl.envs import make
from mbrl.envs.systems import SYSTEMS, AnalyticSystem, double_integrator
from mbrl.planners.base import PlanningProblem, WarmStart
from mbrl.planners.ilqr import ILQR, box_qp
from mbrl.planners.lqr import LQR, lqr_backward
from mbrl.shapes import ShapeError

F64 = torch.float64


def system_problem(system: AnalyticSystem, horizon: int, model=None, reward_fn=None):
    return PlanningProblem(
        SystemModel(system) if model is None else model,
        system.reward_fn() if reward_fn is None else reward_fn,
        None,
        horizon,
        system.action_low,
        system.action_high,
        value_fn=system.value_fn(),
    )


def lq_reference(system: AnalyticSystem, x0: np.ndarray, h: int):
    """Finite-horizon LQR (lqr_backward) of a linear system's quadratic cost, rolled out."""
    q = system.quadratic
    nx, nu = system.obs_dim, system.act_dim
    x, u = torch.zeros(1, nx, dtype=F64), torch.zeros(1, nu, dtype=F64)
    A, B = system.linearize(x, u)
    F = torch.cat([A[0], B[0]], dim=1).expand(h, -1, -1)
    C = torch.block_diag(torch.tensor(2 * q.Q), torch.tensor(2 * q.R)).expand(h, -1, -1)
    g = torch.tensor(q.goal)
    c = torch.cat([-2 * torch.tensor(q.Q) @ g, torch.zeros(nu, dtype=F64)]).expand(h, -1)
    sol = lqr_backward(F, None, C, c, torch.tensor(2 * q.Qf), -2 * torch.tensor(q.Qf) @ g)
    xs, us = [torch.tensor(x0)], []
    for t in range(h):
        us.append(sol.K[t] @ xs[-1] + sol.k[t])
        xs.append(F[t] @ torch.cat([xs[-1], us[-1]]))
    return torch.stack(us), torch.stack(xs), sol


def two_input_system(bound: float = np.inf) -> AnalyticSystem:
    A = np.array([[1.0, 0.1, 0.0], [0.0, 1.0, 0.1], [0.1, 0.0, 1.05]])
    B = np.array([[0.0, 0.1], [0.1, 0.0], [0.05, 0.1]])
    return SYSTEMS["linear"](
        A, B, Q=np.diag([1.0, 0.5, 2.0]), R=np.diag([0.1, 0.3]), Qf=5 * np.eye(3),
        goal=np.array([0.5, 0.0, -0.3]), action_bound=bound, name="two_input",
    )  # fmt: skip


@pytest.mark.parametrize("system", [double_integrator(action_bound=1e6), two_input_system()])
def test_one_iteration_on_linear_quadratic_equals_lqr(system: AnalyticSystem) -> None:
    h = 25
    x0 = np.array([1.0, -0.5, 0.3][: system.obs_dim])
    u_ref, x_ref, sol = lq_reference(system, x0, h)
    plan = ILQR(max_iterations=1, mu_init=0.0).plan(
        system_problem(system, h),
        torch.tensor(x0),
        WarmStart(torch.zeros(h, system.act_dim, dtype=F64)),
    )
    torch.testing.assert_close(plan.actions, u_ref, rtol=1e-8, atol=1e-8)
    torch.testing.assert_close(plan.x_ref, x_ref, rtol=1e-8, atol=1e-8)
    torch.testing.assert_close(plan.K, sol.K, rtol=1e-8, atol=1e-8)
    # a second iteration finds nothing left to gain
    plan2 = ILQR(max_iterations=5, mu_init=0.0).plan(
        system_problem(system, h), torch.tensor(x0), WarmStart(plan.actions)
    )
    assert plan2.status == "converged" and plan2.iterations == 1


@pytest.mark.parametrize("seed", range(8))
def test_box_qp_matches_scipy(seed: int) -> None:
    rng = np.random.default_rng(seed)
    n = int(rng.integers(1, 5))
    W = rng.normal(size=(n, n))
    H = W @ W.T + 0.1 * np.eye(n)
    g = 3 * rng.normal(size=n)
    low, high = -rng.uniform(0.1, 1.0, n), rng.uniform(0.1, 1.0, n)
    x, free, L = box_qp(H, g, low, high, np.zeros(n))
    ref = scipy.optimize.minimize(
        lambda y: 0.5 * y @ H @ y + g @ y, np.zeros(n), jac=lambda y: H @ y + g,
        bounds=list(zip(low, high, strict=True)), method="L-BFGS-B",
        options={"ftol": 1e-15, "gtol": 1e-12},
    )  # fmt: skip
    np.testing.assert_allclose(x, ref.x, atol=1e-6)
    assert np.all(x >= low) and np.all(x <= high)
    grad = g + H @ x
    np.testing.assert_allclose(grad[free], 0.0, atol=1e-8)  # stationary on the free set
    if L is not None:
        np.testing.assert_allclose(L @ L.T, H[np.ix_(free, free)])


def test_pendulum_swingup_reaches_ipopt_optimum() -> None:
    system = SYSTEMS["pendulum"]()
    h = 80
    u_init = np.full((h, 1), 1.0)
    plan = ILQR(max_iterations=200, tol_rel_cost=1e-9).plan(
        system_problem(system, h), torch.tensor(system.start), WarmStart(torch.tensor(u_init))
    )
    reference = ipopt_reference(system, system.start, u_init).cost
    assert plan.status == "converged"
    assert plan.diagnostics["cost"] <= reference * 1.01, (plan.diagnostics, reference)
    assert abs(plan.expected_return + plan.diagnostics["cost"]) < 1e-9
    assert system.success(plan.x_ref[-1].numpy())  # the optimum swings the pendulum up


def test_control_bounds_are_respected() -> None:
    system = SYSTEMS["pendulum"]()
    plan = ILQR(max_iterations=100).plan(
        system_problem(system, 60),
        torch.tensor(system.start),
        WarmStart(torch.full((60, 1), 0.5, dtype=F64)),
    )
    assert plan.actions.abs().max() <= 2.0
    saturated = plan.actions.abs() >= 2.0 - 1e-12  # [H, U]
    assert saturated.any()  # a torque-limited swing-up saturates
    assert (plan.K[saturated[:, 0]] == 0).all()  # box-DDP: no feedback on clamped controls
    # two bounded inputs: box-DDP reaches the constrained optimum of a convex problem
    bounded = two_input_system(bound=1.0)
    x0 = np.array([2.0, -1.0, 1.0])
    problem = system_problem(bounded, 20)
    plan = ILQR(max_iterations=100, tol_rel_cost=1e-12).plan(problem, torch.tensor(x0), None)
    assert (plan.actions <= problem.action_high.double()).all()
    assert (plan.actions >= problem.action_low.double()).all()
    at_bound = plan.actions.abs() >= 1.0 - 1e-9
    assert at_bound.any() and not at_bound.all()
    reference = ipopt_reference(bounded, x0, np.zeros((20, 2))).cost
    assert plan.diagnostics["cost"] == pytest.approx(reference, rel=1e-6)


class _ExplodingModel:
    learns_reward = False

    def mean_dynamics(self, x: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        return x * 1e200 + u


class _NaNForLargeActions:
    """``x' = x + u`` while ``|u| < 0.5``, NaN beyond: big steps must be rejected."""

    learns_reward = False

    def mean_dynamics(self, x: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        return torch.where(u.abs() < 0.5, x + u, torch.nan)


def test_nonfinite_rollouts_give_named_status() -> None:
    system = double_integrator()
    problem = system_problem(system, 10, model=_ExplodingModel())
    plan = ILQR().plan(problem, torch.tensor([1.0, 0.0], dtype=F64))
    assert plan.status == "nonfinite" and plan.expected_return == float("-inf")
    assert plan.K is None and problem.nonfinite == 1
    torch.testing.assert_close(plan.actions, torch.zeros(10, 1, dtype=F64))
    # NaN only for large steps: those line-search candidates are rejected and counted
    one_d = SYSTEMS["linear"](np.eye(1), np.eye(1), R=0.01 * np.eye(1), action_bound=5.0)
    problem = system_problem(one_d, 5, model=_NaNForLargeActions())
    plan = ILQR(max_iterations=50).plan(problem, torch.tensor([3.0], dtype=F64))
    assert plan.nonfinite > 0 and problem.nonfinite == plan.nonfinite
    assert plan.status == "converged" and torch.isfinite(plan.actions).all()
    assert plan.actions.abs().max() < 0.5
    assert plan.diagnostics["cost"] < plan.diagnostics["initial_cost"]


def test_indefinite_hessian_is_regularized() -> None:
    """Hanging down, ``2 (1 - cos theta)`` has negative curvature: Q_uu goes indefinite, mu
    rises until the backward pass succeeds, and the solve still converges."""
    system = SYSTEMS["pendulum"]()
    plan = ILQR(max_iterations=200, mu_init=1e-6).plan(
        system_problem(system, 50),
        torch.tensor(system.start),
        WarmStart(torch.full((50, 1), 0.5, dtype=F64)),
    )
    assert plan.diagnostics["backward_failures"] >= 1
    assert plan.status == "converged"
    assert plan.diagnostics["cost"] < 0.8 * plan.diagnostics["initial_cost"]
    # a cost concave in u on an unbounded problem: no mu up to mu_max helps
    concave = SYSTEMS["linear"](np.eye(1), np.eye(1), R=-np.eye(1))
    plan = ILQR(mu_max=10.0).plan(system_problem(concave, 5), torch.tensor([1.0], dtype=F64))
    assert plan.status == "diverged" and plan.diagnostics["mu"] > 10.0


def test_generic_model_and_reward_paths_agree() -> None:
    """Autograd derivatives of a plain model and of -reward(x, u, f(x, u)) give the same plan
    as the casadi fast paths."""
    system = SYSTEMS["cartpole"]()

    class Plain:
        learns_reward = False
        obs_dim, act_dim = system.obs_dim, system.act_dim
        mean_dynamics = staticmethod(system.step)

    def reward(obs: torch.Tensor, act: torch.Tensor, next_obs: torch.Tensor) -> torch.Tensor:
        return -system.cost(obs, act) + 0.0 * next_obs.sum(-1)  # depends on next_obs

    x0 = torch.tensor(system.start, dtype=F64)
    warm = WarmStart(torch.full((30, 1), 2.0, dtype=F64))
    fast = ILQR(max_iterations=8).plan(system_problem(system, 30), x0, warm)
    slow = ILQR(max_iterations=8).plan(system_problem(system, 30, Plain(), reward), x0, warm)
    torch.testing.assert_close(slow.actions, fast.actions, rtol=1e-7, atol=1e-7)
    assert slow.diagnostics["cost"] == pytest.approx(fast.diagnostics["cost"], rel=1e-10)


def test_deterministic_and_dtype_following() -> None:
    system = SYSTEMS["acrobot"]()
    problem = system_problem(system, 20)
    warm = WarmStart(torch.full((20, 1), 1.0))
    a = ILQR(max_iterations=5).plan(problem, torch.tensor(system.start, dtype=torch.float32), warm)
    b = ILQR(max_iterations=5).plan(problem, torch.tensor(system.start, dtype=torch.float32), warm)
    assert torch.equal(a.actions, b.actions) and torch.equal(a.K, b.K)
    assert a.actions.dtype == a.K.dtype == a.x_ref.dtype == torch.float32
    assert a.actions.shape == (20, 1) and a.K.shape == (20, 1, 4) and a.x_ref.shape == (21, 4)


def test_bad_input_raises() -> None:
    system = SYSTEMS["pendulum"]()
    problem = system_problem(system, 10)
    with pytest.raises(ShapeError, match="warm.actions"):
        ILQR().plan(problem, torch.zeros(2), WarmStart(torch.zeros(9, 1)))
    with pytest.raises(ValueError, match="one state"):
        ILQR().plan(problem, torch.zeros(1, 2))
    with pytest.raises(ValueError, match="regularization"):
        ILQR(regularization="diagonal")

    class Learned:
        learns_reward = True

    with pytest.raises(ValueError, match="learns the reward"):
        ILQR().plan(system_problem(system, 10, model=Learned()), torch.zeros(2))


@pytest.mark.learning
def test_ilqr_mpc_swings_up_the_pendulum_env() -> None:
    spec = make("pendulum-swingup")
    problem = system_problem(spec.dynamics, 40)
    ctrl = MPCController(ILQR(max_iterations=10), problem)
    ep = run_episode(spec.make(), ctrl, seed=0, max_steps=120)
    assert spec.dynamics.success(ep.obs[-1]), ep.obs[-1]
    assert ctrl.stats.plans == 120


def _pendulum_problem(h: int) -> tuple[AnalyticSystem, PlanningProblem]:
    system = SYSTEMS["pendulum"]()
    return system, system_problem(system, h)


def test_default_guess_keeps_a_near_upright_start_in_the_upright_basin() -> None:
    """From near upright, zeros open loop fall and swing through a full turn, and iLQR polishes
    that turn (the failure once reported as converged); the default guess (the regulator guess
    here) stays upright and plans what LQR does."""
    system, problem = _pendulum_problem(40)
    x0 = torch.tensor([0.08217701, -0.13812797], dtype=F64)  # the study's stabilize start 0
    zeros = ILQR(max_iterations=50).plan(problem, x0, WarmStart(torch.zeros(40, 1, dtype=F64)))
    assert zeros.x_ref[:, 0].abs().max() > 6.0  # a full turn, ending upright wrapped
    plan = ILQR(max_iterations=50).plan(problem, x0)
    assert plan.status == "converged" and plan.diagnostics["regulator_guess"] == 1.0
    assert plan.x_ref[:, 0].abs().max() <= x0[0].abs() + 1e-9  # never farther than at start
    assert plan.diagnostics["cost"] < 0.01 * zeros.diagnostics["cost"]
    lqr = LQR(goal=system.goal).plan(problem, x0)
    assert plan.diagnostics["cost"] <= -lqr.expected_return + 1e-9  # the optimum, LQR's or better


def test_hanging_at_rest_with_zero_torque_is_a_saddle_not_converged() -> None:
    """Hanging at rest with zero torque the gradient is zero: the old solver stopped there as
    "converged" on a do-nothing plan. With the caller's zeros the status is "saddle"; the
    default guess steps off it along the negative curvature and swings up."""
    system, problem = _pendulum_problem(80)
    x0 = torch.tensor(system.start, dtype=F64)  # [pi, 0]
    stuck = ILQR(max_iterations=100).plan(problem, x0, WarmStart(torch.zeros(80, 1, dtype=F64)))
    assert stuck.status == "saddle" and not stuck.ok
    assert stuck.diagnostics["cost"] == stuck.diagnostics["initial_cost"]  # did nothing
    assert stuck.diagnostics["saddle_decrease"] > 0.0
    plan = ILQR(max_iterations=200).plan(problem, x0)
    assert plan.status == "converged" and plan.diagnostics["saddle_escapes"] >= 1
    assert system.success(plan.x_ref[-1].numpy())  # swung up
    assert plan.diagnostics["cost"] < 0.5 * stuck.diagnostics["cost"]
    again = ILQR(max_iterations=200).plan(problem, x0)
    assert torch.equal(again.actions, plan.actions)  # the perturbation is deterministic


def test_a_minimum_met_after_indefinite_steps_is_not_called_a_saddle() -> None:
    """The swing-up passes through negative curvature (backward failures), so its optimum is
    checked, and it is a minimum: converged, with no saddle found."""
    system, problem = _pendulum_problem(60)
    warm = WarmStart(torch.full((60, 1), 1.0, dtype=F64))
    plan = ILQR(max_iterations=200).plan(problem, torch.tensor(system.start, dtype=F64), warm)
    assert plan.diagnostics["backward_failures"] >= 1
    assert plan.status == "converged" and plan.diagnostics["saddle_decrease"] == 0.0
