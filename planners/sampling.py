"""Sampling planners: random shooting, the cross-entropy method (with the iCEM options) and MPPI.

All three plan from one start, ``x0 [X]`` or a filter's
:class:`~mbrl.dynamics.base.Belief` of one row: each plan starts the model once
(:meth:`~mbrl.planners.base.PlanningProblem.start`, so a latent model encodes once per plan)
and scores every population of candidate action sequences ``[N, H, U]`` from that started
state with :meth:`~mbrl.planners.base.PlanningProblem.evaluate` (returns ``[N]``, higher is
better, minus infinity for rollouts that went non-finite). Every random number is drawn from
``problem.generator`` (``None``: torch's default generator, and then no determinism is
promised), after the start. Python loops run over optimizer iterations only; candidates are
tensor rows. The planners need a box action space: a discrete problem
(:attr:`~mbrl.planners.base.PlanningProblem.discrete`) is refused.

Non-finite rollouts: a candidate scored minus infinity is never returned while a finite one
exists, never enters an elite mean or an MPPI weight, and is counted in :attr:`Plan.nonfinite`.
When every candidate of a call is non-finite the planner returns its initial mean (the warm
start, or the middle of the bounds) with ``status="all_nonfinite"``.

Warm start: ``warm.actions [H, U]`` of a :class:`~mbrl.planners.base.WarmStart` (the MPC
controller passes the previous plan's :meth:`~mbrl.planners.base.Plan.warm_start` shifted by the
steps played) is the initial mean of CEM and MPPI and is itself scored as one candidate of the
first population of every planner, so a good previous plan is never lost. ``warm.elites`` is
read only by CEM with ``shift_elites=True`` (random shooting and MPPI ignore it).

The final mean (MPPI, and CEM with ``return_mean_or_best="mean"``): ``score_mean`` says whether
it is scored once more for :attr:`Plan.expected_return`. That costs one more pass of the model
over the horizon (``P`` rows): on a model whose cost is per call, such as an analytic system,
it adds ``1 / iterations`` to the plan; on one whose cost is per row (an ensemble, MuJoCo)
about ``1 / (iterations * N)``. ``"auto"`` (the default) scores it when the plan ran at least
two iterations (the re-score adds at most half) and skips it for a one-update plan, where it
could double the plan. When the clipped mean equals a candidate scored in this call (MPPI's
weights all on one candidate, say) that score is used and nothing is re-run. A skipped mean has
``expected_return`` = the sample estimate the update was built on (MPPI: the softmax-weighted
mean of the last iteration's finite returns; CEM: the mean of its last finite elites' returns),
``diagnostics["mean_scored"] = 0`` (1 when scored or reused), and no ``"mean_nonfinite"``
check: its actions are finite and within the bounds (a weighted mean of finite candidates),
but its own rollout was not run.

``compile=True`` scores every population through ``torch.compile``
(``PlanningProblem.evaluate(..., compiled=True)``); the first plans pay the compilation.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from mbrl.dynamics.base import Belief, RolloutState
from mbrl.planners.base import Plan, PlanningProblem, WarmStart
from mbrl.planners.noise import colored_noise, uniform_noise, white_noise
from mbrl.shapes import ShapeError, check_shape


class RandomShooting:
    """Random shooting: score ``population`` sequences drawn uniformly within the action bounds
    and return the best one (Nagabandi et al. 2018, "Neural Network Dynamics for Model-Based
    Deep RL with Model-Free Fine-Tuning", Sec. IV-C).

    When a warm start is given it replaces one of the uniform candidates. One iteration; the
    returned ``expected_return`` is the best candidate's score.

    Args:
        population: ``N >= 1`` candidates per plan.
        compile: score the candidates through ``torch.compile`` (see the module docstring).
    """

    def __init__(self, population: int = 1000, compile: bool = False) -> None:
        _check_int("population", population, 1)
        _check_bool("compile", compile)
        self.population = population
        self.compile = compile

    @torch.inference_mode()
    def plan(
        self,
        problem: PlanningProblem,
        x0: torch.Tensor | Belief,
        warm: WarmStart | None = None,
    ) -> Plan:
        """Best of ``population`` uniform candidates ``[N, H, U]`` (the last one replaced by
        ``warm.actions`` when given) from ``x0 [X]`` or a one-row belief."""
        s = _setup(problem, x0, warm)
        low, high, mean0 = s.low, s.high, s.mean0
        before = problem.nonfinite
        h, u = problem.horizon, problem.act_dim
        cand = low + (high - low) * uniform_noise(
            (self.population, h, u), problem.generator, s.device
        )  # [N, H, U]
        if warm is not None:
            cand[-1] = mean0
        returns = problem.evaluate(s.root, cand, self.compile)  # [N]
        best = int(torch.argmax(returns))
        best_return = float(returns[best])
        nonfinite = problem.nonfinite - before
        if not math.isfinite(best_return):
            return Plan(
                mean0, best_return, status="all_nonfinite", iterations=1, nonfinite=nonfinite
            )
        return Plan(
            cand[best].clone(),
            best_return,
            iterations=1,
            nonfinite=nonfinite,
            diagnostics={"candidates": float(self.population)},
        )


class CEM:
    """Cross-entropy method over open-loop action sequences, with the iCEM options.

    CEM (Botev et al. 2013, "The Cross-Entropy Method for Optimization"; as used for planning in
    PETS, Chua et al. 2018, "Deep RL in a Handful of Trials using Probabilistic Dynamics
    Models", Sec. 4 / App. A): a diagonal Gaussian over ``[H, U]`` is refitted ``iterations``
    times to the ``K = max(1, round(elite_fraction * population))`` best candidates, with
    smoothing ``mean <- alpha * mean + (1 - alpha) * elite_mean`` and the same for the
    variance. Samples are clipped to the action bounds (clipping, not a truncated normal, as in
    iCEM; mass beyond a bound lands on the bound).

    Initial distribution: mean = warm start (else the middle of the bounds), std = ``init_std``
    (else ``(high - low) / 4`` per action dimension, i.e. PETS' variance ``(high - low)^2 / 16``),
    reset on every call. The std is floored at ``min_std`` after every update.

    iCEM options (Pinneri et al. 2020, "Sample-efficient Cross-Entropy Method for Real-time
    Planning", Sec. 3):

    - ``noise_beta``: samples are ``mean + std * eps`` with ``eps`` colored ``1 / f^beta`` noise
      along the horizon (:func:`~mbrl.planners.noise.colored_noise`); 0 is white noise.
    - ``population_decay`` (iCEM's ``gamma``): iteration ``i`` samples
      ``max(round(population * gamma^-i), min(2 K, population))`` new candidates.
    - ``keep_elites_fraction``: the best ``round(keep_elites_fraction * K)`` (at least 1) elites
      of iteration ``i`` are added to the population of iteration ``i + 1`` and scored again.
    - ``shift_elites``: the best elites of the previous plan, shifted by the caller
      (``warm.elites`` of :meth:`plan`: the plan returns ``Plan.warm =
      WarmStart(actions, elites)`` with this call's last elites ``[K, H, U]``, best first, and
      the controller shifts them with :func:`~mbrl.planners.base.shift_warm`), are added to the
      first population; as many as ``keep_elites_fraction`` keeps (at least 1). Without
      ``shift_elites`` the plan declares no elites (``Plan.warm`` is ``None``) and a warm start
      that carries elites is refused, since they would be silently dropped.

    Stopping rule: exactly ``iterations`` refits, no early stop.

    Returned plan (``return_mean_or_best``): ``"best"`` gives the best candidate scored during
    the call (its score is ``expected_return``); ``"mean"`` gives the final mean, clipped to the
    bounds and, as ``score_mean`` says (module docstring), scored once more; if that score is
    non-finite the best candidate is returned with ``status="mean_nonfinite"``.

    Args:
        population: ``N`` candidates sampled in the first iteration.
        elite_fraction: fraction of the population refitted to, in ``(0, 1]``.
        iterations: refits per plan, ``>= 1``.
        alpha: smoothing of the mean and variance updates, in ``[0, 1)``.
        init_std: initial std in action units (``None``: ``(high - low) / 4``).
        min_std: floor on the std in action units, ``>= 0``.
        noise_beta: colored-noise exponent ``>= 0`` (iCEM uses 2 to 2.5).
        keep_elites_fraction: fraction of elites carried to the next iteration, in ``[0, 1]``.
        shift_elites: add the caller's shifted previous elites to the first population.
        population_decay: iCEM's ``gamma >= 1``.
        return_mean_or_best: ``"best"`` or ``"mean"``.
        score_mean: ``True``, ``False`` or ``"auto"``: score the final mean once more for
            ``expected_return`` (``"mean"`` only; module docstring).
        compile: score the populations through ``torch.compile``.
    """

    def __init__(
        self,
        population: int = 500,
        elite_fraction: float = 0.1,
        iterations: int = 5,
        alpha: float = 0.1,
        init_std: float | None = None,
        min_std: float = 0.0,
        noise_beta: float = 0.0,
        keep_elites_fraction: float = 0.0,
        shift_elites: bool = False,
        population_decay: float = 1.0,
        return_mean_or_best: str = "best",
        score_mean: bool | str = "auto",
        compile: bool = False,
    ) -> None:
        _check_int("population", population, 1)
        _check_int("iterations", iterations, 1)
        _check_range("elite_fraction", elite_fraction, 0.0, 1.0, low_open=True)
        _check_range("alpha", alpha, 0.0, 1.0, high_open=True)
        _check_range("keep_elites_fraction", keep_elites_fraction, 0.0, 1.0)
        _check_range("min_std", min_std, 0.0, math.inf, high_open=True)
        _check_range("noise_beta", noise_beta, 0.0, math.inf, high_open=True)
        _check_range("population_decay", population_decay, 1.0, math.inf, high_open=True)
        if init_std is not None and not (math.isfinite(init_std) and init_std > 0):
            raise ValueError(f"init_std must be a finite number > 0 or None, got {init_std}")
        if return_mean_or_best not in ("best", "mean"):
            raise ValueError(
                f"return_mean_or_best must be 'best' or 'mean', got {return_mean_or_best!r}"
            )
        _check_score_mean(score_mean)
        _check_bool("compile", compile)
        self.population = population
        self.elite_fraction = elite_fraction
        self.iterations = iterations
        self.alpha = alpha
        self.init_std = init_std
        self.min_std = min_std
        self.noise_beta = noise_beta
        self.keep_elites_fraction = keep_elites_fraction
        self.shift_elites = shift_elites
        self.population_decay = population_decay
        self.return_mean_or_best = return_mean_or_best
        self.score_mean = score_mean
        self.compile = compile
        self._scores_mean = _resolve_score_mean(score_mean, iterations)
        self.num_elites = max(1, round(elite_fraction * population))
        floor = min(2 * self.num_elites, population)
        self.populations = tuple(
            max(round(population * population_decay**-i), floor) for i in range(iterations)
        )
        self.num_reused = max(1, round(keep_elites_fraction * self.num_elites))

    def _noise(
        self, shape: tuple[int, int, int], generator: torch.Generator | None, device: torch.device
    ) -> torch.Tensor:
        if self.noise_beta == 0.0:
            return white_noise(shape, generator, device)
        return colored_noise(shape, self.noise_beta, generator, device)

    @torch.inference_mode()
    def plan(
        self,
        problem: PlanningProblem,
        x0: torch.Tensor | Belief,
        warm: WarmStart | None = None,
    ) -> Plan:
        """Refit a Gaussian over ``[H, U]`` to the elites ``iterations`` times from ``x0 [X]``
        (or a one-row belief).

        Args:
            problem: the planning problem; its generator drives all sampling.
            x0: ``[X]`` start observation, or a :class:`~mbrl.dynamics.base.Belief` of one row
                when the model is a :class:`~mbrl.dynamics.base.Filter`.
            warm: ``warm.actions [H, U]`` is the initial mean (and one first-iteration
                candidate); ``warm.elites [M, H, U]`` (best first) are the previous plan's
                shifted elites, only with ``shift_elites=True``. ``None``: a cold start.
        """
        s = _setup(problem, x0, warm)
        low, high, mean0 = s.low, s.high, s.mean0
        h, u = problem.horizon, problem.act_dim
        warm_elites = None if warm is None else warm.elites
        if warm_elites is not None:
            if not self.shift_elites:
                raise ValueError(
                    "warm.elites was given but shift_elites=False; construct CEM "
                    "with shift_elites=True to reuse the previous elites, or pass "
                    "WarmStart(actions) without elites"
                )
            _check_actions("warm.elites", warm_elites, ("M", h, u), "[M, H, U]")
            warm_elites = torch.minimum(torch.maximum(warm_elites.to(low), low), high)
        gen, device = problem.generator, s.device
        before = problem.nonfinite
        mean = mean0.clone()  # [H, U]
        if self.init_std is None:
            std = ((high - low) / 4).expand(h, u).clone()  # [H, U]
        else:
            std = torch.full((h, u), self.init_std, device=device)  # [H, U]
        var = std**2  # [H, U]
        best_return = torch.tensor(float("-inf"), device=device)
        best_actions = mean0.clone()  # [H, U]
        reused = None  # [R, H, U] candidates carried into the next population
        elites = mean0[None]  # [K, H, U]
        candidates = 0
        for i, n_i in enumerate(self.populations):
            noise = self._noise((n_i, h, u), gen, device)  # [n_i, H, U]
            cand = torch.clamp(mean + std * noise, low, high)  # [n_i, H, U]
            extra = []
            if i == 0:
                if warm is not None:
                    extra.append(mean0[None])
                if warm_elites is not None:
                    extra.append(warm_elites[: self.num_reused])
            elif reused is not None:
                extra.append(reused)
            if extra:
                cand = torch.cat([cand, *extra], dim=0)  # [N_i, H, U]
            returns = problem.evaluate(s.root, cand, self.compile)  # [N_i]
            candidates += cand.shape[0]
            k = min(self.num_elites, cand.shape[0])
            top_returns, top_idx = torch.topk(returns, k)  # [K], [K]
            elites = cand[top_idx]  # [K, H, U]
            weight = torch.isfinite(top_returns).float()  # [K]
            count = weight.sum()
            w = (weight / count.clamp(min=1.0))[:, None, None]  # [K, 1, 1]
            elite_mean = (w * elites).sum(dim=0)  # [H, U]
            elite_var = (w * (elites - elite_mean) ** 2).sum(dim=0)  # [H, U]
            any_finite = count > 0
            mean = torch.where(any_finite, self.alpha * mean + (1 - self.alpha) * elite_mean, mean)
            var = torch.where(any_finite, self.alpha * var + (1 - self.alpha) * elite_var, var)
            std = var.sqrt().clamp(min=self.min_std)
            improved = top_returns[0] > best_return
            best_return = torch.where(improved, top_returns[0], best_return)
            best_actions = torch.where(improved, elites[0], best_actions)
            if self.keep_elites_fraction > 0:
                reused = elites[: self.num_reused]
        nonfinite_before_mean = problem.nonfinite - before
        best = float(best_return)
        diagnostics = {
            "candidates": float(candidates),
            "final_std_mean": float(std.mean()),
            "best_return": best,
        }
        common = {"iterations": self.iterations, "diagnostics": diagnostics}

        def plan_of(actions: torch.Tensor, ret: float, **kw: object) -> Plan:
            warm_next = WarmStart(actions, elites=elites) if self.shift_elites else None
            return Plan(actions, ret, warm=warm_next, **common, **kw)

        if not math.isfinite(best):
            return plan_of(mean0, best, status="all_nonfinite", nonfinite=nonfinite_before_mean)
        if self.return_mean_or_best == "best":
            return plan_of(best_actions, best, nonfinite=nonfinite_before_mean)
        mean = torch.clamp(mean, low, high)

        def estimate() -> torch.Tensor:
            """The last refit's sample estimate: the mean of its finite elites' returns."""
            elite_returns = torch.where(weight > 0, top_returns, 0.0)  # [K]
            return torch.where(any_finite, (w.view(-1) * elite_returns).sum(), best_return)

        mean_return, scored = _mean_return(
            problem,
            s.root,
            mean,
            (best_actions, best_return),
            estimate,
            self._scores_mean,
            self.compile,
        )
        diagnostics["mean_scored"] = float(scored)
        nonfinite = problem.nonfinite - before
        if not math.isfinite(mean_return):
            return plan_of(best_actions, best, status="mean_nonfinite", nonfinite=nonfinite)
        return plan_of(mean, mean_return, nonfinite=nonfinite)


class MPPI:
    """Model predictive path integral control (Williams et al. 2017, "Information Theoretic MPC
    for Model-Based Reinforcement Learning", Alg. 2), one plan = ``iterations`` updates.

    Each iteration samples ``population`` sequences ``clip(mean + noise_std * eps)`` (``eps``
    white, or colored with ``noise_beta > 0``), scores them (returns ``R``), and moves the mean to
    the softmax-weighted average ``sum_n w_n a_n`` with ``w = softmax(R / temperature)`` over
    the finite candidates (non-finite ones weigh zero). The control-cost term
    ``lambda * u^T Sigma^-1 eps`` of the paper is left out (it is constant for a fixed
    ``temperature`` up to the mean's own contribution and most implementations drop it).

    Stopping rule: exactly ``iterations`` updates. The final mean is clipped to the bounds and,
    as ``score_mean`` says (module docstring: ``"auto"`` scores it for two or more iterations),
    scored once more; if that score is non-finite, the best sampled candidate is returned with
    ``status="mean_nonfinite"``.

    Args:
        population: ``N`` candidates per iteration.
        temperature: ``lambda > 0``; lower concentrates the weights on the best candidates.
        noise_std: exploration std in action units, ``> 0``.
        iterations: updates per plan, ``>= 1``.
        noise_beta: colored-noise exponent ``>= 0`` (0: white).
        score_mean: ``True``, ``False`` or ``"auto"``: score the final mean once more for
            ``expected_return``.
        compile: score the populations through ``torch.compile``.
    """

    def __init__(
        self,
        population: int = 500,
        temperature: float = 1.0,
        noise_std: float = 0.5,
        iterations: int = 1,
        noise_beta: float = 0.0,
        score_mean: bool | str = "auto",
        compile: bool = False,
    ) -> None:
        _check_int("population", population, 1)
        _check_int("iterations", iterations, 1)
        _check_range("temperature", temperature, 0.0, math.inf, low_open=True)
        _check_range("noise_std", noise_std, 0.0, math.inf, low_open=True)
        _check_range("noise_beta", noise_beta, 0.0, math.inf, high_open=True)
        _check_score_mean(score_mean)
        _check_bool("compile", compile)
        self.population = population
        self.temperature = temperature
        self.noise_std = noise_std
        self.iterations = iterations
        self.noise_beta = noise_beta
        self.score_mean = score_mean
        self.compile = compile
        self._scores_mean = _resolve_score_mean(score_mean, iterations)

    @torch.inference_mode()
    def plan(
        self,
        problem: PlanningProblem,
        x0: torch.Tensor | Belief,
        warm: WarmStart | None = None,
    ) -> Plan:
        """``iterations`` path-integral updates of the mean sequence ``[H, U]`` from ``x0 [X]``
        (or a one-row belief), starting at ``warm.actions`` when given."""
        s = _setup(problem, x0, warm)
        low, high, mean0 = s.low, s.high, s.mean0
        h, u = problem.horizon, problem.act_dim
        gen, device = problem.generator, s.device
        before = problem.nonfinite
        mean = mean0.clone()  # [H, U]
        best_return = torch.tensor(float("-inf"), device=device)
        best_actions = mean0.clone()  # [H, U]
        for i in range(self.iterations):
            if self.noise_beta == 0.0:
                eps = white_noise((self.population, h, u), gen, device)  # [N, H, U]
            else:
                eps = colored_noise((self.population, h, u), self.noise_beta, gen, device)
            cand = eps.mul_(self.noise_std).add_(mean).clamp_(low, high)  # [N, H, U]
            if i == 0 and warm is not None:
                cand = torch.cat([cand, mean0[None]], dim=0)  # [N + 1, H, U]
            returns = problem.evaluate(s.root, cand, self.compile)  # [N]
            top = returns.max()
            # softmax over finite candidates; all -inf leaves the mean where it is
            weight = torch.softmax((returns - top.clamp(min=-1e30)) / self.temperature, dim=0)
            weight = torch.nan_to_num(weight, nan=0.0)  # [N]
            any_finite = torch.isfinite(top)
            mean = torch.where(any_finite, (weight[:, None, None] * cand).sum(dim=0), mean)
            top_actions = cand[torch.argmax(returns)]  # [H, U]
            improved = top > best_return
            best_return = torch.where(improved, top, best_return)
            best_actions = torch.where(improved, top_actions, best_actions)
        best = float(best_return)
        diagnostics = {"best_return": best}
        if not math.isfinite(best):
            return Plan(
                mean0,
                best,
                status="all_nonfinite",
                iterations=self.iterations,
                nonfinite=problem.nonfinite - before,
                diagnostics=diagnostics,
            )
        mean = torch.clamp(mean, low, high)

        def estimate() -> torch.Tensor:
            """The last update's sample estimate: the weighted mean of its finite returns."""
            finite_returns = torch.where(weight > 0, returns, 0.0)  # [N]
            return torch.where(any_finite, (weight * finite_returns).sum(), best_return)

        mean_return, scored = _mean_return(
            problem, s.root, mean, (top_actions, top), estimate, self._scores_mean, self.compile
        )
        diagnostics["mean_scored"] = float(scored)
        nonfinite = problem.nonfinite - before
        if not math.isfinite(mean_return):
            return Plan(
                best_actions,
                best,
                status="mean_nonfinite",
                iterations=self.iterations,
                nonfinite=nonfinite,
                diagnostics=diagnostics,
            )
        return Plan(
            mean,
            mean_return,
            iterations=self.iterations,
            nonfinite=nonfinite,
            diagnostics=diagnostics,
        )


@dataclass(frozen=True)
class _Setup:
    """What every sampling plan starts from."""

    root: RolloutState  # [P] rows: the one start of the plan, started once
    low: torch.Tensor  # [U] bounds on the start's device
    high: torch.Tensor  # [U]
    mean0: torch.Tensor  # [H, U] the warm start clipped to the bounds, else mid-bounds
    device: torch.device  # where candidates are made (the start's device)


def _setup(problem: PlanningProblem, x0: torch.Tensor | Belief, warm: WarmStart | None) -> _Setup:
    """Refuse discrete problems, validate ``x0`` (``[X]`` or a one-row belief) and ``warm``,
    and start the model once."""
    if problem.discrete:
        raise ValueError(
            f"sampling planners need a box action space, but the problem is discrete "
            f"(action_values of shape {list(problem.action_values.shape)}); plan a discrete "
            "problem with MCTS"
        )
    if isinstance(x0, Belief):
        if x0.batch != 1:
            raise ShapeError(
                f"x0: expected a belief of one row (batch 1), got batch {x0.batch}; plan once "
                "per system"
            )
        device = x0.mean.device
    elif torch.is_tensor(x0) and x0.ndim == 1:
        device = x0.device
    else:
        shape = list(x0.shape) if torch.is_tensor(x0) else type(x0).__name__
        raise ShapeError(
            f"x0: expected one observation of shape [X] or a Belief, got {shape}; plan from a "
            "single state (call plan once per state)"
        )
    if warm is not None and not isinstance(warm, WarmStart):
        raise TypeError(
            f"warm: expected a WarmStart or None, got {type(warm).__name__}; wrap a previous "
            "plan [H, U] as WarmStart(actions)"
        )
    low = problem.action_low.to(device)  # [U]
    high = problem.action_high.to(device)  # [U]
    h, u = problem.horizon, problem.act_dim
    if warm is None:
        mean0 = ((low + high) / 2).expand(h, u).clone()  # [H, U]
    else:
        _check_actions("warm.actions", warm.actions, (h, u), "[H, U]")
        mean0 = torch.minimum(torch.maximum(warm.actions.to(low), low), high)  # [H, U]
    return _Setup(problem.start(x0), low, high, mean0, device)


def _mean_return(
    problem: PlanningProblem,
    root: RolloutState,
    mean: torch.Tensor,
    scored: tuple[torch.Tensor, torch.Tensor],
    estimate: Callable[[], torch.Tensor],
    score: bool,
    compiled: bool,
) -> tuple[float, bool]:
    """The final mean's ``expected_return`` and whether it is the mean's own score.

    ``scored`` is a candidate ``[H, U]`` scored in this call and its score ``[]``: equal to
    ``mean [H, U]``, its score is the mean's. Otherwise the mean is scored from ``root`` when
    ``score``, else ``estimate()`` ``[]`` (the planner's sample estimate) stands in.
    """
    actions, actions_return = scored
    if torch.equal(mean, actions):
        return float(actions_return), True
    if score:
        return float(problem.evaluate(root, mean[None], compiled)[0]), True
    return float(estimate()), False


def _resolve_score_mean(score_mean: bool | str, iterations: int) -> bool:
    """``score_mean`` as a bool: ``"auto"`` scores the mean of plans of two or more iterations,
    where the re-score adds at most half of the plan's model calls."""
    return score_mean if isinstance(score_mean, bool) else iterations >= 2


def _check_score_mean(score_mean: object) -> None:
    if not (isinstance(score_mean, bool) or score_mean == "auto"):
        raise ValueError(f"score_mean must be True, False or 'auto', got {score_mean!r}")


def _check_bool(name: str, value: object) -> None:
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be True or False, got {value!r}")


def _check_actions(name: str, actions: torch.Tensor, expected: tuple, letters: str) -> None:
    try:
        check_shape(name, actions, expected)
    except ShapeError as err:
        raise ShapeError(
            f"{err} ({letters} with the problem's horizon and action dim); pass the previous plan "
            "shifted to the horizon, or None"
        ) from None
    if not bool(torch.isfinite(actions).all()):
        raise ValueError(f"{name} contains NaN or inf; pass finite actions or None")


def _check_int(name: str, value: int, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")


def _check_range(
    name: str,
    value: float,
    low: float,
    high: float,
    low_open: bool = False,
    high_open: bool = False,
) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and not math.isnan(value)
    if ok:
        ok = (value > low if low_open else value >= low) and (
            value < high if high_open else value <= high
        )
    if not ok:
        lo, hi = "(" if low_open else "[", ")" if high_open else "]"
        raise ValueError(f"{name} must be in {lo}{low}, {high}{hi}, got {value!r}")
