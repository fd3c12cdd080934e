"""The LQR-FLM step (linear-Gaussian controllers, forward pass, KL, dual search, step size)
against known answers."""

from __future__ import annotations

import math

import pytest
import torch

from mbrl.dynamics.tvlg import TVLGDynamics, fit_tvlg
from mbrl.envs.systems import double_integrator, pendulum
from mbrl.planners.derivatives import QuadraticStageCost
from mbrl.planners.lqr import lqr_backward
from mbrl.planners.lqr_flm import (
    LQRFLM,
    LinearGaussianController,
    QuadraticCost,
    _backward,
    adapt_step,
    expected_cost,
    final_state,
    kl_divergence,
    quadratic_cost,
    trajectory_distribution,
)
from mbrl.shapes import ShapeError

F64 = torch.float64


def random_linear(seed: int, nx: int = 3, nu: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    A = torch.eye(nx, dtype=F64) + 0.2 * torch.randn(nx, nx, generator=g, dtype=F64)
    return A, torch.randn(nx, nu, generator=g, dtype=F64)


def sample(
    step,
    ctrl: LinearGaussianController,
    x0: torch.Tensor,
    n: int,
    gen: torch.Generator,
    noise: float = 0.0,
    x0_std: float = 0.05,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` trajectories of ``ctrl`` on ``x' = step(x, u) + noise * eps``."""
    h, nx, nu = ctrl.horizon, ctrl.x_dim, ctrl.u_dim
    x = torch.zeros(n, h + 1, nx, dtype=F64)
    u = torch.zeros(n, h, nu, dtype=F64)
    x[:, 0] = x0 + x0_std * torch.randn(n, nx, generator=gen, dtype=F64)
    for t in range(h):
        u[:, t] = ctrl.act(x[:, t], t, gen)
        x[:, t + 1] = step(x[:, t], u[:, t]) + noise * torch.randn(n, nx, generator=gen, dtype=F64)
    return x, u


def random_cost(seed: int, horizon: int, nx: int, nu: int) -> QuadraticCost:
    g = torch.Generator().manual_seed(seed)
    nz = nx + nu
    M = torch.randn(horizon, nz, nz, generator=g, dtype=F64)
    Mf = torch.randn(nx, nx, generator=g, dtype=F64)
    return QuadraticCost(
        C=M @ M.mT + 0.5 * torch.eye(nz, dtype=F64),
        c=torch.randn(horizon, nz, generator=g, dtype=F64),
        c0=torch.zeros(horizon, dtype=F64),
        C_final=Mf @ Mf.T + torch.eye(nx, dtype=F64),
        c_final=torch.randn(nx, generator=g, dtype=F64),
        c0_final=torch.tensor(0.0, dtype=F64),
    )


def exact_linear_fit(
    seed: int, horizon: int = 12
) -> tuple[TVLGDynamics, torch.Tensor, torch.Tensor]:
    """A TVLG fit of x' = A x + B u + 0.3 from noise-free samples (exact), with A, B."""
    A, B = random_linear(seed)
    ctrl = LinearGaussianController.initial(horizon, 3, 2, variance=1.0)
    x, u = sample(
        lambda x, u: x @ A.T + u @ B.T + 0.3,
        ctrl,
        torch.zeros(3, dtype=F64),
        10,
        torch.Generator().manual_seed(seed),
        x0_std=1.0,
    )
    return fit_tvlg(x, u, regularization=0.0), A, B


def test_backward_without_the_kl_term_is_the_lqr_solution() -> None:
    """Known answer: on an exact fit of a linear system, the LQR-FLM backward pass with no KL
    term (eta -> 0 in the dual, eta=None here) gives the project's LQR gains, and covariances
    Q_uu^-1 = (C_uu + B' V_{t+1} B)^-1; a tiny eta gets within 1e-6 of them."""
    dyn, A, B = exact_linear_fit(0)
    h = dyn.horizon
    cost = random_cost(1, h, 3, 2)
    ctrl, failed, _ = _backward(dyn, cost, None, None)
    assert not bool(failed)
    F = torch.cat([A, B], -1).expand(h, 3, 5)
    ref = lqr_backward(
        F, torch.full((h, 3), 0.3, dtype=F64), cost.C, cost.c, cost.C_final, cost.c_final
    )
    torch.testing.assert_close(ctrl.K, ref.K, rtol=0, atol=1e-6)
    torch.testing.assert_close(ctrl.k, ref.k, rtol=0, atol=1e-6)
    Quu = cost.C[:, 3:, 3:] + B.T @ ref.V[1:] @ B
    torch.testing.assert_close(ctrl.covariance, torch.linalg.inv(Quu), rtol=0, atol=1e-6)
    as_lqr = LinearGaussianController.from_lqr(ref, torch.linalg.inv(Quu))
    torch.testing.assert_close(as_lqr.K, ctrl.K, rtol=0, atol=1e-6)
    prev = LinearGaussianController.initial(h, 3, 2, variance=0.5)
    near, failed, _ = _backward(dyn, cost, prev, torch.tensor(1e-10, dtype=F64))
    assert not bool(failed)
    torch.testing.assert_close(near.K, ref.K, rtol=0, atol=1e-6)
    torch.testing.assert_close(near.k, ref.k, rtol=0, atol=1e-6)


def test_backward_at_a_large_dual_variable_returns_the_previous_controller() -> None:
    """Known answer at the other end: as eta grows, the KL term dominates and the update
    returns the previous controller (gains, offsets and covariance)."""
    dyn, _, _ = exact_linear_fit(16)
    h = dyn.horizon
    g = torch.Generator().manual_seed(17)
    M = torch.randn(h, 2, 2, generator=g, dtype=F64)
    prev = LinearGaussianController(  # mild gains: the cost-to-go does not blow up backwards
        0.1 * torch.randn(h, 2, 3, generator=g, dtype=F64),
        torch.randn(h, 2, generator=g, dtype=F64),
        M @ M.mT + 0.1 * torch.eye(2, dtype=F64),
    )
    ctrl, failed, _ = _backward(dyn, random_cost(18, h, 3, 2), prev, torch.tensor(1e12, dtype=F64))
    assert not bool(failed)
    for new, old in ((ctrl.K, prev.K), (ctrl.k, prev.k), (ctrl.covariance, prev.covariance)):
        torch.testing.assert_close(new, old, rtol=0, atol=1e-6)


@pytest.mark.parametrize("target", [1e-3, 1e-2, 1e-1, 1.0])
def test_dual_search_meets_kl_targets(target: float) -> None:
    dyn, _, _ = exact_linear_fit(2, horizon=15)
    cost = random_cost(3, 15, 3, 2)
    prev = LinearGaussianController.initial(15, 3, 2, variance=1.0)
    x0_mean, x0_cov = torch.ones(3, dtype=F64), 0.01 * torch.eye(3, dtype=F64)
    res = LQRFLM().update(dyn, cost, prev, x0_mean, x0_cov, kl_target=target)
    assert res.status == "ok" and bool(res.met)
    assert res.evaluations <= 50
    assert abs(float(res.kl) - target) <= 0.1 * target
    # the reported KL is the controller's own, measured independently
    traj = trajectory_distribution(dyn, res.controller, x0_mean, x0_cov)
    kl = float(kl_divergence(res.controller, prev, traj.mu, traj.sigma)) / 15
    assert kl == pytest.approx(float(res.kl), rel=1e-9)
    # in the model, the new controller never costs more than the previous one
    assert float(res.expected_cost) <= float(res.previous_cost)


def test_batched_conditions_equal_separate_updates() -> None:
    """Two conditions solved at once (one of them needs indefinite-Q_uu fixes) give the
    controllers of two separate updates."""
    T = 25
    di, pend = double_integrator(), pendulum()
    gen = torch.Generator().manual_seed(4)
    prev = LinearGaussianController.initial(T, 2, 1, variance=1.0)
    dyns, costs, starts = [], [], []
    for system, x0 in ((di, [1.0, 0.0]), (pend, [math.pi, 0.0])):
        x0 = torch.tensor(x0, dtype=F64)
        x, u = sample(system.step, prev, x0, 20, gen)
        dyns.append(fit_tvlg(x, u))
        costs.append(quadratic_cost(system.stage_cost(), x, u))
        starts.append(x0)
    x0_cov = 0.05**2 * torch.eye(2, dtype=F64)
    solver = LQRFLM()
    single = [
        solver.update(d, c, prev, s, x0_cov, kl_target=0.5)
        for d, c, s in zip(dyns, costs, starts, strict=True)
    ]
    assert single[0].indefinite_fixes == 0 and single[1].indefinite_fixes > 0
    stacked_cost = QuadraticCost(
        *(
            torch.stack([getattr(c, f) for c in costs])
            for f in ("C", "c", "c0", "C_final", "c_final", "c0_final")
        )
    )
    both = solver.update(
        TVLGDynamics.stack(dyns),
        stacked_cost,
        prev,
        torch.stack(starts),
        x0_cov,
        kl_target=torch.tensor([0.5, 0.5], dtype=F64),
    )
    assert both.status == "ok" and both.met.all()
    assert both.indefinite_fixes == single[1].indefinite_fixes
    for m in range(2):
        torch.testing.assert_close(
            both.controller.condition(m).K, single[m].controller.K, rtol=0, atol=1e-9
        )
        torch.testing.assert_close(both.eta[m], single[m].eta, rtol=1e-12, atol=0)


def test_indefinite_action_hessian_raises_eta_and_is_counted() -> None:
    """Swing-up cost at the hanging pendulum: the cost alone has an indefinite Q_uu; the update
    raises eta past it, counts the fixes and returns a proper controller."""
    pend, T = pendulum(), 30
    prev = LinearGaussianController.initial(T, 2, 1, variance=1.0)
    x0 = torch.tensor([math.pi, 0.0], dtype=F64)
    x, u = sample(pend.step, prev, x0, 20, torch.Generator().manual_seed(5))
    dyn = fit_tvlg(x, u)
    cost = quadratic_cost(pend.stage_cost(), x, u)
    ctrl, failed, step = _backward(dyn, cost, None, None)
    assert ctrl is None and bool(failed) and 0 <= step < T
    res = LQRFLM().update(dyn, cost, prev, x0, 0.05**2 * torch.eye(2, dtype=F64), kl_target=1.0)
    assert res.indefinite_fixes > 0
    assert res.status == "ok"
    for t in (res.controller.K, res.controller.k, res.controller.covariance):
        assert bool(torch.isfinite(t).all())
    assert bool((torch.linalg.eigvalsh(res.controller.covariance) > 0).all())


def test_unreachable_kl_target_is_named_and_keeps_the_closest_controller() -> None:
    dyn, _, _ = exact_linear_fit(6, horizon=10)
    cost = random_cost(7, 10, 3, 2)
    prev = LinearGaussianController.initial(10, 3, 2, variance=1.0)
    x0 = (torch.zeros(3, dtype=F64), 0.01 * torch.eye(3, dtype=F64))
    res = LQRFLM().update(dyn, cost, prev, *x0, kl_target=1e4)
    assert res.status == "kl_not_met" and not bool(res.met)
    assert float(res.eta) == pytest.approx(1e-8)  # the search ended at min_eta
    assert bool(torch.isfinite(res.controller.K).all())
    reachable = LQRFLM().update(dyn, cost, prev, *x0, kl_target=1.0)
    assert 1.0 < float(res.kl) < 1e4 and float(res.kl) > float(reachable.kl)
    few = LQRFLM(max_evaluations=2).update(dyn, cost, prev, *x0, kl_target=1e-3)
    assert few.status == "max_evaluations" and few.evaluations == 2


def test_expected_cost_never_rises_on_a_linear_system_with_refits() -> None:
    """Noise-free double integrator, exact refits: each iteration's expected cost is the one the
    previous update predicted (to 1e-9), and it never rises, with the step size adapted."""
    di, T = double_integrator(), 20
    gen = torch.Generator().manual_seed(8)
    cost = di.stage_cost()
    ctrl = LinearGaussianController.initial(T, 2, 1, variance=1.0)
    x0 = torch.tensor([1.0, 0.0], dtype=F64)
    x0_cov = 0.05**2 * torch.eye(2, dtype=F64)
    solver = LQRFLM(kl_step=0.5)
    step_mult, eta, res, costs = 1.0, 1.0, None, []
    for _ in range(10):
        x, u = sample(di.step, ctrl, x0, 20, gen)
        dyn = fit_tvlg(x, u, regularization=0.0)
        quad = quadratic_cost(cost, x, u)
        J = float(expected_cost(dyn, ctrl, quad, x0, x0_cov))
        if res is not None:
            assert J == pytest.approx(float(res.expected_cost), abs=1e-9)
            step_mult = adapt_step(step_mult, float(res.previous_cost), float(res.expected_cost), J)
        res = solver.update(dyn, quad, ctrl, x0, x0_cov, step_mult=step_mult, eta=eta)
        # once converged, a large target can need eta below min_eta: named, not hidden
        assert res.status == "ok" or float(res.eta) == pytest.approx(solver.min_eta, rel=1e-3)
        ctrl, eta = res.controller, res.eta
        costs.append(J)
    assert all(b <= a + 1e-9 for a, b in zip(costs, costs[1:], strict=False)), costs
    assert costs[-1] < 0.3 * costs[0]


def test_expected_cost_never_rises_on_the_pendulum_with_refits() -> None:
    """The analytic pendulum (sin nonlinearity) regulated to hanging from 1 rad with a quadratic
    cost, 20 noisy samples per iteration, refit every iteration: the expected cost of each
    controller under its own refit model falls at every one of 10 iterations."""
    pend, T = pendulum(), 20
    goal = torch.tensor([math.pi, 0.0], dtype=F64)
    cost = QuadraticStageCost(
        torch.diag(torch.tensor([1.0, 0.1], dtype=F64)),
        0.01 * torch.eye(1, dtype=F64),
        torch.diag(torch.tensor([10.0, 1.0], dtype=F64)),
        goal,
    )
    x0 = torch.tensor([math.pi - 1.0, 0.0], dtype=F64)
    x0_cov = 0.05**2 * torch.eye(2, dtype=F64)
    ctrl = LinearGaussianController.initial(T, 2, 1, variance=1.0)
    solver = LQRFLM(kl_step=0.01)
    gen = torch.Generator()
    step_mult, eta, res, costs = 1.0, 1.0, None, []
    for _ in range(10):
        gen.manual_seed(9)  # the same noise each iteration: the controllers are compared
        x, u = sample(pend.step, ctrl, x0, 20, gen, noise=1e-3)
        dyn = fit_tvlg(x, u)
        quad = quadratic_cost(cost, x, u)
        J = float(expected_cost(dyn, ctrl, quad, x0, x0_cov))
        if res is not None:
            step_mult = adapt_step(step_mult, float(res.previous_cost), float(res.expected_cost), J)
        res = solver.update(dyn, quad, ctrl, x0, x0_cov, step_mult=step_mult, eta=eta)
        ctrl, eta = res.controller, res.eta
        costs.append(J)
    assert all(b < a for a, b in zip(costs, costs[1:], strict=False)), costs
    assert costs[-1] < 0.3 * costs[0]


def test_forward_pass_kl_and_expected_cost_match_monte_carlo() -> None:
    g = torch.Generator().manual_seed(10)
    T, nx, nu = 4, 2, 1
    dyn = TVLGDynamics(
        F=0.5 * torch.randn(T, nx, nx + nu, generator=g, dtype=F64),
        f=torch.randn(T, nx, generator=g, dtype=F64),
        Sigma=0.05 * torch.eye(nx, dtype=F64).expand(T, nx, nx),
    )
    ctrl = LinearGaussianController(
        0.3 * torch.randn(T, nu, nx, generator=g, dtype=F64),
        torch.randn(T, nu, generator=g, dtype=F64),
        0.2 * torch.ones(T, nu, nu, dtype=F64),
    )
    old = LinearGaussianController(
        ctrl.K + 0.2, ctrl.k - 0.5, 0.5 * torch.ones(T, nu, nu, dtype=F64)
    )
    x0_mean, x0_cov = (
        torch.tensor([1.0, -1.0], dtype=F64),
        torch.diag(torch.tensor([0.1, 0.2], dtype=F64)),
    )
    traj = trajectory_distribution(dyn, ctrl, x0_mean, x0_cov)
    n = 40000
    x = x0_mean + torch.randn(n, nx, generator=g, dtype=F64) @ torch.linalg.cholesky(x0_cov).T
    zs, xs = [], [x]
    for t in range(T):
        u = ctrl.act(x, t, g)
        zs.append(torch.cat([x, u], -1))
        x = (
            dyn.step_mean(x, u, t)
            + torch.randn(n, nx, generator=g, dtype=F64) @ torch.linalg.cholesky(dyn.Sigma[t]).T
        )
        xs.append(x)
    z = torch.stack(zs, 1)  # [n, T, Z]
    torch.testing.assert_close(traj.mu, z.mean(0), rtol=0, atol=0.03)
    emp = torch.einsum("nti,ntj->tij", z - z.mean(0), z - z.mean(0)) / n
    torch.testing.assert_close(traj.sigma, emp, rtol=0, atol=0.05 * float(emp.abs().max()))
    mf, sf = final_state(dyn, traj)
    torch.testing.assert_close(mf, x.mean(0), rtol=0, atol=0.03)
    # KL per step: exact Gaussian KL at each sampled state, averaged
    kl = kl_divergence(ctrl, old, traj.mu, traj.sigma, per_step=True)
    for t in range(T):
        xt = z[:, t, :nx]
        p = torch.distributions.MultivariateNormal(ctrl.mean_action(xt, t), ctrl.covariance[t])
        q = torch.distributions.MultivariateNormal(old.mean_action(xt, t), old.covariance[t])
        mc = torch.distributions.kl_divergence(p, q).mean()
        assert float(kl[t]) == pytest.approx(float(mc), rel=0.02)
    assert float(kl_divergence(ctrl, ctrl, traj.mu, traj.sigma)) == pytest.approx(0.0, abs=1e-12)
    cost = random_cost(11, T, nx, nu)
    per_sample = (
        0.5 * torch.einsum("nti,tij,ntj->n", z, cost.C, z)
        + (z * cost.c).sum((-1, -2))
        + cost.c0.sum()
    )
    per_sample = (
        per_sample + 0.5 * torch.einsum("ni,ij,nj->n", x, cost.C_final, x) + x @ cost.c_final
    )
    assert float(expected_cost(dyn, ctrl, cost, x0_mean, x0_cov)) == pytest.approx(
        float(per_sample.mean()), rel=0.02
    )


def test_quadratic_cost_of_a_quadratic_stage_cost_is_exact() -> None:
    Q, R, Qf = (
        torch.diag(torch.tensor([1.0, 0.1], dtype=F64)),
        torch.tensor([[0.2]], dtype=F64),
        torch.eye(2, dtype=F64),
    )
    goal = torch.tensor([0.5, -1.0], dtype=F64)
    g = torch.Generator().manual_seed(12)
    x, u = (
        torch.randn(3, 5, 2, generator=g, dtype=F64),
        torch.randn(3, 4, 1, generator=g, dtype=F64),
    )
    quad = quadratic_cost(QuadraticStageCost(Q, R, Qf, goal), x, u)
    torch.testing.assert_close(quad.C, 2 * torch.block_diag(Q, R).expand(4, 3, 3))
    torch.testing.assert_close(
        quad.c, torch.cat([-2 * Q @ goal, torch.zeros(1, dtype=F64)]).expand(4, 3)
    )
    torch.testing.assert_close(quad.c0, (goal @ Q @ goal).expand(4))
    torch.testing.assert_close(quad.C_final, 2 * Qf)
    torch.testing.assert_close(quad.c0_final, goal @ Qf @ goal)


def test_controller_sampling_and_plan() -> None:
    g = torch.Generator().manual_seed(13)
    T, nx, nu = 3, 2, 2
    M = torch.randn(T, nu, nu, generator=g, dtype=F64)
    ctrl = LinearGaussianController(
        torch.randn(T, nu, nx, generator=g, dtype=F64),
        torch.randn(T, nu, generator=g, dtype=F64),
        M @ M.mT + 0.1 * torch.eye(nu, dtype=F64),
    )
    x = torch.randn(20000, nx, generator=g, dtype=F64)
    a = ctrl.act(x, 1, torch.Generator().manual_seed(0))
    torch.testing.assert_close(a, ctrl.act(x, 1, torch.Generator().manual_seed(0)), rtol=0, atol=0)
    resid = a - ctrl.mean_action(x, 1)
    torch.testing.assert_close(resid.T @ resid / 20000, ctrl.covariance[1], rtol=0.05, atol=0.02)
    # the plan, played as the MPC loop plays it, is the controller's mean
    x_ref = torch.randn(T + 1, nx, generator=g, dtype=F64)
    plan = ctrl.as_plan(x_ref)
    assert plan.actions.dtype == torch.float32 and plan.covariance.shape == (T, nu, nu)
    for t in range(T):
        x_now = x[t].float()
        played = plan.actions[t] + plan.K[t] @ (x_now - plan.x_ref[t])
        torch.testing.assert_close(played, ctrl.mean_action(x_now, t), rtol=1e-5, atol=1e-5)
    init = LinearGaussianController.initial(T, nx, nu, variance=2.0, batch_shape=(4,))
    assert init.batch_shape == (4,) and float(init.covariance[2, 1, 0, 0]) == 2.0
    with pytest.raises(ValueError, match="condition"):
        init.as_plan()


def test_adapt_step_follows_the_predicted_against_actual_rule() -> None:
    # predicted improvement 2, actual 1: mult = 2 / (2 * 1) = 1
    assert adapt_step(1.0, 10.0, 8.0, 9.0) == pytest.approx(1.0)
    # actual worse than before: 2 / (2 * 3) = 1/3
    assert adapt_step(0.6, 10.0, 8.0, 11.0) == pytest.approx(0.2)
    # as predicted (or better): the factor is capped at 5, the multiplier at 10
    assert adapt_step(1.0, 10.0, 8.0, 8.0) == pytest.approx(5.0)
    assert adapt_step(4.0, 10.0, 8.0, 7.0) == pytest.approx(10.0)
    # no predicted improvement: the factor floor 0.1, the multiplier floor 0.01
    assert adapt_step(0.05, 10.0, 10.0, 12.0) == pytest.approx(0.01)
    out = adapt_step(
        torch.ones(2),
        torch.tensor([10.0, 10.0]),
        torch.tensor([8.0, 8.0]),
        torch.tensor([9.0, 11.0]),
    )
    torch.testing.assert_close(out, torch.tensor([1.0, 1 / 3], dtype=F64))


def test_bad_inputs_are_clear_errors() -> None:
    dyn, _, _ = exact_linear_fit(14, horizon=6)
    cost = random_cost(15, 6, 3, 2)
    prev = LinearGaussianController.initial(6, 3, 2)
    x0 = (torch.zeros(3, dtype=F64), torch.eye(3, dtype=F64))
    solver = LQRFLM()
    with pytest.raises(ShapeError, match="disagree"):
        solver.update(dyn, cost, LinearGaussianController.initial(5, 3, 2), *x0)
    bad = TVLGDynamics(dyn.F.clone(), dyn.f, dyn.Sigma)
    bad.F[2, 0, 0] = math.nan
    with pytest.raises(ValueError, match="dyn.F holds NaN"):
        solver.update(bad, cost, prev, *x0)
    with pytest.raises(ValueError, match="KL target"):
        solver.update(dyn, cost, prev, *x0, kl_target=0.0)
    with pytest.raises(ValueError, match="not positive definite"):
        LinearGaussianController(prev.K, prev.k, -prev.covariance)
    with pytest.raises(ValueError, match="k holds NaN"):
        LinearGaussianController(prev.K, prev.k * math.nan, prev.covariance)
    with pytest.raises(ShapeError, match="covariance"):
        LinearGaussianController(prev.K, prev.k, prev.covariance[:, :1])
    with pytest.raises(TypeError, match="QuadraticCost or a StageCost"):
        solver.update(dyn, object(), prev, *x0)
    with pytest.raises(ShapeError, match="QuadraticCost.C"):
        solver.update(
            dyn,
            QuadraticCost(
                cost.C[:, :4, :4], cost.c, cost.c0, cost.C_final, cost.c_final, cost.c0_final
            ),
            prev,
            *x0,
        )
    with pytest.raises(ValueError, match="kl_tolerance"):
        LQRFLM(kl_tolerance=1.5)
    with pytest.raises(ShapeError, match="one more state"):
        quadratic_cost(
            QuadraticStageCost(torch.eye(3), torch.eye(2), torch.eye(3), torch.zeros(3)),
            torch.zeros(2, 5, 3),
            torch.zeros(2, 5, 2),
        )
