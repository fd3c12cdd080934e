"""First- and second-order expansions of dynamics and costs along a trajectory, for LQR/iLQR.

All functions work on a whole trajectory at once: rows ``[B, ...]`` are independent (for iLQR
``B = H``, one row per time step, with time indices ``t = arange(H)``), so each expansion is one
batched call, never a Python loop over rows.

Dynamics Jacobians (:func:`dynamics_jacobians`) dispatch on the model's declared capability
(``isinstance`` on the runtime-checkable protocols of :mod:`mbrl.dynamics.base`):

1. :class:`~mbrl.dynamics.base.Linearizable`: ``model.linearize(x, u, t)`` (an analytic system
   by casadi AD, MuJoCo by finite differences, a time-varying linear-Gaussian fit indexed by
   ``t``);
2. :class:`~mbrl.dynamics.base.DifferentiableModel`: reverse-mode autograd of
   ``model.mean_dynamics`` on ``X`` stacked copies of the rows, one backward pass for all ``B``
   Jacobians (:func:`autograd_jacobian`);
3. anything else is a ``TypeError`` naming both protocols.

Models are called in their own dtype (:func:`model_dtype`: a float32 ensemble or GP gets
float32 inputs); the solvers convert the expansions to float64.

The cost is a :class:`~mbrl.planners.base.StageCost` (``cost(x, u, t)``, ``expansion(x, u, t)``,
the terminal pair), found by :func:`stage_cost_of`: the problem's ``stage_cost`` when given;
else the stage part from ``reward_fn`` (in closed form when the reward is itself a
``StageCost``, as the analytic systems' rewards are; otherwise ``-reward_fn(x, u, f(x, u))``
with ``f`` the model's mean step, expanded by autograd and chained through the dynamics
Jacobians) and the terminal part from ``value_fn`` (in closed form when it is a
:class:`TerminalCost`; otherwise autograd of ``-value_fn``; zero without one), so that gradient
planners optimise exactly what :meth:`~mbrl.planners.base.PlanningProblem.evaluate` scores.
Gradients and Hessians come from double back-propagation on stacked copies of the rows
(:func:`autograd_cost_expansion`).
"""

from __future__ import annotations

import types
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import torch

from mbrl.dynamics.base import DifferentiableModel, Linearizable, RolloutState

CostFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
"""``(x [B, X], u [B, U]) -> cost [B]``."""

TerminalCostFn = Callable[[torch.Tensor], torch.Tensor]
"""``x [B, X] -> cost [B]``."""

StepFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
"""``(x [B, X], u [B, U]) -> x' [B, X]``, a model's mean one-step dynamics."""


@dataclass(frozen=True)
class CostExpansion:
    """Second-order expansion of a cost at rows ``z = [x, u]`` (``Z = X + U``; ``Z = X`` for a
    terminal cost): ``l(z + d) ~ cost + grad' d + d' hess d / 2``."""

    cost: torch.Tensor  # [B]
    grad: torch.Tensor  # [B, Z]
    hess: torch.Tensor  # [B, Z, Z]


@runtime_checkable
class TerminalCost(Protocol):
    """A terminal cost in closed form: ``terminal_cost(x [B, X]) -> [B]`` and its expansion in
    ``x``. A ``value_fn`` that also is one (an analytic system's ``value_fn()``: minus its
    terminal cost) is expanded without autograd."""

    def terminal_cost(self, x: torch.Tensor) -> torch.Tensor: ...

    def terminal_expansion(self, x: torch.Tensor) -> CostExpansion: ...


@runtime_checkable
class CasadiTerminalCost(Protocol):
    """A terminal cost with a casadi form: ``terminal_cost_casadi(x [X, 1]) -> scalar``."""

    def terminal_cost_casadi(self, x: Any) -> Any: ...


@runtime_checkable
class CasadiStageCost(Protocol):
    """A stage cost with a casadi form, for NMPC: ``cost_casadi(x [X, 1], u [U, 1], t: int)``
    (SX or MX, scalar) and ``terminal_cost_casadi(x [X, 1])``."""

    def cost_casadi(self, x: Any, u: Any, t: int) -> Any: ...

    def terminal_cost_casadi(self, x: Any) -> Any: ...


# ---------------------------------------------------------------------------- autograd


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


# ---------------------------------------------------------------------------- the model


def model_dtype(model: Any, default: torch.dtype) -> torch.dtype:
    """The floating dtype ``model`` computes in: that of its parameters for a
    ``torch.nn.Module`` (the ensemble), else of the first floating tensor or module it holds
    as an attribute (the GP's normalisers); ``default`` for models that follow their inputs'
    dtype (known and analytic dynamics, MuJoCo)."""
    values = [model] if isinstance(model, torch.nn.Module) else list(vars(model).values())
    for value in values:
        if isinstance(value, torch.nn.Module):
            for p in value.parameters():
                if p.is_floating_point():
                    return p.dtype
        elif torch.is_tensor(value) and value.is_floating_point():
            return value.dtype
    return default


