"""Iterative LQR with control limits (box-DDP) on any Linearizable or differentiable model.

References: Tassa, Erez & Todorov 2012, "Synthesis and stabilization of complex behaviors
through online trajectory optimization" (Sec. II: backward pass, regularization of Sec. II-F,
line search, the Levenberg-Marquardt schedule for ``mu``); Tassa, Mansard & Todorov 2014,
"Control-limited differential dynamic programming" (box-DDP: each backward step solves the box
QP for the feed-forward term by projected Newton, Alg. 1, and zeroes the feedback rows of clamped
controls).

Notation: ``H`` horizon, ``X`` state, ``U`` action, ``Z = X + U``. The cost is the problem's
objective (:func:`~mbrl.planners.derivatives.stage_cost_of`),
``J = sum_t l(x_t, u_t, t) + l_H(x_H)``: minus the reward and minus ``value_fn`` (zero without
one), or the problem's ``stage_cost``; dynamics are the model's mean dynamics (particles,
discount and termination are ignored: iLQR plans one deterministic trajectory). The backward
pass is the shared Riccati recursion (:func:`~mbrl.planners.lqr.riccati_backward`) with the
box-QP gain step (:func:`box_gain`).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from mbrl.planners.base import Plan, PlanningProblem, WarmStart
from mbrl.planners.derivatives import (
    ProblemCost,
    StepFn,
    dynamics_jacobians,
    mean_step,
    model_dtype,
    stage_cost_of,
)
from mbrl.planners.lqr import GainFn, IndefiniteError, TimeVaryingLQR, riccati_backward
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
        self, problem: PlanningProblem, x0: torch.Tensor, warm: WarmStart | None = None
    ) -> Plan:
        """Optimise ``H`` actions from ``x0 [X]`` starting from ``warm.actions [H, U]`` (zeros
        clipped into the bounds when ``None``; non-finite entries are replaced the same way).

        The model is called in its own dtype (``x0``'s for models that follow their inputs);
        the backward pass runs in float64. Returns a :class:`Plan` in ``x0``'s dtype and device
        with ``actions [H, U]``, ``K [H, U, X]``, ``x_ref [H + 1, X]``, the status of the
        stopping rule and diagnostics ``cost``, ``initial_cost``, ``grad_norm``, ``mu``,
        ``expected_reduction``, ``backward_failures``, ``rejected_steps``.

        Raises:
            ValueError: ``x0`` is not one state, or the model learns the reward.
            TypeError: the model is neither ``Linearizable`` nor a ``DifferentiableModel``, or
                the reward (or ``value_fn``) is not differentiable (checked before any
                autograd call; see :func:`~mbrl.planners.derivatives.stage_cost_of`).
        """
        h, nu = problem.horizon, problem.act_dim
        if x0.ndim != 1:
            raise ValueError(f"x0 must be one state [X], got shape {list(x0.shape)}")
        nx = x0.shape[0]
        out_dtype, device = x0.dtype, x0.device
        objective = stage_cost_of(problem)
        step = mean_step(problem.model)
        dtype = model_dtype(problem.model, x0.dtype)
        low = problem.action_low.to(dtype=dtype, device=device)  # [U]
        high = problem.action_high.to(dtype=dtype, device=device)  # [U]
        default = torch.clamp(torch.zeros(nu, dtype=dtype, device=device), low, high)  # [U]
        if warm is None:
            u = default.expand(h, nu).clone()  # [H, U]
        else:
            check_shape("warm.actions", warm.actions, (h, nu))
            u = warm.actions.to(dtype=dtype, device=device)
            u = torch.where(torch.isfinite(u), u, default)
            u = torch.minimum(torch.maximum(u, low), high)
        low64, high64 = low.double().cpu(), high.double().cpu()  # [U]
        times = torch.arange(h, device=device)  # [H]
        x0 = x0.to(dtype)

        x, cost = self._rollout_open(step, objective, x0, u)
        if not (torch.isfinite(x).all() and np.isfinite(cost)):
            problem.nonfinite += 1
            return Plan(
                actions=u.to(out_dtype),
                expected_return=float("-inf"),
                status="nonfinite",
                nonfinite=1,
                diagnostics={"cost": float("inf"), "initial_cost": float("inf")},
            )
        initial_cost = cost
        mu, delta = self.mu_init, 1.0
        status = "max_iterations"
        K = torch.zeros(h, nu, nx, dtype=torch.float64)  # [H, U, X]
        grad_norm, expected, backward_failures, rejected, nonfinite = np.inf, 0.0, 0, 0, 0
        iterations = 0
        need_expansion = True
        while iterations < self.max_iterations:
            iterations += 1
            if need_expansion:
                try:
                    expansion = self._expand(problem, objective, x, u, times)
                except FloatingPointError:
                    status = "nonfinite"
                    break
                need_expansion = False
            u64 = u.double().cpu()  # [H, U]
            gain = box_gain(low64 - u64, high64 - u64)
            # backward pass, raising mu until every Q_uu is positive definite
            while True:
                result = self._backward(expansion, mu, gain)
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
            K_new, k_new = result.K, result.k
            d1, d2 = float(result.d1), float(result.d2)
            grad_norm = float(torch.mean(torch.amax(k_new.abs() / (u64.abs() + 1.0), dim=1)))
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
            xs, us, costs = self._rollout_closed(step, objective, x0, x, u, K_new, k_new, low, high)
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
            actions=u.to(out_dtype),
            expected_return=-cost,
            K=K.to(dtype=out_dtype, device=device),
            x_ref=x.to(out_dtype),
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
    def _rollout_open(
        step: StepFn, objective: ProblemCost, x0: torch.Tensor, u: torch.Tensor
    ) -> tuple[torch.Tensor, float]:
        """States ``[H + 1, X]`` and cost of the open-loop actions ``u [H, U]``."""
        with torch.no_grad():
            xs = [x0.reshape(1, -1)]
            for ut in u.unsqueeze(1).unbind(0):
                xs.append(step(xs[-1], ut))
            x = torch.cat(xs)  # [H + 1, X]
            cost = float(objective.trajectory_cost(x.unsqueeze(0), u.unsqueeze(0))[0])
        return x, cost

    def _rollout_closed(
        self,
        step: StepFn,
        objective: ProblemCost,
        x0: torch.Tensor,
        x_ref: torch.Tensor,
        u_ref: torch.Tensor,
        K: torch.Tensor,
        k: torch.Tensor,
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
        k_t = k.to(dtype=dtype, device=device)  # [H, U]
        KT = K.to(dtype=dtype, device=device).transpose(1, 2).unbind(0)  # H x [X, U]
        ff = (u_ref.unsqueeze(0) + alphas[:, None, None] * k_t).unbind(1)  # H x [A, U]
        refs = x_ref.unbind(0)  # H + 1 x [X]
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
            costs = objective.trajectory_cost(x, u)  # [A]
            finite = torch.isfinite(costs) & torch.isfinite(x).flatten(1).all(dim=1)
            costs = torch.where(finite, costs, torch.inf)
        return x, u, costs.cpu().numpy()

    def _expand(
        self,
        problem: PlanningProblem,
        objective: ProblemCost,
        x: torch.Tensor,
        u: torch.Tensor,
        t: torch.Tensor,
    ) -> tuple[torch.Tensor, ...]:
        """Dynamics and cost expansions along ``x [H + 1, X]``, ``u [H, U]`` at times
        ``t [H]``, in the model's dtype, as float64 CPU tensors: ``F [H, X + 1, Z + 1]``
        (homogeneous ``[[f_x, f_u, 0], [0, 0, 1]]``), ``C [H, Z + 1, Z + 1]``
        (``[[l_zz, l_z], [l_z', 0]]``), ``V_H [X + 1, X + 1]`` and the regularizer rows
        ``Rg [H, U, Z + 1]`` (``[f_u' f_x, f_u' f_u, 0]`` or ``[0, I, 0]``)."""
        h, nx = u.shape[0], x.shape[1]
        nu = u.shape[1]
        nz = nx + nu
        A, B = dynamics_jacobians(problem.model, x[:-1], u, t, problem.horizon)
        stage = objective.expansion_along(x[:-1], u, t, x[1:], (A, B))
        opts = {"dtype": torch.float64, "device": "cpu"}
        fx = A.detach().to(**opts)
        fu = B.detach().to(**opts)
        F = torch.zeros(h, nx + 1, nz + 1, **opts)
        F[:, :nx, :nx], F[:, :nx, nx:nz], F[:, nx, nz] = fx, fu, 1.0
        C = torch.zeros(h, nz + 1, nz + 1, **opts)
        C[:, :nz, :nz] = stage.hess.detach().to(**opts)
        lz = stage.grad.detach().to(**opts)
        C[:, :nz, nz], C[:, nz, :nz] = lz, lz
        VH = torch.zeros(nx + 1, nx + 1, **opts)
        if objective.has_terminal:
            terminal = objective.terminal_expansion(x[-1:])
            VH[:nx, :nx] = terminal.hess[0].detach().to(**opts)
            lx = terminal.grad[0].detach().to(**opts)
            VH[:nx, nx], VH[nx, :nx] = lx, lx
        Rg = torch.zeros(h, nu, nz + 1, **opts)
        if self.regularization == "state":
            Rg[:, :, :nz] = fu.mT @ F[:, :nx, :nz]
        else:
            Rg[:, :, nx:nz] = torch.eye(nu, **opts)
        if not (torch.isfinite(F).all() and torch.isfinite(C).all() and torch.isfinite(VH).all()):
            raise FloatingPointError(
                "non-finite derivatives along a finite trajectory; check the model and reward"
            )
        return F, C, VH, Rg

    @staticmethod
    def _backward(
        expansion: tuple[torch.Tensor, ...], mu: float, gain: GainFn
    ) -> TimeVaryingLQR | None:
        """One regularized box-DDP backward pass: :func:`~mbrl.planners.lqr.riccati_backward`
        on the expansion (``F, C, V_H, Rg``, see :meth:`_expand`) with the regularizer
        ``mu Rg`` and the box-QP ``gain`` (Tassa et al. 2012 eq. 11 in homogeneous
        coordinates). ``None`` when some regularized ``Q_uu`` is not positive definite."""
        F, C, VH, Rg = expansion
        try:
            return riccati_backward(F, C, VH, mu * Rg if mu > 0 else None, gain)
        except IndefiniteError:
            return None


def box_gain(dlow: torch.Tensor, dhigh: torch.Tensor) -> GainFn:
    """The box-DDP gain step (Tassa, Mansard & Todorov 2014) for
    :func:`~mbrl.planners.lqr.riccati_backward`: the feed-forward ``k_t`` minimises the
    regularized ``Q`` model over ``dlow[t] <= k <= dhigh[t]`` (``[H, U]``, float64, the bounds
    minus the current actions) by :func:`box_qp`, warm-started at ``k_{t+1}``, and the
    feedback rows of clamped controls are zero. One action (``U = 1``): the box QP in closed
    form, the Newton step clipped, in Python floats. Raises
    :class:`~mbrl.planners.lqr.IndefiniteError` when ``Q_uu`` is not positive definite on the
    free controls."""
    if dlow.shape[-1] == 1:
        lows, highs = dlow[:, 0].tolist(), dhigh[:, 0].tolist()

        def scalar(
            t: int, Quu: torch.Tensor, Qux: torch.Tensor, qu: torch.Tensor
        ) -> tuple[torch.Tensor, torch.Tensor]:
            quu, q = float(Quu), float(qu)
            if not quu > 0:
                raise IndefiniteError(t)
            k_free = -q / quu
            kt = min(max(k_free, lows[t]), highs[t])
            if kt == k_free:
                return Qux / -quu, qu / -quu
            return torch.zeros_like(Qux), torch.full_like(qu, kt)

        return scalar
    low_np, high_np = dlow.numpy(), dhigh.numpy()
    prev = np.zeros(dlow.shape[-1])  # k_{t+1}: the box QP's warm start

    def boxed(
        t: int, Quu: torch.Tensor, Qux: torch.Tensor, qu: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        rows_x = Qux.numpy()
        kt, free, L = box_qp(Quu.numpy(), qu.numpy(), low_np[t], high_np[t], prev)
        if not np.isfinite(kt).all():
            raise IndefiniteError(t)
        K = np.zeros_like(rows_x)
        if free.any():
            K[free] = -np.linalg.solve(L.T, np.linalg.solve(L, rows_x[free]))
        prev[:] = kt
        return torch.from_numpy(K), torch.from_numpy(kt)

    return boxed
