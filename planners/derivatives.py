"""First- and second-order expansions of dynamics and costs along a trajectory, for LQR/iLQR.

All functions work on a whole trajectory at once: rows ``[B, ...]`` are independent (for iLQR
``B = H``, one row per time step), so each expansion is one batched call, never a Python loop
over rows.

Dynamics Jacobians (:func:`dynamics_jacobians`) dispatch on the model:

1. a model method ``linearize(x [B, X], u [B, U]) -> (A [B, X, X], B [B, X, U])`` when it has one
   (a MuJoCo model with finite differences, an analytic model with closed-form Jacobians);
2. otherwise reverse-mode autograd of ``model.mean_dynamics`` on ``X`` stacked copies of the
   rows, one backward pass for all ``B`` Jacobians (see :func:`autograd_jacobian`).

Costs are ``l(x, u) = -reward_fn(x, u, f(x, u))`` (``f`` the mean dynamics), or the reward's
``stage_cost(x, u)`` when the reward function carries one (analytic systems: no dynamics call
needed). Their expansions come, in this order, from the reward function's own
``cost_expansion(x, u) -> (cost [B], grad [B, Z], hess [B, Z, Z])`` (analytic systems: casadi
AD), from closed-form matrices when it carries ``quadratic`` (``Q, R, Qf, goal``), from
autograd of ``stage_cost``, or from autograd of the reward in ``(x, u, next_obs)`` chained
through the dynamics Jacobians (see :func:`stage_cost_expansion`). The terminal cost likewise
(``terminal_reward_fn.cost_expansion(x)``, else autograd). Gradients
and Hessians come from double back-propagation on stacked copies of the rows (see
:func:`autograd_cost_expansion`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

CostFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
"""``(x [B, X], u [B, U]) -> cost [B]``."""

TerminalCostFn = Callable[[torch.Tensor], torch.Tensor]
"""``x [B, X] -> cost [B]``."""


@dataclass(frozen=True)
class CostExpansion:
    """Second-order expansion of a cost at rows ``z = [x, u]`` (``Z = X + U``; ``Z = X`` for a
    terminal cost): ``l(z + d) ~ cost + grad' d + d' hess d / 2``."""

    cost: torch.Tensor  # [B]
    grad: torch.Tensor  # [B, Z]
    hess: torch.Tensor  # [B, Z, Z]


def autograd_jacobian(fn: Callable[[torch.Tensor], torch.Tensor], z: torch.Tensor) -> torch.Tensor:
    """Row-wise Jacobians ``[B, Y, Z]`` of a row-independent ``fn: [B, Z] -> [B, Y]`` at ``z``.

    One forward pass on ``Y`` stacked copies of the rows and one backward pass: copy ``i``
    back-propagates output ``i`` only, so its input gradient is row ``i`` of every Jacobian.
    """
    b = z.shape[0]
    with torch.inference_mode(False), torch.enable_grad():
        zr = z.detach().clone().repeat(_out_dim(fn, z), 1).requires_grad_(True)  # [Y * B, Z]
        y = fn(zr)  # [Y * B, Y]
        ny = y.shape[-1]
        picked = y.view(ny, b, ny).diagonal(dim1=0, dim2=2)  # [B, Y]: copy i, output i
        (g,) = torch.autograd.grad(picked.sum(), zr)
    return g.view(ny, b, -1).transpose(0, 1)  # [B, Y, Z]


def _out_dim(fn: Callable[[torch.Tensor], torch.Tensor], z: torch.Tensor) -> int:
    with torch.no_grad():
        return fn(z[:1]).shape[-1]


def autograd_cost_expansion(
    fn: Callable[[torch.Tensor], torch.Tensor], z: torch.Tensor
) -> CostExpansion:
    """Value, gradient and Hessian of a row-independent cost ``fn: [B, Z] -> [B]`` at ``z``.

    One forward pass on ``Z`` stacked copies of the rows, a backward pass for the gradient
    (rows are independent, so the gradient of the summed cost is the per-row gradient) and a
    second backward pass of copy ``i``'s gradient entry ``i``: row ``i`` of every Hessian.
    """
    b, nz = z.shape
    with torch.inference_mode(False), torch.enable_grad():
        zr = z.detach().clone().repeat(nz, 1).requires_grad_(True)  # [Z * B, Z]
        value = fn(zr)  # [Z * B]
        (g,) = torch.autograd.grad(value.sum(), zr, create_graph=True)  # [Z * B, Z]
        picked = g.view(nz, b, nz).diagonal(dim1=0, dim2=2)  # [B, Z]
        (h,) = torch.autograd.grad(picked.sum(), zr)  # [Z * B, Z]
    hess = h.view(nz, b, nz).transpose(0, 1)  # [B, Z, Z]
    return CostExpansion(cost=value[:b].detach(), grad=g[:b].detach(), hess=0.5 * (hess + hess.mT))


def finite_difference_jacobians(
    step_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    u: torch.Tensor,
    eps: float = 1e-6,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Central-difference Jacobians of ``step_fn(x [B, X], u [B, U]) -> [B, X]``.

    One call of ``step_fn`` on ``2 (X + U) B`` perturbed rows. Returns ``A [B, X, X]``,
    ``B [B, X, U]``. For models without autograd (MuJoCo) and for tests.
    """
    b, nx = x.shape
    nz = nx + u.shape[-1]
    z = torch.cat([x, u], dim=-1)  # [B, Z]
    d = eps * torch.eye(nz, dtype=z.dtype, device=z.device)  # [Z, Z]
    zp = (z.unsqueeze(0) + d.unsqueeze(1)).reshape(nz * b, nz)  # [Z * B, Z]
    zm = (z.unsqueeze(0) - d.unsqueeze(1)).reshape(nz * b, nz)  # [Z * B, Z]
    zz = torch.cat([zp, zm], dim=0)  # [2 Z B, Z]
    out = step_fn(zz[:, :nx], zz[:, nx:]).reshape(2, nz, b, nx)
    jac = ((out[0] - out[1]) / (2 * eps)).permute(1, 2, 0)  # [B, X, Z]
    return jac[..., :nx], jac[..., nx:]


