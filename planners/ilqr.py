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
box-QP gain step (:func:`box_gain`). Without an initial guess the solver starts from the
better of zeros and a closed-loop regulator guess, and it does not report a saddle (a stationary
point with negative curvature, such as the hanging pendulum at rest) as converged.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

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
from mbrl.planners.lqr import (
    Array,
    GainFn,
    IndefiniteError,
    TimeVaryingLQR,
    riccati_backward,
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

    Initial guess: the caller's ``warm.actions``; without one (the first plan of an MPC
    episode) the cheaper of two rollouts: zero actions (clipped into the bounds) open loop, and
    the *regulator guess* (:meth:`_regulator_guess`): the time-varying LQR of the problem
    expanded at the start state held still, rolled out in closed loop. Near a goal the regulator
    guess is the LQR of the linearization there and stays in the goal's basin; zeros open loop
    let an unstable system fall out of it (the pendulum started near upright falls and, without
    friction, swings through a full turn, and the iterations then polish that full turn).

    Stationary points: when the iterations stop at a stationary point (below) after meeting an
    indefinite ``Q_uu`` or needing more regularization than ``mu_init`` (which can hide negative
    curvature), the unregularized backward pass is run there: if some ``Q_uu`` has a negative
    eigenvalue and the perturbation along it (:meth:`_descent_perturbation`) lowers the real
    rollout's cost, the point is a saddle, not a minimum (the hanging pendulum with zero torque
    is one: the gradient is zero, the curvature in the torque negative). Without a caller's
    guess the solver steps to the perturbed trajectory and goes on (``saddle_escapes``); with
    one it stops with status ``"saddle"``.

    Stopping rule and :attr:`Plan.status`:

    - ``"converged"``: the gradient measure ``mean_t max_i |k_ti| / (|u_ti| + 1)`` is below
      ``tol_grad`` (with ``mu < 1e-5``, as Tassa's), or an accepted step reduced the cost by
      less than ``tol_rel_cost * |J|``, or the expected reduction is below that, and the point
      is not a saddle (above);
    - ``"saddle"``: the same stationarity at a saddle of the caller's initial guess; the plan is
      that stationary trajectory and ``saddle_decrease`` says how much the perturbation saved;
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
        """Optimise ``H`` actions from ``x0 [X]`` starting from ``warm.actions [H, U]``
        (non-finite entries replaced by zeros clipped into the bounds), or from the default
        guess when ``None`` (the cheaper of zeros and the regulator guess, see the class
        docstring).

        The model is called in its own dtype (``x0``'s for models that follow their inputs);
        the backward pass runs in float64. Returns a :class:`Plan` in ``x0``'s dtype and device
        with ``actions [H, U]``, ``K [H, U, X]``, ``x_ref [H + 1, X]``, the status of the
        stopping rule and diagnostics ``cost``, ``initial_cost`` (of the trajectory the
        iterations start from), ``grad_norm``, ``mu``, ``expected_reduction``,
        ``backward_failures``, ``rejected_steps``, ``regulator_guess`` (1 when the default guess
        was the regulator's), ``saddle_escapes`` and ``saddle_decrease`` (the cost the last
        saddle perturbation saved; 0 when none was found).

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
        box = (low, high, low64, high64)
        nonfinite, regulated = 0, False
        if warm is None:  # the default guess: the better of zeros and the regulator around x0
            guess = self._regulator_guess(problem, objective, step, x0, u, times, box)
            if guess is not None:
                nonfinite += guess.nonfinite
                if guess.cost < cost:
                    x, u, cost, regulated = guess.x, guess.u, guess.cost, True
        initial_cost = cost
        mu, delta = self.mu_init, 1.0
        status = "max_iterations"
        K = torch.zeros(h, nu, nx, dtype=torch.float64)  # [H, U, X]
        grad_norm, expected, backward_failures, rejected = np.inf, 0.0, 0, 0
        escapes, saddle_decrease = 0, 0.0
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
            result, mu, delta, failures = self._backward_raising_mu(expansion, mu, delta, gain)
            backward_failures += failures
            if result is None:
                status = "diverged"
                break
            mu_used = mu
            K_new, k_new = result.K, result.k
            d1, d2 = float(result.d1), float(result.d2)
            grad_norm = float(torch.mean(torch.amax(k_new.abs() / (u64.abs() + 1.0), dim=1)))
            expected = -(d1 + d2)
            stationary = (grad_norm < self.tol_grad and mu < 1e-5) or (
                expected <= self.tol_rel_cost * abs(cost)
            )
            improvement = None
            if not stationary:
                # forward pass: every alpha at once
                ks = torch.as_tensor(self.alphas)[:, None, None] * k_new  # [A, H, U]
                xs, us, costs = self._rollout_closed(step, objective, x0, x, u, K_new, ks, box)
                bad = ~np.isfinite(costs)
                nonfinite += int(bad.sum())
                reduction = cost - costs  # [A]
                expected_a = -(self.alphas * d1 + self.alphas**2 * d2)  # [A]
                ok = (reduction > self.min_reduction_ratio * expected_a) & ~bad & (reduction > 0)
                if not ok.any():
                    rejected += 1
                    delta = max(self.mu_factor, delta * self.mu_factor)
                    mu = max(self.mu_min, mu * delta)
                    if mu > self.mu_max:
                        status = "diverged"
                        break
                    continue
                a = int(np.argmax(ok))  # largest accepted alpha
                new_cost = float(costs[a])
                x, u, K = xs[a], us[a], K_new
                improvement = cost - new_cost
                cost = new_cost
                need_expansion = True
                delta = min(1.0 / self.mu_factor, delta / self.mu_factor)
                mu = mu * delta if mu * delta > self.mu_min else 0.0
                if improvement >= self.tol_rel_cost * abs(cost):
                    continue
            else:
                K = K_new
            # a stationary point: a minimum unless the unregularized second-order model has
            # negative curvature along which a real rollout lowers the cost (checked when
            # regularization may have hidden it)
            if backward_failures > 0 or mu_used > self.mu_init:
                if need_expansion:
                    try:
                        expansion = self._expand(problem, objective, x, u, times)
                    except FloatingPointError:
                        status = "nonfinite"
                        break
                    need_expansion = False
                descent = self._descent_perturbation(
                    step, objective, x0, x, u, cost, expansion, box
                )
                if descent is not None:
                    nonfinite += descent.nonfinite
                    saddle_decrease = cost - descent.cost
                    if warm is None:  # the default guess steps off the saddle and goes on
                        x, u, cost = descent.x, descent.u, descent.cost
                        escapes += 1
                        need_expansion = True
                        mu, delta = self.mu_init, 1.0
                        continue
                    status = "saddle"
                    break
            status = "converged"
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
                "regulator_guess": float(regulated),
                "saddle_escapes": float(escapes),
                "saddle_decrease": float(saddle_decrease),
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

    @staticmethod
    def _rollout_closed(
        step: StepFn,
        objective: ProblemCost,
        x0: torch.Tensor,
        x_ref: torch.Tensor,
        u_ref: torch.Tensor,
        K: torch.Tensor,
        ks: torch.Tensor,
        box: _Box,
    ) -> tuple[torch.Tensor, torch.Tensor, np.ndarray]:
        """Roll out ``u = clip(u_ref + ks[a] + K (x - x_ref))`` for every candidate ``a`` at
        once (``ks [A, H, U]``: ``alpha k`` for the line search).

        Returns states ``[A, H + 1, X]``, actions ``[A, H, U]`` and costs ``[A]`` (inf where
        the rollout is not finite).
        """
        dtype, device = x0.dtype, x0.device
        low, high = box[0], box[1]
        n = ks.shape[0]
        KT = K.to(dtype=dtype, device=device).transpose(1, 2).unbind(0)  # H x [X, U]
        ff = (u_ref.unsqueeze(0) + ks.to(dtype=dtype, device=device)).unbind(1)  # H x [A, U]
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
        next_x: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, ...]:
        """Dynamics and cost expansions along ``x [H + 1, X]``, ``u [H, U]`` at times
        ``t [H]``, in the model's dtype, as float64 CPU tensors: ``F [H, X + 1, Z + 1]``
        (homogeneous ``[[f_x, f_u, d], [0, 0, 1]]``), ``C [H, Z + 1, Z + 1]``
        (``[[l_zz, l_z], [l_z', 0]]``), ``V_H [X + 1, X + 1]`` and the regularizer rows
        ``Rg [H, U, Z + 1]`` (``[f_u' f_x, f_u' f_u, 0]`` or ``[0, I, 0]``). ``next_x [H, X]``
        are the model's next states ``f(x_t, u_t)`` when ``x`` is not a rollout (the
        regulator guess); the defect ``d_t = f(x_t, u_t) - x_{t+1}`` is then the affine term
        (zero, and ``next_x = x[1:]``, along a rollout)."""
        h, nx = u.shape[0], x.shape[1]
        nu = u.shape[1]
        nz = nx + nu
        A, B = dynamics_jacobians(problem.model, x[:-1], u, t, problem.horizon)
        following = x[1:] if next_x is None else next_x
        stage = objective.expansion_along(x[:-1], u, t, following, (A, B))
        opts = {"dtype": torch.float64, "device": "cpu"}
        fx = A.detach().to(**opts)
        fu = B.detach().to(**opts)
        F = torch.zeros(h, nx + 1, nz + 1, **opts)
        F[:, :nx, :nx], F[:, :nx, nx:nz], F[:, nx, nz] = fx, fu, 1.0
        if next_x is not None:
            F[:, :nx, nz] = (next_x - x[1:]).detach().to(**opts)
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

    def _backward_raising_mu(
        self, expansion: tuple[torch.Tensor, ...], mu: float, delta: float, gain: GainFn
    ) -> tuple[TimeVaryingLQR | None, float, float, int]:
        """:meth:`_backward`, raising ``mu`` on the schedule until every ``Q_uu`` is positive
        definite: ``(result or None past mu_max, mu, delta, failed passes)``."""
        failures = 0
        while True:
            result = self._backward(expansion, mu, gain)
            if result is not None:
                return result, mu, delta, failures
            failures += 1
            delta = max(self.mu_factor, delta * self.mu_factor)
            mu = max(self.mu_min, mu * delta)
            if mu > self.mu_max:
                return None, mu, delta, failures

    def _regulator_guess(
        self,
        problem: PlanningProblem,
        objective: ProblemCost,
        step: StepFn,
        x0: torch.Tensor,
        u_bar: torch.Tensor,
        t: torch.Tensor,
        box: _Box,
    ) -> _Trajectory | None:
        """The regulator guess: the time-varying LQR of the problem expanded at the start held
        still (``x_t = x0``, ``u_t = u_bar [H, U]``, the model's defects ``f(x0, u_bar) - x0``
        as affine terms), rolled out in closed loop ``u = clip(u_bar + alpha k + K (x - x0))``
        through the model for every line-search ``alpha``; the cheapest rollout. Near a goal
        the cost pulls toward it is the LQR of the linearization there, which keeps the
        trajectory in the goal's basin where an open-loop zero guess falls out of it. ``None``
        when no regularization up to ``mu_max`` makes the backward pass definite, or no
        rollout is finite."""
        x_bar = x0.reshape(1, -1).expand(u_bar.shape[0] + 1, -1)  # [H + 1, X]
        with torch.no_grad():
            next_x = step(x_bar[:-1], u_bar)  # [H, X]
        if not torch.isfinite(next_x).all():
            return None
        try:
            expansion = self._expand(problem, objective, x_bar, u_bar, t, next_x)
        except FloatingPointError:
            return None
        u64 = u_bar.double().cpu()
        gain = box_gain(box[2] - u64, box[3] - u64)
        result = self._backward_raising_mu(expansion, self.mu_init, 1.0, gain)[0]
        if result is None:
            return None
        ks = torch.as_tensor(self.alphas)[:, None, None] * result.k  # [A, H, U]
        xs, us, costs = self._rollout_closed(step, objective, x0, x_bar, u_bar, result.K, ks, box)
        bad = int((~np.isfinite(costs)).sum())
        if bad == len(costs):
            return _Trajectory(x_bar, u_bar, float("inf"), bad)
        a = int(np.argmin(costs))
        return _Trajectory(xs[a], us[a], float(costs[a]), bad)

    def _descent_perturbation(
        self,
        step: StepFn,
        objective: ProblemCost,
        x0: torch.Tensor,
        x: torch.Tensor,
        u: torch.Tensor,
        cost: float,
        expansion: tuple[torch.Tensor, ...],
        box: _Box,
    ) -> _Trajectory | None:
        """A perturbation of the stationary trajectory ``x [H + 1, X]``, ``u [H, U]`` that
        lowers its cost, or ``None`` when the unregularized second-order model is positive
        definite (a local minimum of the model) or no tried perturbation lowers the cost.

        The unregularized backward pass runs from ``t = H - 1`` down until a step ``s`` whose
        ``Q_uu`` has a non-positive eigenvalue; along that eigenvector ``v``, ``u_s`` is moved
        by ``+-eps v`` (``eps`` = 1, 0.3, 0.1, 0.03, 0.01 of the half action range, 1 for an
        unbounded action) and the later controls follow the pass's feedback
        ``K_t (x_t - x_ref_t)``, ``t > s``: the model's direction of negative curvature. Each
        is rolled out through the model and the cheapest is taken if it is cheaper than
        ``cost`` by more than ``tol_rel_cost |cost|``. Deterministic: ties go to ``+v`` and
        the larger ``eps``."""
        F, C, VH, _ = expansion
        h, nu, nx = u.shape[0], u.shape[1], x.shape[1]
        u64 = u.double().cpu()
        gain = box_gain(box[2] - u64, box[3] - u64)
        gains: dict[int, Array] = {}
        found: list[tuple[int, np.ndarray]] = []

        def recording(t: int, Quu: Array, Qux: Array, qu: Array) -> tuple[Array, Array]:
            try:
                K_t, k_t = gain(t, Quu, Qux, qu)
            except IndefiniteError:
                found.append((t, np.array(Quu, dtype=np.float64)))
                raise
            gains[t] = K_t
            return K_t, k_t

        try:
            riccati_backward(F, C, VH, None, recording)
            return None
        except IndefiniteError:
            pass
        s, Quu = found[0]
        v = torch.from_numpy(np.linalg.eigh(Quu)[1][:, 0])  # [U] the lowest curvature
        half = (box[3] - box[2]) / 2  # [U]
        scale = float(half.min()) if bool(torch.isfinite(half).all()) else 1.0
        eps = scale * torch.tensor([1.0, 0.3, 0.1, 0.03, 0.01], dtype=torch.float64)
        eps = torch.cat([eps, -eps])  # [A]
        ks = torch.zeros(len(eps), h, nu, dtype=torch.float64)
        ks[:, s] = eps[:, None] * v
        K = torch.zeros(h, nu, nx, dtype=torch.float64)
        for t, K_t in gains.items():
            K[t] = torch.as_tensor(K_t)
        xs, us, costs = self._rollout_closed(step, objective, x0, x, u, K, ks, box)
        bad = int((~np.isfinite(costs)).sum())
        a = int(np.argmin(costs))  # first of the cheapest
        if not costs[a] < cost - self.tol_rel_cost * abs(cost):
            return None
        return _Trajectory(xs[a], us[a], float(costs[a]), bad)


_Box = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]
"""``(low, high)`` ``[U]`` in the model's dtype and device, and the same in float64 on CPU."""


@dataclass(frozen=True)
class _Trajectory:
    """A rollout the solver may start from or step to."""

    x: torch.Tensor  # [H + 1, X]
    u: torch.Tensor  # [H, U]
    cost: float
    nonfinite: int  # candidates of its search that were not finite


def box_gain(dlow: torch.Tensor, dhigh: torch.Tensor) -> GainFn:
    """The box-DDP gain step (Tassa, Mansard & Todorov 2014) for
    :func:`~mbrl.planners.lqr.riccati_backward`: the feed-forward ``k_t`` minimises the
    regularized ``Q`` model over ``dlow[t] <= k <= dhigh[t]`` (``[H, U]``, float64, the bounds
    minus the current actions) by :func:`box_qp`, warm-started at ``k_{t+1}``, and the
    feedback rows of clamped controls are zero. One action (``U = 1``): the box QP in closed
    form, the Newton step clipped, in Python floats. Takes and returns the pass's arrays (numpy
    or torch, see :data:`~mbrl.planners.lqr.GainFn`). Raises
    :class:`~mbrl.planners.lqr.IndefiniteError` when ``Q_uu`` is not positive definite on the
    free controls."""
    if dlow.shape[-1] == 1:
        lows, highs = dlow[:, 0].tolist(), dhigh[:, 0].tolist()

        def scalar(t: int, Quu: Array, Qux: Array, qu: Array) -> tuple[Array, Array]:
            quu, q = float(Quu[0, 0]), float(qu[0])
            if not quu > 0:
                raise IndefiniteError(t)
            k_free = -q / quu
            kt = min(max(k_free, lows[t]), highs[t])
            if kt == k_free:
                return Qux / -quu, qu / -quu
            return Qux * 0.0, qu * 0.0 + kt

        return scalar
    low_np, high_np = dlow.numpy(), dhigh.numpy()
    prev = np.zeros(dlow.shape[-1])  # k_{t+1}: the box QP's warm start

    def boxed(t: int, Quu: Array, Qux: Array, qu: Array) -> tuple[Array, Array]:
        rows_x = np.asarray(Qux)
        kt, free, L = box_qp(np.asarray(Quu), np.asarray(qu), low_np[t], high_np[t], prev)
        if not np.isfinite(kt).all():
            raise IndefiniteError(t)
        K = np.zeros_like(rows_x)
        if free.any():
            K[free] = -np.linalg.solve(L.T, np.linalg.solve(L, rows_x[free]))
        prev[:] = kt
        if isinstance(Qux, np.ndarray):
            return K, kt.copy()
        return torch.from_numpy(K), torch.from_numpy(kt.copy())

    return boxed
