"""The planning seam: a :class:`PlanningProblem` owns the one planning step, a planner returns a
:class:`Plan`.

The step is the primitive: :meth:`PlanningProblem.start` turns starts (``x0 [X]``, ``[B, X]`` or a
filter's :class:`~mbrl.dynamics.base.Belief`) into ``B * P`` particles, and
:meth:`PlanningProblem.step` advances them one model step under an action and returns a
:class:`Step` with the reward (the model's when it learns it, else ``reward_fn``), whether each
row is still alive (not terminated) and whether the step was finite. Open-loop scoring
(:meth:`PlanningProblem.evaluate`), tree search, the Dyna rollouts and the diagnostics are loops
over this one step.

:meth:`PlanningProblem.evaluate` scores candidates ``[N, H, U]`` (or ``[B, N, H, U]`` from ``B``
starts) with one model call per horizon step for all rows, flattened start-major
(``[B * N * P]``: particle ``p`` of candidate ``n`` of start ``b`` at row
``(b * N + n) * P + p``), and returns the discounted mean return over particles. A candidate
whose rollout produces NaN or inf while alive scores minus infinity and is counted in
:attr:`PlanningProblem.nonfinite`; it can never be chosen over a finite candidate.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields, replace
from typing import Protocol, runtime_checkable

import torch

from mbrl.dynamics.base import Belief, DynamicsModel, Filter, RolloutState
from mbrl.envs.spec import RewardFn, TerminationFn, never_terminates
from mbrl.shapes import ShapeError, check_shape

ValueFn = Callable[[RolloutState], torch.Tensor]
"""Terminal value ``state [R rows] -> [R]`` added (discounted) after the last planning step."""

Prior = Callable[[RolloutState], torch.distributions.Distribution]
"""Action prior ``state [R rows] -> distribution over [R, U]`` (or ``[R]`` indices for discrete
actions): MCTS's PUCT prior and sampled actions, policy-guided sampling."""


@dataclass(frozen=True)
class Step:
    """One planning step of ``R`` rows."""

    state: RolloutState  # the rows after the step
    reward: torch.Tensor  # [R] float32 reward of the step (not masked: check ``finite``)
    alive: torch.Tensor  # [R] bool: the step did not terminate the row
    finite: torch.Tensor  # [R] bool: reward and next observation are finite


@dataclass(frozen=True)
class WarmStart:
    """What the next plan starts from, handed back by the controller shifted by the steps it
    played (:func:`shift_warm`: every ``[..., H, U]`` tensor is shifted, nothing else is read).
    """

    actions: torch.Tensor  # [H, U] the previous plan
    elites: torch.Tensor | None = None  # [K, H, U] best candidates, best first (iCEM's reuse)
    carry: Mapping[str, torch.Tensor] = field(default_factory=dict)
    """A planner's own memory; entries shaped ``[..., H, U]`` are shifted, others kept as they
    are."""


def shift_warm(warm: WarmStart, steps: int, fill: torch.Tensor) -> WarmStart:
    """``warm`` with every ``[..., H, U]`` tensor shifted by ``steps`` (:func:`shift_actions`)."""
    horizon_shape = tuple(warm.actions.shape[-2:])

    def shift(value: object) -> object:
        if torch.is_tensor(value) and tuple(value.shape[-2:]) == horizon_shape:
            return shift_actions(value, steps, fill)
        return value

    changes = {f.name: shift(getattr(warm, f.name)) for f in fields(warm) if f.name != "carry"}
    changes["carry"] = {k: shift(v) for k, v in warm.carry.items()}
    return replace(warm, **changes)


