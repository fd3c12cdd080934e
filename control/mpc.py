"""The one MPC loop: any planner on any planning problem, receding horizon with warm start.

Every ``replan_every`` steps the controller plans from the current observation, warm-started
with what the previous plan declared (:meth:`~mbrl.planners.base.Plan.warm_start`: its actions,
and whatever else the planner keeps, such as iCEM's elites) shifted by the steps taken since
(:func:`~mbrl.planners.base.shift_warm`; every ``[..., H, U]`` tensor is shifted and the tail
filled with the middle of the action bounds). The controller knows no planner's field names.
Between replans it plays the stored plan, adding the plan's time-varying feedback
``K[t] (x - x_ref[t])`` when the planner provides it (LQR, iLQR).

When the problem's model is a :class:`~mbrl.dynamics.base.Filter` (a latent model, a Kalman
filter) the controller keeps a belief: :meth:`MPCController.reset` takes the prior
(``reset_belief(1)``), every :meth:`MPCController.act` updates it with the real observation
and the action that led to it (``observe(belief, obs [1, ...], prev_act [1, U] or None)``),
also between replans, and the planner plans from the belief; feedback gains act on the belief
mean. Image observations (``uint8``) reach the filter as they are; anything else is float32.
For a discrete problem (``action_values [A, U]``) the actions are action vectors (rows of
``action_values``), and the shifted tail is filled with the action value nearest the middle of
the bounds.

Exploration noise (PlaNet's, Hafner et al. 2019, Sec. 5: 0.3): with ``exploration_std > 0``
every action played gets Gaussian noise of that std in units of half the action range, clipped
to the bounds; the noisy action is the one returned and the one a filter observes next.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import gymnasium as gym
import numpy as np
import torch

from mbrl.data import Episode
from mbrl.dynamics.base import Belief, Filter
from mbrl.planners.base import Plan, Planner, PlanningProblem, WarmStart, shift_warm


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
        problem: the planning problem (model, reward, horizon, bounds, particles). When its
            model is a :class:`~mbrl.dynamics.base.Filter`, plans start from the belief.
        replan_every: ``k``; plan every ``k`` env steps and play the plan in between
            (``1 <= k <= H``).
        device: where observations are moved before planning.
        exploration_std: std of the noise added to every action played, in units of half the
            action range (0: none); settable between episodes.
        exploration_generator: draws that noise (on ``device``; ``None``: torch's default).

    Attributes:
        plan: the stored plan (``None`` before the first :meth:`act` of an episode).
        belief: the filter's current belief of one row (``None`` when the model is no
            filter).
        stats: running counts (:class:`MPCStats`).
    """

    def __init__(
        self,
        planner: Planner,
        problem: PlanningProblem,
        replan_every: int = 1,
        device: torch.device | str = "cpu",
        exploration_std: float = 0.0,
        exploration_generator: torch.Generator | None = None,
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
        self._low = problem.action_low.to(self.device)  # [U]
        self._high = problem.action_high.to(self.device)  # [U]
        mid = (self._low + self._high) / 2  # [U]
        if problem.action_values is not None:  # the valid action nearest the middle
            values = problem.action_values.to(self.device)  # [A, U]
            mid = values[torch.argmin(((values - mid) ** 2).sum(dim=-1))]
        self._mid = mid  # [U] fill of the shifted tail
        self._half_range = (self._high - self._low) / 2  # [U] unit of the exploration noise
        self.exploration_std = exploration_std
        self.exploration_generator = exploration_generator
        self._filter: Filter | None = problem.model if isinstance(problem.model, Filter) else None
        self.reset()

    def reset(self) -> None:
        """Forget the stored plan and, for a filter, restart the belief from its prior (call at
        every episode start)."""
        self.plan: Plan | None = None
        self._warm: WarmStart | None = None  # what the stored plan declared for the next call
        self._t = 0  # steps played from the current plan
        self._prev_act: torch.Tensor | None = None  # [U] the action played last
        self.belief: Belief | None = None
        if self._filter is not None:
            self.belief = self._filter.reset_belief(1)

    def reset_stats(self) -> None:
        self.stats = MPCStats()

    def warm_start(self) -> WarmStart | None:
        """The stored plan's warm start shifted by the steps played, padded with mid-bound
        actions (``None`` before the first plan of an episode)."""
        if self._warm is None:
            return None
        return shift_warm(self._warm, self._t, self._mid)

    def act(self, obs: np.ndarray) -> np.ndarray:
        """The action ``[U]`` for the real observation ``obs [X]`` (``[...]`` for a filter)."""
        x = torch.as_tensor(obs, device=self.device)  # [X], or uint8 images for a filter
        if x.dtype != torch.uint8:
            x = x.to(torch.float32)
        if self._filter is not None:
            prev = None if self._prev_act is None else self._prev_act[None]  # [1, U]
            self.belief = self._filter.observe(self.belief, x[None], prev)
            x0: torch.Tensor | Belief = self.belief
            x_now = self.belief.mean[0]  # [Z] what feedback gains act on
        else:
            x0 = x_now = x
        if self.plan is None or self._t >= self.replan_every:
            start = time.perf_counter()
            before = self.problem.nonfinite
            self.plan = self.planner.plan(self.problem, x0, self.warm_start())
            self._warm = self.plan.warm_start()
            self.stats.plans += 1
            self.stats.plan_seconds += time.perf_counter() - start
            self.stats.nonfinite += self.problem.nonfinite - before
            self.stats.not_ok += not self.plan.ok
            self._t = 0
        u = self.plan.actions[self._t]
        if self.plan.K is not None and self.plan.x_ref is not None:
            u = u + self.plan.K[self._t] @ (x_now - self.plan.x_ref[self._t])
            u = torch.minimum(torch.maximum(u, self._low), self._high)
        if self.exploration_std > 0:
            noise = torch.randn(
                u.shape, generator=self.exploration_generator, device=self.device
            )  # [U]
            u = u + self.exploration_std * self._half_range * noise
            u = torch.minimum(torch.maximum(u, self._low), self._high)
        self._t += 1
        self._prev_act = u.detach()
        return u.detach().cpu().numpy().astype(np.float32)


def run_episode(
    env: gym.Env,
    policy: Policy,
    seed: int | None = None,
    max_steps: int | None = None,
    on_step: Callable[[int, float], None] | None = None,
    env_action: Callable[[np.ndarray], Any] | None = None,
) -> Episode:
    """Play one episode of ``policy`` in ``env`` (reset with ``seed``) and record it.

    ``on_step(t, reward)`` is called after every step (progress bars). ``env_action`` maps the
    policy's action vector ``[U]`` to what ``env.step`` takes (a discrete env's index:
    :meth:`~mbrl.envs.spec.EnvSpec.env_action`); the episode records the vector. Float
    observations are stored as float32, images keep their ``uint8``.
    """
    start = time.perf_counter()
    obs, _ = env.reset(seed=seed)
    policy.reset()
    observations, actions, rewards, terms = [_observation(obs)], [], [], []
    truncated = False
    t = 0
    while max_steps is None or t < max_steps:
        action = policy.act(observations[-1])
        obs, reward, terminated, truncated, _ = env.step(
            action if env_action is None else env_action(action)
        )
        observations.append(_observation(obs))
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


def _observation(obs: Any) -> np.ndarray:
    """An env observation as stored: ``uint8`` images as they are, anything else float32."""
    arr = np.asarray(obs)
    return arr if arr.dtype == np.uint8 else arr.astype(np.float32, copy=False)
