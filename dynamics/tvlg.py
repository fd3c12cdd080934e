"""Time-varying linear-Gaussian (TVLG) dynamics fitted around sampled trajectories, for LQR-FLM
and guided policy search (Levine & Abbeel 2014, "Learning Neural Network Policies with Guided
Policy Search under Unknown Dynamics", Sec. 3 and 4).

From ``N`` trajectories of one condition, ``x [N, T + 1, X]`` and ``u [N, T, U]``,
:func:`fit_tvlg` regresses ``x_{t+1}`` on ``z_t = [x_t, u_t]`` separately at every step:
``x_{t+1} ~ N(F_t z_t + f_t, Sigma_t)``. All ``T`` regressions are one batched computation (the
joint moments of ``y_t = [x_t, u_t, x_{t+1}]``, ``D = 2 X + U`` entries, then Gaussian
conditioning), never a Python loop over time steps.

A prior (:class:`TVLGPrior`) supplies normal-inverse-Wishart hyperparameters ``(mu0, Phi, m,
n0)`` over ``y_t`` at every step, and the fit takes the MAP joint covariance (Levine & Abbeel
2014, Sec. 4; Levine, Finn, Darrell & Abbeel 2016, "End-to-end training of deep visuomotor
policies", Appendix A.3)::

    Sigma_y = (N S + Phi + N m / (N + m) (mu_hat - mu0)(mu_hat - mu0)') / (N + n0)
    mu_y    = mu_hat

with ``mu_hat``, ``S`` the empirical mean and (1/N-normalised) covariance of the samples. That is
what lets 5 samples per step determine a regression with ``X + U + 1 > 5`` unknowns per output.
Two priors are provided: :class:`GMMPrior`, a Gaussian mixture over ``(x_t, u_t, x_{t+1})``
fitted by EM on a bounded set of past trajectories (cbfinn/gps' ``DynamicsPriorGMM``), and
:class:`ModelPrior`, centred on the linearization of a global model (an ensemble, a GP, an
analytic system) at the samples.

All computations run in float64 on the samples' device.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, NamedTuple, Protocol, runtime_checkable

import torch

from mbrl.data import Sequences
from mbrl.dynamics.base import DifferentiableModel, DynamicsModel, Linearizable
from mbrl.planners.derivatives import dynamics_jacobians, mean_step, model_dtype
from mbrl.shapes import ShapeError


@dataclass(frozen=True, eq=False)
class TVLGDynamics:
    """``x_{t+1} ~ N(F_t [x_t; u_t] + f_t, Sigma_t)`` for ``t = 0 .. T-1``.

    Leading axes ``[...]`` (conditions ``M``, say) are kept in front of every field; an
    unbatched model has none. Fields are float64.
    """

    F: torch.Tensor  # [..., T, X, X + U]
    f: torch.Tensor  # [..., T, X]
    Sigma: torch.Tensor  # [..., T, X, X]

    def __post_init__(self) -> None:
        F, f, S = self.F, self.f, self.Sigma
        if F.ndim < 3:
            raise ShapeError(f"TVLGDynamics.F: expected [..., T, X, X + U], got {list(F.shape)}")
        *batch, h, nx, nz = F.shape
        if nz <= nx:
            raise ShapeError(
                f"TVLGDynamics.F: expected [..., T, X, X + U] with U >= 1, got {list(F.shape)}"
            )
        for name, t, want in (("f", f, (*batch, h, nx)), ("Sigma", S, (*batch, h, nx, nx))):
            if tuple(t.shape) != tuple(want):
                raise ShapeError(f"TVLGDynamics.{name}: expected {list(want)}, got {list(t.shape)}")

    @property
    def x_dim(self) -> int:
        """``X``."""
        return self.F.shape[-2]

    @property
    def u_dim(self) -> int:
        """``U``."""
        return self.F.shape[-1] - self.F.shape[-2]

    @property
    def horizon(self) -> int:
        """``T``, the number of steps (``T + 1`` states)."""
        return self.F.shape[-3]

    @property
    def batch_shape(self) -> torch.Size:
        """The leading axes ``[...]`` (``()`` for one condition)."""
        return self.F.shape[:-3]

    def step_mean(self, x: torch.Tensor, u: torch.Tensor, t: int) -> torch.Tensor:
        """Mean next state ``F_t [x; u] + f_t``: ``x [..., B, X]``, ``u [..., B, U]`` with the
        model's leading axes (``[B, X]`` for an unbatched model) -> ``[..., B, X]``."""
        z = torch.cat([x, u], dim=-1).to(self.F)  # [..., B, Z]
        return z @ self.F[..., t, :, :].mT + self.f[..., t, None, :]

    def predict_state(
        self, z_mean: torch.Tensor, z_cov: torch.Tensor, t: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The Gaussian of ``x_{t+1}`` when ``z_t = [x_t; u_t] ~ N(z_mean [..., Z], z_cov [..., Z,
        Z])``: mean ``F_t z_mean + f_t`` ``[..., X]``, covariance ``F_t z_cov F_t' + Sigma_t``
        ``[..., X, X]``."""
        F = self.F[..., t, :, :]
        mean = (F @ z_mean[..., None])[..., 0] + self.f[..., t, :]
        cov = F @ z_cov @ F.mT + self.Sigma[..., t, :, :]
        return mean, 0.5 * (cov + cov.mT)

    def condition(self, index: int) -> TVLGDynamics:
        """The unbatched model of condition ``index`` of a ``[M, ...]`` batch."""
        if not self.batch_shape:
            raise ValueError("condition(): this TVLGDynamics has no leading condition axis")
        return TVLGDynamics(self.F[index], self.f[index], self.Sigma[index])

    @staticmethod
    def stack(models: list[TVLGDynamics]) -> TVLGDynamics:
        """``M`` models of equal shapes stacked along a new leading condition axis."""
        if not models:
            raise ValueError("TVLGDynamics.stack needs at least one model")
        return TVLGDynamics(
            torch.stack([d.F for d in models]),
            torch.stack([d.f for d in models]),
            torch.stack([d.Sigma for d in models]),
        )


class NormalInverseWishart(NamedTuple):
    """Normal-inverse-Wishart hyperparameters over ``y_t = [x_t, u_t, x_{t+1}]`` (``D = 2 X + U``)
    at each of ``T`` steps, in the form the MAP fit uses (see the module docstring): ``Phi`` is
    the scatter matrix (``n0`` times a prior covariance), ``m`` the strength of ``mu0``, ``n0``
    that of ``Phi``."""

    mu0: torch.Tensor  # [T, D]
    Phi: torch.Tensor  # [T, D, D]
    m: torch.Tensor  # [T]
    n0: torch.Tensor  # [T]


@runtime_checkable
class TVLGPrior(Protocol):
    """A prior for :func:`fit_tvlg`.

    ``update(x [N, T + 1, X], u [N, T, U])`` absorbs new trajectories (a no-op for priors that
    learn elsewhere); ``evaluate(x, u)`` returns the :class:`NormalInverseWishart` at every step
    for the samples about to be fitted.
    """

    def update(self, x: torch.Tensor, u: torch.Tensor) -> None: ...

    def evaluate(self, x: torch.Tensor, u: torch.Tensor) -> NormalInverseWishart: ...


# ---------------------------------------------------------------------------- input checks


def check_samples(x: torch.Tensor, u: torch.Tensor, what: str = "fit_tvlg") -> tuple[int, ...]:
    """Check trajectories ``x [N, T + 1, X]``, ``u [N, T, U]`` and return ``(N, T, X, U)``.

    Raises:
        ShapeError: wrong number of axes, different ``N``, or ``x`` not one step longer than
            ``u``.
        ValueError: NaN/inf entries (naming the first sample and step holding one), or no step.
    """
    for name, t in (("x", x), ("u", u)):
        if not torch.is_tensor(t) or t.ndim != 3:
            got = list(t.shape) if torch.is_tensor(t) else type(t).__name__
            want = "[N, T + 1, X]" if name == "x" else "[N, T, U]"
            raise ShapeError(f"{what}: {name} must be {want} (samples, steps, dims), got {got}")
    n, h1, nx = x.shape
    if u.shape[0] != n:
        raise ShapeError(
            f"{what}: x has {n} samples but u has {u.shape[0]}; pass the same trajectories "
            "(x [N, T + 1, X], u [N, T, U])"
        )
    if u.shape[1] != h1 - 1:
        raise ShapeError(
            f"{what}: x must hold one more state than u holds actions (x [N, T + 1, X], "
            f"u [N, T, U]); got x {list(x.shape)} and u {list(u.shape)}"
        )
    if u.shape[1] < 1 or n < 1 or nx < 1 or u.shape[2] < 1:
        raise ValueError(
            f"{what}: need at least one sample and one step; got x {list(x.shape)}, "
            f"u {list(u.shape)}"
        )
    for name, t in (("x", x), ("u", u)):
        if not t.is_floating_point():
            raise TypeError(f"{what}: {name} must be a floating tensor, got {t.dtype}")
        bad = ~torch.isfinite(t)
        if bool(bad.any()):
            i, s = (int(v) for v in torch.nonzero(bad.any(dim=-1))[0])
            rows = int(bad.any(dim=-1).any(dim=-1).sum())
            raise ValueError(
                f"{what}: {name} contains NaN/inf in {rows} of {n} samples (first: sample {i}, "
                f"step {s}); drop those trajectories (a diverged rollout) before fitting"
            )
    return n, u.shape[1], nx, u.shape[2]


def _is_float(value: Any) -> bool:
    """Whether ``value`` is a finite real number (not a bool)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _joint(x: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """``y [T, N, D]`` with ``y_t = [x_t, u_t, x_{t+1}]`` per sample, float64."""
    x, u = x.to(torch.float64), u.to(torch.float64)
    return torch.cat([x[:, :-1], u, x[:, 1:]], dim=-1).transpose(0, 1)


def _moments(y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Empirical mean ``[..., D]`` and 1/N covariance ``[..., D, D]`` of ``y [..., N, D]``."""
    mean = y.mean(dim=-2)
    d = y - mean[..., None, :]
    cov = d.mT @ d / y.shape[-2]
    return mean, 0.5 * (cov + cov.mT)


# ---------------------------------------------------------------------------- the fit


def fit_tvlg(
    x: torch.Tensor | Sequences,
    u: torch.Tensor | None = None,
    prior: TVLGPrior | None = None,
    regularization: float = 1e-6,
) -> TVLGDynamics:
    """Fit ``x_{t+1} ~ N(F_t [x_t; u_t] + f_t, Sigma_t)`` at every step of ``N`` trajectories.

    Per step, the joint Gaussian of ``y_t = [z_t, x_{t+1}]`` (``z_t = [x_t, u_t]``) is the
    empirical one (``1/N`` covariance) or, with a ``prior``, the normal-inverse-Wishart MAP
    estimate of the module docstring (the rule of cbfinn/gps' ``DynamicsLRPrior`` and
    ``gauss_fit_joint_prior``); ``regularization`` is added to the diagonal of its ``z`` block
    (cbfinn/gps' default 1e-6). Conditioning gives::

        F_t = Sigma_{x'z} Sigma_zz^-1,   f_t = mu_{x'} - F_t mu_z,
        Sigma_t = Sigma_{x'x'} - F_t Sigma_zz F_t'

    Without a prior and with ``regularization = 0`` this is per-step least squares of
    ``x_{t+1}`` on ``[x_t, u_t, 1]`` with the maximum-likelihood (``1/N``) residual covariance.
    All ``T`` steps are one batched solve. Call ``prior.update(x, u)`` first to let the prior
    absorb the same samples (the fit never updates it).

    Args:
        x: ``[N, T + 1, X]`` states of ``N`` trajectories aligned in time, or a
            :class:`~mbrl.data.Sequences` of time-aligned chunks (its ``obs`` and ``act``; ``u``
            must then be ``None``).
        u: ``[N, T, U]`` actions.
        prior: a :class:`TVLGPrior`, or ``None`` for the plain regression.
        regularization: ``>= 0``, added to the ``[x, u]`` block of the joint covariance.

    Returns:
        :class:`TVLGDynamics` in float64 on the samples' device.

    Raises:
        ShapeError, ValueError: malformed samples (:func:`check_samples`), a ``Sequences`` whose
            chunks are not aligned in time, or, without a prior, fewer than ``X + U + 1``
            samples (the regression is under-determined): collect more or pass a prior.
        ValueError: a joint covariance that is not positive definite (samples that do not
            vary in some direction of ``[x, u]`` with ``regularization = 0``).
    """
    if isinstance(x, Sequences):
        if u is not None:
            raise TypeError("fit_tvlg(Sequences): pass the chunks alone, u comes from their act")
        x, u = _sequence_samples(x)
    if u is None:
        raise TypeError("fit_tvlg: pass u [N, T, U] with x [N, T + 1, X] (or one Sequences)")
    if not (_is_float(regularization) and regularization >= 0):
        raise ValueError(
            f"fit_tvlg: regularization must be a finite float >= 0, got {regularization!r}"
        )
    if prior is not None and not isinstance(prior, TVLGPrior):
        raise TypeError(
            f"fit_tvlg: prior must be a TVLGPrior (update(x, u), evaluate(x, u)), got "
            f"{type(prior).__name__}"
        )
    n, h, nx, nu = check_samples(x, u)
    nz = nx + nu
    if prior is None and n < nz + 1:
        raise ValueError(
            f"fit_tvlg: {n} samples per step cannot determine the regression of x' on [x, u, 1] "
            f"(X + U + 1 = {nz + 1} unknowns per output); collect at least {nz + 1} samples per "
            "step, or pass a prior (GMMPrior on earlier samples, ModelPrior from a global model)"
        )
    y = _joint(x, u)  # [T, N, D]
    mean, cov = _moments(y)
    if prior is not None:
        niw = _check_niw(prior.evaluate(x, u), h, 2 * nx + nu, type(prior).__name__)
        mu0, Phi, m, n0 = (t.to(y) for t in niw)
        d = mean - mu0  # [T, D]
        shrink = (n * m / (n + m))[:, None, None]
        cov = (n * cov + Phi + shrink * d[:, :, None] * d[:, None, :]) / (n + n0)[:, None, None]
        cov = 0.5 * (cov + cov.mT)
    F, f, Sigma = _condition(mean, cov, nz, regularization)
    return TVLGDynamics(F, f, Sigma)


def _condition(
    mean: torch.Tensor, cov: torch.Tensor, nz: int, regularization: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``F [T, X, Z]``, ``f [T, X]``, ``Sigma [T, X, X]`` of the Gaussian ``(mean [T, D], cov [T,
    D, D])`` over ``[z, x']`` conditioned on ``z``."""
    eye = torch.eye(nz, dtype=cov.dtype, device=cov.device)
    szz = cov[:, :nz, :nz] + regularization * eye
    syz = cov[:, nz:, :nz]  # [T, X, Z]
    L, info = torch.linalg.cholesky_ex(szz)
    if bool((info != 0).any()):
        t = int(torch.nonzero(info)[0])
        raise ValueError(
            f"fit_tvlg: the covariance of [x, u] at step {t} is not positive definite (the samples "
            "do not vary in some direction: add exploration noise to the actions, use "
            "regularization > 0, or pass a prior)"
        )
    F = torch.cholesky_solve(syz.mT, L).mT  # [T, X, Z]
    f = mean[:, nz:] - (F @ mean[:, :nz, None])[..., 0]
    Sigma = cov[:, nz:, nz:] - F @ szz @ F.mT
    return F, f, 0.5 * (Sigma + Sigma.mT)


def _check_niw(niw: Any, h: int, d: int, name: str) -> NormalInverseWishart:
    try:
        mu0, Phi, m, n0 = niw
    except (TypeError, ValueError):
        raise TypeError(
            f"{name}.evaluate must return (mu0 [T, D], Phi [T, D, D], m [T], n0 [T]), got "
            f"{type(niw).__name__}"
        ) from None
    for field, t, want in (
        ("mu0", mu0, (h, d)),
        ("Phi", Phi, (h, d, d)),
        ("m", m, (h,)),
        ("n0", n0, (h,)),
    ):
        if not torch.is_tensor(t) or tuple(t.shape) != want:
            got = list(t.shape) if torch.is_tensor(t) else type(t).__name__
            raise ShapeError(f"{name}.evaluate: {field} expected {list(want)}, got {got}")
        if not bool(torch.isfinite(t).all()):
            raise ValueError(f"{name}.evaluate: {field} holds NaN/inf")
    return NormalInverseWishart(mu0, Phi, m, n0)


def _sequence_samples(seqs: Sequences) -> tuple[torch.Tensor, torch.Tensor]:
    """``(obs [B, L + 1, X], act [B, L, U])`` of time-aligned chunks."""
    if seqs.obs.ndim != 3 or not seqs.obs.is_floating_point():
        raise TypeError(
            f"fit_tvlg(Sequences): need float state observations [B, L + 1, X], got "
            f"{seqs.obs.dtype} {list(seqs.obs.shape)}"
        )
    if len(seqs) and bool((seqs.time != seqs.time[:1]).any()):
        raise ValueError(
            "fit_tvlg(Sequences): the chunks are not aligned in time (time[:, t] differs between "
            "chunks); a time-varying fit needs every chunk to cover the same steps, e.g. whole "
            "episodes from their first step"
        )
    return seqs.obs, seqs.act


def fit_initial_state(
    x0: torch.Tensor, min_variance: float = 1e-6
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gaussian of the initial state from samples ``x0 [..., N, X]``: mean ``[..., X]`` and the
    diagonal covariance ``diag(max(var, min_variance))`` ``[..., X, X]`` (the 1/N variance;
    cbfinn/gps' ``initial_state_var`` default 1e-6 is the floor), float64."""
    x0 = x0.to(torch.float64)
    if not bool(torch.isfinite(x0).all()):
        raise ValueError("fit_initial_state: x0 holds NaN/inf")
    mean = x0.mean(dim=-2)
    var = x0.var(dim=-2, unbiased=False).clamp_min(min_variance)
    return mean, torch.diag_embed(var)


# ---------------------------------------------------------------------------- GMM prior


class GMMPrior:
    """A dynamics prior from a Gaussian mixture over ``y = [x_t, u_t, x_{t+1}]`` (``D = 2 X +
    U``), fitted by EM on the transitions of the last ``max_samples`` trajectories (Levine, Finn,
    Darrell & Abbeel 2016, Appendix A.3; cbfinn/gps ``DynamicsPriorGMM`` and ``utility/gmm.py``).

    :meth:`update` appends trajectories, keeps the latest ``max_samples``, and runs EM with
    ``K = max(2, min(max_clusters, floor(N T / min_samples_per_cluster)))`` clusters, warm-started
    from the previous mixture when ``K`` is unchanged; otherwise the clusters start from a random
    assignment of the points (drawn from ``generator``) followed by an M-step. EM stops when the
    log-likelihood falls or changes by less than ``1e-5`` of its magnitude, or after
    ``max_iterations``; every cluster covariance gets ``1e-6 I``, and clusters whose mass falls
    under ``1e-4 / K`` are reset to the moments of all points (cbfinn/gps' rules).

    :meth:`evaluate` averages each query point's cluster responsibilities over the ``N`` samples
    of a step and returns the moments of the mixture under those weights,
    ``mu0 = sum_k w_k mu_k`` and ``Phi = m sum_k w_k (Sigma_k + (mu_k - mu0)(mu_k - mu0)')``,
    with ``m = strength`` and ``n0 = strength (P - 2 - D) / P`` for ``P`` points in the mixture
    (cbfinn/gps' normalisation: the prior counts as about ``strength`` samples; clamped at 0 for
    a mixture of fewer than ``D + 2`` points, where the formula turns negative).

    Defaults: ``max_clusters=20``, ``min_samples_per_cluster=40``, ``max_samples=20`` are the
    values in every cbfinn/gps example (``experiments/*/hyperparams.py``, e.g.
    ``box2d_pointmass_example``; the library defaults in ``algorithm/dynamics/config.py`` are
    50, 20 and 20), ``strength=1.0`` is cbfinn/gps' default, ``max_iterations=100`` that of its
    ``GMM.update``. cbfinn/gps keeps ``max_samples - 1`` trajectories; this keeps
    ``max_samples``.

    All state is float64 tensors (:meth:`state_dict` / :meth:`load_state_dict` for checkpoints).
    """

    def __init__(
        self,
        max_clusters: int = 20,
        min_samples_per_cluster: int = 40,
        max_samples: int = 20,
        strength: float = 1.0,
        max_iterations: int = 100,
    ) -> None:
        for name, value in (
            ("max_clusters", max_clusters),
            ("min_samples_per_cluster", min_samples_per_cluster),
            ("max_samples", max_samples),
            ("max_iterations", max_iterations),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"GMMPrior: {name} must be an int >= 1, got {value!r}")
        if not (_is_float(strength) and strength > 0):
            raise ValueError(f"GMMPrior: strength must be a finite float > 0, got {strength!r}")
        self.max_clusters = max_clusters
        self.min_samples_per_cluster = min_samples_per_cluster
        self.max_samples = max_samples
        self.strength = float(strength)
        self.max_iterations = max_iterations
        self.x: torch.Tensor | None = None  # [S, T + 1, X] kept trajectories
        self.u: torch.Tensor | None = None  # [S, T, U]
        self.mu: torch.Tensor | None = None  # [K, D] cluster means
        self.sigma: torch.Tensor | None = None  # [K, D, D] cluster covariances
        self.logmass: torch.Tensor | None = None  # [K] log mixing weights
        self.iterations = 0  # EM iterations of the last update

    @property
    def clusters(self) -> int:
        """``K`` of the current mixture (0 before the first update)."""
        return 0 if self.mu is None else self.mu.shape[0]

    def update(
        self, x: torch.Tensor, u: torch.Tensor, generator: torch.Generator | None = None
    ) -> None:
        """Absorb trajectories ``x [N, T + 1, X]``, ``u [N, T, U]`` and refit the mixture.

        ``generator`` draws the random initial assignment when the mixture is (re)started
        (``None``: a generator seeded with 0, so that the fit is deterministic either way).

        Raises:
            ShapeError, ValueError: malformed samples, or samples whose ``T``, ``X`` or ``U``
                differ from those already kept.
        """
        check_samples(x, u, "GMMPrior.update")
        x, u = x.detach().to(torch.float64), u.detach().to(torch.float64)
        if self.x is not None:
            if x.shape[1:] != self.x.shape[1:] or u.shape[1:] != self.u.shape[1:]:
                raise ShapeError(
                    f"GMMPrior.update: trajectories x {list(x.shape[1:])}, u {list(u.shape[1:])} "
                    f"differ from the kept ones x {list(self.x.shape[1:])}, u "
                    f"{list(self.u.shape[1:])}; use one prior per task and horizon"
                )
            x = torch.cat([self.x, x.to(self.x.device)])
            u = torch.cat([self.u, u.to(self.u.device)])
        self.x, self.u = x[-self.max_samples :], u[-self.max_samples :]
        data = _joint(self.x, self.u).reshape(-1, 2 * x.shape[-1] + u.shape[-1])  # [S T, D]
        k = int(max(2, min(self.max_clusters, data.shape[0] // self.min_samples_per_cluster)))
        if self.mu is None or self.mu.shape[0] != k:
            if generator is None:
                generator = torch.Generator(device=data.device).manual_seed(0)
            labels = torch.randint(k, (data.shape[0],), generator=generator, device=data.device)
            resp = torch.nn.functional.one_hot(labels, k).to(data)  # [P, K]
            self._m_step(data, resp)
        self._em(data)

    def _m_step(self, data: torch.Tensor, resp: torch.Tensor) -> None:
        """Mixing weights, means and covariances from responsibilities ``resp [P, K]``."""
        p, k = resp.shape
        total = resp.sum(dim=0)  # [K]
        logmass = torch.log(total / p)
        self.logmass = logmass - torch.logsumexp(logmass, dim=0)
        w = resp / total.clamp_min(torch.finfo(data.dtype).tiny)  # [P, K], columns sum to 1
        small = self.logmass.exp() < 1e-4 / k  # reboot: all points, equal weight
        w = torch.where(small[None, :], torch.full_like(w, 1.0 / p), w)
        self.mu = w.mT @ data  # [K, D]
        diff = data[None, :, :] - self.mu[:, None, :]  # [K, P, D]
        cov = (diff * w.mT[:, :, None]).mT @ diff  # [K, D, D]
        eye = torch.eye(data.shape[1], dtype=data.dtype, device=data.device)
        self.sigma = 0.5 * (cov + cov.mT) + 1e-6 * eye

    def _log_obs(self, y: torch.Tensor) -> torch.Tensor:
        """``log pi_k N(y | mu_k, Sigma_k)`` ``[..., P, K]`` of points ``y [..., P, D]``."""
        d = y.shape[-1]
        L = torch.linalg.cholesky(self.sigma)  # [K, D, D]
        diff = y[..., None, :, :] - self.mu[:, None, :]  # [..., K, P, D]
        sol = torch.linalg.solve_triangular(L, diff.mT, upper=False)  # [..., K, D, P]
        half_logdet = torch.log(torch.diagonal(L, dim1=-2, dim2=-1)).sum(-1)  # [K]
        const = 0.5 * d * math.log(2 * math.pi)
        log_obs = -0.5 * (sol**2).sum(dim=-2) - half_logdet[:, None] - const  # [..., K, P]
        return (log_obs + self.logmass[:, None]).transpose(-1, -2)  # [..., P, K]

    def _em(self, data: torch.Tensor) -> None:
        previous = -math.inf
        self.iterations = 0
        for _ in range(self.max_iterations):
            log_obs = self._log_obs(data)  # [P, K]
            norm = torch.logsumexp(log_obs, dim=1, keepdim=True)  # [P, 1]
            ll = float(norm.sum())
            if ll < previous or abs(ll - previous) < 1e-5 * abs(previous):
                break
            previous = ll
            self._m_step(data, torch.exp(log_obs - norm))
            self.iterations += 1

    def evaluate(self, x: torch.Tensor, u: torch.Tensor) -> NormalInverseWishart:
        """The normal-inverse-Wishart hyperparameters at every step of ``x [N, T + 1, X]``,
        ``u [N, T, U]`` (see the class docstring).

        Raises:
            RuntimeError: before the first :meth:`update`.
            ShapeError: samples whose dimensions differ from the mixture's.
        """
        if self.mu is None:
            raise RuntimeError(
                "GMMPrior.evaluate before any update: call update(x, u) with trajectories first"
            )
        n, h, nx, nu = check_samples(x, u, "GMMPrior.evaluate")
        d = self.mu.shape[1]
        if 2 * nx + nu != d:
            raise ShapeError(
                f"GMMPrior.evaluate: samples with X = {nx}, U = {nu} give D = {2 * nx + nu}, but "
                f"the mixture is over D = {d}"
            )
        y = _joint(x, u).to(self.mu.device)  # [T, N, D]
        log_obs = self._log_obs(y)  # [T, N, K]
        log_resp = log_obs - torch.logsumexp(log_obs, dim=-1, keepdim=True)
        w = torch.exp(torch.logsumexp(log_resp, dim=1) - math.log(n))  # [T, K]
        mu0 = w @ self.mu  # [T, D]
        diff = self.mu[None, :, :] - mu0[:, None, :]  # [T, K, D]
        spread = (diff * w[:, :, None]).mT @ diff  # [T, D, D]
        Phi = torch.einsum("tk,kij->tij", w, self.sigma) + spread
        points = self.x.shape[0] * self.u.shape[1]
        m = torch.full((h,), self.strength, dtype=y.dtype, device=y.device)
        n0 = (m * (points - 2 - d) / points).clamp_min(0.0)
        return NormalInverseWishart(mu0, m[:, None, None] * 0.5 * (Phi + Phi.mT), m, n0)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The kept trajectories and the mixture (empty before the first update)."""
        if self.mu is None:
            return {}
        return {
            "x": self.x,
            "u": self.u,
            "mu": self.mu,
            "sigma": self.sigma,
            "logmass": self.logmass,
        }

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Restore what :meth:`state_dict` returned."""
        if not state:
            self.x = self.u = self.mu = self.sigma = self.logmass = None
            return
        missing = {"x", "u", "mu", "sigma", "logmass"} - set(state)
        if missing:
            raise KeyError(f"GMMPrior.load_state_dict: missing {sorted(missing)}")
        self.x, self.u = state["x"], state["u"]
        self.mu, self.sigma, self.logmass = state["mu"], state["sigma"], state["logmass"]


# ---------------------------------------------------------------------------- model prior


class ModelPrior:
    """A dynamics prior centred on a global model's linearization (in the manner of the
    neural-network prior of Fu, Levine & Abbeel 2016, "One-shot learning of manipulation skills
    with online dynamics adaptation and neural network priors", Sec. IV).

    At step ``t`` with sample mean ``z_bar = [x_bar, u_bar]`` and sample covariance ``S_zz`` of
    ``z_t``, the model's mean step ``f`` and Jacobian ``F = [A B]`` at ``z_bar``
    (:func:`~mbrl.planners.derivatives.dynamics_jacobians`: ``Linearizable.linearize`` with time
    index ``t``, else autograd of ``DifferentiableModel.mean_dynamics``) give::

        mu0 = [z_bar, f(z_bar)]
        Phi = n0 [[P, P F'], [F P, F P F' + diag(v)]],  P = S_zz + (s + regularization) I

    with ``s = tr(S_zz) / Z`` the mean variance of ``z_t`` (so that the prior spans every
    direction of ``[x, u]`` with about the data's spread, far above the fit's own
    regularization), ``v`` the model's predicted variance (:meth:`DynamicsModel.predict`, zero
    for models without one) and ``m = n0 = strength``. The conditional of the prior is exactly
    the linearization; in the MAP fit (:func:`fit_tvlg`) the data's regression and the model's
    ``F`` are weighted about ``N : strength`` along the directions the samples span, and the
    model's ``F`` alone fills the directions they do not (fewer than ``X + U + 1`` samples, or
    actions that barely vary around a feedback law).

    :meth:`update` absorbs nothing: the global model is trained by its owner.
    """

    def __init__(self, model: Any, strength: float = 1.0, regularization: float = 1e-6) -> None:
        if not isinstance(model, (Linearizable, DifferentiableModel)):
            raise TypeError(
                f"ModelPrior: {type(model).__name__} is neither Linearizable (linearize(x, u, t)) "
                "nor a DifferentiableModel (mean_dynamics(x, u)); give a model with one of the two"
            )
        if not (_is_float(strength) and strength > 0):
            raise ValueError(f"ModelPrior: strength must be a finite float > 0, got {strength!r}")
        if not (_is_float(regularization) and regularization >= 0):
            raise ValueError(
                f"ModelPrior: regularization must be a finite float >= 0, got {regularization!r}"
            )
        self.model = model
        self.strength = float(strength)
        self.regularization = float(regularization)

    def update(self, x: torch.Tensor, u: torch.Tensor) -> None:
        """Nothing to absorb (the model learns elsewhere); checks the samples."""
        check_samples(x, u, "ModelPrior.update")

    def evaluate(self, x: torch.Tensor, u: torch.Tensor) -> NormalInverseWishart:
        """The hyperparameters at every step of ``x [N, T + 1, X]``, ``u [N, T, U]``."""
        n, h, nx, nu = check_samples(x, u, "ModelPrior.evaluate")
        z = torch.cat([x[:, :-1], u], dim=-1).to(torch.float64).transpose(0, 1)  # [T, N, Z]
        z_bar, s_zz = _moments(z)
        x_bar, u_bar = z_bar[:, :nx], z_bar[:, nx:]
        t = torch.arange(h, device=z.device)
        A, B = dynamics_jacobians(self.model, x_bar, u_bar, t)
        F = torch.cat([A, B], dim=-1).to(torch.float64)  # [T, X, Z]
        dtype = model_dtype(self.model, torch.float64)
        xm, um = x_bar.to(dtype), u_bar.to(dtype)
        with torch.no_grad():
            y_bar = mean_step(self.model)(xm, um).to(torch.float64)  # [T, X]
            if isinstance(self.model, DynamicsModel):
                var = self.model.predict(xm, um).var.to(torch.float64)  # [T, X]
            else:
                var = torch.zeros_like(y_bar)
        eye = torch.eye(nx + nu, dtype=torch.float64, device=z.device)
        spread = torch.diagonal(s_zz, dim1=-2, dim2=-1).mean(-1)  # [T] mean variance of z
        P = s_zz + (spread + self.regularization)[:, None, None] * eye
        PF = P @ F.mT  # [T, Z, X]
        top = torch.cat([P, PF], dim=-1)
        bottom = torch.cat([PF.mT, F @ PF + torch.diag_embed(var)], dim=-1)
        cov = torch.cat([top, bottom], dim=-2)
        s = torch.full((h,), self.strength, dtype=torch.float64, device=z.device)
        mu0 = torch.cat([z_bar, y_bar], dim=-1)
        return NormalInverseWishart(mu0, s[:, None, None] * 0.5 * (cov + cov.mT), s, s.clone())
