"""Linear-quadratic regulators: the discrete algebraic Riccati equation, finite-horizon
time-varying LQR with affine terms, and an infinite-horizon :class:`LQR` planner.

Conventions: dynamics ``x' = A x + B u`` (or ``x' = F [x; u] + f``), stage cost
``x' Q x + u' R u`` for the infinite-horizon problem, ``[x; u]' C [x; u] / 2 + c' [x; u]`` for
the finite-horizon one; gains act as ``u = K x + k`` (the minus sign is inside ``K``).
All solves run in float64.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from mbrl.planners.base import Plan, PlanningProblem
from mbrl.planners.derivatives import dynamics_jacobians, stage_cost_expansion
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
    """Solution of a finite-horizon LQR: the policy ``u_t = K_t x_t + k_t`` and the value
    ``V_t(x) = x' V_t x / 2 + v_t' x + const``."""

    K: torch.Tensor  # [H, U, X]
    k: torch.Tensor  # [H, U]
    V: torch.Tensor  # [H + 1, X, X]
    v: torch.Tensor  # [H + 1, X]


def lqr_backward(
    F: torch.Tensor | tuple[torch.Tensor, torch.Tensor],
    f: torch.Tensor | None,
    C: torch.Tensor,
    c: torch.Tensor,
    V_final: torch.Tensor | None = None,
    v_final: torch.Tensor | None = None,
) -> TimeVaryingLQR:
    """Finite-horizon time-varying LQR with affine terms, by the backward Riccati recursion.

    Problem: minimise ``sum_t (z_t' C_t z_t / 2 + c_t' z_t) + x_H' V_final x_H / 2 +
    v_final' x_H`` with ``z_t = [x_t; u_t]`` and ``x_{t+1} = F_t z_t + f_t``. Recursion (from
    ``V_H = V_final``, ``v_H = v_final``, zeros by default)::

        Q_t = C_t + F_t' V_{t+1} F_t
        q_t = c_t + F_t' V_{t+1} f_t + F_t' v_{t+1}
        K_t = -Q_uu^-1 Q_ux,   k_t = -Q_uu^-1 q_u
        V_t = Q_xx + Q_xu K_t + K_t' Q_ux + K_t' Q_uu K_t
        v_t = q_x + Q_xu k_t + K_t' q_u + K_t' Q_uu k_t

    Args:
        F: ``[H, X, X + U]``, or a pair ``(A [H, X, X], B [H, X, U])``.
        f: ``[H, X]`` offsets, or ``None`` for zero.
        C: ``[H, X + U, X + U]`` symmetric, with ``Q_uu`` positive definite at every step.
        c: ``[H, X + U]``.
        V_final, v_final: ``[X, X]``, ``[X]`` terminal value (zero by default).

    Returns:
        :class:`TimeVaryingLQR` in float64.

    Raises:
        ValueError: if a ``Q_uu`` is not positive definite (the problem is not convex in u).
    """
    if isinstance(F, tuple):
        F = torch.cat([_f64(F[0]), _f64(F[1])], dim=-1)
    F, C, c = _f64(F), _f64(C), _f64(c)
    h, nx, nz = F.shape
    opts = {"dtype": torch.float64, "device": F.device}
    check_shape("C", C, (h, nz, nz))
    check_shape("c", c, (h, nz))
    f = torch.zeros(h, nx, **opts) if f is None else _f64(f)
    check_shape("f", f, (h, nx))
    V = torch.zeros(nx, nx, **opts) if V_final is None else _f64(V_final)  # [X, X]
    v = torch.zeros(nx, **opts) if v_final is None else _f64(v_final)  # [X]
    Ks, ks, Vs, vs = [], [], [V], [v]
    for t in reversed(range(h)):
        Ft = F[t]  # [X, Z]
        Qt = C[t] + Ft.mT @ V @ Ft  # [Z, Z]
        qt = c[t] + Ft.mT @ (V @ f[t] + v)  # [Z]
        L, info = torch.linalg.cholesky_ex(Qt[nx:, nx:])
        if int(info) != 0:
            raise ValueError(f"Q_uu is not positive definite at step {t}: the cost must be convex")
        rhs = torch.cat([Qt[nx:, :nx], qt[nx:, None]], dim=1)  # [U, X + 1]
        gains = -torch.cholesky_solve(rhs, L)  # [U, X + 1]
        K, k = gains[:, :nx], gains[:, nx]
        M = torch.zeros(nz + 1, nx + 1, **opts)  # [Z + 1, X + 1]: z = M [x; 1]
        M[:nx, :nx] = torch.eye(nx, **opts)
        M[nx:nz, :nx], M[nx:nz, nx], M[nz, nx] = K, k, 1.0
        Qaug = torch.zeros(nz + 1, nz + 1, **opts)  # [[Q, q], [q', 0]]
        Qaug[:nz, :nz], Qaug[:nz, nz], Qaug[nz, :nz] = Qt, qt, qt
        Vaug = M.mT @ Qaug @ M  # [X + 1, X + 1]
        V, v = 0.5 * (Vaug[:nx, :nx] + Vaug[:nx, :nx].mT), Vaug[:nx, nx]
        Ks.append(K)
        ks.append(k)
        Vs.append(V)
        vs.append(v)
    return TimeVaryingLQR(
        K=torch.stack(Ks[::-1]),
        k=torch.stack(ks[::-1]),
        V=torch.stack(Vs[::-1]),
        v=torch.stack(vs[::-1]),
    )


class LQR:
    """Infinite-horizon LQR around a goal: ``u = u_goal + K (x - x_goal)``.

    ``A, B`` are the model's Jacobians at ``(goal, goal_action)`` (exact for linear systems, a
    linearization otherwise; see :mod:`mbrl.planners.derivatives`), ``Q, R`` half the stage
    cost's Hessian blocks there unless given (cross terms are dropped). The gain is computed on
    the first :meth:`plan` of a problem and kept for later calls on the same problem.

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

    def gain(self, problem: PlanningProblem) -> torch.Tensor:
        """The gain ``K [U, X]`` (float64) for ``problem``'s model and cost."""
        if self._problem is problem and self._gain is not None:
            return self._gain
        nx, nu = self.goal.shape[0], problem.act_dim
        u_goal = self.goal_action
        if u_goal is None:
            u_goal = torch.zeros(nu, dtype=torch.float64)
        xg, ug = self.goal.reshape(1, nx), u_goal.reshape(1, nu)
        A, B = dynamics_jacobians(problem.model, xg, ug)
        Q, R = self.Q, self.R
        if Q is None or R is None:
            hess = stage_cost_expansion(problem, xg, ug).hess[0]  # [Z, Z]
            Q = 0.5 * hess[:nx, :nx] if Q is None else Q
            R = 0.5 * hess[nx:, nx:] if R is None else R
        self._gain = lqr_gain(A[0], B[0], Q, R)
        self._problem = problem
        return self._gain

    def plan(self, problem: PlanningProblem, x0: torch.Tensor, warm_start: Any = None) -> Plan:
        """Roll the closed loop ``u = clip(u_goal + K (x - goal))`` through the model's mean
        dynamics for ``H`` steps from ``x0 [X]``; the plan carries the predicted states as
        ``x_ref`` and ``K`` at every step. ``warm_start`` is ignored. Status ``"ok"``, or
        ``"nonfinite"`` when the predicted rollout is not finite."""
        h, nu = problem.horizon, problem.act_dim
        check_shape("x0", x0, (self.goal.shape[0],))
        dtype, device = x0.dtype, x0.device
        K = self.gain(problem).to(dtype=dtype, device=device)  # [U, X]
        goal = self.goal.to(dtype=dtype, device=device)  # [X]
        u_goal = (
            torch.zeros(nu, dtype=dtype, device=device)
            if self.goal_action is None
            else self.goal_action.to(dtype=dtype, device=device)
        )
        low = problem.action_low.to(dtype=dtype, device=device)
        high = problem.action_high.to(dtype=dtype, device=device)
        xs, us = [x0.reshape(1, -1)], []
        with torch.no_grad():
            for _ in range(h):
                u = torch.clamp(u_goal + (xs[-1] - goal) @ K.mT, low, high)  # [1, U]
                us.append(u)
                xs.append(problem.model.mean_dynamics(xs[-1], u))
            x_ref = torch.cat(xs)  # [H + 1, X]
            actions = torch.cat(us)  # [H, U]
            ret = problem.reward_fn(x_ref[:-1], actions, x_ref[1:]).sum()
            if problem.terminal_reward_fn is not None:
                ret = ret + problem.terminal_reward_fn(x_ref[-1:]).sum()
        finite = bool(torch.isfinite(x_ref).all()) and bool(torch.isfinite(ret))
        return Plan(
            actions=actions,
            expected_return=float(ret) if finite else float("-inf"),
            K=K.expand(h, -1, -1),
            x_ref=x_ref,
            status="ok" if finite else "nonfinite",
        )
