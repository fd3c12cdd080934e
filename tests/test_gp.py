"""Gaussian-process dynamics: calibration, batching, exact/sparse switch, rollouts, gradients,
bad input and checkpoints."""

from __future__ import annotations

import io
import math
import warnings

import pytest
import torch
from linear_operator.utils.errors import NotPSDError

from mbrl.dynamics import DifferentiableModel, DynamicsModel, Transitions
from mbrl.dynamics.gp import MIN_POINTS, GaussianProcessModel, _cholesky, _jitters

torch.set_num_threads(1)
NOISE = 0.05


def toy(n: int, seed: int, noise: float = NOISE) -> Transitions:
    """x' = x + 0.5 sin(2 x0) + u (output 0), x' = x + 0.3 tanh(x1) u (output 1)."""
    g = torch.Generator().manual_seed(seed)
    obs = torch.rand(n, 2, generator=g) * 4 - 2
    act = torch.rand(n, 1, generator=g) * 2 - 1
    delta = torch.stack(
        [0.5 * torch.sin(2 * obs[:, 0]) + act[:, 0], 0.3 * torch.tanh(obs[:, 1]) * act[:, 0]], 1
    )
    nxt = obs + delta + noise * torch.randn(n, 2, generator=g)
    return Transitions(obs, act, nxt, torch.zeros(n), torch.zeros(n, dtype=torch.bool))


@pytest.fixture(scope="module")
def fitted() -> GaussianProcessModel:
    model = GaussianProcessModel(2, 1, iterations=60, seed=0)
    model.fit(toy(150, 0))
    return model


def test_protocols(fitted):
    assert isinstance(fitted, DynamicsModel)
    assert isinstance(fitted, DifferentiableModel)


def test_calibrated_on_known_function(fitted):
    test = toy(1000, 1)
    pred = fitted.predict(test.obs, test.act)
    z = (test.next_obs - pred.mean) / pred.var.sqrt()
    nll = float((0.5 * torch.log(2 * math.pi * pred.var) + 0.5 * z**2).mean())
    coverage = float((z.abs() < 1.96).float().mean())
    best_nll = 0.5 * math.log(2 * math.pi * NOISE**2) + 0.5  # the noise alone: -2.08
    assert nll < best_nll + 0.35
    assert 0.9 <= coverage <= 0.99
    # the fitted noise variance recovers the true one (normalised back to observation units)
    noise = fitted.diagnostics.noise * fitted._y_std**2
    assert torch.allclose(noise.sqrt(), torch.full((2,), NOISE), rtol=0.3)


def test_cache_matches_direct_posterior(fitted):
    """Mean and variance from the caches (LOVE root, N > love_rank) equal the textbook GP
    posterior computed densely from the fitted hyperparameters."""
    model = GaussianProcessModel(2, 1, iterations=40, love_rank=60)
    data = toy(150, 0)
    model.fit(data)
    assert model._cache["root"].shape[-1] <= 60
    d = model.diagnostics
    x = (torch.cat([data.obs, data.act], 1) - model._x_mean) / model._x_std
    y = ((data.next_obs - data.obs - model._y_mean) / model._y_std).T
    test = toy(50, 3)
    q = (torch.cat([test.obs, test.act], 1) - model._x_mean) / model._x_std
    pred = model.predict(test.obs, test.act)
    for i in range(2):
        xs, qs = (x / d.lengthscale[i]).double(), (q / d.lengthscale[i]).double()
        k = d.outputscale[i].double() * torch.exp(-0.5 * torch.cdist(xs, xs) ** 2)
        ks = d.outputscale[i].double() * torch.exp(-0.5 * torch.cdist(qs, xs) ** 2)
        kn = k + d.noise[i].double() * torch.eye(len(x), dtype=torch.float64)
        c = model._cache["const"][i].double()
        mean = c + ks @ torch.linalg.solve(kn, y[i].double() - c)
        var = d.outputscale[i] - (ks * torch.linalg.solve(kn, ks.T).T).sum(1) + d.noise[i]
        got_mean = (pred.mean[:, i] - test.obs[:, i] - model._y_mean[i]) / model._y_std[i]
        got_var = pred.var[:, i] / model._y_std[i] ** 2
        assert torch.allclose(got_mean.double(), mean, atol=2e-3)
        assert torch.allclose(got_var.double(), var.double(), rtol=0.05, atol=1e-4)


def test_per_output_hyperparameters_follow_relevant_inputs(fitted):
    """One batched model, separate ARD lengthscales per output: output 0 depends on x0 and u
    only, output 1 on x1 and u only, so the irrelevant input gets the longer lengthscale."""
    ls = fitted.diagnostics.lengthscale  # [X=2, D=3]
    assert ls.shape == (2, 3)
    assert ls[0, 1] > 3 * ls[0, 0]
    assert ls[1, 0] > 3 * ls[1, 1]


