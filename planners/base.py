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

How :meth:`~PlanningProblem.evaluate` keeps the step loop short (everything a step would
decide is settled when the problem is made): the loop runs only the model and keeps each step's
state; the reward function and the termination function then score all ``H`` steps at once, on
the stacked observations of ``[H * R]`` rows (both are row-wise by their contract, so this is
the arithmetic of ``H`` calls of :meth:`step`, up to the last-bit rounding of vectorized
transcendental functions); the returns are summed step by step in horizon order, as a loop over
:meth:`step` adds them. A problem without termination (``None``,
or :func:`~mbrl.envs.spec.never_terminates`, which ends only non-finite rows, and those score
minus infinity anyway) masks nothing. Non-finite values are caught without a per-row check at
every step: one sum over the returns and the recorded observations is finite unless some row
may be non-finite (a NaN or inf, or a sum that overflows); only then are the rows resolved one
by one, exactly as :meth:`step`'s ``finite`` and ``alive`` would have.
``evaluate(..., compiled=True)`` runs the same loop through ``torch.compile``.
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

    ``expected_return`` is the predicted return of ``actions``, except where a sampling planner
    skipped scoring its final mean (``score_mean``, :mod:`mbrl.planners.sampling`): then it is
    the planner's sample estimate, and ``diagnostics["mean_scored"]`` is 0.
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
            self._rewards = _learned_rewards
        else:
            self._reward = lambda state, act, nxt: reward_fn(state.obs, act, nxt.obs)
            self._rewards = self._given_rewards
        # never_terminates ends only non-finite rows, which score minus infinity anyway
        terminates = termination_fn is not None and termination_fn is not never_terminates
        self._alive = self._alive_before_steps if terminates else _never_ended
        self._gammas = tuple(self.discount**t for t in range(horizon + 1))  # [H + 1]
        self._compiled: Callable[[RolloutState, torch.Tensor], _Rollout] | None = None

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
        self,
        x0: torch.Tensor | Belief | RolloutState,
        actions: torch.Tensor,
        compiled: bool = False,
    ) -> torch.Tensor:
        """Discounted mean return over particles of each candidate.

        ``x0`` is one start ``[X]`` with ``actions [N, H, U]`` (returns ``[N]``), or ``B``
        starts (``[B, X]``, a ``Belief``, or the :class:`RolloutState` of :meth:`start`, which
        planners make once per plan) with ``actions [B, N, H, U]`` (returns ``[B, N]``). A
        started state of ``P`` rows with ``actions [N, H, U]`` is one start. Minus infinity for
        candidates whose rollout went non-finite while alive.

        ``compiled=True`` runs the rollout through ``torch.compile`` (made on the first such
        call and kept by the problem; each new row count may compile again, seconds each; the
        numbers equal the eager ones to float rounding). It needs a working ``torch.compile``
        (on the CPU a C++ compiler); parts it cannot trace run eagerly.
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
        n, h, u = acts.shape[1], self.horizon, self.act_dim
        state = _repeat_rows(root, b, n, p)  # [B * N * P] rows
        rows = b * n * p
        acts = acts.to(state.obs.dtype).permute(2, 0, 1, 3)  # [H, B, N, U]
        if p > 1:
            acts = acts.unsqueeze(3).expand(h, b, n, p, u)  # [H, B, N, P, U]
        acts = acts.reshape(h, rows, u).contiguous()  # [H, B * N * P, U], each step contiguous
        rollout = self._rollout if not compiled else self._compiled_rollout()
        roll = rollout(state, acts)
        if p == 1:
            returns = roll.total.view(b, n)  # [B, N]
        else:
            returns = roll.total.view(b, n, p).mean(dim=2)  # [B, N]
        if bool(roll.suspect):
            bad = ~self._finite_rows(roll).view(b, n, p).all(dim=2)  # [B, N]
            returns = returns.masked_fill(bad, float("-inf"))
            self.nonfinite += int(bad.sum())
        return returns[0] if single else returns

    def _rollout(self, state: RolloutState, acts: torch.Tensor) -> _Rollout:
        """The open-loop rollout of rows ``state [R]`` under ``acts [H, R, U]``: the model
        steps, then every step's reward and termination at once, the discounted sum and whether
        any row may be non-finite (see the module docstring)."""
        h = self.horizon
        # the steps' states are kept (a model never overwrites a state it returned: MCTS keeps
        # them in its tree too)
        states = [state]
        for act in acts.unbind(0):  # [R, U] each
            state = self.model.rollout_step(state, act, self.generator)
            states.append(state)
        obs = torch.stack([s.obs for s in states])  # [H + 1, R, X]
        rewards = self._rewards(states, obs, acts)  # [H, R] float32
        alive = self._alive(obs)  # [H + 1, R] alive before step t (row H: at the end), or None
        terms = rewards if alive is None else torch.where(alive[:-1], rewards, 0.0)
        total = torch.zeros(terms.shape[1], device=terms.device)  # [R]
        gammas = self._gammas
        for t in range(h):  # in horizon order, as a loop over step would add them
            total.add_(terms[t], alpha=gammas[t])
        value = None
        if self.value_fn is not None:
            value = self.value_fn(state).float()  # [R]
            term = value if alive is None else torch.where(alive[-1], value, 0.0)
            total.add_(term, alpha=gammas[h])
        # one sum: finite unless some row has a non-finite term or next observation (or the sum
        # overflows); only then are the rows resolved one by one
        suspect = ~torch.isfinite(total.sum() + obs[1:].sum())
        return _Rollout(total, suspect, rewards, obs, alive, value)

    def _given_rewards(
        self, states: list[RolloutState], obs: torch.Tensor, acts: torch.Tensor
    ) -> torch.Tensor:
        """``reward_fn`` on every step at once: ``[H, R]`` float32 from ``obs [H + 1, R, X]``
        and ``acts [H, R, U]``."""
        h, rows = acts.shape[:2]
        reward = self.reward_fn(obs[:-1].flatten(0, 1), acts.flatten(0, 1), obs[1:].flatten(0, 1))
        if tuple(reward.shape) != (h * rows,):
            raise ShapeError(
                f"reward_fn: expected one reward per row, [{h * rows}] for {h * rows} rows of "
                f"(obs, act, next_obs), got {list(reward.shape)}; return a [B] tensor"
            )
        return reward.float().view(h, rows)

    def _alive_before_steps(self, obs: torch.Tensor) -> torch.Tensor:
        """``[H + 1, R]`` bool: row ``t`` alive before step ``t`` (no earlier step ended it),
        row ``H`` alive after the last step; ``termination_fn`` on every step at once."""
        h, rows = obs.shape[0] - 1, obs.shape[1]
        ended = self.termination_fn(obs[1:].flatten(0, 1))  # [H * R]
        if tuple(ended.shape) != (h * rows,):
            raise ShapeError(
                f"termination_fn: expected one flag per row, [{h * rows}] for {h * rows} rows "
                f"of next_obs, got {list(ended.shape)}; return a bool [B] tensor"
            )
        alive = torch.ones(h + 1, rows, dtype=torch.uint8, device=obs.device)
        alive[1:] = ~ended.view(h, rows)
        return alive.cumprod(dim=0).bool()

    def _finite_rows(self, roll: _Rollout) -> torch.Tensor:
        """``[R]`` bool: every reward, next observation and the terminal value of the row is
        finite while the row is alive (:meth:`step`'s ``finite`` and ``alive``, over the
        horizon)."""
        ok = torch.isfinite(roll.rewards) & torch.isfinite(roll.obs[1:]).all(dim=-1)  # [H, R]
        if roll.alive is None:
            rows_ok = ok.all(dim=0)
            if roll.value is not None:
                rows_ok &= torch.isfinite(roll.value)
            return rows_ok
        rows_ok = (ok | ~roll.alive[:-1]).all(dim=0)
        if roll.value is not None:
            rows_ok &= torch.isfinite(roll.value) | ~roll.alive[-1]
        return rows_ok

    def _compiled_rollout(self) -> Callable[[RolloutState, torch.Tensor], _Rollout]:
        if self._compiled is None:
            self._compiled = torch.compile(self._rollout)
        return self._compiled


@dataclass(frozen=True)
class _Rollout:
    """What :meth:`PlanningProblem._rollout` hands back for ``R`` rows."""

    total: torch.Tensor  # [R] float32 discounted return (non-finite where a term was)
    suspect: torch.Tensor  # [] bool: some row may be non-finite (then resolve with the rest)
    rewards: torch.Tensor  # [H, R] float32 reward of every step, not masked
    obs: torch.Tensor  # [H + 1, R, X] the observations, the start first
    alive: torch.Tensor | None  # [H + 1, R] bool alive before each step; None: never ends
    value: torch.Tensor | None  # [R] float32 terminal value, not masked; None: no value_fn


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


def _learned_rewards(
    states: list[RolloutState], obs: torch.Tensor, acts: torch.Tensor
) -> torch.Tensor:
    """The model's own rewards of every step, ``[H, R]`` float32."""
    return torch.stack([s.reward for s in states[1:]]).float()


def _never_ended(obs: torch.Tensor) -> None:
    """No termination: every row stays alive (no mask)."""
    return None
