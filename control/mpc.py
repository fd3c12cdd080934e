"""The one MPC loop: any planner on any planning problem, receding horizon with warm start.

Every ``replan_every`` steps the controller plans from the current observation, warm-started
with the previous plan shifted by the steps taken since (the tail is filled with the middle of
the action bounds); a plan that carries elites (iCEM) hands them back shifted as
``warm_elites``. Between replans it plays the stored plan, adding the plan's time-varying
feedback ``K[t] (x - x_ref[t])`` when the planner provides it (LQR, iLQR).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import gymnasium as gym
import numpy as np
import torch

from mbrl.planners.base import Plan, Planner, PlanningProblem, shift_actions


class Policy(Protocol):
    """Anything that acts: ``reset()`` at an episode start, ``act(obs [X]) -> action [U]``."""

    def reset(self) -> None: ...

    def act(self, obs: np.ndarray) -> np.ndarray: ...


class RandomPolicy:
    """Uniform actions within bounds, from an explicit numpy generator."""

    def __init__(self, low: np.ndarray, high: np.ndarray, rng: np.random.Generator) -> None:
        self.low, self.high, self.rng = np.asarray(low), np.asarray(high), rng

    def reset(self) -> None:
        pass

    def act(self, obs: np.ndarray) -> np.ndarray:
        return self.rng.uniform(self.low, self.high).astype(np.float32)


@dataclass
class MPCStats:
    """Running counts of one controller, reset with :meth:`MPCController.reset_stats`."""

    plans: int = 0
    plan_seconds: float = 0.0
    nonfinite: int = 0  # candidates scored minus infinity
    not_ok: int = 0  # plans whose status is not in OK_STATUSES


class MPCController:
    """Receding-horizon control around ``planner`` and ``problem``.

    Args:
        planner: any :class:`~mbrl.planners.base.Planner`.
        problem: the planning problem (model, reward, horizon, bounds, particles).
        replan_every: ``k``; plan every ``k`` env steps and play the plan in between
            (``1 <= k <= H``).
        device: where observations are moved before planning.
    """

    def __init__(
        self,
        planner: Planner,
        problem: PlanningProblem,
        replan_every: int = 1,
        device: torch.device | str = "cpu",
    ) -> None:
        if not 1 <= replan_every <= problem.horizon:
            raise ValueError(
                f"replan_every must be in [1, horizon={problem.horizon}], got {replan_every}"
            )
        self.planner = planner
        self.problem = problem
        self.replan_every = replan_every
        self.device = torch.device(device)
        self.stats = MPCStats()
        self._mid = ((problem.action_low + problem.action_high) / 2).to(self.device)  # [U]
        self._low = problem.action_low.to(self.device)
        self._high = problem.action_high.to(self.device)
        self.reset()

    def reset(self) -> None:
        """Forget the stored plan (call at every episode start)."""
        self.plan: Plan | None = None
        self._t = 0  # steps played from the current plan

    def reset_stats(self) -> None:
        self.stats = MPCStats()

    def warm_start(self) -> torch.Tensor | None:
        """The stored plan shifted by the steps played, padded with mid-bound actions."""
        if self.plan is None:
            return None
        return shift_actions(self.plan.actions, self._t, self._mid)

    def act(self, obs: np.ndarray) -> np.ndarray:
        x = torch.as_tensor(obs, dtype=torch.float32, device=self.device)  # [X]
        if self.plan is None or self._t >= self.replan_every:
            start = time.perf_counter()
            before = self.problem.nonfinite
            if self.plan is not None and self.plan.elites is not None:  # iCEM's shifted elites
                elites = shift_actions(self.plan.elites, self._t, self._mid)
                self.plan = self.planner.plan(
                    self.problem, x, self.warm_start(), warm_elites=elites
                )
            else:
                self.plan = self.planner.plan(self.problem, x, self.warm_start())
            self.stats.plans += 1
            self.stats.plan_seconds += time.perf_counter() - start
            self.stats.nonfinite += self.problem.nonfinite - before
            self.stats.not_ok += not self.plan.ok
            self._t = 0
        u = self.plan.actions[self._t]
        if self.plan.K is not None and self.plan.x_ref is not None:
            u = u + self.plan.K[self._t] @ (x - self.plan.x_ref[self._t])
            u = torch.minimum(torch.maximum(u, self._low), self._high)
        self._t += 1
        return u.detach().cpu().numpy().astype(np.float32)


@dataclass(frozen=True)
class Episode:
    """One real episode."""

    obs: np.ndarray  # [T + 1, X]
    act: np.ndarray  # [T, U]
    reward: np.ndarray  # [T]
    terminated: np.ndarray  # [T] bool
    truncated: bool
    seconds: float  # wall time of the whole episode

    @property
    def ret(self) -> float:
        return float(self.reward.sum())

    def __len__(self) -> int:
        return len(self.reward)


def run_episode(
    env: gym.Env,
    policy: Policy,
    seed: int | None = None,
    max_steps: int | None = None,
    on_step: Callable[[int, float], None] | None = None,
) -> Episode:
    """Play one episode of ``policy`` in ``env`` (reset with ``seed``) and record it.

    ``on_step(t, reward)`` is called after every step (progress bars).
    """
    start = time.perf_counter()
    obs, _ = env.reset(seed=seed)
    policy.reset()
    observations, actions, rewards, terms = [np.asarray(obs, dtype=np.float32)], [], [], []
    truncated = False
    t = 0
    while max_steps is None or t < max_steps:
        action = policy.act(observations[-1])
        obs, reward, terminated, truncated, _ = env.step(action)
        observations.append(np.asarray(obs, dtype=np.float32))
        actions.append(np.asarray(action, dtype=np.float32))
        rewards.append(float(reward))
        terms.append(bool(terminated))
        t += 1
        if on_step is not None:
            on_step(t, float(reward))
        if terminated or truncated:
            break
    return Episode(
        obs=np.stack(observations),
        act=np.stack(actions).reshape(len(actions), -1),
        reward=np.asarray(rewards, dtype=np.float32),
        terminated=np.asarray(terms, dtype=bool),
        truncated=bool(truncated),
        seconds=time.perf_counter() - start,
    )
