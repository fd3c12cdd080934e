"""Analytic control systems with differentiable torch dynamics and casadi twins.

Each :class:`AnalyticSystem` writes its discrete-time step and its smooth cost ONCE, as functions
of a small math namespace (``_TorchOps`` or ``_CasadiOps``); the torch form works on batches
``x [B, X]``, ``u [B, U]`` in the inputs' dtype and device, the casadi form on symbolic columns
``x [X, 1]``, ``u [U, 1]`` (SX or MX) for NMPC/IPOPT. Both use the same discretization, so they
agree to rounding error.

Systems (angles in radians, angle 0 = upright for the swing-ups, which start hanging down):

- ``pendulum``: Gymnasium's Pendulum-v1 physics (g = 10, m = 1, l = 1, dt = 0.05 s, torque in
  [-2, 2], semi-implicit Euler ``w' = w + (3 g / (2 l) sin th + 3 u / (m l^2)) dt``,
  ``th' = th + w' dt``) without Pendulum-v1's speed clip at 8 rad/s (kept smooth; a swing-up
  from rest peaks near 7.7 rad/s). State ``[theta, theta_dot]``.
- ``cartpole``: the Barto et al. (1983) cart-pole with CartPole-v1's parameters (cart 1 kg,
  pole 0.1 kg, half-length 0.5 m, g = 9.8) and a continuous force in [-10, 10] N, RK4 with
  dt = 0.05 s. State ``[x, theta, x_dot, theta_dot]``.
- ``acrobot``: Spong's acrobot with Gymnasium Acrobot-v1's "book" parameters (unit masses and
  lengths, centres of mass at 0.5, unit inertias, g = 9.8), torque on the elbow in [-4, 4],
  RK4 with dt = 0.05 s. State ``[theta1, theta2, theta1_dot, theta2_dot]`` with ``theta1``
  measured from upright (Acrobot-v1's ``theta1 - pi``).
- ``linear(A, B, Q, R)``: ``x' = A x + B u`` with cost ``(x - g)' Q (x - g) + u' R u``;
  :func:`double_integrator` is one.

Costs are smooth: ``2 (1 - cos theta)`` terms (about ``theta^2`` near upright) plus quadratic
velocity and action terms; the terminal cost is heavier. Rewards are minus the cost of
``(obs, act)``, with the action clipped to the bounds as the env clips it.

What planners take from a system (no planner reads attributes of these objects):

- :meth:`AnalyticSystem.reward_fn`: the env's reward, which is also a
  :class:`~mbrl.planners.base.StageCost` (closed-form casadi-AD expansions) with a casadi form
  for NMPC (:class:`SystemCost`);
- :meth:`AnalyticSystem.value_fn`: the terminal reward ``state -> [R]`` (minus the terminal
  cost), with the same closed-form and casadi terminal expansions (:class:`SystemValue`);
- :meth:`AnalyticSystem.stage_cost`: the whole objective (stage and terminal) as one
  :class:`SystemCost`, for ``PlanningProblem(stage_cost=...)``;
- the dynamics behind the model seam are :class:`mbrl.dynamics.systems.SystemModel`, built from
  the system's step functions (:meth:`AnalyticSystem.step`, :meth:`AnalyticSystem.step_numeric`,
  :meth:`AnalyticSystem.linearize`, the casadi twins); this module does not import
  ``mbrl.dynamics``.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property
from typing import TYPE_CHECKING, Any

import casadi as ca
import gymnasium as gym
import numpy as np
import torch
from gymnasium import spaces
from gymnasium.wrappers import TimeLimit

from mbrl.envs.registry import register
from mbrl.envs.spec import EnvSpec, never_terminates

if TYPE_CHECKING:
    from mbrl.dynamics.base import RolloutState
    from mbrl.planners.derivatives import CostExpansion

# ---------------------------------------------------------------- one math namespace, two forms


class _TorchOps:
    """Torch forms: states are ``[B, X]``, components ``[B]``."""

    sin = staticmethod(torch.sin)
    cos = staticmethod(torch.cos)

    @staticmethod
    def split(x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return x.unbind(-1)

    @staticmethod
    def stack(parts: list[Any]) -> torch.Tensor:
        return torch.stack(parts, dim=-1)

    @staticmethod
    def matvec(m: np.ndarray, x: torch.Tensor) -> torch.Tensor:
        return x @ torch.as_tensor(m.T, dtype=x.dtype, device=x.device)

    @staticmethod
    def quad(m: np.ndarray, d: torch.Tensor) -> torch.Tensor:
        return ((d @ torch.as_tensor(m, dtype=d.dtype, device=d.device)) * d).sum(-1)

    @staticmethod
    def const(v: np.ndarray, like: torch.Tensor) -> torch.Tensor:
        return torch.as_tensor(v, dtype=like.dtype, device=like.device)


class _CasadiOps:
    """Casadi forms: states are symbolic columns ``[X, 1]``, components scalars."""

    sin = staticmethod(ca.sin)
    cos = staticmethod(ca.cos)

    @staticmethod
    def split(x: Any) -> list[Any]:
        return [x[i] for i in range(x.shape[0])]

    @staticmethod
    def stack(parts: list[Any]) -> Any:
        return ca.vertcat(*parts)

    @staticmethod
    def matvec(m: np.ndarray, x: Any) -> Any:
        return ca.mtimes(ca.DM(m), x)

    @staticmethod
    def quad(m: np.ndarray, d: Any) -> Any:
        return ca.mtimes([d.T, ca.DM(m), d])

    @staticmethod
    def const(v: np.ndarray, like: Any) -> Any:
        return ca.DM(v)


Ops = type[_TorchOps] | type[_CasadiOps]
StepExpr = Callable[[Any, Any, Any], Any]  # (x, u, ops) -> x'
CostExpr = Callable[[Any, Any, Any], Any]  # (x, u, ops) -> cost
TerminalExpr = Callable[[Any, Any], Any]  # (x, ops) -> cost


def _rk4(ode: StepExpr, dt: float, substeps: int) -> StepExpr:
    """Classic RK4 with ``substeps`` equal substeps of ``dt / substeps`` (zero-order-hold u)."""
    h = dt / substeps

    def step(x: Any, u: Any, ops: Ops) -> Any:
        for _ in range(substeps):
            k1 = ode(x, u, ops)
            k2 = ode(x + (h / 2) * k1, u, ops)
            k3 = ode(x + (h / 2) * k2, u, ops)
            k4 = ode(x + h * k3, u, ops)
            x = x + (h / 6) * (k1 + 2 * k2 + 2 * k3 + k4)
        return x

    return step


@dataclass(frozen=True)
class QuadraticCost:
    """``cost(x, u) = (x - goal)' Q (x - goal) + u' R u``, terminal ``(x - goal)' Qf (x - goal)``.

    The matrices of systems whose cost is exactly quadratic (:func:`linear`), for known-answer
    comparisons (LQR references); planners get the cost through :class:`SystemCost`.
    """

    Q: np.ndarray  # [X, X]
    R: np.ndarray  # [U, U]
    Qf: np.ndarray  # [X, X]
    goal: np.ndarray  # [X]


@dataclass(frozen=True, eq=False)
class AnalyticSystem:
    """A discrete-time system ``x' = f(x, u)`` with a smooth cost, in torch and casadi forms.

    Build one with :func:`pendulum`, :func:`cartpole`, :func:`acrobot`, :func:`linear` or
    :func:`double_integrator` (also by name through :data:`SYSTEMS`). ``state_labels`` and
    ``action_labels`` name each entry with its unit in brackets (``"theta_dot [rad/s]"``), for
    tables and plot axes; a rate's unit ends in ``/s``.
    """

    name: str
    obs_dim: int  # X
    act_dim: int  # U
    dt: float  # seconds per step
    action_low: np.ndarray  # [U]
    action_high: np.ndarray  # [U]
    goal: np.ndarray  # [X] the state the cost is minimal at (an equilibrium under u = 0)
    start: np.ndarray  # [X] nominal initial state
    start_noise: float  # initial_state adds uniform noise in [-start_noise, start_noise]
    angle_dims: tuple[int, ...]  # state entries that are angles (wrapped by success)
    success_tolerance: np.ndarray  # [X] success: |wrapped (x - goal)| <= tolerance elementwise
    step_expr: StepExpr
    cost_expr: CostExpr
    terminal_expr: TerminalExpr
    quadratic: QuadraticCost | None = None
    max_episode_steps: int = 200
    ode_expr: StepExpr | None = None  # (x, u, ops) -> x_dot; None for discrete-time systems
    state_labels: tuple[str, ...] = ()  # [X] name and unit of each entry, "theta [rad]"; ()
    action_labels: tuple[str, ...] = ()  # [U] "torque [N m]"; (): unnamed (x[i] / u[j])

    def __post_init__(self) -> None:
        for field, labels, size in (
            ("state_labels", self.state_labels, self.obs_dim),
            ("action_labels", self.action_labels, self.act_dim),
        ):
            if labels and len(labels) != size:
                raise ValueError(
                    f"system {self.name!r}: {field} has {len(labels)} names {tuple(labels)} for "
                    f"{size} entries; give one name (with its unit) per entry, or none"
                )

    # ---- torch forms

    def step(self, x: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        """Next states ``[B, X]`` of ``x [B, X]`` under ``u [B, U]`` (inputs' dtype, device)."""
        return self.step_expr(x, u, _TorchOps)

    def cost(self, x: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        """Stage cost ``[B]`` of ``x [B, X]``, ``u [B, U]``."""
        return self.cost_expr(x, u, _TorchOps)

    def terminal_cost(self, x: torch.Tensor) -> torch.Tensor:
        """Terminal cost ``[B]`` of ``x [B, X]``."""
        return self.terminal_expr(x, _TorchOps)

    # ---- casadi forms

    def step_casadi(self, x: Any, u: Any) -> Any:
        """Symbolic next state ``[X, 1]`` of casadi columns ``x [X, 1]``, ``u [U, 1]``."""
        return self.step_expr(x, u, _CasadiOps)

    def cost_casadi(self, x: Any, u: Any) -> Any:
        """Symbolic stage cost (scalar) of ``x [X, 1]``, ``u [U, 1]``."""
        return self.cost_expr(x, u, _CasadiOps)

    def terminal_cost_casadi(self, x: Any) -> Any:
        """Symbolic terminal cost (scalar) of ``x [X, 1]``."""
        return self.terminal_expr(x, _CasadiOps)

    def ode_casadi(self, x: Any, u: Any) -> Any:
        """Symbolic time derivative ``x_dot [X, 1]`` of the continuous-time dynamics the step
        discretizes (direct collocation).

        Raises:
            ValueError: the system is defined in discrete time only (``linear``).
        """
        if self.ode_expr is None:
            raise ValueError(
                f"system {self.name!r} is defined in discrete time only and has no ODE for "
                "collocation: give NMPC ode=f(x, u) -> x_dot (casadi), or use "
                "method='multiple_shooting'"
            )
        return self.ode_expr(x, u, _CasadiOps)

    # ---- episodes

    def initial_state(self, rng: np.random.Generator) -> np.ndarray:
        """``start`` plus uniform noise of half-width ``start_noise``, float64 ``[X]``."""
        noise = rng.uniform(-self.start_noise, self.start_noise, size=self.obs_dim)
        return (self.start + noise).astype(np.float64)

    def success(self, x: np.ndarray) -> bool | np.ndarray:
        """Whether ``x [X]`` (or each row of ``[B, X]``) is within ``success_tolerance`` of the
        goal, angles wrapped to ``(-pi, pi]``."""
        d = np.asarray(x, dtype=np.float64) - self.goal
        if self.angle_dims:
            idx = list(self.angle_dims)
            d[..., idx] = np.mod(d[..., idx] + np.pi, 2 * np.pi) - np.pi
        ok = np.all(np.abs(d) <= self.success_tolerance, axis=-1)
        return bool(ok) if ok.ndim == 0 else ok

    def reward_fn(self) -> SystemReward:
        """The env's reward ``-cost(obs, clip(act))`` as a batched torch function; also the
        system's :class:`SystemCost` (a ``StageCost`` for gradient planners and NMPC)."""
        return SystemReward(self)

    def value_fn(self) -> SystemValue:
        """The terminal reward ``state -> -terminal_cost(state.obs) [R]`` for
        ``PlanningProblem(value_fn=...)``."""
        return SystemValue(self)

    def stage_cost(self) -> SystemCost:
        """The system's whole objective, stage and terminal cost, as one ``StageCost`` for
        ``PlanningProblem(stage_cost=...)``."""
        return SystemCost(self)

    # ---- compiled casadi twins, for fast numeric evaluation and exact derivatives

    @cached_property
    def casadi(self) -> CasadiFunctions:
        """Compiled casadi functions of the step, its Jacobians and the cost expansions."""
        x = ca.SX.sym("x", self.obs_dim)
        u = ca.SX.sym("u", self.act_dim)
        z = ca.vertcat(x, u)
        nxt = self.step_casadi(x, u)
        cost = self.cost_casadi(x, u)
        cost_hess, cost_grad = ca.hessian(cost, z)
        term = self.terminal_cost_casadi(x)
        term_hess, term_grad = ca.hessian(term, x)
        d = ca.densify
        return CasadiFunctions(
            step=ca.Function("step", [x, u], [d(nxt)]),
            jacobians=ca.Function(
                "jacobians", [x, u], [d(ca.jacobian(nxt, x)), d(ca.jacobian(nxt, u))]
            ),
            cost=ca.Function("cost", [x, u], [d(cost), d(cost_grad), d(cost_hess)]),
            terminal=ca.Function("terminal", [x], [d(term), d(term_grad), d(term_hess)]),
        )

    @cached_property
    def _batched(self) -> dict[str, _BatchedCasadi]:
        c = self.casadi
        names = ("step", "jacobians", "cost", "terminal")
        return {n: _BatchedCasadi(getattr(c, n)) for n in names}

    def step_numeric(self, x: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        """:meth:`step` by the compiled casadi twin: next states ``[B, X]`` of ``x [B, X]``,
        ``u [B, U]`` (float64 evaluation, returned in ``x``'s dtype and device; no autograd).
        """
        (out,) = self._batched["step"](x, u)
        return _rows(out, x)

    def linearize(self, x: torch.Tensor, u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Exact Jacobians ``A [B, X, X]``, ``B [B, X, U]`` of :meth:`step` (casadi AD, float64
        evaluation, returned in ``x``'s dtype and device)."""
        a, b = self._batched["jacobians"](x, u)
        return _mats(a, x), _mats(b, x)

    def spec(self, env_name: str | None = None) -> EnvSpec:
        """An :class:`EnvSpec` with ``dynamics`` = this system."""
        return EnvSpec(
            name=env_name or self.name,
            make_env=lambda **kwargs: TimeLimit(
                SystemEnv(self, **kwargs), max_episode_steps=self.max_episode_steps
            ),
            obs_dim=self.obs_dim,
            act_dim=self.act_dim,
            action_low=self.action_low.astype(np.float32),
            action_high=self.action_high.astype(np.float32),
            max_episode_steps=self.max_episode_steps,
            reward_fn=self.reward_fn(),
            termination_fn=never_terminates,
            description=f"analytic {self.name} (torch dynamics with a casadi twin), reward -cost",
            dynamics=self,
        )


@dataclass(frozen=True)
class CasadiFunctions:
    """Casadi functions of one system (dense outputs), for NMPC and exact derivatives."""

    step: ca.Function  # (x [X], u [U]) -> x' [X]
    jacobians: ca.Function  # (x, u) -> (df/dx [X, X], df/du [X, U])
    cost: ca.Function  # (x, u) -> (l, dl/dz [Z], d2l/dz2 [Z, Z]), z = [x; u]
    terminal: ca.Function  # x -> (l_H, dl_H/dx [X], d2l_H/dx2 [X, X])


class _BatchedCasadi:
    """Evaluates a casadi Function on row batches through zero-copy numpy buffers.

    One mapped copy of the function (and its buffers) is kept per batch size ``B``; inputs are
    rows ``[B, n]``; each output comes back as ``[B, cols, rows]`` (casadi stores matrices
    column-major), so matrices need a transpose of the last two axes. The outputs are the
    reused buffers: copy them before the next call.
    """

    def __init__(self, fn: ca.Function) -> None:
        self.fn = fn
        self._by_size: dict[int, tuple] = {}

    def __call__(self, *args: torch.Tensor) -> list[np.ndarray]:
        b = args[0].shape[0]
        entry = self._by_size.get(b)
        if entry is None:
            if len(self._by_size) >= 32:
                self._by_size.clear()
            fn = self.fn
            mapped = fn.map(b)
            buf, run = mapped.buffer()
            ins = [np.zeros((b, fn.size2_in(i), fn.size1_in(i))) for i in range(fn.n_in())]
            outs = [np.zeros((b, fn.size2_out(i), fn.size1_out(i))) for i in range(fn.n_out())]
            for i, a in enumerate(ins):
                buf.set_arg(i, memoryview(a))
            for i, o in enumerate(outs):
                buf.set_res(i, memoryview(o))
            entry = self._by_size[b] = (mapped, buf, run, ins, outs)
        _, _, run, ins, outs = entry
        for dst, src in zip(ins, args, strict=True):
            dst.reshape(b, -1)[:] = src.numpy(force=True)
        run()
        return outs  # the buffers themselves: convert (copy) before the next call


def _rows(out: np.ndarray, like: torch.Tensor) -> torch.Tensor:
    """``[B, 1, n]`` (a column per row) -> a copy ``[B, n]`` in ``like``'s dtype and device."""
    rows = torch.from_numpy(out.reshape(out.shape[0], -1))
    return rows.to(dtype=like.dtype, device=like.device, copy=True)


def _mats(out: np.ndarray, like: torch.Tensor) -> torch.Tensor:
    """``[B, cols, rows]`` -> a copy ``[B, rows, cols]`` in ``like``'s dtype and device."""
    mats = torch.from_numpy(out).transpose(1, 2)
    return mats.to(dtype=like.dtype, device=like.device, copy=True).contiguous()


def _expansion(cost: torch.Tensor, grad: torch.Tensor, hess: torch.Tensor) -> CostExpansion:
    # imported here: mbrl.planners imports mbrl.envs at import time, so this module cannot
    # import mbrl.planners at its top
    from mbrl.planners.derivatives import CostExpansion

    return CostExpansion(cost=cost, grad=grad, hess=hess)


class SystemCost:
    """The system's cost as a :class:`~mbrl.planners.base.StageCost` and its casadi form.

    ``cost(x [B, X], u [B, U], t [B]) -> [B]`` (time-invariant: ``t`` is ignored),
    ``expansion`` its exact value, gradient ``[B, Z]`` and Hessian ``[B, Z, Z]`` in
    ``z = [x, u]`` (casadi AD, float64 evaluation, returned in ``x``'s dtype), the terminal
    pair in ``x``; ``cost_casadi(x [X, 1], u [U, 1], t)`` and ``terminal_cost_casadi(x)`` are
    the symbolic forms NMPC optimizes. No clipping: planners keep actions in the bounds.
    """

    def __init__(self, system: AnalyticSystem) -> None:
        self.system = system

    def cost(self, x: torch.Tensor, u: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.system.cost(x, u)

    def expansion(self, x: torch.Tensor, u: torch.Tensor, t: torch.Tensor) -> CostExpansion:
        c, g, h = self.system._batched["cost"](x, u)
        return _expansion(_rows(c, x)[:, 0], _rows(g, x), _mats(h, x))

    def terminal_cost(self, x: torch.Tensor) -> torch.Tensor:
        return self.system.terminal_cost(x)

    def terminal_expansion(self, x: torch.Tensor) -> CostExpansion:
        c, g, h = self.system._batched["terminal"](x)
        return _expansion(_rows(c, x)[:, 0], _rows(g, x), _mats(h, x))

    def cost_casadi(self, x: Any, u: Any, t: int) -> Any:
        return self.system.cost_casadi(x, u)

    def terminal_cost_casadi(self, x: Any) -> Any:
        return self.system.terminal_cost_casadi(x)


class SystemReward(SystemCost):
    """``reward(obs [B, X], act [B, U], next_obs [B, X]) = -cost(obs, clip(act)) [B]``, the
    env's reward; as a :class:`SystemCost` it gives gradient planners the exact stage cost
    (unclipped) and its expansion."""

    def __call__(
        self, obs: torch.Tensor, act: torch.Tensor, next_obs: torch.Tensor
    ) -> torch.Tensor:
        low = _TorchOps.const(self.system.action_low, act)
        high = _TorchOps.const(self.system.action_high, act)
        return -self.system.cost(obs, torch.minimum(torch.maximum(act, low), high))


class SystemValue:
    """The terminal reward ``value(state) = -terminal_cost(state.obs) [R]`` (a
    :data:`~mbrl.planners.base.ValueFn`), with the exact terminal cost and expansion in ``x``
    (``terminal_cost``, ``terminal_expansion``) and its casadi form ``terminal_cost_casadi``.
    """

    def __init__(self, system: AnalyticSystem) -> None:
        self.system = system
        self._cost = SystemCost(system)

    def __call__(self, state: RolloutState) -> torch.Tensor:
        return -self.system.terminal_cost(state.obs)

    def terminal_cost(self, x: torch.Tensor) -> torch.Tensor:
        return self.system.terminal_cost(x)

    def terminal_expansion(self, x: torch.Tensor) -> CostExpansion:
        return self._cost.terminal_expansion(x)

    def terminal_cost_casadi(self, x: Any) -> Any:
        return self.system.terminal_cost_casadi(x)


class SystemEnv(gym.Env):
    """A gymnasium env stepping an :class:`AnalyticSystem` in float64 torch.

    Observation: the state ``[X]`` (float32); action clipped to the bounds; reward
    ``-cost(state, action)``; terminates only when the state becomes NaN or inf (as the spec's
    :func:`~mbrl.envs.spec.never_terminates`); the ``TimeLimit`` wrapper of
    :meth:`AnalyticSystem.spec` truncates.
    """

    metadata = {"render_modes": []}

    def __init__(self, system: AnalyticSystem, render_mode: str | None = None) -> None:
        if render_mode is not None:
            raise ValueError(f"SystemEnv does not render; got render_mode={render_mode!r}")
        self.system = system
        self.observation_space = spaces.Box(-np.inf, np.inf, (system.obs_dim,), dtype=np.float32)
        self.action_space = spaces.Box(
            system.action_low.astype(np.float32), system.action_high.astype(np.float32)
        )
        self.state: np.ndarray | None = None  # [X] float64

    def reset(
        self, *, seed: int | None = None, options: dict | None = None
    ) -> tuple[np.ndarray, dict]:
        super().reset(seed=seed)
        self.state = self.system.initial_state(self.np_random)
        return self.state.astype(np.float32), {}

    def step(self, action: np.ndarray) -> tuple[np.ndarray, float, bool, bool, dict]:
        if self.state is None:
            raise RuntimeError("call reset() before step()")
        a = np.asarray(action, dtype=np.float64).reshape(self.system.act_dim)
        a = np.clip(a, self.system.action_low, self.system.action_high)
        x = torch.as_tensor(self.state, dtype=torch.float64).unsqueeze(0)  # [1, X]
        u = torch.as_tensor(a, dtype=torch.float64).unsqueeze(0)  # [1, U]
        reward = -float(self.system.cost(x, u)[0])
        self.state = self.system.step(x, u)[0].numpy()
        terminated = not bool(np.isfinite(self.state).all())
        return self.state.astype(np.float32), reward, terminated, False, {}


# ---------------------------------------------------------------- the systems


def _swingup_angle_cost(theta: Any, ops: Ops) -> Any:
    """``2 (1 - cos theta)``: zero upright, 4 hanging, about ``theta^2`` near upright."""
    return 2.0 * (1.0 - ops.cos(theta))


def pendulum(
    action_bound: float = 2.0,
    velocity_weight: float = 0.1,
    action_weight: float = 0.01,
    terminal_weight: float = 10.0,
    start_noise: float = 0.0,
) -> AnalyticSystem:
    """Pendulum-v1 swing-up (see the module docstring); state ``[theta, theta_dot]``.

    Cost ``2 (1 - cos th) + velocity_weight w^2 + action_weight u^2``; terminal cost
    ``terminal_weight (2 (1 - cos th) + velocity_weight w^2)``.
    """
    g, m, length, dt = 10.0, 1.0, 1.0, 0.05

    def accel(th: Any, tau: Any, ops: Ops) -> Any:
        return 3.0 * g / (2.0 * length) * ops.sin(th) + 3.0 / (m * length**2) * tau

    def step(x: Any, u: Any, ops: Ops) -> Any:
        th, w = ops.split(x)[:2]
        (tau,) = ops.split(u)[:1]
        w_next = w + accel(th, tau, ops) * dt
        return ops.stack([th + w_next * dt, w_next])

    def ode(x: Any, u: Any, ops: Ops) -> Any:
        th, w = ops.split(x)[:2]
        (tau,) = ops.split(u)[:1]
        return ops.stack([w, accel(th, tau, ops)])

    def state_cost(x: Any, ops: Ops) -> Any:
        th, w = ops.split(x)[:2]
        return _swingup_angle_cost(th, ops) + velocity_weight * w**2

    def cost(x: Any, u: Any, ops: Ops) -> Any:
        (tau,) = ops.split(u)[:1]
        return state_cost(x, ops) + action_weight * tau**2

    return AnalyticSystem(
        name="pendulum",
        obs_dim=2,
        act_dim=1,
        dt=dt,
        action_low=np.array([-action_bound]),
        action_high=np.array([action_bound]),
        goal=np.zeros(2),
        start=np.array([math.pi, 0.0]),
        start_noise=start_noise,
        angle_dims=(0,),
        success_tolerance=np.array([0.1, 0.5]),
        step_expr=step,
        cost_expr=cost,
        terminal_expr=lambda x, ops: terminal_weight * state_cost(x, ops),
        max_episode_steps=200,
        ode_expr=ode,
        state_labels=("theta [rad]", "theta_dot [rad/s]"),
        action_labels=("torque [N m]",),
    )


def cartpole(
    force_bound: float = 10.0,
    dt: float = 0.05,
    substeps: int = 1,
    start_noise: float = 0.0,
) -> AnalyticSystem:
    """Cart-pole swing-up (see the module docstring); state ``[x, theta, x_dot, theta_dot]``.

    Continuous-time model (Barto et al. 1983 / Florian 2007 equations, theta from upright)::

        tmp = (F + m_p l w^2 sin th) / (m_c + m_p)
        th_acc = (g sin th - cos th tmp) / (l (4/3 - m_p cos^2 th / (m_c + m_p)))
        x_acc = tmp - m_p l th_acc cos th / (m_c + m_p)

    Cost ``2 (1 - cos th) + 0.1 x^2 + 0.01 (x_dot^2 + w^2) + 0.001 F^2``; terminal cost 10 times
    the state part.
    """
    g, mc, mp, half = 9.8, 1.0, 0.1, 0.5
    total = mc + mp

    def ode(s: Any, u: Any, ops: Ops) -> Any:
        _, th, xd, w = ops.split(s)[:4]
        (force,) = ops.split(u)[:1]
        sin, cos = ops.sin(th), ops.cos(th)
        tmp = (force + mp * half * w**2 * sin) / total
        th_acc = (g * sin - cos * tmp) / (half * (4.0 / 3.0 - mp * cos**2 / total))
        x_acc = tmp - mp * half * th_acc * cos / total
        return ops.stack([xd, w, x_acc, th_acc])

    def state_cost(s: Any, ops: Ops) -> Any:
        x, th, xd, w = ops.split(s)[:4]
        return _swingup_angle_cost(th, ops) + 0.1 * x**2 + 0.01 * (xd**2 + w**2)

    def cost(s: Any, u: Any, ops: Ops) -> Any:
        (force,) = ops.split(u)[:1]
        return state_cost(s, ops) + 0.001 * force**2

    return AnalyticSystem(
        name="cartpole",
        obs_dim=4,
        act_dim=1,
        dt=dt,
        action_low=np.array([-force_bound]),
        action_high=np.array([force_bound]),
        goal=np.zeros(4),
        start=np.array([0.0, math.pi, 0.0, 0.0]),
        start_noise=start_noise,
        angle_dims=(1,),
        success_tolerance=np.array([0.5, 0.15, 0.5, 0.5]),
        step_expr=_rk4(ode, dt, substeps),
        cost_expr=cost,
        terminal_expr=lambda s, ops: 10.0 * state_cost(s, ops),
        max_episode_steps=200,
        ode_expr=ode,
        state_labels=("x [m]", "theta [rad]", "x_dot [m/s]", "theta_dot [rad/s]"),
        action_labels=("force [N]",),
    )


def acrobot(
    torque_bound: float = 4.0,
    dt: float = 0.05,
    substeps: int = 1,
    start_noise: float = 0.0,
) -> AnalyticSystem:
    """Acrobot swing-up (Spong 1995; Acrobot-v1 "book" dynamics with theta1 from upright).

    State ``[theta1, theta2, theta1_dot, theta2_dot]``; torque on the elbow. Cost
    ``2 (1 - cos th1) + 2 (1 - cos (th1 + th2)) + 0.01 (w1^2 + w2^2) + 0.01 tau^2``; terminal
    cost 10 times the state part. Goal: both links upright, ``[0, 0, 0, 0]``.
    """
    m1 = m2 = 1.0
    l1 = 1.0
    lc1 = lc2 = 0.5
    i1 = i2 = 1.0
    g = 9.8

    def ode(s: Any, u: Any, ops: Ops) -> Any:
        th1, th2, w1, w2 = ops.split(s)[:4]
        (tau,) = ops.split(u)[:1]
        sin2, cos2 = ops.sin(th2), ops.cos(th2)
        d1 = m1 * lc1**2 + m2 * (l1**2 + lc2**2 + 2 * l1 * lc2 * cos2) + i1 + i2
        d2 = m2 * (lc2**2 + l1 * lc2 * cos2) + i2
        # Acrobot-v1's cos(q - pi/2) terms with q = theta + pi become -sin(theta)
        phi2 = -m2 * lc2 * g * ops.sin(th1 + th2)
        phi1 = (
            -m2 * l1 * lc2 * w2**2 * sin2
            - 2 * m2 * l1 * lc2 * w2 * w1 * sin2
            - (m1 * lc1 + m2 * l1) * g * ops.sin(th1)
            + phi2
        )
        acc2 = (tau + d2 / d1 * phi1 - m2 * l1 * lc2 * w1**2 * sin2 - phi2) / (
            m2 * lc2**2 + i2 - d2**2 / d1
        )
        acc1 = -(d2 * acc2 + phi1) / d1
        return ops.stack([w1, w2, acc1, acc2])

    def state_cost(s: Any, ops: Ops) -> Any:
        th1, th2, w1, w2 = ops.split(s)[:4]
        return (
            _swingup_angle_cost(th1, ops)
            + _swingup_angle_cost(th1 + th2, ops)
            + 0.01 * (w1**2 + w2**2)
        )

    def cost(s: Any, u: Any, ops: Ops) -> Any:
        (tau,) = ops.split(u)[:1]
        return state_cost(s, ops) + 0.01 * tau**2

    return AnalyticSystem(
        name="acrobot",
        obs_dim=4,
        act_dim=1,
        dt=dt,
        action_low=np.array([-torque_bound]),
        action_high=np.array([torque_bound]),
        goal=np.zeros(4),
        start=np.array([math.pi, 0.0, 0.0, 0.0]),
        start_noise=start_noise,
        angle_dims=(0, 1),
        success_tolerance=np.array([0.15, 0.15, 1.0, 1.0]),
        step_expr=_rk4(ode, dt, substeps),
        cost_expr=cost,
        terminal_expr=lambda s, ops: 10.0 * state_cost(s, ops),
        max_episode_steps=400,
        ode_expr=ode,
        state_labels=("theta1 [rad]", "theta2 [rad]", "theta1_dot [rad/s]", "theta2_dot [rad/s]"),
        action_labels=("elbow torque [N m]",),
    )


def linear(
    A: np.ndarray,
    B: np.ndarray,
    Q: np.ndarray | None = None,
    R: np.ndarray | None = None,
    Qf: np.ndarray | None = None,
    goal: np.ndarray | None = None,
    action_bound: float | np.ndarray = np.inf,
    start: np.ndarray | None = None,
    start_noise: float = 0.0,
    dt: float = 1.0,
    name: str = "linear",
    max_episode_steps: int = 100,
    state_labels: tuple[str, ...] | None = None,
    action_labels: tuple[str, ...] | None = None,
) -> AnalyticSystem:
    """``x' = A x + B u`` with cost ``(x - goal)' Q (x - goal) + u' R u`` and terminal cost
    ``(x - goal)' Qf (x - goal)`` (defaults: ``Q = I``, ``R = I``, ``Qf = Q``, goal 0, no action
    bounds, start at ones). ``A [X, X]``, ``B [X, U]``. The entries are ``x[i]`` and ``u[j]``
    (no unit) unless ``state_labels [X]`` / ``action_labels [U]`` name them.

    Raises:
        ValueError: if the matrix shapes or the numbers of labels disagree.
    """
    A = np.asarray(A, dtype=np.float64)
    B = np.asarray(B, dtype=np.float64)
    if A.ndim != 2 or A.shape[0] != A.shape[1] or B.ndim != 2 or B.shape[0] != A.shape[0]:
        raise ValueError(f"need A [X, X] and B [X, U]; got A {A.shape}, B {B.shape}")
    nx, nu = B.shape
    Q = np.eye(nx) if Q is None else np.asarray(Q, dtype=np.float64)
    R = np.eye(nu) if R is None else np.asarray(R, dtype=np.float64)
    Qf = Q if Qf is None else np.asarray(Qf, dtype=np.float64)
    goal = np.zeros(nx) if goal is None else np.asarray(goal, dtype=np.float64)
    if Q.shape != (nx, nx) or Qf.shape != (nx, nx) or R.shape != (nu, nu) or goal.shape != (nx,):
        raise ValueError(
            f"need Q, Qf [{nx}, {nx}], R [{nu}, {nu}], goal [{nx}]; got Q {Q.shape}, "
            f"Qf {Qf.shape}, R {R.shape}, goal {goal.shape}"
        )
    bound = np.broadcast_to(np.asarray(action_bound, dtype=np.float64), (nu,)).copy()

    def step(x: Any, u: Any, ops: Ops) -> Any:
        return ops.matvec(A, x) + ops.matvec(B, u)

    def cost(x: Any, u: Any, ops: Ops) -> Any:
        return ops.quad(Q, x - ops.const(goal, x)) + ops.quad(R, u)

    return AnalyticSystem(
        name=name,
        obs_dim=nx,
        act_dim=nu,
        dt=dt,
        action_low=-bound,
        action_high=bound,
        goal=goal,
        start=np.ones(nx) if start is None else np.asarray(start, dtype=np.float64),
        start_noise=start_noise,
        angle_dims=(),
        success_tolerance=np.full(nx, 0.05),
        step_expr=step,
        cost_expr=cost,
        terminal_expr=lambda x, ops: ops.quad(Qf, x - ops.const(goal, x)),
        quadratic=QuadraticCost(Q=Q, R=R, Qf=Qf, goal=goal),
        max_episode_steps=max_episode_steps,
        state_labels=tuple(state_labels or (f"x[{i}]" for i in range(nx))),
        action_labels=tuple(action_labels or (f"u[{j}]" for j in range(nu))),
    )


def double_integrator(dt: float = 0.1, action_bound: float = 1.0) -> AnalyticSystem:
    """Position-velocity double integrator (exact zero-order-hold discretization), state
    ``[p, v]`` (m, m/s), the action ``u`` an acceleration in ``[-action_bound, action_bound]``
    m/s^2 (a force on a unit mass), cost ``p^2 + 0.1 v^2 + 0.1 u^2``, terminal ``10 p^2 + v^2``,
    starting at ``[1, 0]``; its ODE ``(p, v)' = (v, u)`` serves collocation."""

    def ode(x: Any, u: Any, ops: Ops) -> Any:
        return ops.stack([ops.split(x)[1], ops.split(u)[0]])

    system = linear(
        A=np.array([[1.0, dt], [0.0, 1.0]]),
        B=np.array([[0.5 * dt**2], [dt]]),
        Q=np.diag([1.0, 0.1]),
        R=np.array([[0.1]]),
        Qf=np.diag([10.0, 1.0]),
        action_bound=action_bound,
        start=np.array([1.0, 0.0]),
        start_noise=0.1,
        dt=dt,
        name="double_integrator",
        state_labels=("p [m]", "v [m/s]"),
        action_labels=("u [m/s^2]",),
    )
    return dataclasses.replace(system, ode_expr=ode)


POINT_MASS_TARGET = np.array([5.0, 20.0])  # [m] cbfinn/gps box2d_pointmass_example


def point_mass(
    start: tuple[float, float] = (0.0, 5.0),
    start_noise: float = 0.0,
    action_bound: float = 40.0,
) -> AnalyticSystem:
    """The 2-D point-mass reach of cbfinn/gps (``experiments/box2d_pointmass_example``,
    ``python/gps/agent/box2d/point_mass_world.py``) rebuilt as a linear system; state
    ``[x, y, vx, vy]`` (m, m/s), action a commanded velocity ``[vx, vy]`` (m/s).

    The Box2D world there has no gravity; each step sets the body's linear velocity to the
    action and takes one Box2D step of ``h = 1 / 20`` s (``fwSettings.hz``), which damps the
    velocity by ``c = 1 / (1 + 0.1 h)`` (``linearDamping = 0.1``) before moving the body::

        v' = c u,    p' = p + h c u.

    The action is clipped to ``[-action_bound, action_bound]`` per axis: 40 m/s is Box2D's
    largest translation per step (``b2_maxTranslation = 2`` m) at 20 Hz (Box2D clamps the norm;
    here each axis). Cost (``CostState`` with ``wp = 1``, ``l2 = 1`` on the position, and
    ``CostAction`` with ``wu = 5e-5``): ``0.5 |p - (5, 20)|^2 + 0.5 * 5e-5 |u|^2`` per step;
    the terminal cost ``0.5 |p_T - (5, 20)|^2`` stands for cbfinn's last sample step (weight
    multiplier 1). ``T = 100`` steps. cbfinn's example starts at ``(0, 5)`` at rest (one
    condition); ``start`` and ``start_noise`` (uniform half-width on every entry) move the
    starts. The third (always zero) coordinate of cbfinn's end-effector sensors is dropped.
    """
    h = 1.0 / 20.0
    c = 1.0 / (1.0 + 0.1 * h)
    zeros = np.zeros((2, 2))
    A = np.block([[np.eye(2), zeros], [zeros, zeros]])
    B = np.vstack([h * c * np.eye(2), c * np.eye(2)])
    Q = np.diag([0.5, 0.5, 0.0, 0.0])
    return linear(
        A=A,
        B=B,
        Q=Q,
        R=0.5 * 5e-5 * np.eye(2),
        Qf=Q,
        goal=np.concatenate([POINT_MASS_TARGET, np.zeros(2)]),
        action_bound=action_bound,
        start=np.array([start[0], start[1], 0.0, 0.0]),
        start_noise=start_noise,
        dt=h,
        name="point_mass",
        max_episode_steps=100,
        state_labels=("x [m]", "y [m]", "vx [m/s]", "vy [m/s]"),
        action_labels=("vx command [m/s]", "vy command [m/s]"),
    )


SYSTEMS: dict[str, Callable[..., AnalyticSystem]] = {
    "pendulum": pendulum,
    "cartpole": cartpole,
    "acrobot": acrobot,
    "linear": linear,
}
"""The study's system names -> factories (``linear`` needs ``A`` and ``B``)."""

ENV_NAMES: dict[str, Callable[[], AnalyticSystem]] = {
    "pendulum-swingup": lambda: pendulum(start_noise=0.05),
    "cartpole-swingup-analytic": lambda: cartpole(start_noise=0.05),
    "acrobot-swingup": lambda: acrobot(start_noise=0.05),
    "double-integrator": double_integrator,
    "point-mass": point_mass,
    # starts uniform over [0, 10] x [2.5, 12.5] m, the box of cbfinn/gps' four MDGPS starts
    "point-mass-spread": lambda: point_mass(start=(5.0, 7.5), start_noise=5.0),
}
"""Registered env names -> the system behind each (initial states with small noise)."""

for _env_name, _factory in ENV_NAMES.items():
    register(_env_name, lambda n=_env_name, f=_factory: f().spec(n))
