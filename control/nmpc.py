"""Nonlinear MPC by direct transcription and IPOPT (casadi), behind the planner seam.

:class:`NMPC` solves, from the current state ``x0``, the finite-horizon optimal control problem

    min_{x_0..x_H, u_0..u_{H-1}}  sum_{t<H} c(x_t, u_t) + c_H(x_H)
    s.t.  x_0 = x0,  x_{t+1} = F(x_t, u_t),  u_low <= u_t <= u_high,  x_low <= x_t <= x_high

with the planning problem's model's casadi twin (a ``CasadiModel``: ``step_casadi``,
``ode_casadi``) and its objective's casadi form (a ``CasadiStageCost``: ``cost_casadi``,
``terminal_cost_casadi``), under the problem's action bounds.
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

The NLP is built on the first solve of a problem (SX graph, ``nlpsol`` with IPOPT); ``x0`` is its
parameter and bounds are passed per solve. Warm start: the primal guess is ``warm.actions`` (the
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

from mbrl.dynamics.base import CasadiModel
from mbrl.planners.base import Plan, PlanningProblem, WarmStart
from mbrl.planners.derivatives import CasadiStageCost, stage_cost_of
from mbrl.shapes import check_shape

METHODS = ("multiple_shooting", "collocation")
COLLOCATION_SCHEMES = ("legendre", "radau")

_OK = {"Solve_Succeeded", "Solved_To_Acceptable_Level"}
_INFEASIBLE = {"Infeasible_Problem_Detected", "Restoration_Failed"}
_MAX_ITER = {"Maximum_Iterations_Exceeded", "Maximum_CpuTime_Exceeded"}


class CasadiSystem(Protocol):
    """What :func:`ipopt_reference` needs of a system (``mbrl.envs.systems.AnalyticSystem``
    fulfils it)."""

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


@dataclass(frozen=True)
class _Transcription:
    """The NLP built for one planning problem."""

    solver: Any  # casadi nlpsol
    simulate: Any  # casadi mapaccum of the discrete step over H steps
    state_low_w: np.ndarray  # [Nw_x] bounds over the X and XC blocks of w
    state_high_w: np.ndarray
    n_x: int  # X * (H + 1)
    n_u: int  # U * H


class NMPC:
    """Casadi/IPOPT nonlinear MPC on the problem's own model (see the module docstring).

    The planning problem supplies everything optimized: the dynamics are its model's symbolic
    twin (a :class:`~mbrl.dynamics.base.CasadiModel`: ``step_casadi``, ``ode_casadi``, ``dt``),
    the cost is its objective's casadi form (a
    :class:`~mbrl.planners.derivatives.CasadiStageCost` from
    :func:`~mbrl.planners.derivatives.stage_cost_of`: ``cost_casadi(x, u, t)`` and
    ``terminal_cost_casadi(x)``; an analytic system's ``reward_fn()``/``value_fn()`` or
    ``stage_cost()``), and the action bounds are the problem's. The NLP is built on the first
    solve of a problem and kept for later solves of the same problem; a problem whose model
    or cost has no casadi form is refused with a ``TypeError``.

    Args:
        horizon: ``H`` control steps; must equal the planning problem's horizon.
        method: ``"multiple_shooting"`` or ``"collocation"``.
        state_bounds: ``(x_low [X], x_high [X])`` imposed on ``x_1..x_H`` (and collocation
            points); ``None`` for no state constraints. Use ``+-inf`` for free entries.
        collocation: ``"legendre"`` or ``"radau"`` roots; ``degree``: their number per interval.
        ode: continuous-time dynamics for collocation; defaults to the model's ``ode_casadi``.
        max_iter, tol: IPOPT's iteration limit and convergence tolerance.
        ipopt_options: extra IPOPT options (``{"max_cpu_time": 0.5}``, ...), without the
            ``ipopt.`` prefix.

    Raises:
        ValueError: unknown method or scheme, bad bounds.
    """

    def __init__(
        self,
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
        if isinstance(horizon, bool) or not isinstance(horizon, int) or horizon < 1:
            raise ValueError(f"horizon must be an int >= 1, got {horizon!r}")
        if collocation not in COLLOCATION_SCHEMES:
            raise ValueError(f"unknown collocation {collocation!r}; valid: {COLLOCATION_SCHEMES}")
        if degree < 1:
            raise ValueError(f"collocation degree must be >= 1, got {degree}")
        self.horizon = horizon
        self.method = method
        self.state_bounds = None
        if state_bounds is not None:
            x_low = np.asarray(state_bounds[0], dtype=np.float64).reshape(-1)
            x_high = np.asarray(state_bounds[1], dtype=np.float64).reshape(-1)
            if x_low.shape != x_high.shape or bool((x_low > x_high).any()):
                raise ValueError(
                    "state_bounds: need x_low [X] and x_high [X] with x_low <= x_high, got "
                    f"{x_low} and {x_high}"
                )
            self.state_bounds = (x_low, x_high)
        self.collocation = collocation
        self.degree = degree if method == "collocation" else 0
        self.ode = ode
        self.options = {
            "print_time": False,
            "ipopt.print_level": 0,
            "ipopt.sb": "yes",
            "ipopt.max_iter": int(max_iter),
            "ipopt.tol": float(tol),
        }
        self.options.update({f"ipopt.{k}": v for k, v in (ipopt_options or {}).items()})
        self._problem: PlanningProblem | None = None
        self._nlp: _Transcription | None = None

    # ------------------------------------------------------------------ the NLP

    def _transcription(self, problem: PlanningProblem) -> _Transcription:
        """The NLP of ``problem`` (built on its first solve, then kept)."""
        if self._problem is problem and self._nlp is not None:
            return self._nlp
        if problem.horizon != self.horizon:
            raise ValueError(
                f"NMPC was built for horizon {self.horizon}, the problem has {problem.horizon}; "
                "build NMPC with the problem's horizon"
            )
        model = problem.model
        if not isinstance(model, CasadiModel):
            raise TypeError(
                f"NMPC optimizes the symbolic twin of the problem's model, but "
                f"{type(model).__name__} is not a CasadiModel (obs_dim, act_dim, dt, "
                "step_casadi, ode_casadi); plan this problem with iLQR or a sampling planner, "
                "or build it on a model with a casadi twin (SystemModel of an analytic system)"
            )
        cost = stage_cost_of(problem)
        if not isinstance(cost, CasadiStageCost):
            raise TypeError(
                f"NMPC needs the problem's cost in casadi form, but its stage cost (reward_fn "
                f"{type(problem.reward_fn).__name__}, value_fn "
                f"{type(problem.value_fn).__name__}) has no cost_casadi(x, u, t) / "
                "terminal_cost_casadi(x); give the problem a CasadiStageCost as stage_cost "
                "(an analytic system's stage_cost()), or plan it with iLQR"
            )
        nx, nu, h, d = model.obs_dim, model.act_dim, self.horizon, self.degree
        if self.state_bounds is None:
            x_low, x_high = np.full(nx, -np.inf), np.full(nx, np.inf)
        else:
            x_low, x_high = self.state_bounds
            if x_low.shape != (nx,):
                raise ValueError(
                    f"state_bounds: expected [{nx}] bounds for the model's {nx} states, got "
                    f"{list(x_low.shape)}"
                )
        ode = self.ode if self.ode is not None else model.ode_casadi

        # Decision vector w = [X (H+1)*nx | U H*nu | XC H*d*nx], one block after the other.
        xs = ca.SX.sym("x", nx, h + 1)
        us = ca.SX.sym("u", nu, h)
        xc = ca.SX.sym("xc", nx, h * d)
        p = ca.SX.sym("x0", nx)
        objective = 0
        for t in range(h):
            objective += cost.cost_casadi(xs[:, t], us[:, t], t)
        objective += cost.terminal_cost_casadi(xs[:, h])
        gaps = [xs[:, 0] - p]
        if self.method == "multiple_shooting":
            for t in range(h):
                gaps.append(model.step_casadi(xs[:, t], us[:, t]) - xs[:, t + 1])
        else:
            c, dw = _collocation_coefficients(d, self.collocation)
            dt = float(model.dt)
            for t in range(h):
                pts = [xs[:, t]] + [xc[:, t * d + r] for r in range(d)]
                for r in range(d):
                    slope = sum(c[j, r] * pts[j] for j in range(d + 1))
                    gaps.append(dt * ode(pts[r + 1], us[:, t]) - slope)
                gaps.append(sum(dw[j] * pts[j] for j in range(d + 1)) - xs[:, t + 1])
        w = ca.vertcat(ca.vec(xs), ca.vec(us), ca.vec(xc))
        g = ca.vertcat(*gaps)
        solver = ca.nlpsol("nmpc", "ipopt", {"x": w, "f": objective, "g": g, "p": p}, self.options)
        # Forward simulation of an action guess under the discrete step (the primal warm start).
        xsym, usym = ca.SX.sym("x", nx), ca.SX.sym("u", nu)
        step = ca.Function("step", [xsym, usym], [model.step_casadi(xsym, usym)])
        self._nlp = _Transcription(
            solver=solver,
            simulate=step.mapaccum("rollout", h),
            # x_0 is free in the bounds: it is pinned by x_0 = x0
            state_low_w=np.concatenate(
                [np.full(nx, -np.inf), np.tile(x_low, h), np.tile(x_low, h * d)]
            ),
            state_high_w=np.concatenate(
                [np.full(nx, np.inf), np.tile(x_high, h), np.tile(x_high, h * d)]
            ),
            n_x=nx * (h + 1),
            n_u=nu * h,
        )
        self._problem = problem
        return self._nlp

    def _bounds(
        self, nlp: _Transcription, nx: int, u_low: np.ndarray, u_high: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        h = self.horizon
        lo_s, hi_s = nlp.state_low_w, nlp.state_high_w
        split = nx * (h + 1)
        lbx = np.concatenate([lo_s[:split], np.tile(u_low, h), lo_s[split:]])
        ubx = np.concatenate([hi_s[:split], np.tile(u_high, h), hi_s[split:]])
        return lbx, ubx

    def initial_guess(
        self, problem: PlanningProblem, x0: np.ndarray, actions: np.ndarray, simulate: bool
    ) -> np.ndarray:
        """Primal guess ``w``: ``actions [H, U]`` with the states they produce from ``x0 [X]``
        under the problem's model (``simulate``), or with every state at ``x0``."""
        nlp = self._transcription(problem)
        states = np.repeat(x0[:, None], self.horizon + 1, axis=1)  # [X, H + 1]
        if simulate:
            xs = np.asarray(nlp.simulate(x0, actions.T))  # [X, H]
            if np.isfinite(xs).all():
                states[:, 1:] = xs
        colloc = np.repeat(states[:, :-1], self.degree, axis=1)  # [X, H * d]
        return np.concatenate([states.T.ravel(), actions.ravel(), colloc.T.ravel()])

    def solve(
        self,
        problem: PlanningProblem,
        x0: np.ndarray,
        guess_actions: np.ndarray | None = None,
    ) -> NMPCSolution:
        """Solve ``problem`` from ``x0 [X]`` with the primal guess ``guess_actions [H, U]`` and
        the states they produce; without a guess, actions at the middle of the problem's
        bounds (0 where unbounded) and every state at ``x0`` (a cold multiple-shooting start,
        which does not commit IPOPT to the open-loop drift of a poor action guess).

        Raises:
            TypeError: the problem's model or cost has no casadi form (see the class).
            ValueError: ``x0`` is not a finite ``[X]`` state, or the horizons differ.
        """
        nlp = self._transcription(problem)
        nx, nu = problem.model.obs_dim, problem.act_dim
        x0 = np.asarray(x0, dtype=np.float64).reshape(-1)
        if x0.shape != (nx,) or not np.isfinite(x0).all():
            raise ValueError(f"x0 must be a finite [{nx}] state, got {x0}")
        u_low = problem.action_low.cpu().double().numpy().reshape(nu)
        u_high = problem.action_high.cpu().double().numpy().reshape(nu)
        mid = np.where(np.isfinite(u_low + u_high), (u_low + u_high) / 2, 0.0)
        mid = np.clip(mid, u_low, u_high)
        if guess_actions is None:
            guess = np.tile(mid, (self.horizon, 1))
        else:
            guess = np.asarray(guess_actions, dtype=np.float64).reshape(self.horizon, nu)
            guess = np.clip(np.where(np.isfinite(guess), guess, mid), u_low, u_high)
        lbx, ubx = self._bounds(nlp, nx, u_low, u_high)
        w0 = self.initial_guess(problem, x0, guess, simulate=guess_actions is not None)
        w0 = np.clip(w0, lbx, ubx)
        start = time.perf_counter()
        sol = nlp.solver(x0=w0, p=x0, lbx=lbx, ubx=ubx, lbg=0.0, ubg=0.0)
        seconds = time.perf_counter() - start
        stats = nlp.solver.stats()
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
        states = w[: nlp.n_x].reshape(self.horizon + 1, nx)
        actions = w[nlp.n_x : nlp.n_x + nlp.n_u].reshape(self.horizon, nu)
        if not (np.isfinite(w).all() and math.isfinite(cost)):
            status = "error"
            actions, states = guess, np.asarray(w0[: nlp.n_x]).reshape(states.shape)
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
        self, problem: PlanningProblem, x0: torch.Tensor, warm: WarmStart | None = None
    ) -> Plan:
        """The planner seam: solve ``problem`` from ``x0 [X]`` with ``warm.actions [H, U]`` as
        the primal guess.

        Returns the optimal actions ``[H, U]`` (dtype and device of ``x0``),
        ``expected_return = -cost``, the predicted states as ``x_ref [H + 1, X]`` (no gains:
        ``K`` is ``None``), IPOPT's status mapped as in the module docstring, and its
        iterations.
        """
        if problem.horizon != self.horizon:
            raise ValueError(
                f"NMPC was built for horizon {self.horizon}, the problem has {problem.horizon}; "
                "build NMPC with the problem's horizon"
            )
        self._transcription(problem)  # refuses a model without a casadi twin first
        if not torch.is_tensor(x0):
            raise TypeError(
                f"x0: NMPC plans from a state [X], got a {type(x0).__name__}; plan a filter's "
                "belief with ilqr or a sampling planner"
            )
        check_shape("x0", x0, (problem.model.obs_dim,))
        guess = None
        if warm is not None:
            check_shape("warm.actions", warm.actions, (self.horizon, problem.act_dim))
            guess = warm.actions.detach().cpu().double().numpy()
        sol = self.solve(problem, x0.detach().cpu().double().numpy(), guess)
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