def _capability_error(model: Any, needs: str) -> TypeError:
    return TypeError(
        f"{type(model).__name__} is neither Linearizable (linearize(x, u, t)) nor a "
        f"DifferentiableModel (mean_dynamics(x, u), autograd-able); {needs} needs one of the "
        "two (KnownModel, SystemModel, MujocoModel, an ensemble or a GP)"
    )


def mean_step(model: Any) -> StepFn:
    """The model's mean one-step dynamics ``(x [B, X], u [B, U]) -> [B, X]``:
    ``mean_dynamics`` of a :class:`~mbrl.dynamics.base.DifferentiableModel`, else the mean of
    ``predict`` for a :class:`~mbrl.dynamics.base.Linearizable` one (MuJoCo).

    Raises:
        TypeError: the model is neither (the message names both protocols).
    """
    if isinstance(model, DifferentiableModel):
        return model.mean_dynamics
    if isinstance(model, Linearizable):
        return lambda x, u: model.predict(x, u).mean
    raise _capability_error(model, "a gradient planner")


def check_time(t: torch.Tensor | None, rows: int, horizon: int | None) -> None:
    """Check time indices ``t [B]`` (long) of ``rows`` rows against ``horizon`` (``H``; valid
    ``0 <= t < H``; ``None`` skips the range check).

    Raises:
        ValueError: wrong shape or dtype, a negative index, or an index past the horizon.
    """
    if t is None:
        return
    if not torch.is_tensor(t) or t.dtype != torch.long or t.shape != (rows,):
        got = f"{t.dtype} {list(t.shape)}" if torch.is_tensor(t) else type(t).__name__
        raise ValueError(f"time index t: expected a long tensor [{rows}], got {got}")
    if horizon is not None and rows > 0:
        lo, hi = int(t.min()), int(t.max())
        if lo < 0 or hi >= horizon:
            bad = hi if hi >= horizon else lo
            raise ValueError(
                f"time index t = {bad} is outside the horizon: valid 0..{horizon - 1} "
                f"(H = {horizon}); pass t = arange(H) for a trajectory of H steps"
            )


