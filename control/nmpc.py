"""Nonlinear MPC by direct transcription and IPOPT (casadi), behind the planner seam.

:class:`NMPC` solves, from the current state ``x0``, the finite-horizon optimal control problem

    min_{x_0..x_H, u_0..u_{H-1}}  sum_{t<H} c(x_t, u_t) + c_H(x_H)
    s.t.  x_0 = x0,  x_{t+1} = F(x_t, u_t),  u_low <= u_t <= u_high,  x_low <= x_t <= x_high

with the system's casadi twin (``step_casadi``, ``cost_casadi``, ``terminal_cost_casadi``).
Two transcriptions (Betts 2010, "Practical Methods for Optimal Control", ch. 4; Biegler 2010,
"Nonlinear Programming", ch. 10):

- ``"multiple_shooting"`` (Bock & Plitt 1984): states and controls at every step are decision
  variables, ``F`` is the system's own discrete step, and the steps are tied by equality
  ("gap") constraints. The optimum is exactly the discrete-time problem the torch planners see.
- ``"collocation"``: direct collocation on the continuous-time dynamics ``x_dot = f(x, u)``
  (``ode``): inside each control interval of length ``dt`` the state is a polynomial of degree
  ``d`` (default 3) through the interval start and ``d`` collocation points (Gauss-Legendre
  or Gauss-Radau roots), the ODE holds at the collocation points, and the polynomial's end
  value starts the next interval. The control is held over the interval. Stage costs are taken
  at the interval starts, as in the discrete problem, so the two objectives are comparable.

The NLP is built once in ``__init__`` (SX graph, ``nlpsol`` with IPOPT); ``x0`` is its parameter
and bounds are passed per solve. Warm start: the primal guess is ``warm_start`` actions (the
MPC controller's shifted plan) with the states they produce under the discrete step (cold:
mid-bound actions, all states at ``x0``); multipliers
are not warm-started (IPOPT's interior-point iterates gain little from them without a matching
barrier parameter). Stopping rule: IPOPT's (scaled NLP error <= ``tol``, or ``max_iter``
iterations). IPOPT's return status becomes :attr:`Plan.status`:

- ``"ok"``: ``Solve_Succeeded`` / ``Solved_To_Acceptable_Level``;
- ``"infeasible"``: ``Infeasible_Problem_Detected`` (and the restoration phase failing to find a
  feasible point: ``Restoration_Failed``);
- ``"max_iterations"``: ``Maximum_Iterations_Exceeded`` / ``Maximum_CpuTime_Exceeded``;
- ``"error"``: anything else, or a non-finite solution.

A plan whose status is not ``"ok"`` still carries finite in-bound actions (the last iterate,
clipped; the warm start if the iterate is not finite), and the MPC controller counts it.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import casadi as ca
import numpy as np
import torch

from mbrl.planners.base import Plan, PlanningProblem
from mbrl.shapes import check_shape

METHODS = ("multiple_shooting", "collocation")
COLLOCATION_SCHEMES = ("legendre", "radau")

_OK = {"Solve_Succeeded", "Solved_To_Acceptable_Level"}
_INFEASIBLE = {"Infeasible_Problem_Detected", "Restoration_Failed"}
_MAX_ITER = {"Maximum_Iterations_Exceeded", "Maximum_CpuTime_Exceeded"}


class CasadiSystem(Protocol):
    """What NMPC needs of a system (``mbrl.envs.systems.AnalyticSystem`` fulfils it)."""

    obs_dim: int
    act_dim: int
    dt: float
    action_low: np.ndarray
    action_high: np.ndarray

    def step_casadi(self, x: Any, u: Any) -> Any: ...

    def cost_casadi(self, x: Any, u: Any) -> Any: ...

    def terminal_cost_casadi(self, x: Any) -> Any: ...


OdeFn = Callable[[Any, Any], Any]
"""``f(x [X, 1], u [U, 1]) -> x_dot [X, 1]`` in casadi symbols (continuous-time dynamics)."""


def status_from_ipopt(return_status: str) -> str:
    """Map IPOPT's ``return_status`` to a :attr:`Plan.status` (see the module docstring)."""
    if return_status in _OK:
        return "ok"
    if return_status in _INFEASIBLE:
        return "infeasible"
    if return_status in _MAX_ITER:
        return "max_iterations"
    return "error"


