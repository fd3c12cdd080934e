"""Iterative LQR with control limits (box-DDP) on any model with differentiable mean dynamics.

References: Tassa, Erez & Todorov 2012, "Synthesis and stabilization of complex behaviors
through online trajectory optimization" (Sec. II: backward pass, regularization of Sec. II-F,
line search, the Levenberg-Marquardt schedule for ``mu``); Tassa, Mansard & Todorov 2014,
"Control-limited differential dynamic programming" (box-DDP: each backward step solves the box
QP for the feed-forward term by projected Newton, Alg. 1, and zeroes the feedback rows of clamped
controls).

Notation: ``H`` horizon, ``X`` state, ``U`` action, ``Z = X + U``. The cost is minus the
problem's reward, ``J = sum_t l(x_t, u_t) + l_H(x_H)`` with ``l = -reward`` and ``l_H`` minus the
problem's terminal reward (zero without one); dynamics are the model's mean dynamics (particles
and termination are ignored: iLQR plans one deterministic trajectory).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from mbrl.planners.base import Plan, PlanningProblem
from mbrl.planners.derivatives import (
    dynamics_jacobians,
    stage_cost_expansion,
    terminal_cost_expansion,
)
from mbrl.shapes import check_shape

_STATUSES = ("converged", "max_iterations", "diverged", "nonfinite")


def box_qp(
    H: np.ndarray,
    g: np.ndarray,
    low: np.ndarray,
    high: np.ndarray,
    x0: np.ndarray,
    max_iterations: int = 50,
    tol: float = 1e-10,
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Minimise ``x' H x / 2 + g' x`` subject to ``low <= x <= high`` by projected Newton
    (Tassa, Mansard & Todorov 2014, Alg. 1).

    Each iteration fixes the clamped set (at a bound with the gradient pushing outwards), takes
    a Newton step on the free coordinates and a projected Armijo line search (step halving,
    sufficient-decrease factor 0.1). Stops when no coordinate is free, when the free gradient's
    norm is below ``tol``, when the step no longer changes ``x``, or after ``max_iterations``.

    Args:
        H: ``[U, U]`` symmetric; positive definite on the free coordinates.
        g, low, high, x0: ``[U]`` (``x0`` is projected onto the box first).

    Returns:
        ``(x [U], free [U] bool, L)`` with ``L`` the Cholesky factor of ``H`` restricted to the
        free coordinates (``None`` if none is free). ``x`` is NaN if ``H`` is not positive
        definite on the free coordinates.
    """
    x = np.clip(x0, low, high)
    free = np.ones(len(g), dtype=bool)
    L = None

    def value(y: np.ndarray) -> float:
        return float(0.5 * y @ H @ y + g @ y)

    for _ in range(max_iterations):
        grad = g + H @ x
        clamped = ((x <= low) & (grad > 0)) | ((x >= high) & (grad < 0))
        free = ~clamped
        if not free.any():
            return x, free, None
        try:
            L = np.linalg.cholesky(H[np.ix_(free, free)])
        except np.linalg.LinAlgError:
            return np.full_like(x, np.nan), free, None
        grad_f = grad[free]
        if np.linalg.norm(grad_f) < tol:
            break
        step_dir = np.zeros_like(x)
        step_dir[free] = -np.linalg.solve(L.T, np.linalg.solve(L, grad_f))
        step, old = 1.0, value(x)
        while step > 1e-12:
            cand = np.clip(x + step * step_dir, low, high)
            if value(cand) - old <= 0.1 * grad @ (cand - x):
                break
            step *= 0.5
        if np.array_equal(cand, x):
            break
        x = cand
    grad = g + H @ x
    free = ~(((x <= low) & (grad > 0)) | ((x >= high) & (grad < 0)))
    if free.any():
        L = np.linalg.cholesky(H[np.ix_(free, free)])
    return x, free, L


