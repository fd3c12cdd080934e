"""Linear-quadratic regulators: the discrete algebraic Riccati equation, finite-horizon
time-varying LQR with affine terms, and an infinite-horizon :class:`LQR` planner.

Conventions: dynamics ``x' = A x + B u`` (or ``x' = F [x; u] + f``), stage cost
``x' Q x + u' R u`` for the infinite-horizon problem, ``[x; u]' C [x; u] / 2 + c' [x; u]`` for
the finite-horizon one; gains act as ``u = K x + k`` (the minus sign is inside ``K``).
All solves run in float64.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from mbrl.planners.base import Plan, PlanningProblem, WarmStart
from mbrl.planners.derivatives import (
    ProblemCost,
    dynamics_jacobians,
    mean_step,
    model_dtype,
    stage_cost_of,
)
from mbrl.shapes import check_shape


def _f64(m: Any) -> torch.Tensor:
    return torch.as_tensor(np.asarray(m) if not torch.is_tensor(m) else m).to(torch.float64)


def solve_dare(
    A: Any, B: Any, Q: Any, R: Any, tol: float = 1e-14, max_iterations: int = 100
) -> torch.Tensor:
    """Stabilizing solution ``P [X, X]`` of ``P = A'PA - A'PB (R + B'PB)^-1 B'PA + Q``.

    Structure-preserving doubling algorithm (Chu, Fan, Lin & Weng 2004, "Structure-preserving
    algorithms for periodic discrete-time algebraic Riccati equations", Sec. 2)::

        A_0 = A, G_0 = B R^-1 B', H_0 = Q
        W = I + G_k H_k
        A_{k+1} = A_k W^-1 A_k
        G_{k+1} = G_k + A_k W^-1 G_k A_k'
        H_{k+1} = H_k + A_k' H_k W^-1 A_k      ->  P

    converging quadratically when ``(A, B)`` is stabilizable and ``(A, Q^1/2)`` detectable.
    Stops when ``|H_{k+1} - H_k| <= tol |H_{k+1}|`` (Frobenius norms), then takes one Riccati
    fixed-point step to polish. ``A [X, X]``, ``B [X, U]``, ``Q [X, X]`` symmetric PSD,
    ``R [U, U]`` symmetric PD; tensors or arrays. Returns a float64 tensor on ``A``'s device.

    Raises:
        ValueError: on shape mismatches or a non-positive-definite ``R``.
        RuntimeError: if it does not converge in ``max_iterations`` doublings or the result is
            not finite or not stabilizing (the pair is not stabilizable/detectable, or is badly
            conditioned).
    """
    A, B, Q, R = _f64(A), _f64(B), _f64(Q), _f64(R)
    nx, nu = _check_lq(A, B, Q, R)
    L, info = torch.linalg.cholesky_ex(R)
    if int(info) != 0:
        raise ValueError("R must be symmetric positive definite")
    eye = torch.eye(nx, dtype=torch.float64, device=A.device)
    Ak, Gk, Hk = A, B @ torch.cholesky_solve(B.mT, L), Q
    for _ in range(max_iterations):
        W = eye + Gk @ Hk
        WA = torch.linalg.solve(W, Ak)  # W^-1 A_k
        WG = torch.linalg.solve(W, Gk)  # W^-1 G_k
        H_next = Hk + Ak.mT @ Hk @ WA
        Gk = Gk + Ak @ WG @ Ak.mT
        Ak = Ak @ WA
        done = torch.linalg.norm(H_next - Hk) <= tol * torch.linalg.norm(H_next)
        Hk = 0.5 * (H_next + H_next.mT)
        if bool(done):
            break
    else:
        raise RuntimeError(
            f"solve_dare did not converge in {max_iterations} doublings; check that (A, B) is "
            "stabilizable and (A, Q) detectable"
        )
    # one fixed-point step of the Riccati map polishes the last digits
    BP = B.mT @ Hk
    P = A.mT @ Hk @ A - (BP @ A).mT @ torch.linalg.solve(R + BP @ B, BP @ A) + Q
    P = 0.5 * (P + P.mT)
    stable = False
    if bool(torch.isfinite(P).all()):
        BP = B.mT @ P
        closed = A - B @ torch.linalg.solve(R + BP @ B, BP @ A)  # A + B K
        stable = bool(torch.linalg.eigvals(closed).abs().max() < 1.0)
    if not stable:
        raise RuntimeError(
            "solve_dare found no stabilizing solution; check that (A, B) is stabilizable and "
            "(A, Q) detectable"
        )
    return P


def lqr_gain(A: Any, B: Any, Q: Any, R: Any) -> torch.Tensor:
    """Infinite-horizon gain ``K [U, X]`` with ``u = K x`` optimal for cost ``x'Qx + u'Ru``:
    ``K = -(R + B'PB)^-1 B'PA`` with ``P`` from :func:`solve_dare` (float64)."""
    A, B, Q, R = _f64(A), _f64(B), _f64(Q), _f64(R)
    P = solve_dare(A, B, Q, R)
    BP = B.mT @ P
    return -torch.linalg.solve(R + BP @ B, BP @ A)


def _check_lq(A: torch.Tensor, B: torch.Tensor, Q: torch.Tensor, R: torch.Tensor) -> tuple:
    nx, nu = B.shape[-2], B.shape[-1]
    check_shape("A", A, (nx, nx))
    check_shape("B", B, (nx, "U"))
    check_shape("Q", Q, (nx, nx))
    check_shape("R", R, (nu, nu))
    return nx, nu


@dataclass(frozen=True)
class TimeVaryingLQR:
    """Solution of a finite-horizon LQR: the policy ``u_t = K_t x_t + k_t``, the value
    ``V_t(x) = x' V_t x / 2 + v_t' x + const`` and the predicted change of the objective from
    applying ``alpha k`` on top of the expansion point, ``alpha d1 + alpha^2 d2``. Leading batch
    axes ``[...]`` (conditions ``M``, say) are kept in front of every field."""

    K: torch.Tensor  # [..., H, U, X]
    k: torch.Tensor  # [..., H, U]
    V: torch.Tensor  # [..., H + 1, X, X]
    v: torch.Tensor  # [..., H + 1, X]
    d1: torch.Tensor  # [...] sum_t k_t' q_u,t
    d2: torch.Tensor  # [...] sum_t k_t' Q_uu,t k_t / 2


class IndefiniteError(ValueError):
    """A step's ``Q_uu`` has no minimiser (not positive definite on the free controls)."""

    def __init__(self, step: int) -> None:
        super().__init__(f"Q_uu is not positive definite at step {step}: the cost must be convex")
        self.step = step


Array = torch.Tensor | np.ndarray

GainFn = Callable[[int, Array, Array, Array], tuple[Array, Array]]
"""``gain(t, Q_uu [..., U, U], Q_ux [..., U, X], q_u [..., U]) -> (K [..., U, X], k [..., U])``:
the minimiser of ``u' Q_uu u / 2 + u' (Q_ux x + q_u)`` as ``u = K x + k`` at step ``t`` (called
for ``t = H-1 .. 0``); raises :class:`IndefiniteError` when there is none. It gets and returns
the arrays of :func:`riccati_backward`'s pass: float64 numpy arrays for one unbatched CPU
problem, torch tensors otherwise."""


def unconstrained_gain(t: int, Quu: Array, Qux: Array, qu: Array) -> tuple[Array, Array]:
    """The :data:`GainFn` without constraints: ``[K, k] = -Q_uu^-1 [Q_ux, q_u]`` (Cholesky)."""
    if isinstance(Quu, np.ndarray):
        K, k = unconstrained_gain(t, *(torch.from_numpy(a) for a in (Quu, Qux, qu)))
        return K.numpy(), k.numpy()
    L, info = torch.linalg.cholesky_ex(Quu)
    if bool((info != 0).any()):
        raise IndefiniteError(t)
    gains = -torch.cholesky_solve(torch.cat([Qux, qu.unsqueeze(-1)], dim=-1), L)  # [..., U, X+1]
    return gains[..., :-1], gains[..., -1]


class _TorchArrays:
    """The array operations of the recursion, on torch tensors (batched, or on a device)."""

    @staticmethod
    def eye(n: int, m: int, like: torch.Tensor) -> torch.Tensor:
        return torch.eye(n, m, dtype=like.dtype, device=like.device)

    @staticmethod
    def zeros(shape: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
        return torch.zeros(shape, dtype=like.dtype, device=like.device)


class _NumpyArrays:
    """The same on numpy arrays: one unbatched CPU problem (iLQR's), where numpy's per-call
    overhead on ``[Z + 1, Z + 1]`` matrices is a fraction of torch's."""

    @staticmethod
    def eye(n: int, m: int, like: np.ndarray) -> np.ndarray:
        return np.eye(n, m, dtype=like.dtype)

    @staticmethod
    def zeros(shape: tuple[int, ...], like: np.ndarray) -> np.ndarray:
        return np.zeros(shape, dtype=like.dtype)


def riccati_backward(
    F: torch.Tensor,
    C: torch.Tensor,
    V_final: torch.Tensor,
    reg: torch.Tensor | None = None,
    gain: GainFn = unconstrained_gain,
) -> TimeVaryingLQR:
    """The backward Riccati recursion of LQR, iLQR and LQR-FLM, in homogeneous coordinates.

    With ``z~ = [x; u; 1]`` (``Z + 1`` entries) and ``x~ = [x; 1]``: dynamics ``x~' = F~_t z~``
    (``F~ = [[f_x, f_u, f], [0, 0, 1]]``), stage cost ``z~' C~_t z~ / 2``
    (``C~ = [[C, c], [c', 2 c0]]``) and terminal value ``x~' V~_H x~ / 2``. For
    ``t = H-1 .. 0``::

        Q~_t = C~_t + F~_t' V~_{t+1} F~_t                       [Z + 1, Z + 1]
        (K_t, k_t) = gain(t, Q_uu + R_uu, Q_ux + R_ux, q_u)      R = reg_t (regularizer rows)
        V~_t = M_t' Q~_t M_t,  M_t = [[I, 0], [K_t, k_t], [0, 1]]

    (Tassa, Erez & Todorov 2012, eq. 5 and 11; the regularizer enters the gains only, eq. 10).
    The gain step is pluggable: :func:`unconstrained_gain` (LQR) or iLQR's box QP
    (:func:`mbrl.planners.ilqr.box_gain`). The recursion is written once over an array
    namespace: one unbatched float64 CPU problem runs on numpy arrays (zero-copy views of the
    inputs; the small matrix products cost a fraction of torch's per-call overhead), anything
    else on torch tensors.

    Args:
        F: ``[..., H, X + 1, Z + 1]``.
        C: ``[..., H, Z + 1, Z + 1]`` symmetric.
        V_final: ``[..., X + 1, X + 1]``.
        reg: ``[..., H, U, Z + 1]`` added to the ``u`` rows of ``Q~`` for the gains, or ``None``.
        gain: the per-step :data:`GainFn`.

    Returns:
        :class:`TimeVaryingLQR` in ``F``'s dtype and device (``V``, ``v`` from ``V~``).

    Raises:
        IndefiniteError: from ``gain``.
    """
    batch = tuple(F.shape[:-3])
    if not batch and F.device.type == "cpu" and F.dtype == torch.float64:
        parts = (F, C, V_final) if reg is None else (F, C, V_final, reg)
        arrays = [a.detach().numpy() for a in parts]
        out = _recursion(*arrays[:3], None if reg is None else arrays[3], gain, _NumpyArrays)
        return TimeVaryingLQR(*(torch.from_numpy(np.ascontiguousarray(a)) for a in out))
    return TimeVaryingLQR(*_recursion(F, C, V_final, reg, gain, _TorchArrays))


def _recursion(F: Any, C: Any, V_final: Any, reg: Any, gain: GainFn, ops: Any) -> tuple:
    """:func:`riccati_backward` on the arrays of ``ops``: ``(K, k, V, v, d1, d2)``."""
    h, nx1, nz1 = F.shape[-3:]
    nx, nz = nx1 - 1, nz1 - 1
    nu = nz - nx
    batch = tuple(F.shape[:-3])
    M = ops.zeros((*batch, nz1, nx1), F)  # [[I, 0], [K_t, k_t], [0, 1]], the u rows per step
    M[..., :nx, :nx] = ops.eye(nx, nx, F)
    M[..., nz, nx] = 1.0
    K_all = ops.zeros((*batch, h, nu, nx), F)
    k_all = ops.zeros((*batch, h, nu), F)
    qu_all = ops.zeros((*batch, h, nu), F)
    Quu_all = ops.zeros((*batch, h, nu, nu), F)
    Vt = ops.zeros((*batch, h + 1, nx1, nx1), F)
    Vt[..., h, :, :] = V_final
    FT = F.swapaxes(-1, -2)
    V = V_final
    for t in range(h - 1, -1, -1):
        Q = C[..., t, :, :] + FT[..., t, :, :] @ (V @ F[..., t, :, :])  # [..., Z + 1, Z + 1]
        rows = Q[..., nx:nz, :] if reg is None else Q[..., nx:nz, :] + reg[..., t, :, :]
        qu = Q[..., nx:nz, nz]  # [..., U] (not regularized)
        K, k = gain(t, rows[..., nx:nz], rows[..., :nx], qu)
        M[..., nx:nz, :nx] = K
        M[..., nx:nz, nx] = k
        V = M.swapaxes(-1, -2) @ (Q @ M)  # symmetric up to rounding; symmetrized once below
        K_all[..., t, :, :] = K
        k_all[..., t, :] = k
        Vt[..., t, :, :] = V
        qu_all[..., t, :] = qu
        Quu_all[..., t, :, :] = Q[..., nx:nz, nx:nz]
    Vt = 0.5 * (Vt + Vt.swapaxes(-1, -2))
    d1 = (k_all * qu_all).sum(axis=(-1, -2))
    d2 = 0.5 * (k_all[..., None, :] @ Quu_all @ k_all[..., :, None]).sum(axis=(-1, -2, -3))
    return K_all, k_all, Vt[..., :nx, :nx], Vt[..., :nx, nx], d1, d2


def lqr_backward(
    F: torch.Tensor | tuple[torch.Tensor, torch.Tensor],
    f: torch.Tensor | None,
    C: torch.Tensor,
    c: torch.Tensor,
    V_final: torch.Tensor | None = None,
    v_final: torch.Tensor | None = None,
) -> TimeVaryingLQR:
    """Finite-horizon time-varying LQR with affine terms, by the backward Riccati recursion
    (:func:`riccati_backward` with :func:`unconstrained_gain`), batched over leading axes.

    Problem: minimise ``sum_t (z_t' C_t z_t / 2 + c_t' z_t) + x_H' V_final x_H / 2 +
    v_final' x_H`` with ``z_t = [x_t; u_t]`` and ``x_{t+1} = F_t z_t + f_t``. Recursion (from
    ``V_H = V_final``, ``v_H = v_final``, zeros by default)::

        Q_t = C_t + F_t' V_{t+1} F_t
        q_t = c_t + F_t' V_{t+1} f_t + F_t' v_{t+1}
        K_t = -Q_uu^-1 Q_ux,   k_t = -Q_uu^-1 q_u
        V_t = Q_xx + Q_xu K_t + K_t' Q_ux + K_t' Q_uu K_t
        v_t = q_x + Q_xu k_t + K_t' q_u + K_t' Q_uu k_t

    Args:
        F: ``[..., H, X, X + U]``, or a pair ``(A [..., H, X, X], B [..., H, X, U])``.
        f: ``[..., H, X]`` offsets, or ``None`` for zero.
        C: ``[..., H, X + U, X + U]`` symmetric, with ``Q_uu`` positive definite at every step.
        c: ``[..., H, X + U]``.
        V_final, v_final: ``[..., X, X]``, ``[..., X]`` terminal value (zero by default).

    Returns:
        :class:`TimeVaryingLQR` in float64.

    Raises:
        ValueError: if a ``Q_uu`` is not positive definite (the problem is not convex in u).
    """
    if isinstance(F, tuple):
        F = torch.cat([_f64(F[0]), _f64(F[1])], dim=-1)
    F, C, c = _f64(F), _f64(C), _f64(c)
    h, nx, nz = F.shape[-3:]
    batch = F.shape[:-3]
    opts = {"dtype": torch.float64, "device": F.device}
    check_shape("C", C, (*batch, h, nz, nz))
    check_shape("c", c, (*batch, h, nz))
    f = torch.zeros(*batch, h, nx, **opts) if f is None else _f64(f)
    check_shape("f", f, (*batch, h, nx))
    V = torch.zeros(*batch, nx, nx, **opts) if V_final is None else _f64(V_final)
    v = torch.zeros(*batch, nx, **opts) if v_final is None else _f64(v_final)
    check_shape("V_final", V, (*batch, nx, nx))
    check_shape("v_final", v, (*batch, nx))
    Fh = torch.zeros(*batch, h, nx + 1, nz + 1, **opts)  # [[F, f], [0, 1]]
    Fh[..., :nx, :nz], Fh[..., :nx, nz], Fh[..., nx, nz] = F, f, 1.0
    Ch = torch.zeros(*batch, h, nz + 1, nz + 1, **opts)  # [[C, c], [c', 0]]
    Ch[..., :nz, :nz], Ch[..., :nz, nz], Ch[..., nz, :nz] = C, c, c
    Vh = torch.zeros(*batch, nx + 1, nx + 1, **opts)  # [[V, v], [v', 0]]
    Vh[..., :nx, :nx], Vh[..., :nx, nx], Vh[..., nx, :nx] = V, v, v
    return riccati_backward(Fh, Ch, Vh)


class LQR:
    """Infinite-horizon LQR around a goal: ``u = u_goal + K (x - x_goal)``.

    ``A, B`` are the model's Jacobians at ``(goal, goal_action)`` and ``t = 0`` (exact for
    linear systems, a linearization otherwise; see :mod:`mbrl.planners.derivatives`; the model
    is called in its own dtype), ``Q, R`` half the Hessian blocks of the problem's stage cost
    there unless given (cross terms are dropped). The gain is computed in float64 on the first
    :meth:`plan` of a problem and kept for later calls on the same problem.

    Args:
        goal: ``[X]`` state to regulate to (an equilibrium of the model under ``goal_action``).
        goal_action: ``[U]``, zero by default.
        Q, R: ``[X, X]``, ``[U, U]`` cost weights; from the cost Hessian when ``None``.
    """

    def __init__(
        self,
        goal: Any,
        goal_action: Any | None = None,
        Q: Any | None = None,
        R: Any | None = None,
    ) -> None:
        self.goal = _f64(goal)  # [X]
        self.goal_action = None if goal_action is None else _f64(goal_action)  # [U]
        self.Q = None if Q is None else _f64(Q)  # [X, X]
        self.R = None if R is None else _f64(R)  # [U, U]
        self._problem: PlanningProblem | None = None
        self._gain: torch.Tensor | None = None  # [U, X]
        self._objective: ProblemCost | None = None

    def gain(self, problem: PlanningProblem) -> torch.Tensor:
        """The gain ``K [U, X]`` (float64) for ``problem``'s model and cost."""
        if self._problem is problem and self._gain is not None:
            return self._gain
        nx, nu = self.goal.shape[0], problem.act_dim
        u_goal = self.goal_action
        if u_goal is None:
            u_goal = torch.zeros(nu, dtype=torch.float64)
        objective = stage_cost_of(problem)
        dtype = model_dtype(problem.model, torch.float64)
        xg, ug = self.goal.reshape(1, nx).to(dtype), u_goal.reshape(1, nu).to(dtype)
        t0 = torch.zeros(1, dtype=torch.long)
        A, B = dynamics_jacobians(problem.model, xg, ug, t0, problem.horizon)
        Q, R = self.Q, self.R
        if Q is None or R is None:
            hess = objective.expansion(xg, ug, t0).hess[0].double()  # [Z, Z]
            Q = 0.5 * hess[:nx, :nx] if Q is None else Q
            R = 0.5 * hess[nx:, nx:] if R is None else R
        self._gain = lqr_gain(A[0].double(), B[0].double(), Q, R)
        self._problem, self._objective = problem, objective
        return self._gain

    def plan(
        self, problem: PlanningProblem, x0: torch.Tensor, warm: WarmStart | None = None
    ) -> Plan:
        """Roll the closed loop ``u = clip(u_goal + K (x - goal))`` through the model's mean
        dynamics (in the model's dtype) for ``H`` steps from ``x0 [X]``; the plan, in ``x0``'s
        dtype and device, carries the predicted states as ``x_ref [H + 1, X]``, ``K [H, U, X]``
        at every step and ``expected_return`` minus the objective of the predicted
        trajectory. ``warm`` is ignored. Status ``"ok"``, or ``"nonfinite"`` when the
        predicted rollout is not finite."""
        h, nu = problem.horizon, problem.act_dim
        if not torch.is_tensor(x0):
            raise TypeError(
                f"x0: LQR plans from a state [X] about its set point, got a "
                f"{type(x0).__name__}; a filter's belief (a latent image model) has no set "
                "point to regulate to: plan it with ilqr (the learned reward as the stage "
                "cost) or a sampling planner (random, cem, icem, mppi, mcts)"
            )
        check_shape("x0", x0, (self.goal.shape[0],))
        K64 = self.gain(problem)
        objective = self._objective
        out_dtype, device = x0.dtype, x0.device
        dtype = model_dtype(problem.model, x0.dtype)
        K = K64.to(dtype=dtype, device=device)  # [U, X]
        goal = self.goal.to(dtype=dtype, device=device)  # [X]
        u_goal = (
            torch.zeros(nu, dtype=dtype, device=device)
            if self.goal_action is None
            else self.goal_action.to(dtype=dtype, device=device)
        )
        low = problem.action_low.to(dtype=dtype, device=device)
        high = problem.action_high.to(dtype=dtype, device=device)
        step = mean_step(problem.model)
        xs, us = [x0.reshape(1, -1).to(dtype)], []
        with torch.no_grad():
            for _ in range(h):
                u = torch.clamp(u_goal + (xs[-1] - goal) @ K.mT, low, high)  # [1, U]
                us.append(u)
                xs.append(step(xs[-1], u))
            x_ref = torch.cat(xs)  # [H + 1, X]
            actions = torch.cat(us)  # [H, U]
            cost = float(objective.trajectory_cost(x_ref[None], actions[None])[0])
        finite = bool(torch.isfinite(x_ref).all()) and math.isfinite(cost)
        return Plan(
            actions=actions.to(out_dtype),
            expected_return=-cost if finite else float("-inf"),
            K=K64.to(dtype=out_dtype, device=device).expand(h, -1, -1),
            x_ref=x_ref.to(out_dtype),
            status="ok" if finite else "nonfinite",
        )
