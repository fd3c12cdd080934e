"""Riccati solvers and the LQR planner against known answers."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.linalg
import torch

from mbrl.control import MPCController, run_episode
from mbrl.dynamics.systems import SystemModel
from mbrl.envs import make
from mbrl.envs.systems import SYSTEMS, double_integrator
from mbrl.planners.base import PlanningProblem
from mbrl.planners.lqr import LQR, lqr_backward, lqr_gain, solve_dare


def random_lq(rng: np.random.Generator, nx: int, nu: int):
    A = rng.normal(size=(nx, nx))
    A *= rng.uniform(0.5, 1.5) / max(abs(np.linalg.eigvals(A)))  # some unstable, some stable
    B = rng.normal(size=(nx, nu))
    M = rng.normal(size=(nx, nx))
    N = rng.normal(size=(nu, nu))
    return A, B, M @ M.T + 0.1 * np.eye(nx), N @ N.T + 0.1 * np.eye(nu)


@pytest.mark.parametrize("seed", range(6))
def test_solve_dare_matches_scipy(seed: int) -> None:
    rng = np.random.default_rng(seed)
    nx, nu = int(rng.integers(1, 7)), int(rng.integers(1, 4))
    A, B, Q, R = random_lq(rng, nx, nu)
    P = solve_dare(A, B, Q, R).numpy()
    expected = scipy.linalg.solve_discrete_are(A, B, Q, R)
    assert np.abs(P - expected).max() <= 1e-8 * max(1.0, np.abs(expected).max())
    K = lqr_gain(A, B, Q, R).numpy()
    K_expected = -np.linalg.solve(R + B.T @ expected @ B, B.T @ expected @ A)
    np.testing.assert_allclose(K, K_expected, rtol=1e-8, atol=1e-10)
    assert max(abs(np.linalg.eigvals(A + B @ K))) < 1.0  # the closed loop is stable


def test_solve_dare_rejects_unstabilizable_and_bad_r() -> None:
    A = np.diag([2.0, 0.5])
    B = np.array([[0.0], [1.0]])  # the unstable mode is not actuated
    with pytest.raises(RuntimeError, match="stabilizable"):
        solve_dare(A, B, np.eye(2), np.eye(1))
    with pytest.raises(ValueError, match="positive definite"):
        solve_dare(np.eye(2), np.ones((2, 1)), np.eye(2), -np.eye(1))
    with pytest.raises(ValueError, match="Q: expected"):
        solve_dare(np.eye(2), np.ones((2, 1)), np.eye(3), np.eye(1))


def condensed_lq_solution(F, f, C, c, VH, vH, x0):
    """The finite-horizon LQ problem as one quadratic program in the stacked actions."""
    h, nx, nz = F.shape
    nu = nz - nx
    # x_t = S_t x0 + T_t u + o_t, affinely in the stacked actions u [H * U]
    S = [np.eye(nx)]
    T = [np.zeros((nx, h * nu))]
    o = [np.zeros(nx)]
    for t in range(h):
        A, B = F[t][:, :nx], F[t][:, nx:]
        E = np.zeros((nu, h * nu))
        E[:, t * nu : (t + 1) * nu] = np.eye(nu)
        S.append(A @ S[-1])
        T.append(A @ T[-1] + B @ E)
        o.append(A @ o[-1] + f[t])
    Hq = np.zeros((h * nu, h * nu))
    g = np.zeros(h * nu)
    for t in range(h + 1):
        xa = T[t]
        xb = S[t] @ x0 + o[t]
        if t < h:
            E = np.zeros((nu, h * nu))
            E[:, t * nu : (t + 1) * nu] = np.eye(nu)
            Z = np.vstack([xa, E])  # z_t = Z u + zb
            zb = np.concatenate([xb, np.zeros(nu)])
            Hq += Z.T @ C[t] @ Z
            g += Z.T @ (C[t] @ zb + c[t])
        else:
            Hq += xa.T @ VH @ xa
            g += xa.T @ (VH @ xb + vH)
    return np.linalg.solve(Hq, -g).reshape(h, nu)


def test_lqr_backward_equals_condensed_qp() -> None:
    rng = np.random.default_rng(0)
    h, nx, nu = 6, 3, 2
    F = rng.normal(size=(h, nx, nx + nu)) * 0.7
    f = rng.normal(size=(h, nx))
    W = rng.normal(size=(h, nx + nu, nx + nu))
    C = W @ np.swapaxes(W, 1, 2) + 0.5 * np.eye(nx + nu)
    c = rng.normal(size=(h, nx + nu))
    VH = np.eye(nx) * 2.0
    vH = rng.normal(size=nx)
    x0 = rng.normal(size=nx)
    tt = torch.tensor
    sol = lqr_backward(tt(F), tt(f), tt(C), tt(c), tt(VH), tt(vH))
    assert sol.K.shape == (h, nu, nx) and sol.k.shape == (h, nu)
    assert sol.V.shape == (h + 1, nx, nx) and sol.v.shape == (h + 1, nx)
    x, us = x0, []
    for t in range(h):
        u = sol.K[t].numpy() @ x + sol.k[t].numpy()
        us.append(u)
        x = F[t] @ np.concatenate([x, u]) + f[t]
    expected = condensed_lq_solution(F, f, C, c, VH, vH, x0)
    np.testing.assert_allclose(np.stack(us), expected, rtol=1e-9, atol=1e-9)
    # the (A, B) form gives the same gains
    sol2 = lqr_backward((tt(F[..., :nx]), tt(F[..., nx:])), tt(f), tt(C), tt(c), tt(VH), tt(vH))
    torch.testing.assert_close(sol2.K, sol.K)


def test_lqr_backward_approaches_dare_gain_on_long_horizons() -> None:
    rng = np.random.default_rng(1)
    A, B, Q, R = random_lq(rng, 3, 1)
    h = 300
    F = torch.tensor(np.concatenate([A, B], 1)).expand(h, -1, -1)
    C = torch.tensor(scipy.linalg.block_diag(2 * Q, 2 * R)).expand(h, -1, -1)
    sol = lqr_backward(F, None, C, torch.zeros(h, 4, dtype=torch.float64))
    torch.testing.assert_close(sol.K[0], lqr_gain(A, B, Q, R), rtol=1e-8, atol=1e-8)
    torch.testing.assert_close(sol.V[0] / 2, solve_dare(A, B, Q, R), rtol=1e-8, atol=1e-8)


def test_lqr_backward_rejects_nonconvex_cost() -> None:
    F = torch.ones(2, 1, 2, dtype=torch.float64)
    C = torch.tensor([[[1.0, 0.0], [0.0, -1.0]]], dtype=torch.float64).expand(2, -1, -1)
    with pytest.raises(ValueError, match="not positive definite at step 1"):
        lqr_backward(F, None, C, torch.zeros(2, 2, dtype=torch.float64))


def system_problem(system, horizon: int) -> PlanningProblem:
    return PlanningProblem(
        SystemModel(system),
        system.reward_fn(),
        None,
        horizon,
        system.action_low,
        system.action_high,
        value_fn=system.value_fn(),
    )


def test_lqr_planner_gain_and_closed_loop_on_double_integrator() -> None:
    system = double_integrator(action_bound=100.0)
    problem = system_problem(system, 20)
    planner = LQR(goal=system.goal)
    plan = planner.plan(problem, torch.tensor([1.0, 0.0], dtype=torch.float64))
    quad = system.quadratic
    A, B = np.array([[1.0, 0.1], [0.0, 1.0]]), np.array([[0.005], [0.1]])
    K = lqr_gain(A, B, quad.Q, quad.R)
    torch.testing.assert_close(plan.K[0], K, rtol=1e-10, atol=1e-12)
    assert plan.K.shape == (20, 1, 2) and plan.x_ref.shape == (21, 2) and plan.status == "ok"
    # the predicted states follow the closed loop x' = (A + B K) x
    Acl = A + B @ K.numpy()
    np.testing.assert_allclose(plan.x_ref[5].numpy(), np.linalg.matrix_power(Acl, 5) @ [1.0, 0.0])
    # the real closed loop through the MPC controller reaches the goal
    spec = make("double-integrator")
    env = spec.make()
    problem32 = system_problem(spec.dynamics, 10)
    ep = run_episode(env, MPCController(planner, problem32), seed=0, max_steps=80)
    assert np.abs(ep.obs[-1]).max() < 0.02


def test_lqr_stabilizes_pendulum_and_cartpole_near_upright() -> None:
    for system, x0 in [
        (SYSTEMS["pendulum"](), [0.3, -0.5]),
        (SYSTEMS["cartpole"](), [0.2, 0.2, 0.0, -0.3]),
    ]:
        problem = system_problem(system, 10)
        ctrl = MPCController(LQR(goal=system.goal), problem)
        x = np.array(x0)
        for _ in range(150):
            u = ctrl.act(x.astype(np.float32))
            x = system.step(torch.tensor(x[None]), torch.tensor(u[None], dtype=torch.float64))
            x = x[0].numpy()
        assert system.success(x) and np.abs(x).max() < 1e-3, (system.name, x)