@dataclass(frozen=True)
class Plan:
    """What a planner returns.

    ``K`` and ``x_ref`` are set by planners that compute time-varying feedback (LQR, iLQR); the
    MPC controller then applies ``u_t = actions[t] + K[t] (x_t - x_ref[t])`` between replans.
    ``covariance`` is set by linear-Gaussian controllers (LQR-FLM), ``extras`` carries a
    planner's tensors for its users (MCTS visit counts and root values), and ``warm`` is what the
    planner wants back on its next call (``None``: ``WarmStart(actions)``).
    """

    actions: torch.Tensor  # [H, U]
    expected_return: float  # predicted return of ``actions`` (mean over particles)
    K: torch.Tensor | None = None  # [H, U, X] feedback gains
    x_ref: torch.Tensor | None = None  # [H + 1, X] predicted states the gains act around
    status: str = "ok"  # "ok", or why the plan may not be trusted (e.g. "max_iterations")
    iterations: int = 0
    nonfinite: int = 0  # candidates scored minus infinity during this plan
    diagnostics: Mapping[str, float] = field(default_factory=dict)
    covariance: torch.Tensor | None = None  # [H, U, U] action covariance (linear-Gaussian)
    extras: Mapping[str, torch.Tensor] = field(default_factory=dict)
    warm: WarmStart | None = None  # for the next call; None means WarmStart(actions)

    def warm_start(self) -> WarmStart:
        """What the next plan should start from (before the controller's shift)."""
        return self.warm if self.warm is not None else WarmStart(self.actions)

    @property
    def ok(self) -> bool:
        """Whether the planner vouches for the plan ("ok", or a solver's "converged")."""
        return self.status in OK_STATUSES


OK_STATUSES = frozenset({"ok", "converged"})
"""Plan statuses that mean the plan can be trusted; every other status is counted as a failure."""


def shift_actions(actions: torch.Tensor, steps: int, fill: torch.Tensor) -> torch.Tensor:
    """Drop the first ``steps`` actions of ``actions [..., H, U]`` and pad the tail with ``fill``
    ``[U]`` so that the result keeps the shape ``[..., H, U]`` (the receding-horizon shift)."""
    if steps < 0:
        raise ValueError(f"shift_actions: steps must be >= 0, got {steps}")
    horizon = actions.shape[-2]
    steps = min(steps, horizon)
    pad = fill.to(actions).expand(*actions.shape[:-2], steps, actions.shape[-1])
    return torch.cat([actions[..., steps:, :], pad], dim=-2)


class Planner(Protocol):
    """``plan(problem, x0 [X] | Belief, warm: WarmStart | None) -> Plan``; deterministic under
    the problem's generator."""

    def plan(
        self, problem: PlanningProblem, x0: torch.Tensor | Belief, warm: WarmStart | None = None
    ) -> Plan: ...


@runtime_checkable
class StageCost(Protocol):
    """A stage cost for gradient planners (LQR, iLQR, LQR-FLM, NMPC's torch side), with time.

    ``cost(x, u, t)`` is the cost of rows ``x [B, X]``, ``u [B, U]`` at time indices ``t [B]``
    (long); ``expansion`` its value, gradient and Hessian in ``z = [x, u]``
    (:class:`~mbrl.planners.derivatives.CostExpansion`); the terminal pair the same in ``x``.
    Time-invariant costs ignore ``t``. Analytic systems implement it in closed form; any other
    problem gets one derived from its reward and model by
    :func:`~mbrl.planners.derivatives.stage_cost_of`.
    """

    def cost(self, x: torch.Tensor, u: torch.Tensor, t: torch.Tensor) -> torch.Tensor: ...

    def expansion(self, x: torch.Tensor, u: torch.Tensor, t: torch.Tensor): ...

    def terminal_cost(self, x: torch.Tensor) -> torch.Tensor: ...

    def terminal_expansion(self, x: torch.Tensor): ...


