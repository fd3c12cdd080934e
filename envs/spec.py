"""The environment seam: an :class:`EnvSpec` names a gymnasium env and its batched torch twins.

``reward_fn(obs, act, next_obs) -> [B]`` and ``termination_fn(next_obs) -> bool [B]`` equal the
env's own reward and termination on the same transition (tested on real rollouts), so that
planners can score imagined rollouts exactly as the env would score real ones.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import gymnasium as gym
import numpy as np
import torch

RewardFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
"""``(obs [B, X], act [B, U], next_obs [B, X]) -> reward [B]``."""

TerminationFn = Callable[[torch.Tensor], torch.Tensor]
"""``next_obs [B, X] -> terminated [B]`` (bool)."""


def never_terminates(next_obs: torch.Tensor) -> torch.Tensor:
    """Termination function of envs that only truncate: all ``False``, shape ``[B]``."""
    return torch.zeros(next_obs.shape[:-1], dtype=torch.bool, device=next_obs.device)


@dataclass(frozen=True)
class EnvSpec:
    """A registry entry: how to make the env and how to score its transitions in torch."""

    name: str
    make_env: Callable[..., gym.Env]  # keyword arguments go to the env (render_mode, ...)
    obs_dim: int  # X
    act_dim: int  # U
    action_low: np.ndarray  # [U]
    action_high: np.ndarray  # [U]
    max_episode_steps: int  # T
    reward_fn: RewardFn
    termination_fn: TerminationFn
    description: str = ""
    solved_return: float | None = None  # an episode return at or above this counts as solved
    dynamics: Any = None  # analytic systems: differentiable torch dynamics and a casadi twin
    position_obs: tuple[int, ...] = ()
    """Observation features that neither the dynamics nor the optimal value depend on: an
    absolute position kept in the observation only so that ``reward_fn`` can score progress
    (HalfCheetah's and Hopper's x). Learners and Dyna models may leave them out of their
    inputs, as the observations of the SAC and MBPO papers do."""

    def make(self, **kwargs: Any) -> gym.Env:
        """A new gymnasium env (time limit included)."""
        return self.make_env(**kwargs)

    def action_bounds(
        self, device: torch.device | str | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Action bounds as float32 tensors ``([U], [U])``."""
        low = torch.as_tensor(self.action_low, dtype=torch.float32, device=device)
        high = torch.as_tensor(self.action_high, dtype=torch.float32, device=device)
        return low, high