class ILQR:
    """Iterative LQR / box-DDP with a Levenberg-Marquardt regularization schedule.

    Each iteration: (1) expand dynamics (Jacobians, see :mod:`mbrl.planners.derivatives`) and
    cost (gradient and Hessian, Gauss-Newton in the dynamics: no second derivatives of ``f``)
    around the current trajectory; (2) backward pass: the Riccati recursion of Tassa et al.
    2012 eq. 5 with state regularization ``Q_uu + mu f_u' f_u``, ``Q_ux + mu f_u' f_x``
    (eq. 10, ``regularization="state"``) or control regularization ``Q_uu + mu I``
    (``"control"``); control limits by the box QP of :func:`box_qp` (box-DDP: feedback rows of
    clamped controls are zero). If some ``Q_uu`` is not positive definite the pass restarts
    with a larger ``mu``; (3) forward pass: all line-search step sizes ``alpha`` are rolled out
    at once as a batch, ``u = clip(u_ref + alpha k + K (x - x_ref))``, and the largest
    ``alpha`` whose actual over expected reduction exceeds ``min_reduction_ratio`` is taken
    (expected reduction ``-(alpha d1 + alpha^2 d2)``, ``d1 = sum k'Q_u``,
    ``d2 = sum k'Q_uu k / 2``). ``mu`` follows Tassa et al. 2012 Sec. II-F: on failure
    ``delta = max(mu_factor, delta mu_factor)``, ``mu = max(mu_min, mu delta)``; on success
    ``delta = min(1 / mu_factor, delta / mu_factor)``, ``mu = mu delta`` (0 below ``mu_min``).

    Stopping rule and :attr:`Plan.status`:

    - ``"converged"``: the gradient measure ``mean_t max_i |k_ti| / (|u_ti| + 1)`` is below
      ``tol_grad`` (with ``mu < 1e-5``, as Tassa's), or an accepted step reduced the cost by
      less than ``tol_rel_cost * |J|``, or the expected reduction is below that;
    - ``"max_iterations"``: ``max_iterations`` iterations ran without converging (the best
      trajectory found is returned: MPC with few iterations per step lands here);
    - ``"diverged"``: ``mu`` exceeded ``mu_max`` (no step decreases the cost, or ``Q_uu``
      stays indefinite); the best trajectory so far is returned;
    - ``"nonfinite"``: the rollout of the initial guess is NaN or inf; the plan holds the
      initial guess without feedback and ``expected_return`` is minus infinity, and the
      problem's ``nonfinite`` counter grows by one.

    Line-search candidates whose rollout is not finite are rejected and counted in
    ``Plan.nonfinite`` and the problem's counter. Deterministic (no randomness).

    Args:
        max_iterations: iterations per :meth:`plan`.
        mu_init, mu_min, mu_max, mu_factor: the regularization schedule.
        line_search_alphas: step sizes, largest first (default ``10^linspace(0, -3, 11)``).
        tol_rel_cost, tol_grad: convergence tolerances (above).
        min_reduction_ratio: accept a step whose actual/expected reduction exceeds this.
        regularization: ``"state"`` or ``"control"`` (above).
    """

    def __init__(
        self,
        max_iterations: int = 100,
        mu_init: float = 1e-2,
        mu_min: float = 1e-6,
        mu_max: float = 1e10,
        mu_factor: float = 1.6,
        line_search_alphas: Sequence[float] | None = None,
        tol_rel_cost: float = 1e-6,
        tol_grad: float = 1e-4,
        min_reduction_ratio: float = 0.0,
        regularization: str = "state",
    ) -> None:
        if max_iterations < 1:
            raise ValueError(f"max_iterations must be >= 1, got {max_iterations}")
        if not 0 <= mu_min <= mu_max or mu_init < 0 or mu_factor <= 1:
            raise ValueError(
                "need 0 <= mu_min <= mu_max, mu_init >= 0 and mu_factor > 1; got "
                f"mu_min={mu_min}, mu_max={mu_max}, mu_init={mu_init}, mu_factor={mu_factor}"
            )
        if regularization not in ("state", "control"):
            raise ValueError(f"regularization must be 'state' or 'control', got {regularization!r}")
        alphas = (
            10.0 ** np.linspace(0.0, -3.0, 11)
            if line_search_alphas is None
            else np.asarray(line_search_alphas, dtype=np.float64)
        )
        if alphas.ndim != 1 or len(alphas) == 0 or (alphas <= 0).any():
            raise ValueError("line_search_alphas must be a non-empty sequence of positive floats")
        self.max_iterations = max_iterations
        self.mu_init, self.mu_min, self.mu_max, self.mu_factor = mu_init, mu_min, mu_max, mu_factor
        self.alphas = np.sort(alphas)[::-1].copy()  # [A] largest first
        self.tol_rel_cost = tol_rel_cost
        self.tol_grad = tol_grad
        self.min_reduction_ratio = min_reduction_ratio
        self.regularization = regularization

    # ------------------------------------------------------------------ the solver

    def plan(
        self, problem: PlanningProblem, x0: torch.Tensor, warm_start: torch.Tensor | None = None
    ) -> Plan:
        """Optimise ``H`` actions from ``x0 [X]`` starting from ``warm_start [H, U]`` (zeros
        clipped into the bounds when ``None``; non-finite entries are replaced the same way).

        Returns a :class:`Plan` in ``x0``'s dtype and device with ``actions [H, U]``,
        ``K [H, U, X]``, ``x_ref [H + 1, X]``, the status of the stopping rule and diagnostics
        ``cost``, ``initial_cost``, ``grad_norm``, ``mu``, ``expected_reduction``,
        ``backward_failures``, ``rejected_steps``.
        """
        h, nu = problem.horizon, problem.act_dim
        if x0.ndim != 1:
            raise ValueError(f"x0 must be one state [X], got shape {list(x0.shape)}")
        nx = x0.shape[0]
        dtype, device = x0.dtype, x0.device
        low = problem.action_low.to(dtype=dtype, device=device)  # [U]
        high = problem.action_high.to(dtype=dtype, device=device)  # [U]
        default = torch.clamp(torch.zeros(nu, dtype=dtype, device=device), low, high)  # [U]
        if warm_start is None:
            u = default.expand(h, nu).clone()  # [H, U]
        else:
            check_shape("warm_start", warm_start, (h, nu))
            u = warm_start.to(dtype=dtype, device=device)
            u = torch.where(torch.isfinite(u), u, default)
            u = torch.minimum(torch.maximum(u, low), high)
        model = problem.model
        if getattr(model, "learns_reward", False):
            raise ValueError(
                "iLQR differentiates the problem's reward_fn, but this model learns the reward; "
                "use a model with learns_reward=False"
            )
        step = getattr(model, "mean_dynamics", None)
        if step is None:
            raise TypeError(
                f"{type(model).__name__} has no mean_dynamics(x, u); iLQR needs a model with "
                "differentiable mean dynamics (KnownModel, an ensemble's mean)"
            )
        low_np, high_np = low.double().cpu().numpy(), high.double().cpu().numpy()

        x, cost = self._rollout_open(problem, x0, u)
        if not (torch.isfinite(x).all() and np.isfinite(cost)):
            problem.nonfinite += 1
            return Plan(
                actions=u,
                expected_return=float("-inf"),
                status="nonfinite",
                nonfinite=1,
                diagnostics={"cost": float("inf"), "initial_cost": float("inf")},
            )
        initial_cost = cost
        mu, delta = self.mu_init, 1.0
        status = "max_iterations"
        K = np.zeros((h, nu, nx))  # [H, U, X]
        grad_norm, expected, backward_failures, rejected, nonfinite = np.inf, 0.0, 0, 0, 0
        iterations = 0
        need_expansion = True
        while iterations < self.max_iterations:
            iterations += 1
            if need_expansion:
                try:
                    expansion = self._expand(problem, x, u)
                except FloatingPointError:
                    status = "nonfinite"
                    break
                need_expansion = False
            u_np = u.double().cpu().numpy()
            # backward pass, raising mu until every Q_uu is positive definite
            while True:
                result = self._backward(*expansion, mu, low_np - u_np, high_np - u_np, nu)
                if result is not None:
                    break
                backward_failures += 1
                delta = max(self.mu_factor, delta * self.mu_factor)
                mu = max(self.mu_min, mu * delta)
                if mu > self.mu_max:
                    break
            if result is None:
                status = "diverged"
                break
            K_new, k_new, d1, d2 = result
            grad_norm = float(np.mean(np.max(np.abs(k_new) / (np.abs(u_np) + 1.0), axis=1)))
            expected = -(d1 + d2)
            if grad_norm < self.tol_grad and mu < 1e-5:
                K = K_new
                status = "converged"
                break
            if expected <= self.tol_rel_cost * abs(cost):
                K = K_new
                status = "converged"
                break
            # forward pass: every alpha at once
            xs, us, costs = self._rollout_closed(problem, x0, x, u, K_new, k_new, low, high)
            bad = ~np.isfinite(costs)
            nonfinite += int(bad.sum())
            reduction = cost - costs  # [A]
            expected_a = -(self.alphas * d1 + self.alphas**2 * d2)  # [A]
            ok = (reduction > self.min_reduction_ratio * expected_a) & ~bad & (reduction > 0)
            if ok.any():
                a = int(np.argmax(ok))  # largest accepted alpha
                new_cost = float(costs[a])
                x, u, K = xs[a], us[a], K_new
                improvement = cost - new_cost
                cost = new_cost
                need_expansion = True
                delta = min(1.0 / self.mu_factor, delta / self.mu_factor)
                mu = mu * delta if mu * delta > self.mu_min else 0.0
                if improvement < self.tol_rel_cost * abs(cost):
                    status = "converged"
                    break
            else:
                rejected += 1
                delta = max(self.mu_factor, delta * self.mu_factor)
                mu = max(self.mu_min, mu * delta)
                if mu > self.mu_max:
                    status = "diverged"
                    break
        if nonfinite:
            problem.nonfinite += nonfinite
        return Plan(
            actions=u,
            expected_return=-cost,
            K=torch.as_tensor(K, dtype=dtype, device=device),
            x_ref=x,
            status=status,
            iterations=iterations,
            nonfinite=nonfinite,
            diagnostics={
                "cost": cost,
                "initial_cost": initial_cost,
                "grad_norm": grad_norm,
                "mu": mu,
                "expected_reduction": float(expected),
                "backward_failures": float(backward_failures),
                "rejected_steps": float(rejected),
            },
        )

    # ------------------------------------------------------------------ pieces

    @staticmethod
    def _trajectory_cost(
        problem: PlanningProblem, x: torch.Tensor, u: torch.Tensor
    ) -> torch.Tensor:
        """Costs ``[A]`` of trajectories ``x [A, H + 1, X]``, ``u [A, H, U]`` (float64)."""
        a, h1, nx = x.shape
        nu = u.shape[-1]
        xs = x[:, :-1].reshape(-1, nx)
        reward = problem.reward_fn(xs, u.reshape(-1, nu), x[:, 1:].reshape(-1, nx))
        total = -reward.double().view(a, h1 - 1).sum(dim=1)  # [A]
        if problem.terminal_reward_fn is not None:
            total = total - problem.terminal_reward_fn(x[:, -1]).double()
        return total

    def _rollout_open(
        self, problem: PlanningProblem, x0: torch.Tensor, u: torch.Tensor
    ) -> tuple[torch.Tensor, float]:
        """States ``[H + 1, X]`` and cost of the open-loop actions ``u [H, U]``."""
        step = problem.model.mean_dynamics
        with torch.no_grad():
            xs = [x0.reshape(1, -1)]
            for ut in u.unsqueeze(1).unbind(0):
                xs.append(step(xs[-1], ut))
            x = torch.cat(xs)  # [H + 1, X]
            cost = float(self._trajectory_cost(problem, x.unsqueeze(0), u.unsqueeze(0))[0])
        return x, cost

    def _rollout_closed(
        self,
        problem: PlanningProblem,
        x0: torch.Tensor,
        x_ref: torch.Tensor,
        u_ref: torch.Tensor,
        K: np.ndarray,
        k: np.ndarray,
        low: torch.Tensor,
        high: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor, np.ndarray]:
        """Roll out ``u = clip(u_ref + alpha k + K (x - x_ref))`` for every alpha at once.

        Returns states ``[A, H + 1, X]``, actions ``[A, H, U]`` and costs ``[A]`` (inf where
        the rollout is not finite).
        """
        dtype, device = x0.dtype, x0.device
        n = len(self.alphas)
        alphas = torch.as_tensor(self.alphas, dtype=dtype, device=device)  # [A]
        k_t = torch.as_tensor(k, dtype=dtype, device=device)  # [H, U]
        KT = torch.as_tensor(K, dtype=dtype, device=device).transpose(1, 2).unbind(0)  # H x [X, U]
        ff = (u_ref.unsqueeze(0) + alphas[:, None, None] * k_t).unbind(1)  # H x [A, U]
        refs = x_ref.unbind(0)  # H + 1 x [X]
        step = problem.model.mean_dynamics
        with torch.no_grad():
            state = x0.expand(n, -1)  # [A, X]
            xs, us = [state], []
            for t in range(len(ff)):
                act = torch.addmm(ff[t], state - refs[t], KT[t])
                act = torch.minimum(torch.maximum(act, low), high)  # [A, U]
                state = step(state, act)
                xs.append(state)
                us.append(act)
            x = torch.stack(xs, dim=1)  # [A, H + 1, X]
            u = torch.stack(us, dim=1)  # [A, H, U]
            costs = self._trajectory_cost(problem, x, u)  # [A]
            finite = torch.isfinite(costs) & torch.isfinite(x).flatten(1).all(dim=1)
            costs = torch.where(finite, costs, torch.inf)
        return x, u, costs.cpu().numpy()

    def _expand(self, problem: PlanningProblem, x: torch.Tensor, u: torch.Tensor) -> tuple:
        """Dynamics and cost expansions along ``x [H + 1, X]``, ``u [H, U]`` as float64 numpy:
        ``F [H, X + 1, Z + 1]`` (homogeneous ``[[f_x, f_u, 0], [0, 0, 1]]``), ``C [H, Z + 1,
        Z + 1]`` (``[[l_zz, l_z], [l_z', 0]]``), ``V_H [X + 1, X + 1]`` and the regularizer
        rows ``Rg [H, U, Z + 1]`` (``[f_u' f_x, f_u' f_u, 0]`` or ``[0, I, 0]``)."""
        h, nx = u.shape[0], x.shape[1]
        nu = u.shape[1]
        nz = nx + nu
        A, B = dynamics_jacobians(problem.model, x[:-1], u)  # [H, X, X], [H, X, U]
        stage = stage_cost_expansion(problem, x[:-1], u, x[1:], (A, B))
        terminal = terminal_cost_expansion(problem, x[-1:])
        fx = A.detach().double().cpu().numpy()
        fu = B.detach().double().cpu().numpy()
        F = np.zeros((h, nx + 1, nz + 1))
        F[:, :nx, :nx], F[:, :nx, nx:nz], F[:, nx, nz] = fx, fu, 1.0
        C = np.zeros((h, nz + 1, nz + 1))
        C[:, :nz, :nz] = stage.hess.detach().double().cpu().numpy()
        lz = stage.grad.detach().double().cpu().numpy()
        C[:, :nz, nz], C[:, nz, :nz] = lz, lz
        VH = np.zeros((nx + 1, nx + 1))
        if terminal is not None:
            VH[:nx, :nx] = terminal.hess[0].detach().double().cpu().numpy()
            lx = terminal.grad[0].detach().double().cpu().numpy()
            VH[:nx, nx], VH[nx, :nx] = lx, lx
        Rg = np.zeros((h, nu, nz + 1))
        if self.regularization == "state":
            Rg[:, :, :nz] = np.swapaxes(fu, 1, 2) @ F[:, :nx, :nz]
        else:
            Rg[:, :, nx:nz] = np.eye(nu)
        if not (np.isfinite(F).all() and np.isfinite(C).all() and np.isfinite(VH).all()):
            raise FloatingPointError(
                "non-finite derivatives along a finite trajectory; check the model and reward"
            )
        return F, C, VH, Rg

    @staticmethod
    def _backward(
        F: np.ndarray,
        C: np.ndarray,
        VH: np.ndarray,
        Rg: np.ndarray,
        mu: float,
        dlow: np.ndarray,
        dhigh: np.ndarray,
        nu: int,
    ) -> tuple[np.ndarray, np.ndarray, float, float] | None:
        """One regularized box-DDP backward pass in homogeneous coordinates.

        With ``Q~ = C~_t + F~_t' V~ F~_t`` (``[Z + 1, Z + 1]``, last row/column the linear
        terms) and the policy ``[x; u; 1] = M [x; 1]``, ``M = [[I, 0], [K, k], [0, 1]]``, the
        value update ``V~ = M' Q~ M`` is Tassa et al. 2012 eq. 11. ``dlow, dhigh [H, U]`` bound
        the feed-forward ``k``. Returns ``(K [H, U, X], k [H, U], d1, d2)``, or ``None`` when
        some regularized ``Q_uu`` is not positive definite.
        """
        h, nx1, nz1 = F.shape
        nx, nz = nx1 - 1, nz1 - 1
        K = np.zeros((h, nu, nx))
        k = np.zeros((h, nu))
        M = np.zeros((nz1, nx1))
        M[:nx, :nx] = np.eye(nx)
        M[nz, nx] = 1.0
        V = VH
        d1 = d2 = 0.0
        Fs, FTs, Cs = list(F), list(F.transpose(0, 2, 1)), list(C)
        regs = list(mu * Rg) if mu > 0 else None
        if nu == 1:  # box QP in closed form: clip the Newton step; Python floats for scalars
            lows, highs = dlow[:, 0].tolist(), dhigh[:, 0].tolist()
            for t in range(h - 1, -1, -1):
                Q = Cs[t] + FTs[t] @ (V @ Fs[t])  # [Z + 1, Z + 1]
                row = Q[nx] if regs is None else Q[nx] + regs[t][0]  # [Z + 1] regularized
                quu, qu = float(row[nx]), float(Q[nx, nz])
                if not quu > 0:
                    return None
                k_free = -qu / quu
                kt = min(max(k_free, lows[t]), highs[t])
                if kt == k_free:
                    Kt = row[:nx] / -quu
                    K[t, 0] = Kt
                    M[nx, :nx] = Kt
                else:
                    M[nx, :nx] = 0.0
                k[t, 0] = M[nx, nx] = kt
                V = M.T @ Q @ M
                d1 += kt * qu
                d2 += 0.5 * kt * kt * float(Q[nx, nx])
            return K, k, d1, d2
        for t in range(h - 1, -1, -1):
            Q = Cs[t] + FTs[t] @ (V @ Fs[t])  # [Z + 1, Z + 1]
            rows = Q[nx:nz] if regs is None else Q[nx:nz] + regs[t]  # [U, Z + 1]
            qu = Q[nx:nz, nz]  # [U] (not regularized)
            kt, free, L = box_qp(rows[:, nx:nz], qu, dlow[t], dhigh[t], k[min(t + 1, h - 1)])
            if not np.isfinite(kt).all():
                return None
            if free.any():
                K[t][free] = -np.linalg.solve(L.T, np.linalg.solve(L, rows[free, :nx]))
            k[t] = kt
            M[nx:nz, :nx] = K[t]
            M[nx:nz, nx] = kt
            V = M.T @ Q @ M
            V = 0.5 * (V + V.T)
            d1 += float(kt @ qu)
            d2 += 0.5 * float(kt @ Q[nx:nz, nx:nz] @ kt)
        return K, k, d1, d2