def test_batched_outputs_equal_separate_fits():
    """Two identical output columns give identical hyperparameters and predictions, and equal
    those of a model fitted to that output alone: the batch axis keeps outputs independent."""
    base = toy(80, 4)
    twin = Transitions(
        base.obs[:, :1].repeat(1, 2),
        base.act,
        base.next_obs[:, :1].repeat(1, 2),
        base.reward,
        base.terminated,
    )
    single = Transitions(
        base.obs[:, :1], base.act, base.next_obs[:, :1], base.reward, base.terminated
    )
    m2 = GaussianProcessModel(2, 1, iterations=30)
    m2.fit(twin)
    m1 = GaussianProcessModel(1, 1, iterations=30)
    m1.fit(single)
    q = toy(20, 5)
    p2 = m2.predict(q.obs[:, :1].repeat(1, 2), q.act)
    p1 = m1.predict(q.obs[:, :1], q.act)
    assert torch.allclose(p2.mean[:, 0], p2.mean[:, 1], atol=1e-5)
    # the twin model sees the duplicated input column; its lengthscales split the relevance, so
    # compare predictions, which do not depend on how the lengthscale is shared
    assert torch.allclose(p2.mean[:, 0], p1.mean[:, 0], atol=2e-2)
    assert torch.allclose(p2.var[:, 0], p1.var[:, 0], rtol=0.3)


def test_exact_sparse_switch_and_agreement():
    data = toy(120, 6)
    exact = GaussianProcessModel(2, 1, max_exact_points=120, iterations=40)
    exact.fit(data)
    assert not exact.diagnostics.sparse
    sparse = GaussianProcessModel(2, 1, max_exact_points=119, inducing_points=60, iterations=40)
    sparse.fit(data)
    assert sparse.diagnostics.sparse and sparse.diagnostics.num_centers == 60
    q = toy(200, 7)
    pe, ps = exact.predict(q.obs, q.act), sparse.predict(q.obs, q.act)
    scale = (q.next_obs - q.obs).std(0)
    assert float(((pe.mean - ps.mean).abs() / scale).max()) < 0.1
    ratio = ps.var / pe.var
    assert 0.5 < float(ratio.median()) < 2.0