class PlanningProblem:
    """Model, reward, termination, horizon, bounds, particles and discount: everything a planner
    needs, and the one planning step.

    Args:
        model: any :class:`~mbrl.dynamics.base.DynamicsModel`.
        reward_fn: batched reward ``(obs, act, next_obs) -> [B]``; ignored when the model
            learns the reward.
        termination_fn: ``next_obs -> bool [B]``; rewards after termination count zero.
            ``None`` for envs that never terminate.
        horizon: ``H``, planning steps.
        action_low, action_high: ``[U]`` bounds.
        particles: ``P``, sampled rollouts per candidate.
        generator: the one source of randomness for model sampling and the planner.
        discount: ``gamma`` in ``(0, 1]``; step ``t`` of a rollout counts ``gamma^t``.
        value_fn: optional terminal value ``state -> [R]`` added with weight ``gamma^H`` for
            rows that have not terminated.
        prior: optional action prior ``state -> distribution`` (MCTS, policy-guided sampling).
        stage_cost: optional :class:`StageCost` for gradient planners; ``None`` derives one from
            ``reward_fn``, the model and ``value_fn``
            (:func:`~mbrl.planners.derivatives.stage_cost_of`).
        action_values: ``[A, U]`` the actions of a discrete action space (``A`` choices, each
            an action vector the reward and the model see); ``None`` for a box. Sampling
            planners refuse a discrete problem.

    ``reward_fn`` and ``value_fn`` stay public attributes: gradient planners differentiate them.
    """

    def __init__(
        self,
        model: DynamicsModel,
        reward_fn: RewardFn,
        termination_fn: TerminationFn | None,
        horizon: int,
        action_low: torch.Tensor,
        action_high: torch.Tensor,
        particles: int = 1,
        generator: torch.Generator | None = None,
        discount: float = 1.0,
        value_fn: ValueFn | None = None,
        prior: Prior | None = None,
        stage_cost: StageCost | None = None,
        action_values: torch.Tensor | None = None,
    ) -> None:
        if isinstance(horizon, bool) or not isinstance(horizon, int) or horizon < 1:
            raise ValueError(f"horizon must be an int >= 1, got {horizon!r}")
        if isinstance(particles, bool) or not isinstance(particles, int) or particles < 1:
            raise ValueError(f"particles must be an int >= 1, got {particles!r}")
        if not 0.0 < float(discount) <= 1.0:
            raise ValueError(f"discount must be in (0, 1], got {discount!r}")
        if stage_cost is not None and not isinstance(stage_cost, StageCost):
            raise TypeError(
                f"stage_cost must implement StageCost (cost, expansion, terminal_cost, "
                f"terminal_expansion); got {type(stage_cost).__name__}"
            )
        self.model = model
        self.reward_fn = reward_fn
        self.termination_fn = termination_fn
        self.value_fn = value_fn
        self.prior = prior
        self.stage_cost = stage_cost
        self.horizon = horizon
        self.particles = particles
        self.discount = float(discount)
        self.action_low = torch.as_tensor(action_low, dtype=torch.float32)  # [U]
        self.action_high = torch.as_tensor(action_high, dtype=torch.float32)  # [U]
        if self.action_low.shape != self.action_high.shape or self.action_low.ndim != 1:
            raise ValueError("action_low and action_high must both have shape [U]")
        if bool((self.action_low > self.action_high).any()):
            raise ValueError("action_low must not exceed action_high")
        self.act_dim = self.action_low.shape[0]
        self.action_values = None
        if action_values is not None:
            values = torch.as_tensor(action_values, dtype=torch.float32)
            check_shape("action_values", values, ("A", self.act_dim))
            self.action_values = values  # [A, U]
        self.generator = generator
        self.nonfinite = 0  # candidates scored minus infinity, over the problem's lifetime
        self._termination = termination_fn if termination_fn is not None else never_terminates
        if model.learns_reward:
            self._reward = _learned_reward
        else:
            self._reward = lambda state, act, nxt: reward_fn(state.obs, act, nxt.obs)
        self._gammas = tuple(self.discount**t for t in range(horizon + 1))  # [H + 1]

    @property
    def discrete(self) -> bool:
        """Whether the action space is a finite set (``action_values``)."""
        return self.action_values is not None

    def to(self, device: torch.device | str) -> PlanningProblem:
        self.action_low = self.action_low.to(device)
        self.action_high = self.action_high.to(device)
        if self.action_values is not None:
            self.action_values = self.action_values.to(device)
        return self

    # ------------------------------------------------------------------ the step

    def start(
        self, x0: torch.Tensor | Belief | RolloutState, particles: int | None = None
    ) -> RolloutState:
        """``particles`` (default ``P``) rows per start: ``x0 [X]`` (one start), ``[B, X]``, or
        a :class:`~mbrl.dynamics.base.Belief` of ``B`` rows when the model is a
        :class:`~mbrl.dynamics.base.Filter`. Returns ``B * P`` rows, start-major. A
        :class:`RolloutState` is returned as it is (already started)."""
        p = self.particles if particles is None else particles
        if isinstance(x0, RolloutState):
            return x0
        if isinstance(x0, Belief):
            if not isinstance(self.model, Filter):
                raise TypeError(
                    f"a Belief was given but {type(self.model).__name__} is not a Filter "
                    "(reset_belief, observe); plan from an observation tensor [X] or [B, X]"
                )
            return self.model.rollout_start(x0, p, self.generator)
        if not torch.is_tensor(x0) or x0.ndim not in (1, 2):
            shape = list(x0.shape) if torch.is_tensor(x0) else type(x0).__name__
            raise ShapeError(f"x0: expected a start [X] or starts [B, X], got {shape}")
        return self.model.rollout_start(x0.reshape(-1, x0.shape[-1]), p, self.generator)

    def step(self, state: RolloutState, act: torch.Tensor) -> Step:
        """Advance every row of ``state`` one model step under ``act [R, U]``."""
        nxt = self.model.rollout_step(state, act, self.generator)
        reward = self._reward(state, act, nxt).float()  # [R]
        finite = torch.isfinite(reward) & torch.isfinite(nxt.obs).all(dim=-1)
        return Step(nxt, reward, ~self._termination(nxt.obs), finite)

    # ------------------------------------------------------------------ open-loop scoring

    @torch.inference_mode()
    def evaluate(
        self, x0: torch.Tensor | Belief | RolloutState, actions: torch.Tensor
    ) -> torch.Tensor:
        """Discounted mean return over particles of each candidate.

        ``x0`` is one start ``[X]`` with ``actions [N, H, U]`` (returns ``[N]``), or ``B``
        starts (``[B, X]``, a ``Belief``, or the :class:`RolloutState` of :meth:`start`, which
        planners make once per plan) with ``actions [B, N, H, U]`` (returns ``[B, N]``). A
        started state of ``P`` rows with ``actions [N, H, U]`` is one start. Minus infinity for
        candidates whose rollout went non-finite while alive.
        """
        root = self.start(x0)
        p = self.particles
        b = root.obs.shape[0] // p
        single = actions.ndim == 3
        if single and b != 1:
            raise ShapeError(
                f"actions: expected [B={b}, N, H, U] for {b} starts, got {list(actions.shape)}"
            )
        if single:
            check_shape("actions", actions, ("N", self.horizon, self.act_dim))
            acts = actions[None]  # [1, N, H, U]
        else:
            check_shape("actions", actions, (b, "N", self.horizon, self.act_dim))
            acts = actions
        n = acts.shape[1]
        state = _repeat_rows(root, b, n, p)  # [B * N * P] rows
        rows = b * n * p
        acts = acts.to(state.obs.dtype).repeat_interleave(p, dim=1).reshape(rows, self.horizon, -1)
        device = actions.device
        total = torch.zeros(rows, dtype=torch.float32, device=device)  # [B * N * P]
        alive = torch.ones(rows, dtype=torch.bool, device=device)  # [B * N * P]
        finite = torch.ones(rows, dtype=torch.bool, device=device)  # [B * N * P]
        gammas = self._gammas
        for t in range(self.horizon):
            s = self.step(state, acts[:, t])
            finite &= s.finite | ~alive
            total.add_(torch.where(alive & s.finite, s.reward, 0.0), alpha=gammas[t])
            alive &= s.alive
            state = s.state
        if self.value_fn is not None:
            value = self.value_fn(state).float()  # [B * N * P]
            ok = torch.isfinite(value)
            finite &= ok | ~alive
            total.add_(torch.where(alive & ok, value, 0.0), alpha=gammas[self.horizon])
        returns = total.view(b, n, p).mean(dim=2)  # [B, N]
        bad = ~finite.view(b, n, p).all(dim=2)
        returns = returns.masked_fill(bad, float("-inf"))
        self.nonfinite += int(bad.sum())
        return returns[0] if single else returns


def _repeat_rows(state: RolloutState, b: int, n: int, p: int) -> RolloutState:
    """Rows ``[B * P]`` of ``B`` starts repeated for ``N`` candidates: ``[B * N * P]``,
    start-major (every tensor field with ``B * P`` leading rows)."""
    if n == 1:
        return state

    def rep(x: torch.Tensor | None) -> torch.Tensor | None:
        if x is None:
            return None
        tail = x.shape[1:]
        return x.view(b, 1, p, *tail).expand(b, n, p, *tail).reshape(b * n * p, *tail)

    return RolloutState(obs=rep(state.obs), reward=rep(state.reward), hidden=rep(state.hidden))


def _learned_reward(state: RolloutState, act: torch.Tensor, nxt: RolloutState) -> torch.Tensor:
    return nxt.reward
