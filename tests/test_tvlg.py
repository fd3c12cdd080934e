"""Time-varying linear-Gaussian fits and their priors against known answers."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from mbrl.data import Sequences
from mbrl.dynamics.known import KnownModel
from mbrl.dynamics.systems import SystemModel
from mbrl.dynamics.tvlg import (
    GMMPrior,
    ModelPrior,
    NormalInverseWishart,
    TVLGDynamics,
    TVLGPrior,
    fit_initial_state,
    fit_tvlg,
)
from mbrl.envs.systems import linear, pendulum
from mbrl.planners.derivatives import finite_difference_jacobians
from mbrl.shapes import ShapeError

F64 = torch.float64


def random_system(seed: int, nx: int, nu: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    A = torch.eye(nx, dtype=F64) + 0.2 * torch.randn(nx, nx, generator=g, dtype=F64)
    B = torch.randn(nx, nu, generator=g, dtype=F64)
    b = torch.randn(nx, generator=g, dtype=F64)
    return A, B, b


def rollouts(
    A: torch.Tensor,
    B: torch.Tensor,
    b: torch.Tensor,
    n: int,
    horizon: int,
    noise: float,
    seed: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` trajectories of ``x' = A x + B u + b + noise * eps`` under random actions."""
    g = torch.Generator().manual_seed(seed)
    nx, nu = B.shape
    x = torch.zeros(n, horizon + 1, nx, dtype=F64)
    x[:, 0] = torch.randn(n, nx, generator=g, dtype=F64)
    u = torch.randn(n, horizon, nu, generator=g, dtype=F64)
    for t in range(horizon):
        eps = torch.randn(n, nx, generator=g, dtype=F64)
        x[:, t + 1] = x[:, t] @ A.T + u[:, t] @ B.T + b + noise * eps
    return x, u


def test_fit_recovers_a_noisy_linear_gaussian_system() -> None:
    A, B, b = random_system(0, 3, 2)
    noise = torch.tensor([0.05, 0.1, 0.2], dtype=F64)
    g = torch.Generator().manual_seed(1)
    n, horizon = 4000, 4
    x = torch.zeros(n, horizon + 1, 3, dtype=F64)
    x[:, 0] = torch.randn(n, 3, generator=g, dtype=F64)
    u = torch.randn(n, horizon, 2, generator=g, dtype=F64)
    for t in range(horizon):
        eps = torch.randn(n, 3, generator=g, dtype=F64) * noise
        x[:, t + 1] = x[:, t] @ A.T + u[:, t] @ B.T + b + eps
    dyn = fit_tvlg(x, u)
    assert dyn.F.shape == (horizon, 3, 5) and dyn.f.shape == (horizon, 3)
    assert (dyn.horizon, dyn.x_dim, dyn.u_dim) == (horizon, 3, 2)
    # F: standard error ~ noise / sqrt(n) ~ 3e-3 at most; Sigma: relative error ~ sqrt(2 / n)
    assert (dyn.F - torch.cat([A, B], -1)).abs().max() < 0.015
    assert (dyn.f - b).abs().max() < 0.015
    true_sigma = torch.diag(noise**2)
    rel = (dyn.Sigma - true_sigma).abs() / noise.outer(noise)
    assert rel.max() < 0.12, rel.max()


def test_fit_equals_a_per_step_least_squares_loop() -> None:
    A, B, b = random_system(2, 4, 2)
    x, u = rollouts(A, B, b, n=12, horizon=6, noise=0.3, seed=3)
    dyn = fit_tvlg(x, u, regularization=0.0)
    for t in range(6):  # the reference: least squares of x' on [x, u, 1], MLE residual covariance
        design = torch.cat([x[:, t], u[:, t], torch.ones(12, 1, dtype=F64)], -1)
        sol = torch.linalg.lstsq(design, x[:, t + 1]).solution  # [Z + 1, X]
        resid = x[:, t + 1] - design @ sol
        torch.testing.assert_close(dyn.F[t], sol[:-1].T, rtol=0, atol=1e-8)
        torch.testing.assert_close(dyn.f[t], sol[-1], rtol=0, atol=1e-8)
        torch.testing.assert_close(dyn.Sigma[t], resid.T @ resid / 12, rtol=0, atol=1e-8)
    # the step mean and the Gaussian propagation use the same F, f
    z = torch.cat([x[:, 2], u[:, 2]], -1)
    torch.testing.assert_close(dyn.step_mean(x[:, 2], u[:, 2], 2), z @ dyn.F[2].T + dyn.f[2])
    mean, cov = dyn.predict_state(z[0], torch.zeros(6, 6, dtype=F64), 2)
    torch.testing.assert_close(mean, dyn.F[2] @ z[0] + dyn.f[2])
    torch.testing.assert_close(cov, dyn.Sigma[2])