def test_rollout_shapes_and_determinism(fitted):
    obs = toy(4, 8).obs
    act = torch.zeros(4 * 5, 1)

    def roll(seed: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(seed)
        state = fitted.rollout_start(obs, 5, g)
        assert state.obs.shape == (20, 2)
        assert torch.equal(state.obs[5], obs[1])
        for _ in range(3):
            state = fitted.rollout_step(state, act, g)
        return state.obs

    a, b, c = roll(0), roll(0), roll(1)
    assert a.shape == (20, 2)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert float(a.view(4, 5, 2).std(1).mean()) > 0  # particles of one start spread


def test_expectation_mode_is_the_mean():
    model = GaussianProcessModel(2, 1, iterations=20, propagation="expectation")
    model.fit(toy(60, 9))
    q = toy(6, 10)
    state = model.rollout_step(model.rollout_start(q.obs, 1, None), q.act, None)
    assert torch.equal(state.obs, model.predict(q.obs, q.act).mean)


@pytest.mark.parametrize("kernel", ["rbf", "matern"])
def test_mean_dynamics_gradient_matches_finite_differences(kernel):
    model = GaussianProcessModel(2, 1, kernel=kernel, iterations=30)
    model.fit(toy(80, 11))
    q = toy(3, 12)
    obs = q.obs.clone().requires_grad_(True)
    act = q.act.clone().requires_grad_(True)
    out = model.mean_dynamics(obs, act)
    w = torch.tensor([0.7, -1.3])
    (out * w).sum().backward()
    eps = 1e-2
    for inp, grad in ((obs, obs.grad), (act, act.grad)):
        base = inp.detach()
        for j in range(base.shape[1]):
            dx = torch.zeros_like(base)
            dx[:, j] = eps
            args_p = (base + dx, q.act) if inp is obs else (q.obs, base + dx)
            args_m = (base - dx, q.act) if inp is obs else (q.obs, base - dx)
            with torch.no_grad():
                fd = ((model.mean_dynamics(*args_p) - model.mean_dynamics(*args_m)) * w).sum(1)
            assert torch.allclose(grad[:, j], fd / (2 * eps), rtol=2e-2, atol=2e-3)


def test_bad_input():
    data = toy(40, 13)
    bad = Transitions(
        data.obs,
        data.act,
        data.next_obs.clone().index_fill_(0, torch.tensor([3]), float("nan")),
        data.reward,
        data.terminated,
    )
    model = GaussianProcessModel(2, 1, iterations=5)
    with pytest.raises(ValueError, match="next_obs contains NaN"):
        model.fit(bad)
    few = Transitions(
        *(t[:5] for t in (data.obs, data.act, data.next_obs, data.reward)), data.terminated[:5]
    )
    with pytest.raises(ValueError, match=f"at least {MIN_POINTS}"):
        model.fit(few)
    with pytest.raises(RuntimeError, match="not fitted"):
        model.predict(data.obs, data.act)
    with pytest.raises(ValueError, match="kernel must be one of"):
        GaussianProcessModel(2, 1, kernel="linear")
    with pytest.raises(ValueError, match="data.act"):
        model.fit(Transitions(data.obs, data.obs, data.next_obs, data.reward, data.terminated))


def test_cholesky_jitter_retry_and_failure():
    v = torch.randn(6, 2, generator=torch.Generator().manual_seed(0))
    singular = (v @ v.T)[None]  # rank 2: plain Cholesky fails
    chol, jitter = _cholesky(singular)
    assert jitter > 0 and torch.isfinite(chol).all()
    with pytest.raises(NotPSDError, match="jitter"):
        _cholesky(-torch.eye(3)[None])
    # jitter that gpytorch adds silently during the fit is read from its warnings
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        warnings.warn("A not p.d., added jitter of 1.0e-05 to the diagonal", stacklevel=1)
    assert _jitters(caught) == [1e-5]


def test_fit_is_reproducible_and_reports_losses():
    data = toy(60, 14)
    reports, preds = [], []
    for _ in range(2):
        model = GaussianProcessModel(2, 1, iterations=15, val_fraction=0.2, seed=3)
        reports.append(model.fit(data))
        preds.append(model.predict(data.obs[:5], data.act[:5]).mean)
    assert reports[0].train_loss == reports[1].train_loss
    assert torch.equal(preds[0], preds[1])
    r = reports[0]
    assert len(r.train_loss) == len(r.val_loss) == r.epochs == 15
    assert r.train_loss[-1] < r.train_loss[0]
    assert r.val_loss[r.best_epoch] == min(r.val_loss)


def test_lbfgs_fit():
    model = GaussianProcessModel(2, 1, iterations=15, optimizer="lbfgs", lr=0.5)
    report = model.fit(toy(80, 15))
    assert report.train_loss[-1] < report.train_loss[0]


def test_state_dict_round_trip(fitted):
    buf = io.BytesIO()
    torch.save(fitted.state_dict(), buf)
    buf.seek(0)
    state = torch.load(buf, weights_only=True)
    clone = GaussianProcessModel(2, 1)
    clone.load_state_dict(state)
    q = toy(10, 16)
    a, b = fitted.predict(q.obs, q.act), clone.predict(q.obs, q.act)
    assert torch.equal(a.mean, b.mean) and torch.equal(a.var, b.var)
    with pytest.raises(ValueError, match="kernel"):
        GaussianProcessModel(2, 1, kernel="matern").load_state_dict(state)


def test_gp_mpc_runs_and_resumes(tmp_path):
    """CLI-shaped smoke test of GP-MPC with a tiny budget: one random and one MPC episode,
    metrics, checkpoint and plot written; a second call resumes and runs nothing again."""
    from mbrl.algorithms import get
    from mbrl.algorithms.common import PlannerConfig
    from mbrl.runs import Run

    module = get("gp-mpc")
    cfg = module.Config(
        env="pendulum",
        trials=1,
        horizon=3,
        model=module.GPConfig(iterations=5),
        planner=PlannerConfig(population=16, iterations=1),
    )
    summary = module.train(cfg, Run(tmp_path / "run", cfg, {"algo": "gp-mpc"}))
    assert len(summary.returns) == 1 and math.isfinite(summary.returns[0])
    lines = (tmp_path / "run" / "metrics.csv").read_text().splitlines()
    assert len(lines) == 3  # header, random episode, one trial
    assert (tmp_path / "run" / "learning_curve.png").exists()
    again = module.train(cfg, Run(tmp_path / "run", cfg))
    assert again.returns == summary.returns
    assert len((tmp_path / "run" / "metrics.csv").read_text().splitlines()) == 3


def test_fit_takes_a_generator_with_the_seam_signature():
    """``fit(data, generator=None)`` like every model; the same generator state gives the same
    fit."""
    import inspect

    params = list(inspect.signature(GaussianProcessModel.fit).parameters)
    assert params[:3] == ["self", "data", "generator"]
    data = toy(60, 16)
    reports = []
    for _ in range(2):
        model = GaussianProcessModel(2, 1, iterations=5, val_fraction=0.2, seed=0)
        reports.append(model.fit(data, torch.Generator().manual_seed(5)))
    assert reports[0].train_loss == reports[1].train_loss
    assert reports[0].val_loss == reports[1].val_loss