def dynamics_jacobians(
    model: Any, x: torch.Tensor, u: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """``A = df/dx [B, X, X]`` and ``B = df/du [B, X, U]`` of the model's mean dynamics at rows
    ``x [B, X]``, ``u [B, U]`` (see the module docstring for the dispatch).

    Raises:
        TypeError: if the model has neither ``linearize`` nor ``mean_dynamics``.
    """
    linearize = getattr(model, "linearize", None)
    if linearize is not None:
        return linearize(x, u)
    f = _mean_dynamics(model)
    nx = x.shape[-1]
    jac = autograd_jacobian(lambda z: f(z[:, :nx], z[:, nx:]), torch.cat([x, u], dim=-1))
    return jac[..., :nx], jac[..., nx:]


def _mean_dynamics(model: Any) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    f = getattr(model, "mean_dynamics", None)
    if f is None:
        raise TypeError(
            f"{type(model).__name__} has no mean_dynamics(x, u) or linearize(x, u); gradient "
            "planners (LQR, iLQR) need a differentiable model (KnownModel, an ensemble's mean)"
        )
    return f


def stage_cost_fn(problem: Any) -> CostFn:
    """The stage cost ``l(x, u) = -reward`` of a planning problem.

    Uses ``problem.reward_fn.stage_cost`` when the reward function offers one (its reward does
    not depend on the next observation); else ``-reward_fn(x, u, f(x, u))`` with ``f`` the
    model's mean dynamics.

    Raises:
        ValueError: if the model learns the reward (there is no reward function to
            differentiate).
    """
    if getattr(problem.model, "learns_reward", False):
        raise ValueError(
            "the model learns the reward; gradient planners need the problem's reward_fn: "
            "build the PlanningProblem with a model whose learns_reward is False"
        )
    reward_fn = problem.reward_fn
    stage = getattr(reward_fn, "stage_cost", None)
    if stage is not None:
        return stage
    f = _mean_dynamics(problem.model)
    return lambda x, u: -reward_fn(x, u, f(x, u))


def terminal_cost_fn(problem: Any) -> TerminalCostFn | None:
    """``-problem.terminal_reward_fn``, or ``None`` when the problem has no terminal reward."""
    terminal = getattr(problem, "terminal_reward_fn", None)
    if terminal is None:
        return None
    return lambda x: -terminal(x)


def stage_cost_expansion(
    problem: Any,
    x: torch.Tensor,
    u: torch.Tensor,
    next_x: torch.Tensor | None = None,
    jacobians: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> CostExpansion:
    """Expansion of the stage cost at rows ``x [B, X]``, ``u [B, U]`` (``Z = X + U``).

    Rewards with ``cost_expansion``, ``quadratic`` or ``stage_cost`` (no ``next_obs``) are
    expanded directly. A general ``reward_fn(x, u, y)`` is expanded in all its arguments at
    ``y = next_x [B, X]`` (the model's mean next states; computed when ``None``) and chained
    through the dynamics Jacobians ``jacobians = (A [B, X, X], B [B, X, U])`` (computed when
    ``None``) with ``J = [A, B]``: gradient ``g_z + J' g_y`` (exact), Hessian
    ``H_zz + J' H_yz + H_zy J + J' H_yy J`` (Gauss-Newton: no second derivatives of the
    dynamics, as in iLQR). This needs no autograd through the model, so it also serves models
    with ``linearize`` only (MuJoCo).
    """
    reward_fn = problem.reward_fn
    expand = getattr(reward_fn, "cost_expansion", None)
    if expand is not None:
        return CostExpansion(*expand(x, u))
    quad = getattr(reward_fn, "quadratic", None)
    if quad is not None:
        return _quadratic_expansion(quad.Q, quad.R, quad.goal, x, u)
    nx, nz = x.shape[-1], x.shape[-1] + u.shape[-1]
    if getattr(reward_fn, "stage_cost", None) is not None:
        cost = stage_cost_fn(problem)
        return autograd_cost_expansion(lambda z: cost(z[:, :nx], z[:, nx:]), torch.cat([x, u], -1))
    stage_cost_fn(problem)  # raises for models that learn the reward
    if next_x is None:
        with torch.no_grad():
            next_x = _mean_dynamics(problem.model)(x, u)
    if jacobians is None:
        jacobians = dynamics_jacobians(problem.model, x, u)
    full = autograd_cost_expansion(
        lambda w: -reward_fn(w[:, :nx], w[:, nx:nz], w[:, nz:]), torch.cat([x, u, next_x], -1)
    )  # derivatives in [x, u, y]
    J = torch.cat([jacobians[0], jacobians[1]], dim=-1).to(full.hess.dtype)  # [B, X, Z]
    g_z, g_y = full.grad[:, :nz], full.grad[:, nz:]
    h_zz, h_zy, h_yy = full.hess[:, :nz, :nz], full.hess[:, :nz, nz:], full.hess[:, nz:, nz:]
    cross = h_zy @ J  # [B, Z, Z]
    hess = h_zz + cross + cross.mT + J.mT @ h_yy @ J
    grad = g_z + (J.mT @ g_y.unsqueeze(-1)).squeeze(-1)
    return CostExpansion(cost=full.cost, grad=grad, hess=hess)


def terminal_cost_expansion(problem: Any, x: torch.Tensor) -> CostExpansion | None:
    """Expansion of the terminal cost at rows ``x [B, X]`` (``Z = X``); ``None`` without one."""
    cost = terminal_cost_fn(problem)
    if cost is None:
        return None
    expand = getattr(problem.terminal_reward_fn, "cost_expansion", None)
    if expand is not None:
        return CostExpansion(*expand(x))
    quad = getattr(problem.reward_fn, "quadratic", None)
    if quad is not None:
        return _quadratic_expansion(quad.Qf, None, quad.goal, x, None)
    return autograd_cost_expansion(cost, x)


def _quadratic_expansion(
    Q: Any, R: Any | None, goal: Any, x: torch.Tensor, u: torch.Tensor | None
) -> CostExpansion:
    """Closed form for ``(x - g)' Q (x - g) + u' R u`` (``R`` and ``u`` may be ``None``)."""
    q = torch.as_tensor(Q, dtype=x.dtype, device=x.device)  # [X, X]
    dx = x - torch.as_tensor(goal, dtype=x.dtype, device=x.device)  # [B, X]
    cost = ((dx @ q) * dx).sum(-1)  # [B]
    g = 2 * dx @ q  # [B, X]
    h = 2 * q  # [X, X]
    if u is not None:
        r = torch.as_tensor(R, dtype=x.dtype, device=x.device)  # [U, U]
        cost = cost + ((u @ r) * u).sum(-1)
        g = torch.cat([g, 2 * u @ r], dim=-1)  # [B, X + U]
        h = torch.block_diag(h, 2 * r)  # [Z, Z]
    return CostExpansion(cost=cost, grad=g, hess=h.expand(x.shape[0], -1, -1))
