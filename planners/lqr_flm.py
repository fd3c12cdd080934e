"""LQR with fitted linear models (LQR-FLM): the KL-constrained update of a time-varying
linear-Gaussian controller (Levine & Abbeel 2014, "Learning Neural Network Policies with Guided
Policy Search under Unknown Dynamics", Sec. 3; the dual search and step-size rule of cbfinn/gps'
``TrajOptLQRPython`` and ``AlgorithmTrajOpt``).

Notation: ``T`` steps, ``z_t = [x_t; u_t]`` (``Z = X + U``), controllers
``p(u_t | x_t) = N(K_t x_t + k_t, S_t)``, dynamics ``x_{t+1} ~ N(F_t z_t + f_t, Sigma_t)``
(:class:`~mbrl.dynamics.tvlg.TVLGDynamics`), and a quadratic cost per step
``z' C_t z / 2 + c_t' z + c0_t`` plus a terminal ``x_T' C_f x_T / 2 + c_f' x_T + c0_f``
(:class:`QuadraticCost`). Every function keeps leading condition axes ``[...]`` (``M``) in front
of every tensor; all solves run in float64.

The update solves::

    min_p  E_p[cost]   s.t.   (1/T) sum_t E_{p(x_t)} KL(p(u_t|x_t) || p_prev(u_t|x_t)) <= eps

through its Lagrangian: for a dual variable ``eta > 0`` the backward pass minimises
``E_p[cost / eta - log p_prev(u|x)] - H(p)``, an LQR on the augmented cost
``C / eta + [[K'PK, -K'P], [-PK, P]]``, ``c / eta + [K'Pk; -Pk]`` (``P = S_prev^-1``) whose
solution is ``K_t, k_t`` from the Riccati recursion and ``S_t = Q_uu,t^-1`` (maximum entropy).
``eta`` is found by a bracketing search on the measured KL (:class:`LQRFLM`).

BADMM guided policy search adds a penalty ``sum_t nu_t KL_t(p || pi)`` to a second controller
(the global policy's linearization ``pi``) inside the same bound: :meth:`LQRFLM.update` with
``policy`` and ``policy_weight``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np
import torch

from mbrl.planners.base import Plan, StageCost
from mbrl.planners.lqr import IndefiniteError, TimeVaryingLQR, riccati_backward
from mbrl.shapes import ShapeError

if TYPE_CHECKING:  # annotations only: mbrl.dynamics.tvlg imports mbrl.planners (derivatives)
    from mbrl.dynamics.tvlg import TVLGDynamics

_F64 = torch.float64


# ---------------------------------------------------------------------------- the controller


@dataclass(frozen=True, eq=False)
class LinearGaussianController:
    """``u_t ~ N(K_t x_t + k_t, covariance_t)`` for ``t = 0 .. T-1``, with leading axes
    ``[...]`` (conditions ``M``) in front of every field.

    The fields are stored in float64; ``chol`` (lower Cholesky factor of the covariance) and
    ``precision`` (its inverse) are computed once at construction.

    Raises:
        ShapeError: fields of mismatched shapes.
        ValueError: NaN/inf entries or a covariance that is not positive definite (naming the
            step).
    """

    K: torch.Tensor  # [..., T, U, X]
    k: torch.Tensor  # [..., T, U]
    covariance: torch.Tensor  # [..., T, U, U]
    chol: torch.Tensor = field(init=False, repr=False)  # [..., T, U, U] lower
    precision: torch.Tensor = field(init=False, repr=False)  # [..., T, U, U]

    def __post_init__(self) -> None:
        K, k, cov = (torch.as_tensor(t).to(_F64) for t in (self.K, self.k, self.covariance))
        if K.ndim < 3:
            raise ShapeError(
                f"LinearGaussianController.K: expected [..., T, U, X], got {list(K.shape)}"
            )
        *batch, h, nu, _ = K.shape
        for name, t, want in (("k", k, (*batch, h, nu)), ("covariance", cov, (*batch, h, nu, nu))):
            if tuple(t.shape) != tuple(want):
                raise ShapeError(
                    f"LinearGaussianController.{name}: expected {list(want)}, got {list(t.shape)}"
                )
        for name, t in (("K", K), ("k", k), ("covariance", cov)):
            if not bool(torch.isfinite(t).all()):
                raise ValueError(f"LinearGaussianController.{name} holds NaN/inf")
        cov = 0.5 * (cov + cov.mT)
        L, info = torch.linalg.cholesky_ex(cov)
        if bool((info != 0).any()):
            where = torch.nonzero(info)[0].tolist()
            raise ValueError(
                f"LinearGaussianController: covariance at index {where} (batch..., step) is not "
                "positive definite"
            )
        for name, value in (("K", K), ("k", k), ("covariance", cov), ("chol", L)):
            object.__setattr__(self, name, value)
        object.__setattr__(self, "precision", torch.cholesky_inverse(L))

    @property
    def horizon(self) -> int:
        """``T``."""
        return self.K.shape[-3]

    @property
    def x_dim(self) -> int:
        """``X``."""
        return self.K.shape[-1]

    @property
    def u_dim(self) -> int:
        """``U``."""
        return self.K.shape[-2]

    @property
    def batch_shape(self) -> torch.Size:
        """The leading axes ``[...]`` (``()`` for one condition)."""
        return self.K.shape[:-3]

    def mean_action(self, x: torch.Tensor, t: int) -> torch.Tensor:
        """``K_t x + k_t`` for states ``x [..., B, X]`` (the controller's leading axes, then
        rows), or one state ``[X]`` of an unbatched controller; returned in ``x``'s dtype."""
        single = x.ndim == 1
        xb = x[None] if single else x
        u = torch.einsum("...ux,...bx->...bu", self.K[..., t, :, :], xb.to(_F64))
        u = u + self.k[..., t, None, :]
        return (u[0] if single else u).to(x.dtype)

    def act(
        self, x: torch.Tensor, t: int, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """A sample of ``N(K_t x + k_t, covariance_t)`` per state ``x [..., B, X]`` (or ``[X]``),
        drawing standard normals from ``generator``; in ``x``'s dtype."""
        single = x.ndim == 1
        xb = x[None] if single else x
        mean = self.mean_action(xb, t).to(_F64)
        eps = torch.randn(mean.shape, generator=generator, dtype=_F64, device=mean.device)
        u = mean + torch.einsum("...uv,...bv->...bu", self.chol[..., t, :, :], eps)
        return (u[0] if single else u).to(x.dtype)

    def condition(self, index: int) -> LinearGaussianController:
        """The unbatched controller of condition ``index`` of a ``[M, ...]`` batch."""
        if not self.batch_shape:
            raise ValueError("condition(): this controller has no leading condition axis")
        return LinearGaussianController(self.K[index], self.k[index], self.covariance[index])

    def as_plan(
        self,
        x_ref: torch.Tensor | None = None,
        expected_return: float = 0.0,
        dtype: torch.dtype = torch.float32,
        status: str = "ok",
    ) -> Plan:
        """The controller as a :class:`~mbrl.planners.base.Plan` for the MPC loop, which plays
        ``u_t = actions[t] + K[t] (x_t - x_ref[t])``: ``actions = K_t x_ref_t + k_t``, so that
        the played mean is ``K_t x_t + k_t`` for any ``x_ref [T + 1, X]`` (zeros when ``None``;
        pass the trajectory mean so that ``actions`` are the mean actions). ``covariance`` is
        the controller's; ``expected_return`` minus its expected cost, say. Unbatched
        controllers only (:meth:`condition` picks one)."""
        if self.batch_shape:
            raise ValueError(
                f"as_plan: the controller has leading axes {list(self.batch_shape)}; pick one "
                "condition with condition(m) first"
            )
        h, nx = self.horizon, self.x_dim
        ref = torch.zeros(h + 1, nx, dtype=_F64, device=self.K.device)
        if x_ref is not None:
            if tuple(x_ref.shape) != (h + 1, nx):
                raise ShapeError(
                    f"as_plan: x_ref expected [{h + 1}, {nx}], got {list(x_ref.shape)}"
                )
            ref = x_ref.to(_F64)
        actions = (self.K @ ref[:-1, :, None])[..., 0] + self.k  # [T, U]
        return Plan(
            actions=actions.to(dtype),
            expected_return=float(expected_return),
            K=self.K.to(dtype),
            x_ref=ref.to(dtype),
            covariance=self.covariance.to(dtype),
            status=status,
        )

    @classmethod
    def from_lqr(
        cls, solution: TimeVaryingLQR, covariance: torch.Tensor | float
    ) -> LinearGaussianController:
        """The gains of a :class:`~mbrl.planners.lqr.TimeVaryingLQR` with a covariance
        ``[..., T, U, U]``, or a variance (float: ``variance * I`` at every step)."""
        K, k = solution.K.to(_F64), solution.k.to(_F64)
        if isinstance(covariance, (int, float)):
            eye = torch.eye(K.shape[-2], dtype=_F64, device=K.device)
            covariance = float(covariance) * eye.expand(*K.shape[:-1], K.shape[-2])
        return cls(K, k, covariance)

    @classmethod
    def initial(
        cls,
        horizon: int,
        x_dim: int,
        u_dim: int,
        variance: float = 1.0,
        mean: torch.Tensor | None = None,
        batch_shape: tuple[int, ...] = (),
    ) -> LinearGaussianController:
        """An open-loop Gaussian controller: ``K = 0``, ``k_t = mean`` (``[U]``, zero by
        default), covariance ``variance * I`` (cbfinn/gps' ``init_var``; its examples use 0.1 to
        5.0); ``batch_shape`` leading axes (``(M,)`` for ``M`` conditions)."""
        for name, value in (("horizon", horizon), ("x_dim", x_dim), ("u_dim", u_dim)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"LinearGaussianController.initial: {name} must be an int >= 1")
        if not (isinstance(variance, (int, float)) and math.isfinite(variance) and variance > 0):
            raise ValueError(
                f"LinearGaussianController.initial: variance must be > 0, got {variance!r}"
            )
        shape = (*batch_shape, horizon)
        K = torch.zeros(*shape, u_dim, x_dim, dtype=_F64)
        k = torch.zeros(*shape, u_dim, dtype=_F64)
        if mean is not None:
            k = k + torch.as_tensor(mean, dtype=_F64)
        cov = float(variance) * torch.eye(u_dim, dtype=_F64).expand(*shape, u_dim, u_dim)
        return cls(K, k, cov)


# ---------------------------------------------------------------------------- costs


@dataclass(frozen=True, eq=False)
class QuadraticCost:
    """``sum_t (z_t' C_t z_t / 2 + c_t' z_t + c0_t) + x_T' C_final x_T / 2 + c_final' x_T +
    c0_final`` in absolute coordinates, with leading axes ``[...]``; float64."""

    C: torch.Tensor  # [..., T, Z, Z]
    c: torch.Tensor  # [..., T, Z]
    c0: torch.Tensor  # [..., T]
    C_final: torch.Tensor  # [..., X, X]
    c_final: torch.Tensor  # [..., X]
    c0_final: torch.Tensor  # [...]

    @property
    def horizon(self) -> int:
        return self.C.shape[-3]


def quadratic_cost(cost: StageCost, x: torch.Tensor, u: torch.Tensor) -> QuadraticCost:
    """Second-order expansion of a :class:`~mbrl.planners.base.StageCost` around trajectories,
    averaged over them (cbfinn/gps ``Algorithm._eval_cost``: each sample's expansion re-centred
    to absolute coordinates, then the mean over samples).

    ``x [..., N, T + 1, X]``, ``u [..., N, T, U]``: ``N`` trajectories (``N = 1`` and the mean
    trajectory for the expansion at the mean). At each point ``z_bar`` with cost ``l``, gradient
    ``g`` and Hessian ``H``: ``C = H``, ``c = g - H z_bar``, ``c0 = l - g' z_bar + z_bar' H
    z_bar / 2``; the terminal part from ``terminal_expansion`` at ``x_T``. One batched call of
    each expansion (rows ``[... N T]`` with their time indices).
    """
    if x.ndim < 3 or u.ndim != x.ndim or x.shape[:-3] != u.shape[:-3]:
        raise ShapeError(
            f"quadratic_cost: expected x [..., N, T + 1, X] and u [..., N, T, U], got "
            f"{list(x.shape)} and {list(u.shape)}"
        )
    *lead, n, h1, nx = x.shape
    h, nu = u.shape[-2], u.shape[-1]
    if u.shape[-3] != n or h != h1 - 1:
        raise ShapeError(
            f"quadratic_cost: x must hold one more state than u holds actions; got x "
            f"{list(x.shape)}, u {list(u.shape)}"
        )
    x, u = x.to(_F64), u.to(_F64)
    rows = int(np.prod(lead, dtype=np.int64)) * n
    xs = x[..., :-1, :].reshape(rows * h, nx)
    us = u.reshape(rows * h, nu)
    t = torch.arange(h, device=x.device).repeat(rows)
    e = cost.expansion(xs, us, t)
    C, c, c0 = _recentre(e, torch.cat([xs, us], dim=-1))
    ef = cost.terminal_expansion(x[..., -1, :].reshape(rows, nx))
    Cf, cf, c0f = _recentre(ef, x[..., -1, :].reshape(rows, nx))
    nz = nx + nu
    return QuadraticCost(
        C=C.reshape(*lead, n, h, nz, nz).mean(dim=-4),
        c=c.reshape(*lead, n, h, nz).mean(dim=-3),
        c0=c0.reshape(*lead, n, h).mean(dim=-2),
        C_final=Cf.reshape(*lead, n, nx, nx).mean(dim=-3),
        c_final=cf.reshape(*lead, n, nx).mean(dim=-2),
        c0_final=c0f.reshape(*lead, n).mean(dim=-1),
    )


def _recentre(e: Any, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(C, c, c0)`` of the expansion ``e`` (value, gradient, Hessian at rows ``z [B, Z]``)."""
    H = e.hess.to(_F64).expand(z.shape[0], z.shape[1], z.shape[1])
    H = 0.5 * (H + H.mT)
    g, v = e.grad.to(_F64), e.cost.to(_F64)
    Hz = (H @ z[:, :, None])[..., 0]
    return H, g - Hz, v - (g * z).sum(-1) + 0.5 * (Hz * z).sum(-1)


# ---------------------------------------------------------------------------- forward pass


class TrajectoryDistribution(NamedTuple):
    """Gaussian marginals ``z_t = [x_t; u_t] ~ N(mu_t, sigma_t)`` of a controller under a TVLG
    model; the final state follows from :meth:`~mbrl.dynamics.tvlg.TVLGDynamics.predict_state`
    at the last step (:func:`final_state`)."""

    mu: torch.Tensor  # [..., T, Z]
    sigma: torch.Tensor  # [..., T, Z, Z]


def _check_pair(dyn: TVLGDynamics, ctrl: LinearGaussianController, what: str) -> None:
    if (dyn.horizon, dyn.x_dim, dyn.u_dim) != (ctrl.horizon, ctrl.x_dim, ctrl.u_dim):
        raise ShapeError(
            f"{what}: dynamics (T={dyn.horizon}, X={dyn.x_dim}, U={dyn.u_dim}) and controller "
            f"(T={ctrl.horizon}, X={ctrl.x_dim}, U={ctrl.u_dim}) disagree"
        )


def trajectory_distribution(
    dyn: TVLGDynamics,
    ctrl: LinearGaussianController,
    x0_mean: torch.Tensor,
    x0_cov: torch.Tensor,
) -> TrajectoryDistribution:
    """The forward pass: marginals of ``z_t`` for ``x_0 ~ N(x0_mean [..., X], x0_cov [..., X,
    X])`` under ``ctrl`` and ``dyn`` (cbfinn/gps ``TrajOptLQRPython.forward``)::

        mu_u = K mu_x + k,   S_xu = S_x K',   S_uu = K S_x K' + covariance
        mu_x' = F mu_z + f,  S_x' = F S_z F' + Sigma

    A loop over the ``T`` steps, batched over leading axes (broadcast between the arguments).
    """
    _check_pair(dyn, ctrl, "trajectory_distribution")
    nx = dyn.x_dim
    mx = torch.as_tensor(x0_mean).to(_F64)
    sx = torch.as_tensor(x0_cov).to(_F64)
    if mx.shape[-1:] != (nx,) or sx.shape[-2:] != (nx, nx):
        raise ShapeError(
            f"trajectory_distribution: x0_mean [..., {nx}] and x0_cov [..., {nx}, {nx}] expected, "
            f"got {list(mx.shape)} and {list(sx.shape)}"
        )
    batch = torch.broadcast_shapes(dyn.batch_shape, ctrl.batch_shape, mx.shape[:-1], sx.shape[:-2])
    mx, sx = mx.expand(*batch, nx), sx.expand(*batch, nx, nx)
    mus, sigmas = [], []
    for t in range(dyn.horizon):
        K, k, S = ctrl.K[..., t, :, :], ctrl.k[..., t, :], ctrl.covariance[..., t, :, :]
        mu = torch.cat([mx, (K @ mx[..., None])[..., 0] + k], dim=-1)  # [..., Z]
        sxu = sx @ K.mT  # [..., X, U]
        top = torch.cat([sx, sxu], dim=-1)
        bottom = torch.cat([sxu.mT, K @ sxu + S], dim=-1)
        sigma = torch.cat([top, bottom], dim=-2)  # [..., Z, Z]
        sigma = 0.5 * (sigma + sigma.mT)
        mus.append(mu)
        sigmas.append(sigma)
        mx, sx = dyn.predict_state(mu, sigma, t)
    return TrajectoryDistribution(torch.stack(mus, dim=-2), torch.stack(sigmas, dim=-3))


def final_state(
    dyn: TVLGDynamics, traj: TrajectoryDistribution
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean ``[..., X]`` and covariance ``[..., X, X]`` of ``x_T`` (after the last step)."""
    return dyn.predict_state(traj.mu[..., -1, :], traj.sigma[..., -1, :, :], dyn.horizon - 1)


def _mean_trajectory(
    dyn: TVLGDynamics, traj: TrajectoryDistribution
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean states ``[..., 1, T + 1, X]`` and actions ``[..., 1, T, U]`` (one trajectory)."""
    nx = dyn.x_dim
    mf, _ = final_state(dyn, traj)
    x = torch.cat([traj.mu[..., :nx], mf[..., None, :]], dim=-2)
    return x[..., None, :, :], traj.mu[..., None, :, nx:]


def kl_divergence(
    new: LinearGaussianController,
    old: LinearGaussianController,
    mu: torch.Tensor,
    sigma: torch.Tensor,
    per_step: bool = False,
) -> torch.Tensor:
    """Expected KL divergence ``E_{x_t} KL(new(u_t | x_t) || old(u_t | x_t))`` with ``x_t`` from
    the marginals ``mu [..., T, Z]``, ``sigma [..., T, Z, Z]`` (of ``new``'s trajectory
    distribution, :func:`trajectory_distribution`), in closed form per step::

        KL_t = (tr(P S) - U + log|S_old| - log|S| + E[d' P d]) / 2,   P = S_old^-1,
        d = (K - K_old) x + (k - k_old),  E[d' P d] = m' P m + tr(dK' P dK Sigma_x)

    (``m`` the mean of ``d``). Because both trajectory distributions share the dynamics, the sum
    over steps is the KL between them (cbfinn/gps ``traj_distr_kl``). Returns the sum over the
    ``T`` steps ``[...]``, or the steps ``[..., T]`` with ``per_step``; each step is clamped at 0
    against rounding. :class:`LQRFLM` constrains the mean over steps, ``sum / T`` (cbfinn/gps
    compares the sum with ``kl_step * T``).
    """
    nx, nu = new.x_dim, new.u_dim
    mx = mu[..., :nx].to(_F64)
    sx = sigma[..., :nx, :nx].to(_F64)
    dK, dk = new.K - old.K, new.k - old.k
    P = old.precision
    m = (dK @ mx[..., None])[..., 0] + dk  # [..., T, U]
    mean_term = (m[..., None, :] @ P @ m[..., :, None])[..., 0, 0]
    spread_term = (dK * (P @ dK @ sx)).sum(dim=(-1, -2))
    trace = (P * new.covariance).sum(dim=(-1, -2))
    logdet_old = 2 * torch.log(torch.diagonal(old.chol, dim1=-2, dim2=-1)).sum(-1)
    logdet_new = 2 * torch.log(torch.diagonal(new.chol, dim1=-2, dim2=-1)).sum(-1)
    kl = 0.5 * (trace - nu + logdet_old - logdet_new + mean_term + spread_term)
    kl = kl.clamp_min(0.0)
    return kl if per_step else kl.sum(dim=-1)


def _expected(quad: QuadraticCost, dyn: TVLGDynamics, traj: TrajectoryDistribution) -> torch.Tensor:
    """``E[cost]`` ``[...]`` of a quadratic cost under the marginals (exact for Gaussians)."""
    mu, sigma = traj
    C, c = quad.C, quad.c
    stage = (
        0.5 * (C * sigma).sum(dim=(-1, -2))
        + 0.5 * (mu[..., None, :] @ C @ mu[..., :, None])[..., 0, 0]
        + (c * mu).sum(-1)
        + quad.c0
    )
    mf, sf = final_state(dyn, traj)
    Cf = quad.C_final
    final = (
        0.5 * (Cf * sf).sum(dim=(-1, -2))
        + 0.5 * (mf[..., None, :] @ Cf @ mf[..., :, None])[..., 0, 0]
        + (quad.c_final * mf).sum(-1)
        + quad.c0_final
    )
    return stage.sum(dim=-1) + final


def _as_quadratic(
    cost: QuadraticCost | StageCost, dyn: TVLGDynamics, traj: TrajectoryDistribution
) -> QuadraticCost:
    """``cost`` itself, or a :class:`StageCost` expanded at the mean of ``traj``."""
    if isinstance(cost, QuadraticCost):
        nx, nz = dyn.x_dim, dyn.x_dim + dyn.u_dim
        h = dyn.horizon
        for name, t, tail in (
            ("C", cost.C, (h, nz, nz)),
            ("c", cost.c, (h, nz)),
            ("c0", cost.c0, (h,)),
            ("C_final", cost.C_final, (nx, nx)),
            ("c_final", cost.c_final, (nx,)),
        ):
            if tuple(t.shape[t.ndim - len(tail) :]) != tail or t.ndim < len(tail):
                want = ", ".join(str(v) for v in tail)
                raise ShapeError(
                    f"QuadraticCost.{name}: expected [..., {want}], got {list(t.shape)}"
                )
            if not bool(torch.isfinite(t).all()):
                raise ValueError(f"QuadraticCost.{name} holds NaN/inf")
        return cost
    if not isinstance(cost, StageCost):
        raise TypeError(
            f"cost must be a QuadraticCost or a StageCost (cost, expansion, terminal_cost, "
            f"terminal_expansion); got {type(cost).__name__}"
        )
    return quadratic_cost(cost, *_mean_trajectory(dyn, traj))


def expected_cost(
    dyn: TVLGDynamics,
    ctrl: LinearGaussianController,
    cost: QuadraticCost | StageCost,
    x0_mean: torch.Tensor,
    x0_cov: torch.Tensor,
) -> torch.Tensor:
    """Expected total cost ``[...]`` of ``ctrl`` under ``dyn`` from ``x_0 ~ N(x0_mean, x0_cov)``:
    exact for a :class:`QuadraticCost` (``E[z'Cz/2 + c'z + c0] = (tr(C S) + mu'C mu)/2 + c'mu +
    c0`` per step, plus the terminal term), the Laplace approximation for a
    :class:`~mbrl.planners.base.StageCost` (expanded at the trajectory mean; cbfinn/gps
    ``TrajOptLQRPython.estimate_cost``)."""
    traj = trajectory_distribution(dyn, ctrl, x0_mean, x0_cov)
    return _expected(_as_quadratic(cost, dyn, traj), dyn, traj)


# ---------------------------------------------------------------------------- backward pass


class _RecordingGain:
    """The :data:`~mbrl.planners.lqr.GainFn` of LQR-FLM: ``[K, k] = -Q_uu^-1 [Q_ux, q_u]`` by
    Cholesky, recording the batch entries whose ``Q_uu`` is not positive definite (``failed``)
    instead of raising, with an identity factor in their place; raises
    :class:`~mbrl.planners.lqr.IndefiniteError` only once every entry has failed. Keeps the
    Cholesky factors ``chol [..., T, U, U]`` of the ``Q_uu``."""

    def __init__(self, batch: tuple[int, ...], horizon: int, nu: int, device: torch.device) -> None:
        self.failed = torch.zeros(batch, dtype=torch.bool, device=device)
        self.chol = torch.zeros(*batch, horizon, nu, nu, dtype=_F64, device=device)
        self.step = -1  # the first step (in backward order) with a failure

    def __call__(self, t: int, Quu: Any, Qux: Any, qu: Any) -> tuple[Any, Any]:
        numpy = isinstance(Quu, np.ndarray)
        if numpy:
            Quu, Qux, qu = (torch.from_numpy(np.ascontiguousarray(a)) for a in (Quu, Qux, qu))
        Quu = 0.5 * (Quu + Quu.mT)
        L, info = torch.linalg.cholesky_ex(Quu)
        bad = info != 0
        if bool(bad.any()):
            if self.step < 0:
                self.step = t
            self.failed |= bad
            if bool(self.failed.all()):
                raise IndefiniteError(t)
            eye = torch.eye(L.shape[-1], dtype=L.dtype, device=L.device).expand_as(L)
            L = torch.where(bad[..., None, None], eye, L)
        self.chol[..., t, :, :] = L
        gains = -torch.cholesky_solve(torch.cat([Qux, qu[..., None]], dim=-1), L)
        K, k = gains[..., :-1], gains[..., -1]
        return (K.numpy(), k.numpy()) if numpy else (K, k)


def _kl_quadratic(ctrl: LinearGaussianController) -> tuple[torch.Tensor, torch.Tensor]:
    """``-log ctrl(u | x)`` up to a constant as a quadratic in ``z = [x; u]``:
    ``[[K'PK, -K'P], [-PK, P]]`` ``[..., T, Z, Z]`` and ``[K'Pk; -Pk]`` ``[..., T, Z]`` with
    ``P = S^-1`` (the KL terms of the augmented cost)."""
    P, K, k = ctrl.precision, ctrl.K, ctrl.k
    PK = P @ K  # [..., T, U, X]
    Pk = (P @ k[..., None])[..., 0]  # [..., T, U]
    kl_C = torch.cat([torch.cat([K.mT @ PK, -PK.mT], -1), torch.cat([-PK, P], -1)], -2)
    kl_c = torch.cat([(K.mT @ Pk[..., None])[..., 0], -Pk], -1)
    return kl_C, kl_c


def _backward(
    dyn: TVLGDynamics,
    cost: QuadraticCost,
    prev: LinearGaussianController | None,
    eta: torch.Tensor | None,
    policy: LinearGaussianController | None = None,
    weight: torch.Tensor | None = None,
) -> tuple[LinearGaussianController | None, torch.Tensor, int]:
    """One LQR-FLM backward pass at dual variable ``eta [...]`` (``None``: the cost alone, no KL
    term; then ``prev`` is unused).

    The cost is augmented to ``C / eta + [[K'PK, -K'P], [-PK, P]]``, ``c / eta + [K'Pk; -Pk]``
    (terminal ``C_final / eta``, ``c_final / eta``) with ``K, k, P = S^-1`` of ``prev``
    (cbfinn/gps ``AlgorithmTrajOpt.compute_costs``; Levine & Abbeel 2014, Sec. 3), and solved by
    :func:`~mbrl.planners.lqr.riccati_backward`; the new controller has the gains and
    covariance ``Q_uu^-1`` per step.

    With a ``policy`` (the global policy's linearization, BADMM GPS) and its weights
    ``weight [..., T] >= 0`` the objective gains ``sum_t weight_t KL_t(p || policy)``: the cost
    becomes ``C / eta + KL(prev) + (weight / eta) KL(policy)`` (the same augmentation built from
    the policy's ``K, k, S^-1``) and the covariance ``(1 + weight / eta) Q_uu^-1``, the
    maximum-entropy solution at temperature ``eta + weight_t`` (Levine et al. 2016, sec. 4.1;
    cbfinn/gps ``AlgorithmBADMM.compute_costs`` divides each step by ``eta + weight_t``
    instead, which equals this only for weights constant in time). Weight 0 gives the plain
    pass, number for number.

    Returns:
        ``(controller, failed [...], step)``: entries of ``failed`` had a non-positive-definite
        ``Q_uu`` (their controller entries are placeholders: ``K = 0``, ``k = 0``, identity
        covariance); ``controller`` is ``None`` when every entry failed; ``step`` is the
        latest step of a failure (``-1`` for none).
    """
    nx, nu = dyn.x_dim, dyn.u_dim
    nz, h = nx + nu, dyn.horizon
    C, c, Cf, cf = cost.C, cost.c, cost.C_final, cost.c_final
    scale = None
    if eta is not None:
        e = eta.to(_F64)
        kl_C, kl_c = _kl_quadratic(prev)
        C = C / e[..., None, None, None] + kl_C
        c = c / e[..., None, None] + kl_c
        Cf = Cf / e[..., None, None]
        cf = cf / e[..., None]
        if policy is not None:
            r = weight.to(_F64) / e[..., None]  # [..., T]
            pol_C, pol_c = _kl_quadratic(policy)
            C = C + r[..., None, None] * pol_C
            c = c + r[..., None] * pol_c
            scale = 1 + r
    batch = tuple(torch.broadcast_shapes(dyn.batch_shape, C.shape[:-3], Cf.shape[:-2]))
    opts = {"dtype": _F64, "device": dyn.F.device}
    Fh = torch.zeros(*batch, h, nx + 1, nz + 1, **opts)  # [[F, f], [0, 1]]
    Fh[..., :nx, :nz], Fh[..., :nx, nz], Fh[..., nx, nz] = dyn.F, dyn.f, 1.0
    Ch = torch.zeros(*batch, h, nz + 1, nz + 1, **opts)  # [[C, c], [c', 0]]
    Ch[..., :nz, :nz], Ch[..., :nz, nz], Ch[..., nz, :nz] = C, c, c
    Vh = torch.zeros(*batch, nx + 1, nx + 1, **opts)  # [[C_f, c_f], [c_f', 0]]
    Vh[..., :nx, :nx], Vh[..., :nx, nx], Vh[..., nx, :nx] = Cf, cf, cf
    gain = _RecordingGain(batch, h, nu, dyn.F.device)
    try:
        sol = riccati_backward(Fh, Ch, Vh, gain=gain)
    except IndefiniteError:
        return None, gain.failed, gain.step
    ok = ~gain.failed[..., None, None]
    K = torch.where(ok[..., None], sol.K, 0.0)
    k = torch.where(ok, sol.k, 0.0)
    cov = torch.cholesky_inverse(gain.chol)
    if scale is not None:
        cov = scale[..., None, None] * cov
    eye = torch.eye(nu, **opts)
    cov = torch.where(ok[..., None], cov, eye)
    return LinearGaussianController(K, k, cov), gain.failed, gain.step


# ---------------------------------------------------------------------------- the step


@dataclass(frozen=True, eq=False)
class LQRFLMResult:
    """What one :meth:`LQRFLM.update` returns; tensors carry the leading axes ``[...]``.

    ``status``: ``"ok"`` when every condition met its KL target within the tolerance;
    ``"kl_not_met"`` when some target cannot be met (it needs a dual variable outside
    ``[min_eta, max_eta]``, or one below where ``Q_uu`` stops being positive definite);
    ``"max_evaluations"`` when the search ran out of evaluations first. A condition that missed
    gets the controller whose KL came closest to its target.
    """

    controller: LinearGaussianController
    eta: torch.Tensor  # [...] the dual variable of each condition's controller
    kl: torch.Tensor  # [...] mean KL per step to the previous controller
    kl_target: torch.Tensor  # [...]
    met: torch.Tensor  # [...] bool: |kl - kl_target| <= kl_tolerance * kl_target
    evaluations: int  # backward/forward passes of the dual search (the most of any condition)
    indefinite_fixes: int  # backward passes redone with a larger eta (summed over conditions)
    status: str
    expected_cost: torch.Tensor  # [...] of the new controller under the model and cost
    previous_cost: torch.Tensor  # [...] of the previous controller under the same


def _pick(
    mask: torch.Tensor, a: LinearGaussianController, b: LinearGaussianController
) -> LinearGaussianController:
    """Entries of ``a`` where ``mask [...]``, else of ``b``."""
    m = mask[..., None, None]
    return LinearGaussianController(
        torch.where(m[..., None], a.K, b.K),
        torch.where(m, a.k, b.k),
        torch.where(m[..., None], a.covariance, b.covariance),
    )


class LQRFLM:
    """The KL-constrained LQR step of LQR-FLM (Levine & Abbeel 2014, Sec. 3) with the dual
    search of cbfinn/gps ``TrajOptLQRPython.update`` (the version with ``min_eta``/``max_eta``
    brackets).

    Dual search, per condition (all conditions batched): start from ``eta`` (the previous
    iteration's, 1.0 by default), bracket ``[min_eta, max_eta]``; after each evaluation (a
    backward pass, the forward pass, the mean KL per step) with constraint violation
    ``con = kl - target``::

        con < 0 (eta too large):  hi = eta, eta = max(sqrt(lo hi), 0.1 hi)
        con > 0 (eta too small):  lo = eta, eta = min(sqrt(lo hi), 10 lo)

    that is, steps of a factor 10 while the bracket is wide and bisection in log space once it
    is narrow. Stops when ``|con| <= kl_tolerance * target`` (cbfinn/gps: 10%), after
    ``max_evaluations`` (cbfinn/gps ``DGD_MAX_ITER = 50``), or when the bracket has closed
    (``hi <= lo (1 + 1e-4)``: the target is out of reach).

    A backward pass whose ``Q_uu`` is not positive definite at some step is redone at
    ``eta0 + delta`` with ``delta = eta_increase, 2 eta_increase, ...`` until it is (cbfinn/gps
    ``del0 = 1e-4``); each redo counts in ``indefinite_fixes`` and the largest failing ``eta``
    becomes the bracket's lower end.

    Args:
        kl_step: base KL step ``epsilon`` (mean KL per step), multiplied by ``step_mult`` in
            :meth:`update` (cbfinn/gps' MDGPS example: 1.0; its library default 0.2).
        min_eta, max_eta: the dual bracket (cbfinn/gps: 1e-8, 1e16).
        max_evaluations: evaluations per update (cbfinn/gps: 50).
        kl_tolerance: relative tolerance on the KL target (cbfinn/gps: 0.1).
        eta_increase: the first increment of ``eta`` on an indefinite ``Q_uu`` (cbfinn/gps: 1e-4).
    """

    def __init__(
        self,
        kl_step: float = 1.0,
        min_eta: float = 1e-8,
        max_eta: float = 1e16,
        max_evaluations: int = 50,
        kl_tolerance: float = 0.1,
        eta_increase: float = 1e-4,
    ) -> None:
        for name, value in (
            ("kl_step", kl_step),
            ("min_eta", min_eta),
            ("eta_increase", eta_increase),
        ):
            if not (_is_float(value) and value > 0):
                raise ValueError(f"LQRFLM: {name} must be a finite float > 0, got {value!r}")
        if not (_is_float(max_eta) and max_eta > min_eta):
            raise ValueError(f"LQRFLM: max_eta must be a finite float > min_eta, got {max_eta!r}")
        if (
            isinstance(max_evaluations, bool)
            or not isinstance(max_evaluations, int)
            or max_evaluations < 1
        ):
            raise ValueError(
                f"LQRFLM: max_evaluations must be an int >= 1, got {max_evaluations!r}"
            )
        if not (_is_float(kl_tolerance) and 0 < kl_tolerance < 1):
            raise ValueError(f"LQRFLM: kl_tolerance must be in (0, 1), got {kl_tolerance!r}")
        self.kl_step = float(kl_step)
        self.min_eta = float(min_eta)
        self.max_eta = float(max_eta)
        self.max_evaluations = max_evaluations
        self.kl_tolerance = float(kl_tolerance)
        self.eta_increase = float(eta_increase)

    def update(
        self,
        dyn: TVLGDynamics,
        cost: QuadraticCost | StageCost,
        prev: LinearGaussianController,
        x0_mean: torch.Tensor,
        x0_cov: torch.Tensor,
        kl_target: float | torch.Tensor | None = None,
        step_mult: float | torch.Tensor = 1.0,
        eta: float | torch.Tensor = 1.0,
        policy: LinearGaussianController | None = None,
        policy_weight: float | torch.Tensor | None = None,
    ) -> LQRFLMResult:
        """One LQR-FLM step from ``prev`` on the fitted ``dyn``; with a ``policy``, the BADMM
        C-step ``min E[cost] + sum_t policy_weight_t KL_t(p || policy)`` under the same bound on
        the KL to ``prev`` (Levine et al. 2016, sec. 4.1; :func:`_backward`).

        Args:
            dyn: the fitted model, ``[...]`` conditions.
            cost: a :class:`QuadraticCost`, or a :class:`~mbrl.planners.base.StageCost`
                expanded at the mean of ``prev``'s trajectory distribution under ``dyn``
                (:func:`quadratic_cost` at sample trajectories is the cbfinn/gps choice; pass
                its result).
            prev: the controller to stay close to (the previous local controller, or the global
                policy's linearization in MDGPS), ``[...]``.
            x0_mean, x0_cov: ``[..., X]``, ``[..., X, X]`` initial-state Gaussian.
            kl_target: mean KL per step to reach (``[...]`` or a float); ``None`` for
                ``kl_step * step_mult``.
            step_mult: the adaptive multiplier (:func:`adapt_step`), float or ``[...]``.
            eta: where the dual search starts (the previous result's ``eta``), float or
                ``[...]``.
            policy: a second controller ``[...]`` to be near (the global policy's
                linearization in BADMM GPS), penalised by its KL rather than bounded; ``None``
                for none.
            policy_weight: its weights ``nu_t >= 0``, a float or ``[..., T]`` (required
                with ``policy``). ``expected_cost`` and ``previous_cost`` stay those of
                ``cost`` alone.

        Returns:
            :class:`LQRFLMResult`.

        Raises:
            ShapeError, ValueError: mismatched shapes, NaN/inf inputs, a non-positive target.
            RuntimeError: ``Q_uu`` stays indefinite up to ``max_eta`` (ill-conditioned inputs).
        """
        _check_pair(dyn, prev, "LQRFLM.update")
        for name, t in (("F", dyn.F), ("f", dyn.f), ("Sigma", dyn.Sigma)):
            if not bool(torch.isfinite(t).all()):
                raise ValueError(f"LQRFLM.update: dyn.{name} holds NaN/inf; refit the dynamics")
        x0_mean, x0_cov = torch.as_tensor(x0_mean).to(_F64), torch.as_tensor(x0_cov).to(_F64)
        if not (bool(torch.isfinite(x0_mean).all()) and bool(torch.isfinite(x0_cov).all())):
            raise ValueError("LQRFLM.update: x0_mean or x0_cov holds NaN/inf")
        weight = None
        if policy is not None:
            _check_pair(dyn, policy, "LQRFLM.update (policy)")
            if policy_weight is None:
                raise ValueError("LQRFLM.update: a policy needs its policy_weight [..., T]")
            weight = torch.as_tensor(policy_weight, dtype=_F64, device=dyn.F.device)
            if weight.ndim == 0:
                weight = weight.expand(dyn.horizon)
            if weight.shape[-1] != dyn.horizon:
                raise ShapeError(
                    f"LQRFLM.update: policy_weight expected [..., T={dyn.horizon}], got "
                    f"{list(weight.shape)}"
                )
            if not bool((torch.isfinite(weight) & (weight >= 0)).all()):
                raise ValueError(
                    f"LQRFLM.update: policy_weight must be finite and >= 0, got {weight}"
                )
        elif policy_weight is not None:
            raise ValueError("LQRFLM.update: policy_weight given without a policy")
        prev_traj = trajectory_distribution(dyn, prev, x0_mean, x0_cov)
        quad = _as_quadratic(cost, dyn, prev_traj)
        batch = tuple(
            torch.broadcast_shapes(
                dyn.batch_shape,
                prev.batch_shape,
                quad.C.shape[:-3],
                x0_mean.shape[:-1],
                x0_cov.shape[:-2],
            )
        )
        opts = {"dtype": _F64, "device": dyn.F.device}
        if kl_target is None:
            target = self.kl_step * torch.as_tensor(step_mult, **opts)
        else:
            target = torch.as_tensor(kl_target, **opts)
        target = target.expand(batch).clone()
        if not bool((torch.isfinite(target) & (target > 0)).all()):
            raise ValueError(f"LQRFLM.update: the KL target must be finite and > 0, got {target}")
        eta_t = torch.as_tensor(eta, **opts).expand(batch).clone()
        if not bool(torch.isfinite(eta_t).all()):
            raise ValueError(f"LQRFLM.update: eta must be finite, got {eta_t}")
        eta_t = eta_t.clamp(self.min_eta, self.max_eta)
        lo = torch.full(batch, self.min_eta, **opts)
        hi = torch.full(batch, self.max_eta, **opts)
        active = torch.ones(batch, dtype=torch.bool, device=dyn.F.device)
        met = torch.zeros_like(active)
        closed = torch.zeros_like(active)
        best: LinearGaussianController | None = None
        best_err = torch.full(batch, math.inf, **opts)
        best_eta, best_kl = eta_t.clone(), torch.full(batch, math.nan, **opts)
        fixes = evaluations = 0
        T = dyn.horizon
        while bool(active.any()) and evaluations < self.max_evaluations:
            evaluations += 1
            ctrl, eta_t, n_fixes, infeasible = self._feasible_backward(
                dyn, quad, prev, eta_t, policy, weight
            )
            fixes += n_fixes
            lo = torch.where(active, torch.maximum(lo, infeasible), lo)
            traj = trajectory_distribution(dyn, ctrl, x0_mean, x0_cov)
            kl = kl_divergence(ctrl, prev, *traj) / T
            con = kl - target
            err = con.abs()
            take = active & (err < best_err)
            best = ctrl if best is None else _pick(take, ctrl, best)
            best_err = torch.where(take, err, best_err)
            best_eta = torch.where(take, eta_t, best_eta)
            best_kl = torch.where(take, kl, best_kl)
            done = active & (err <= self.kl_tolerance * target)
            met |= done
            active &= ~done
            too_small = con > 0  # KL too large: eta must grow
            lo = torch.where(active & too_small, eta_t, lo)
            hi = torch.where(active & ~too_small, eta_t, hi)
            shut = active & (hi <= lo * (1 + 1e-4))
            closed |= shut
            active &= ~shut
            geo = torch.sqrt(lo * hi)
            proposal = torch.where(
                too_small, torch.minimum(geo, 10 * lo), torch.maximum(geo, 0.1 * hi)
            )
            eta_t = torch.where(active, proposal, eta_t)
        status = (
            "ok" if bool(met.all()) else ("kl_not_met" if bool(closed.any()) else "max_evaluations")
        )
        best_traj = trajectory_distribution(dyn, best, x0_mean, x0_cov)
        return LQRFLMResult(
            controller=best,
            eta=best_eta,
            kl=best_kl,
            kl_target=target,
            met=met,
            evaluations=evaluations,
            indefinite_fixes=fixes,
            status=status,
            expected_cost=_expected(quad, dyn, best_traj),
            previous_cost=_expected(quad, dyn, prev_traj),
        )

    def _feasible_backward(
        self,
        dyn: TVLGDynamics,
        quad: QuadraticCost,
        prev: LinearGaussianController,
        eta: torch.Tensor,
        policy: LinearGaussianController | None = None,
        weight: torch.Tensor | None = None,
    ) -> tuple[LinearGaussianController, torch.Tensor, int, torch.Tensor]:
        """:func:`_backward` at ``eta [...]``, redone at ``eta0 + delta`` (``delta`` doubling from
        ``eta_increase``) for the entries whose ``Q_uu`` is indefinite. Returns the controller,
        the ``eta`` used, the number of redone entries and the largest failing ``eta`` per entry
        (0 where none failed)."""
        eta0 = eta
        delta = torch.full_like(eta, self.eta_increase)
        infeasible = torch.zeros_like(eta)
        fixes = 0
        while True:
            ctrl, failed, step = _backward(dyn, quad, prev, eta, policy, weight)
            if not bool(failed.any()):
                return ctrl, eta, fixes, infeasible
            fixes += int(failed.sum())
            infeasible = torch.where(failed, torch.maximum(infeasible, eta), infeasible)
            eta = torch.where(failed, eta0 + delta, eta)
            delta = torch.where(failed, 2 * delta, delta)
            if bool((failed & (eta > self.max_eta)).any()):
                raise RuntimeError(
                    f"LQR-FLM: Q_uu is not positive definite at step {step} even at eta = "
                    f"{self.max_eta:g}; check that the dynamics, the cost and the previous "
                    "controller are finite and reasonably conditioned"
                )


def _is_float(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


# ---------------------------------------------------------------------------- step size


def adapt_step(
    step_mult: float | torch.Tensor,
    previous_cost: float | torch.Tensor,
    predicted_cost: float | torch.Tensor,
    actual_cost: float | torch.Tensor,
    min_mult: float = 0.1,
    max_mult: float = 5.0,
    min_step_mult: float = 0.01,
    max_step_mult: float = 10.0,
) -> float | torch.Tensor:
    """The new KL step multiplier from predicted against actual improvement (cbfinn/gps
    ``Algorithm._set_new_mult``, called by ``AlgorithmTrajOpt._stepadjust``)::

        predicted = previous_cost - predicted_cost,   actual = previous_cost - actual_cost
        mult = clip(predicted / (2 max(1e-4, predicted - actual)), min_mult, max_mult)
        new = clip(mult * step_mult, min_step_mult, max_step_mult)

    (the improvement modelled as ``predicted/KL * KL + (actual - predicted)/KL^2 * KL^2`` and
    maximised over the KL). In LQR-FLM terms: ``previous_cost`` and ``predicted_cost`` are the
    previous iteration's :attr:`LQRFLMResult.previous_cost` and ``expected_cost`` (old and new
    controller under the old model), ``actual_cost`` the new controller's
    :func:`expected_cost` under the model and cost refitted to its own samples. Defaults are
    cbfinn/gps' (``min_mult`` 0.1, ``max_mult`` 5.0, ``min_step_mult`` 0.01,
    ``max_step_mult`` 10.0). Floats in, float out; tensors (``[M]`` conditions) in, tensor out.
    """
    args = (step_mult, previous_cost, predicted_cost, actual_cost)
    as_float = not any(torch.is_tensor(a) for a in args)
    s, prev, pred, act = (torch.as_tensor(a, dtype=_F64) for a in args)
    predicted = prev - pred
    actual = prev - act
    mult = predicted / (2 * torch.clamp_min(predicted - actual, 1e-4))
    new = (mult.clamp(min_mult, max_mult) * s).clamp(min_step_mult, max_step_mult)
    if not bool(torch.isfinite(new).all()):
        raise ValueError(f"adapt_step: non-finite inputs {args}")
    return float(new) if as_float else new
