"""The planning seam: a :class:`PlanningProblem` scores action sequences, a planner returns a
:class:`Plan`.

Sampling planners call :meth:`PlanningProblem.evaluate` with candidates ``[N, H, U]``; it makes
one model call per horizon step for all ``N * P`` particles (candidate-major rows, particle ``p``
of candidate ``n`` at row ``n * P + p``) and returns the mean return over particles ``[N]``.
A candidate whose rollout produces NaN or inf scores minus infinity and is counted in
:attr:`PlanningProblem.nonfinite`; it can never be chosen over a finite candidate.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Protocol

import torch

from mbrl.dynamics.base import DynamicsModel, RolloutState
from mbrl.envs.spec import RewardFn, TerminationFn, never_terminates
from mbrl.shapes import check_shape


@dataclass(frozen=True)
class Plan:
    """What a planner returns.

    ``K`` and ``x_ref`` are set by planners that compute time-varying feedback (LQR, iLQR); the
    MPC controller then applies ``u_t = actions[t] + K[t] (x_t - x_ref[t])`` between replans.
    """

    actions: torch.Tensor  # [H, U]
    expected_return: float  # predicted return of ``actions`` (mean over particles)
    K: torch.Tensor | None = None  # [H, U, X] feedback gains
    x_ref: torch.Tensor | None = None  # [H + 1, X] predicted states the gains act around
    status: str = "ok"  # "ok", or why the plan may not be trusted (e.g. "max_iterations")
    iterations: int = 0
    nonfinite: int = 0  # candidates scored minus infinity during this plan
    diagnostics: Mapping[str, float] = field(default_factory=dict)
    elites: torch.Tensor | None = None  # [K, H, U] best candidates, best first (iCEM's reuse)

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
    """``plan(problem, x0 [X], warm_start [H, U] | None) -> Plan``; deterministic under the
    problem's generator."""

    def plan(
        self, problem: PlanningProblem, x0: torch.Tensor, warm_start: torch.Tensor | None = None
    ) -> Plan: ...


class PlanningProblem:
    """Model, reward, termination, horizon, bounds and particles: everything a planner needs.

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
        terminal_reward_fn: optional ``obs [B, X] -> [B]`` added for the state after the last
            step (for particles that have not terminated).

    ``reward_fn`` and ``terminal_reward_fn`` stay public attributes: gradient planners
    (LQR, iLQR) differentiate them.
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
        terminal_reward_fn: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> None:
        if horizon < 1:
            raise ValueError(f"horizon must be >= 1, got {horizon}")
        if particles < 1:
            raise ValueError(f"particles must be >= 1, got {particles}")
        self.model = model
        self.reward_fn = reward_fn
        self.terminal_reward_fn = terminal_reward_fn
        self.horizon = horizon
        self.particles = particles
        self.action_low = torch.as_tensor(action_low, dtype=torch.float32)  # [U]
        self.action_high = torch.as_tensor(action_high, dtype=torch.float32)  # [U]
        if self.action_low.shape != self.action_high.shape or self.action_low.ndim != 1:
            raise ValueError("action_low and action_high must both have shape [U]")
        if bool((self.action_low > self.action_high).any()):
            raise ValueError("action_low must not exceed action_high")
        self.act_dim = self.action_low.shape[0]
        self.generator = generator
        self.nonfinite = 0  # candidates scored minus infinity, over the problem's lifetime
        self._termination = termination_fn if termination_fn is not None else never_terminates
        if model.learns_reward:
            self._reward = _learned_reward
        else:
            self._reward = lambda state, act, nxt: reward_fn(state.obs, act, nxt.obs)

    def to(self, device: torch.device | str) -> PlanningProblem:
        self.action_low = self.action_low.to(device)
        self.action_high = self.action_high.to(device)
        return self

    @torch.inference_mode()
    def evaluate(self, x0: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
        """Mean return over particles of each candidate ``actions [N, H, U]`` from ``x0 [X]``.

        Returns ``[N]``; minus infinity for candidates whose rollout went non-finite.
        """
        check_shape("actions", actions, ("N", self.horizon, self.act_dim))
        n, p = actions.shape[0], self.particles
        state = self.model.rollout_start(x0.reshape(1, -1).expand(n, -1), p, self.generator)
        acts = actions.to(state.obs.dtype).repeat_interleave(p, dim=0)  # [N * P, H, U]
        total = torch.zeros(n * p, dtype=torch.float32, device=actions.device)  # [N * P]
        alive = torch.ones(n * p, dtype=torch.bool, device=actions.device)  # [N * P]
        finite = torch.ones(n * p, dtype=torch.bool, device=actions.device)  # [N * P]
        for t in range(self.horizon):
            act = acts[:, t]
            nxt = self.model.rollout_step(state, act, self.generator)
            reward = self._reward(state, act, nxt).float()  # [N * P]
            step_ok = torch.isfinite(reward) & torch.isfinite(nxt.obs).all(dim=-1)
            finite &= step_ok | ~alive
            total += torch.where(alive & step_ok, reward, 0.0)
            alive &= ~self._termination(nxt.obs)
            state = nxt
        if self.terminal_reward_fn is not None:
            reward = self.terminal_reward_fn(state.obs).float()  # [N * P]
            finite &= torch.isfinite(reward) | ~alive
            total += torch.where(alive & torch.isfinite(reward), reward, 0.0)
        returns = total.view(n, p).mean(dim=1)  # [N]
        bad = ~finite.view(n, p).all(dim=1)
        returns = returns.masked_fill(bad, float("-inf"))
        self.nonfinite += int(bad.sum())
        return returns


def _learned_reward(state: RolloutState, act: torch.Tensor, nxt: RolloutState) -> torch.Tensor:
    return nxt.reward