def dynamics_jacobians(
    model: Any,
    x: torch.Tensor,
    u: torch.Tensor,
    t: torch.Tensor | None = None,
    horizon: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``A = df/dx [B, X, X]`` and ``B = df/du [B, X, U]`` of the model's mean dynamics at rows
    ``x [B, X]``, ``u [B, U]`` and time indices ``t [B]`` (long; ``None``: time-invariant),
    computed in the model's dtype (see the module docstring for the dispatch).

    Raises:
        TypeError: the model is neither ``Linearizable`` nor a ``DifferentiableModel``.
        ValueError: ``t`` is malformed or past ``horizon`` (when given).
    """
    check_time(t, x.shape[0], horizon)
    dtype = model_dtype(model, x.dtype)
    x, u = x.to(dtype), u.to(dtype)
    if isinstance(model, Linearizable):
        return model.linearize(x, u, t)
    if isinstance(model, DifferentiableModel):
        f = model.mean_dynamics
        nx = x.shape[-1]
        jac = autograd_jacobian(lambda z: f(z[:, :nx], z[:, nx:]), torch.cat([x, u], dim=-1))
        return jac[..., :nx], jac[..., nx:]
    raise _capability_error(model, "a gradient planner (LQR, iLQR)")


# ---------------------------------------------------------------------------- costs


class QuadraticStageCost:
    """``cost(x, u, t) = (x - goal)' Q (x - goal) + u' R u``, terminal
    ``(x - goal)' Qf (x - goal)``: a :class:`~mbrl.planners.base.StageCost` with closed-form
    expansions (time-invariant). ``Q, Qf [X, X]``, ``R [U, U]``, ``goal [X]``; arrays or
    tensors."""

    def __init__(self, Q: Any, R: Any, Qf: Any, goal: Any) -> None:
        self.Q, self.R, self.Qf, self.goal = Q, R, Qf, goal

    def cost(self, x: torch.Tensor, u: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return _quadratic_expansion(self.Q, self.R, self.goal, x, u).cost

    def expansion(self, x: torch.Tensor, u: torch.Tensor, t: torch.Tensor) -> CostExpansion:
        return _quadratic_expansion(self.Q, self.R, self.goal, x, u)

    def terminal_cost(self, x: torch.Tensor) -> torch.Tensor:
        return _quadratic_expansion(self.Qf, None, self.goal, x, None).cost

    def terminal_expansion(self, x: torch.Tensor) -> CostExpansion:
        return _quadratic_expansion(self.Qf, None, self.goal, x, None)


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


def _name(fn: Any) -> str:
    if isinstance(fn, (types.FunctionType, types.MethodType)):
        return fn.__qualname__
    return type(fn).__name__


class ProblemCost:
    """A planning problem's objective as a :class:`~mbrl.planners.base.StageCost` (built by
    :func:`stage_cost_of`): ``cost(x [B, X], u [B, U], t [B])``, ``expansion`` (value, gradient
    ``[B, Z]``, Hessian ``[B, Z, Z]``), the terminal pair in ``x``, and
    :meth:`expansion_along`, which reuses the trajectory's next states and Jacobians. Time
    indices ``t`` must lie in ``0..H-1`` (a ``ValueError`` otherwise).
    """

    def __init__(
        self,
        horizon: int,
        stage: Any | None,
        terminal: TerminalCost | None,
        reward_fn: Any | None = None,
        model: Any | None = None,
        value_fn: Any | None = None,
    ) -> None:
        self.horizon = horizon
        self._stage = stage  # a StageCost, or None: -reward_fn(x, u, f(x, u))
        self._terminal = terminal  # closed form, or None: -value_fn (zero without one)
        self._reward_fn = reward_fn
        self._model = model
        self._value_fn = value_fn

    # ---- stage
    def cost(self, x: torch.Tensor, u: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        check_time(t, x.shape[0], self.horizon)
        if self._stage is not None:
            return self._stage.cost(x, u, t)
        return -self._reward_fn(x, u, mean_step(self._model)(x, u))

    def expansion(self, x: torch.Tensor, u: torch.Tensor, t: torch.Tensor) -> CostExpansion:
        return self.expansion_along(x, u, t)

    def expansion_along(
        self,
        x: torch.Tensor,
        u: torch.Tensor,
        t: torch.Tensor,
        next_x: torch.Tensor | None = None,
        jacobians: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> CostExpansion:
        """:meth:`expansion` at rows ``x [B, X]``, ``u [B, U]``, ``t [B]``, given the model's
        mean next states ``next_x [B, X]`` and Jacobians ``(A [B, X, X], B [B, X, U])`` there
        (computed when ``None``; used only by a reward of the next observation).

        A general ``reward_fn(x, u, y)`` is expanded in all its arguments at ``y = next_x`` and
        chained through ``J = [A, B]``: gradient ``g_z + J' g_y`` (exact), Hessian
        ``H_zz + J' H_yz + H_zy J + J' H_yy J`` (Gauss-Newton: no second derivatives of the
        dynamics, as in iLQR). No autograd through the model, so it also serves models that
        are only ``Linearizable`` (MuJoCo).
        """
        check_time(t, x.shape[0], self.horizon)
        if self._stage is not None:
            return self._stage.expansion(x, u, t)
        reward_fn, model = self._reward_fn, self._model
        nx, nz = x.shape[-1], x.shape[-1] + u.shape[-1]
        if next_x is None:
            with torch.no_grad():
                next_x = mean_step(model)(x, u)
        if jacobians is None:
            jacobians = dynamics_jacobians(model, x, u, t)
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

    def trajectory_cost(self, x: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        """Total costs ``[A]`` (float64) of trajectories ``x [A, H + 1, X]``, ``u [A, H, U]``:
        the stage costs at ``t = 0..H-1`` (a reward of the next observation is scored on the
        trajectory's own next states) plus the terminal cost of ``x_H``."""
        a, h1, nx = x.shape
        xs, us = x[:, :-1].reshape(-1, nx), u.reshape(-1, u.shape[-1])
        if self._stage is not None:
            t = torch.arange(h1 - 1, device=x.device).repeat(a)  # [A * H]
            stage = self.cost(xs, us, t)
        else:
            stage = -self._reward_fn(xs, us, x[:, 1:].reshape(-1, nx))
        total = stage.double().view(a, h1 - 1).sum(dim=1)  # [A]
        if self.has_terminal:
            total = total + self.terminal_cost(x[:, -1]).double()
        return total

    # ---- terminal
    @property
    def has_terminal(self) -> bool:
        """Whether the objective has a terminal cost (``False``: it is zero)."""
        return self._terminal is not None or self._value_fn is not None

    def terminal_cost(self, x: torch.Tensor) -> torch.Tensor:
        if self._terminal is not None:
            return self._terminal.terminal_cost(x)
        if self._value_fn is not None:
            return -self._value_fn(RolloutState(obs=x))
        return torch.zeros(x.shape[0], dtype=x.dtype, device=x.device)

    def terminal_expansion(self, x: torch.Tensor) -> CostExpansion:
        if self._terminal is not None:
            return self._terminal.terminal_expansion(x)
        if self._value_fn is not None:
            value_fn = self._value_fn
            return autograd_cost_expansion(lambda y: -value_fn(RolloutState(obs=y)), x)
        b, nx = x.shape
        zeros = torch.zeros(b, nx, dtype=x.dtype, device=x.device)
        return CostExpansion(cost=zeros[:, 0], grad=zeros, hess=zeros[:, :, None] * zeros[:, None])


class CasadiProblemCost(ProblemCost):
    """A :class:`ProblemCost` whose parts all have casadi forms (a :class:`CasadiStageCost`,
    for NMPC)."""

    def cost_casadi(self, x: Any, u: Any, t: int) -> Any:
        if not 0 <= t < self.horizon:
            raise ValueError(f"time index t = {t} is outside the horizon 0..{self.horizon - 1}")
        return self._stage.cost_casadi(x, u, t)

    def terminal_cost_casadi(self, x: Any) -> Any:
        if self._terminal is None:
            return 0
        return self._terminal.terminal_cost_casadi(x)


def stage_cost_of(problem: Any) -> ProblemCost:
    """The objective gradient planners minimise on ``problem`` (see the module docstring):
    ``problem.stage_cost`` (stage and terminal) when given; else the stage part from
    ``reward_fn`` (closed form when it is a :class:`~mbrl.planners.base.StageCost`, else
    ``-reward_fn(x, u, f(x, u))`` by autograd) and the terminal part from ``value_fn`` (closed
    form when it is a :class:`TerminalCost`, else autograd of ``-value_fn``; zero without one).
    The result is a :class:`CasadiProblemCost` when every part has a casadi form.

    Raises:
        ValueError: the model learns the reward (there is no reward function to
            differentiate) and no ``stage_cost`` is given.
        TypeError: ``reward_fn`` or ``value_fn`` is not differentiable (one tiny probe call
            whose output does not require grad: computed through numpy or ``.detach()``), or
            the model is neither ``Linearizable`` nor a ``DifferentiableModel``.
    """
    from mbrl.planners.base import StageCost  # planners.base imports mbrl.envs, which needs us

    h = problem.horizon
    given = problem.stage_cost
    if given is not None:
        cls = CasadiProblemCost if isinstance(given, CasadiStageCost) else ProblemCost
        return cls(h, given, given)
    model, reward_fn, value_fn = problem.model, problem.reward_fn, problem.value_fn
    if model.learns_reward:
        raise ValueError(
            f"{type(model).__name__} learns the reward; gradient planners differentiate the "
            "problem's reward_fn: build the PlanningProblem with a model whose learns_reward "
            "is False, or give it a stage_cost"
        )
    mean_step(model)  # raises a TypeError naming both capabilities
    dtype = model_dtype(model, torch.float64)
    stage = reward_fn if isinstance(reward_fn, StageCost) else None
    if stage is None:
        x, u = torch.zeros(1, model.obs_dim, dtype=dtype), torch.zeros(1, problem.act_dim)
        _probe(reward_fn, "reward_fn", (x, u.to(dtype), x.clone()))
    terminal = value_fn if isinstance(value_fn, TerminalCost) else None
    if value_fn is not None and terminal is None:
        x = torch.zeros(1, model.obs_dim, dtype=dtype)
        _probe(lambda y: value_fn(RolloutState(obs=y)), f"value_fn {_name(value_fn)}", (x,))
    casadi = isinstance(stage, CasadiStageCost) and (
        value_fn is None or isinstance(terminal, CasadiTerminalCost)
    )
    cls = CasadiProblemCost if casadi else ProblemCost
    return cls(h, stage, terminal, reward_fn, model, value_fn)


def _probe(fn: Callable[..., torch.Tensor], what: str, args: tuple[torch.Tensor, ...]) -> None:
    """One tiny call of ``fn`` on inputs that require grad: its output must require grad."""
    with torch.inference_mode(False), torch.enable_grad():
        inputs = tuple(a.detach().clone().requires_grad_(True) for a in args)
        out = fn(*inputs)
    if not (torch.is_tensor(out) and out.requires_grad):
        name = what if what != "reward_fn" else f"reward_fn {_name(fn)}"
        raise TypeError(
            f"{name} is not differentiable: its output does not depend on its inputs through "
            "torch autograd (computed through numpy, .item() or .detach()?); gradient planners "
            "(LQR, iLQR) differentiate it: write it in torch operations, or give the "
            "PlanningProblem a stage_cost (a StageCost with its own expansion)"
        )