def test_fit_accepts_time_aligned_sequences() -> None:
    A, B, b = random_system(4, 2, 1)
    x, u = rollouts(A, B, b, n=8, horizon=5, noise=0.1, seed=5)
    time = torch.arange(5).expand(8, 5)
    seqs = Sequences(
        obs=x.float(),
        act=u.float(),
        reward=torch.zeros(8, 5),
        terminated=torch.zeros(8, 5, dtype=torch.bool),
        time=time,
    )
    from_seqs = fit_tvlg(seqs)
    direct = fit_tvlg(x.float(), u.float())
    torch.testing.assert_close(from_seqs.F, direct.F)
    shifted = Sequences(
        seqs.obs, seqs.act, seqs.reward, seqs.terminated, time + torch.arange(8)[:, None]
    )
    with pytest.raises(ValueError, match="not aligned in time"):
        fit_tvlg(shifted)


def test_too_few_samples_without_a_prior_is_a_clear_error() -> None:
    A, B, b = random_system(6, 4, 2)
    x, u = rollouts(A, B, b, n=5, horizon=3, noise=0.01, seed=7)
    with pytest.raises(ValueError, match=r"5 samples.*at least 7 samples.*prior"):
        fit_tvlg(x, u)


@pytest.mark.parametrize("which", ["model", "gmm"])
def test_prior_recovers_the_true_dynamics_from_five_noisy_samples(which: str) -> None:
    """X + U + 1 = 7 unknowns per output, 5 samples per step: only the prior makes the fit
    determined, and it recovers [A B] to 1e-3."""
    A, B, b = random_system(8, 4, 2)
    horizon, noise = 8, 1e-4
    if which == "model":
        system = linear(A.numpy(), B.numpy())  # the prior knows A, B (not the offset b)
        prior: TVLGPrior = ModelPrior(SystemModel(system))
    else:
        prior = GMMPrior()
        earlier_x, earlier_u = rollouts(A, B, b, n=20, horizon=horizon, noise=noise, seed=9)
        prior.update(earlier_x, earlier_u, generator=torch.Generator().manual_seed(0))
        assert prior.clusters == 4  # max(2, min(20, floor(20 * 8 / 40)))
    assert isinstance(prior, TVLGPrior)
    x, u = rollouts(A, B, b, n=5, horizon=horizon, noise=noise, seed=10)
    dyn = fit_tvlg(x, u, prior=prior)
    err = (dyn.F - torch.cat([A, B], -1)).abs().max()
    assert err < 1e-3, err
    assert bool(torch.isfinite(dyn.Sigma).all())


def test_model_prior_is_centred_on_the_linearization() -> None:
    """The prior's own conditional is the global model's Jacobian at the samples' mean, for an
    autograd model (KnownModel) and a Linearizable one (SystemModel)."""
    system = pendulum()
    g = torch.Generator().manual_seed(11)
    x = torch.randn(6, 4, 2, generator=g, dtype=F64)
    u = torch.randn(6, 3, 1, generator=g, dtype=F64)
    for model in (KnownModel(system.step, 2, 1), SystemModel(system)):
        niw = ModelPrior(model, strength=2.0).evaluate(x, u)
        assert isinstance(niw, NormalInverseWishart)
        mu0, Phi, m, n0 = niw
        z_bar = torch.cat([x[:, :-1], u], -1).mean(0)  # [T, Z]
        A, Bm = finite_difference_jacobians(system.step, z_bar[:, :2], z_bar[:, 2:])
        cond = torch.linalg.solve(Phi[:, :3, :3], Phi[:, :3, 3:]).mT  # [T, X, Z]
        torch.testing.assert_close(cond, torch.cat([A, Bm], -1), rtol=0, atol=1e-6)
        torch.testing.assert_close(mu0[:, 3:], system.step(z_bar[:, :2], z_bar[:, 2:]))
        torch.testing.assert_close(m, torch.full((3,), 2.0, dtype=F64))
        torch.testing.assert_close(n0, m)