@dataclass(frozen=True)
class NMPCSolution:
    """One solve of the transcribed problem (float64 numpy)."""

    actions: np.ndarray  # [H, U] the optimizer's controls, clipped to the bounds
    states: np.ndarray  # [H + 1, X] the optimizer's states (x_0 = the given start)
    cost: float  # objective value at the solution
    status: str  # "ok" | "infeasible" | "max_iterations" | "error"
    return_status: str  # IPOPT's own status string
    iterations: int
    seconds: float  # wall time of the solver call
    constraint_violation: float  # max violation of the equality and bound constraints
    diagnostics: Mapping[str, float] = field(default_factory=dict)


def _collocation_coefficients(degree: int, scheme: str) -> tuple[np.ndarray, np.ndarray]:
    """Derivative matrix ``C [d + 1, d]`` and continuity weights ``D [d + 1]`` on ``[0, 1]``.

    With Lagrange polynomials ``L_j`` through ``tau_0 = 0`` and the ``d`` collocation roots,
    ``C[j, r] = L_j'(tau_{r+1})`` and ``D[j] = L_j(1)``: the polynomial's derivative at root
    ``r`` is ``sum_j C[j, r] x_j / h`` and its end value ``sum_j D[j] x_j``.
    """
    tau = np.array([0.0, *ca.collocation_points(degree, scheme)])  # [d + 1]
    c = np.zeros((degree + 1, degree))
    d = np.zeros(degree + 1)
    for j in range(degree + 1):
        others = np.delete(tau, j)
        poly = np.poly1d(others, r=True) / np.prod(tau[j] - others)  # L_j
        d[j] = poly(1.0)
        c[j] = np.polyder(poly)(tau[1:])
    return c, d