def two_cluster_data(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Trajectories whose (x, u, x') points form two far-apart blobs: x' = x + u, X = U = 1."""
    g = torch.Generator().manual_seed(seed)
    n, horizon = 40, 10
    centre = torch.where(torch.arange(n) < n // 2, -5.0, 5.0).to(F64)  # [N]
    x = torch.zeros(n, horizon + 1, 1, dtype=F64)
    x[:, 0, 0] = centre + 0.1 * torch.randn(n, generator=g, dtype=F64)
    u = 0.1 * torch.randn(n, horizon, 1, generator=g, dtype=F64)
    for t in range(horizon):
        x[:, t + 1] = x[:, t] + 0.01 * u[:, t]
    return x, u


def test_gmm_prior_finds_the_clusters_deterministically() -> None:
    x, u = two_cluster_data(12)
    priors = [GMMPrior(max_clusters=2, max_samples=40) for _ in range(2)]
    for p in priors:
        p.update(x, u, generator=torch.Generator().manual_seed(3))
    assert priors[0].clusters == 2
    torch.testing.assert_close(priors[0].mu, priors[1].mu, rtol=0, atol=0)
    means = priors[0].mu[:, 0].sort().values
    torch.testing.assert_close(means, torch.tensor([-5.0, 5.0], dtype=F64), rtol=0, atol=0.1)
    torch.testing.assert_close(
        priors[0].logmass.exp(), torch.full((2,), 0.5, dtype=F64), atol=1e-3, rtol=0
    )
    # evaluating at samples of one blob weights that blob: mu0 is its mean
    mu0, Phi, m, n0 = priors[0].evaluate(x[:5], u[:5])
    assert (mu0[:, 0] + 5.0).abs().max() < 0.1
    points = 40 * 10
    torch.testing.assert_close(n0, torch.full((10,), (points - 2 - 3) / points, dtype=F64))
    # checkpoint round trip
    restored = GMMPrior(max_clusters=2, max_samples=40)
    restored.load_state_dict(priors[0].state_dict())
    torch.testing.assert_close(restored.evaluate(x[:5], u[:5]).Phi, Phi, rtol=0, atol=0)


def test_gmm_prior_keeps_a_bounded_set_of_trajectories() -> None:
    x, u = two_cluster_data(13)
    prior = GMMPrior(max_samples=15)
    prior.update(x[:10], u[:10])
    prior.update(x[10:30], u[10:30])
    assert prior.x.shape[0] == 15
    torch.testing.assert_close(prior.x, x[15:30])
    with pytest.raises(ShapeError, match="differ from the kept ones"):
        prior.update(x[:, :5], u[:, :4])
    with pytest.raises(RuntimeError, match="before any update"):
        GMMPrior().evaluate(x, u)


def test_bad_samples_are_clear_errors() -> None:
    A, B, b = random_system(14, 2, 1)
    x, u = rollouts(A, B, b, n=6, horizon=4, noise=0.1, seed=15)
    with pytest.raises(ShapeError, match="one more state than u holds actions"):
        fit_tvlg(x, u[:, :3])
    with pytest.raises(ShapeError, match="x has 6 samples but u has 5"):
        fit_tvlg(x, u[:5])
    with pytest.raises(ShapeError, match=r"x must be \[N, T \+ 1, X\]"):
        fit_tvlg(x[0], u[0])
    bad = x.clone()
    bad[3, 2, 1] = math.nan
    with pytest.raises(ValueError, match="NaN/inf in 1 of 6 samples.*sample 3, step 2"):
        fit_tvlg(bad, u)
    bad_u = u.clone()
    bad_u[0, 1, 0] = math.inf
    with pytest.raises(ValueError, match="u contains NaN/inf"):
        fit_tvlg(x, bad_u)
    with pytest.raises(ValueError, match="regularization"):
        fit_tvlg(x, u, regularization=-1.0)
    # samples that do not vary in u: no regularization, no prior -> not positive definite
    with pytest.raises(ValueError, match="not positive definite.*exploration noise"):
        fit_tvlg(x, torch.zeros_like(u), regularization=0.0)
    with pytest.raises(TypeError, match="prior must be a TVLGPrior"):
        fit_tvlg(x, u, prior=object())
    with pytest.raises(TypeError, match="neither Linearizable"):
        ModelPrior(object())
    with pytest.raises(ValueError, match="max_clusters"):
        GMMPrior(max_clusters=0)


def test_tvlg_dynamics_checks_and_stacks() -> None:
    A, B, b = random_system(16, 2, 1)
    x, u = rollouts(A, B, b, n=6, horizon=4, noise=0.1, seed=17)
    dyn = fit_tvlg(x, u)
    both = TVLGDynamics.stack([dyn, dyn])
    assert both.batch_shape == (2,) and both.horizon == 4
    torch.testing.assert_close(both.condition(1).F, dyn.F)
    with pytest.raises(ShapeError, match="Sigma"):
        TVLGDynamics(dyn.F, dyn.f, dyn.Sigma[:3])
    mean, cov = fit_initial_state(x[:, 0])
    torch.testing.assert_close(mean, x[:, 0].mean(0))
    expected = np.maximum(x[:, 0].numpy().var(0), 1e-6)
    np.testing.assert_allclose(torch.diagonal(cov).numpy(), expected)