class NMPC:
    """Casadi/IPOPT nonlinear MPC on an analytic system (see the module docstring).

    Args:
        system: the system whose casadi twin is optimized (``step_casadi``, ``cost_casadi``,
            ``terminal_cost_casadi``, ``dt``, ``obs_dim``, ``act_dim``, action bounds).
        horizon: ``H`` control steps; must equal the planning problem's horizon.
        method: ``"multiple_shooting"`` or ``"collocation"``.
        state_bounds: ``(x_low [X], x_high [X])`` imposed on ``x_1..x_H`` (and collocation
            points); ``None`` for no state constraints. Use ``+-inf`` for free entries.
        collocation: ``"legendre"`` or ``"radau"`` roots; ``degree``: their number per interval.
        ode: continuous-time dynamics for collocation; defaults to the system's ``ode_casadi``
            when it has one.
        max_iter, tol: IPOPT's iteration limit and convergence tolerance.
        ipopt_options: extra IPOPT options (``{"max_cpu_time": 0.5}``, ...), without the
            ``ipopt.`` prefix.

    Raises:
        ValueError: unknown method or scheme, bad bounds, or collocation without an ODE.
    """

    def __init__(
        self,
        system: CasadiSystem,
        horizon: int,
        method: str = "multiple_shooting",
        state_bounds: tuple[np.ndarray, np.ndarray] | None = None,
        collocation: str = "legendre",
        degree: int = 3,
        ode: OdeFn | None = None,
        max_iter: int = 200,
        tol: float = 1e-8,
        ipopt_options: Mapping[str, Any] | None = None,
    ) -> None:
        if method not in METHODS:
            raise ValueError(f"unknown NMPC method {method!r}; valid: {METHODS}")
        if horizon < 1:
            raise ValueError(f"horizon must be >= 1, got {horizon}")
        if collocation not in COLLOCATION_SCHEMES:
            raise ValueError(f"unknown collocation {collocation!r}; valid: {COLLOCATION_SCHEMES}")
        if degree < 1:
            raise ValueError(f"collocation degree must be >= 1, got {degree}")
        self.system = system
        self.horizon = horizon
        self.method = method
        nx, nu, h = system.obs_dim, system.act_dim, horizon
        self.obs_dim, self.act_dim = nx, nu
        if state_bounds is None:
            x_low, x_high = np.full(nx, -np.inf), np.full(nx, np.inf)
        else:
            x_low = np.broadcast_to(np.asarray(state_bounds[0], dtype=np.float64), (nx,))
            x_high = np.broadcast_to(np.asarray(state_bounds[1], dtype=np.float64), (nx,))
            if bool((x_low > x_high).any()):
                raise ValueError("state_bounds: x_low must not exceed x_high")
        self.state_low, self.state_high = x_low.copy(), x_high.copy()  # [X]
        self.degree = degree if method == "collocation" else 0
        if method == "collocation":
            ode = ode if ode is not None else getattr(system, "ode_casadi", None)
            if ode is None:
                raise ValueError(
                    "collocation needs continuous-time dynamics: pass ode=f(x, u) -> x_dot "
                    "(casadi) or give the system an ode_casadi method; or use "
                    "method='multiple_shooting', which uses the discrete step"
                )

        # Decision vector w = [X (H+1)*nx | U H*nu | XC H*d*nx], one block after the other.
        xs = ca.SX.sym("x", nx, h + 1)
        us = ca.SX.sym("u", nu, h)
        xc = ca.SX.sym("xc", nx, h * self.degree)
        p = ca.SX.sym("x0", nx)
        objective = 0
        for t in range(h):
            objective += system.cost_casadi(xs[:, t], us[:, t])
        objective += system.terminal_cost_casadi(xs[:, h])
        gaps = [xs[:, 0] - p]
        if method == "multiple_shooting":
            for t in range(h):
                gaps.append(system.step_casadi(xs[:, t], us[:, t]) - xs[:, t + 1])
        else:
            c, d = _collocation_coefficients(degree, collocation)
            dt = float(system.dt)
            for t in range(h):
                pts = [xs[:, t]] + [xc[:, t * degree + r] for r in range(degree)]
                for r in range(degree):
                    slope = sum(c[j, r] * pts[j] for j in range(degree + 1))
                    gaps.append(dt * ode(pts[r + 1], us[:, t]) - slope)
                gaps.append(sum(d[j] * pts[j] for j in range(degree + 1)) - xs[:, t + 1])
        w = ca.vertcat(ca.vec(xs), ca.vec(us), ca.vec(xc))
        g = ca.vertcat(*gaps)
        options = {
            "print_time": False,
            "ipopt.print_level": 0,
            "ipopt.sb": "yes",
            "ipopt.max_iter": int(max_iter),
            "ipopt.tol": float(tol),
        }
        options.update({f"ipopt.{k}": v for k, v in (ipopt_options or {}).items()})
        self._solver = ca.nlpsol("nmpc", "ipopt", {"x": w, "f": objective, "g": g, "p": p}, options)
        self._ng = int(g.shape[0])
        self._nw = int(w.shape[0])
        self._n_x = nx * (h + 1)
        self._n_u = nu * h
        # Forward simulation of an action guess under the discrete step (the primal warm start).
        xsym, usym = ca.SX.sym("x", nx), ca.SX.sym("u", nu)
        step = ca.Function("step", [xsym, usym], [system.step_casadi(xsym, usym)])
        self._simulate = step.mapaccum("rollout", h)
        # State bounds over the X and XC blocks of w (x_0 is free: it is pinned by x_0 = x0).
        self._state_low_w = np.concatenate(
            [np.full(nx, -np.inf), np.tile(x_low, h), np.tile(x_low, h * self.degree)]
        )
        self._state_high_w = np.concatenate(
            [np.full(nx, np.inf), np.tile(x_high, h), np.tile(x_high, h * self.degree)]
        )

    def _bounds(self, u_low: np.ndarray, u_high: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        nx, h = self.obs_dim, self.horizon
        lo_s, hi_s = self._state_low_w, self._state_high_w
        split = nx * (h + 1)
        lbx = np.concatenate([lo_s[:split], np.tile(u_low, h), lo_s[split:]])
        ubx = np.concatenate([hi_s[:split], np.tile(u_high, h), hi_s[split:]])
        return lbx, ubx

    def initial_guess(self, x0: np.ndarray, actions: np.ndarray, simulate: bool) -> np.ndarray:
        """Primal guess ``w``: ``actions [H, U]`` with the states they produce from ``x0 [X]``
        (``simulate``), or with every state at ``x0``."""
        states = np.repeat(x0[:, None], self.horizon + 1, axis=1)  # [X, H + 1]
        if simulate:
            xs = np.asarray(self._simulate(x0, actions.T))  # [X, H]
            if np.isfinite(xs).all():
                states[:, 1:] = xs
        colloc = np.repeat(states[:, :-1], self.degree, axis=1)  # [X, H * d]
        return np.concatenate([states.T.ravel(), actions.ravel(), colloc.T.ravel()])

    def solve(
        self,
        x0: np.ndarray,
        guess_actions: np.ndarray | None = None,
        action_low: np.ndarray | None = None,
        action_high: np.ndarray | None = None,
    ) -> NMPCSolution:
        """Solve from ``x0 [X]`` with the primal guess ``guess_actions [H, U]`` and the states
        they produce; without a guess, actions at the middle of the bounds (0 where unbounded)
        and every state at ``x0`` (a cold multiple-shooting start, which does not commit IPOPT
        to the open-loop drift of a poor action guess). Action bounds default to the system's.
        """
        x0 = np.asarray(x0, dtype=np.float64).reshape(-1)
        if x0.shape != (self.obs_dim,) or not np.isfinite(x0).all():
            raise ValueError(f"x0 must be a finite [{self.obs_dim}] state, got {x0}")
        u_low = np.asarray(
            self.system.action_low if action_low is None else action_low, dtype=np.float64
        ).reshape(self.act_dim)
        u_high = np.asarray(
            self.system.action_high if action_high is None else action_high, dtype=np.float64
        ).reshape(self.act_dim)
        mid = np.where(np.isfinite(u_low + u_high), (u_low + u_high) / 2, 0.0)
        mid = np.clip(mid, u_low, u_high)
        if guess_actions is None:
            guess = np.tile(mid, (self.horizon, 1))
        else:
            guess = np.asarray(guess_actions, dtype=np.float64).reshape(self.horizon, self.act_dim)
            guess = np.clip(np.where(np.isfinite(guess), guess, mid), u_low, u_high)
        lbx, ubx = self._bounds(u_low, u_high)
        w0 = np.clip(self.initial_guess(x0, guess, simulate=guess_actions is not None), lbx, ubx)
        start = time.perf_counter()
        sol = self._solver(x0=w0, p=x0, lbx=lbx, ubx=ubx, lbg=0.0, ubg=0.0)
        seconds = time.perf_counter() - start
        stats = self._solver.stats()
        return_status = str(stats.get("return_status", "unknown"))
        status = status_from_ipopt(return_status)
        w = np.asarray(sol["x"]).reshape(-1)
        g = np.asarray(sol["g"]).reshape(-1)
        cost = float(sol["f"])
        violation = float(
            max(
                np.abs(g).max(initial=0.0),
                np.maximum(lbx - w, 0.0).max(initial=0.0),
                np.maximum(w - ubx, 0.0).max(initial=0.0),
            )
        )
        states = w[: self._n_x].reshape(self.horizon + 1, self.obs_dim)
        actions = w[self._n_x : self._n_x + self._n_u].reshape(self.horizon, self.act_dim)
        if not (np.isfinite(w).all() and math.isfinite(cost)):
            status = "error"
            actions, states = guess, np.asarray(w0[: self._n_x]).reshape(states.shape)
        return NMPCSolution(
            actions=np.clip(actions, u_low, u_high),
            states=states,
            cost=cost,
            status=status,
            return_status=return_status,
            iterations=int(stats.get("iter_count", 0)),
            seconds=seconds,
            constraint_violation=violation,
        )

    def plan(
        self, problem: PlanningProblem, x0: torch.Tensor, warm_start: torch.Tensor | None = None
    ) -> Plan:
        """The planner seam: solve from ``x0 [X]`` warm-started with ``warm_start [H, U]``.

        The problem supplies the horizon check and the action bounds; the dynamics and cost are
        the system's casadi twin (the problem's model should be the same system). Returns the
        optimal actions ``[H, U]`` (dtype and device of ``x0``), ``expected_return = -cost``,
        the predicted states as ``x_ref [H + 1, X]`` (no gains: ``K`` is ``None``), IPOPT's
        status mapped as in the module docstring, and its iterations.
        """
        if problem.horizon != self.horizon:
            raise ValueError(
                f"NMPC was built for horizon {self.horizon}, the problem has {problem.horizon}; "
                "build NMPC with the problem's horizon"
            )
        check_shape("x0", x0, (self.obs_dim,))
        guess = None
        if warm_start is not None:
            check_shape("warm_start", warm_start, (self.horizon, self.act_dim))
            guess = warm_start.detach().cpu().double().numpy()
        sol = self.solve(
            x0.detach().cpu().double().numpy(),
            guess,
            problem.action_low.cpu().double().numpy(),
            problem.action_high.cpu().double().numpy(),
        )
        dtype = x0.dtype if x0.is_floating_point() else torch.float32
        return Plan(
            actions=torch.as_tensor(sol.actions, dtype=dtype, device=x0.device),
            expected_return=-sol.cost,
            x_ref=torch.as_tensor(sol.states, dtype=dtype, device=x0.device),
            status=sol.status,
            iterations=sol.iterations,
            diagnostics={
                "cost": sol.cost,
                "solve_seconds": sol.seconds,
                "constraint_violation": sol.constraint_violation,
            },
        )


@dataclass(frozen=True)
class ReferenceSolution:
    """An IPOPT multiple-shooting solve used as the known answer for other solvers."""

    cost: float  # summed stage cost plus terminal cost of the optimum
    seconds: float  # wall time of ``opti.solve()`` alone (the NLP is built before the clock)
    iterations: int  # IPOPT iterations
    status: str  # IPOPT's return status, e.g. "Solve_Succeeded"
    actions: np.ndarray  # [H, U]


def ipopt_reference(
    system: CasadiSystem, x0: np.ndarray, u_init: np.ndarray, tol: float = 1e-10
) -> ReferenceSolution:
    """Solve the open-loop problem from ``x0`` with IPOPT by direct multiple shooting.

    States and controls are variables, the system's casadi step is an equality constraint per
    step, controls are boxed where the bounds are finite, and the initial guess is ``u_init``
    ``[H, U]`` with the states it produces: the same problem and guess an iLQR solve gets, so
    its cost and time can be compared (exact Hessian, stops at IPOPT's ``tol``).
    """
    h = u_init.shape[0]
    xs, us = ca.MX.sym("x", system.obs_dim), ca.MX.sym("u", system.act_dim)
    step = ca.Function("step", [xs, us], [system.step_casadi(xs, us)])
    guess = [np.asarray(x0, dtype=float)]
    for t in range(h):
        guess.append(np.asarray(step(guess[-1], u_init[t])).reshape(-1))
    opti = ca.Opti()
    X = opti.variable(system.obs_dim, h + 1)  # [X, H + 1]
    U = opti.variable(system.act_dim, h)  # [U, H]
    opti.subject_to(X[:, 0] == x0)
    cost = 0
    for t in range(h):
        opti.subject_to(X[:, t + 1] == system.step_casadi(X[:, t], U[:, t]))
        cost = cost + system.cost_casadi(X[:, t], U[:, t])
    cost = cost + system.terminal_cost_casadi(X[:, h])
    if np.isfinite(system.action_low).all() and np.isfinite(system.action_high).all():
        opti.subject_to(opti.bounded(system.action_low, U, system.action_high))
    opti.minimize(cost)
    opti.set_initial(U, u_init.T)
    opti.set_initial(X, np.stack(guess).T)
    opti.solver("ipopt", {"print_time": False}, {"print_level": 0, "tol": tol, "sb": "yes"})
    start = time.perf_counter()
    sol = opti.solve()
    seconds = time.perf_counter() - start
    stats = opti.stats()
    return ReferenceSolution(
        cost=float(sol.value(cost)),
        seconds=seconds,
        iterations=int(stats["iter_count"]),
        status=stats["return_status"],
        actions=np.asarray(sol.value(U)).reshape(system.act_dim, h).T,
    )
