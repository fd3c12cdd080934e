"""The environment seam: an :class:`EnvSpec` names a gymnasium env and its batched torch twins.

``reward_fn(obs, act, next_obs) -> [B]`` and ``termination_fn(next_obs) -> bool [B]`` equal the
env's own reward and termination on the same transition (tested on real rollouts), so that
planners can score imagined rollouts exactly as the env would score real ones.

Action spaces. A box env takes action vectors ``[U]`` within ``[action_low, action_high]``. A
discrete env (``num_actions = A``) takes an action index in ``[0, A)``; ``action_values [A, U]``
is the action vector each index stands for, and that vector is what ``reward_fn``, the models,
the buffers and the planners see (CartPole-v1: ``[[-1], [1]]``, the push direction). Between
the two, :meth:`EnvSpec.env_action` turns a planner's action vector into what the env takes
(the index of the nearest value for a discrete env) and :meth:`EnvSpec.action_vector` turns an
index back into its vector; a discrete env made by :meth:`EnvSpec.make` refuses anything but an
index, with a message that names the fix.
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
    num_actions: int | None = None  # A for a discrete action space, None for a box
    action_values: np.ndarray | None = None
    """``[A, U]`` float32: the action vector of each index of a discrete env. ``None`` with
    ``num_actions`` set means one-hot vectors (``U == A``)."""

    def __post_init__(self) -> None:
        if self.num_actions is None and self.action_values is None:
            return
        if self.action_values is None:
            if self.act_dim != self.num_actions:
                raise ValueError(
                    f"{self.name}: a discrete env without action_values gets one-hot action "
                    f"vectors, which needs act_dim == num_actions; got act_dim={self.act_dim}, "
                    f"num_actions={self.num_actions}: pass action_values [A, U]"
                )
            values = np.eye(self.act_dim, dtype=np.float32)
        else:
            values = np.asarray(self.action_values, dtype=np.float32)
        a = values.shape[0] if values.ndim == 2 else -1
        if values.ndim != 2 or values.shape[1] != self.act_dim or a < 1:
            raise ValueError(
                f"{self.name}: action_values must be [A, U={self.act_dim}], got "
                f"{list(values.shape)}"
            )
        if self.num_actions is not None and self.num_actions != a:
            raise ValueError(
                f"{self.name}: num_actions={self.num_actions} but action_values has {a} rows"
            )
        values.setflags(write=False)
        object.__setattr__(self, "num_actions", a)
        object.__setattr__(self, "action_values", values)

    @property
    def discrete(self) -> bool:
        """Whether the env takes an action index in ``[0, A)`` instead of a vector."""
        return self.num_actions is not None

    def make(self, **kwargs: Any) -> gym.Env:
        """A new gymnasium env (time limit included)."""
        return self.make_env(**kwargs)

    def discrete_actions(self, device: torch.device | str | None = None) -> torch.Tensor:
        """``action_values`` as a float32 tensor ``[A, U]`` (``PlanningProblem(action_values=)``).

        Raises:
            ValueError: for a box env.
        """
        values = self._values("discrete_actions")
        return torch.tensor(values, dtype=torch.float32, device=device)

    def action_index(self, act: torch.Tensor) -> torch.Tensor:
        """Index of the action value nearest (Euclidean) to each of ``act [..., U]``: long
        ``[...]``; ties go to the lower index."""
        values = torch.tensor(self._values("action_index"), dtype=act.dtype, device=act.device)
        if act.shape[-1:] != (self.act_dim,):
            raise ValueError(
                f"{self.name}: action_index takes action vectors [..., U={self.act_dim}], got "
                f"{list(act.shape)}"
            )
        dist = (act[..., None, :] - values).square().sum(dim=-1)  # [..., A]
        return dist.argmin(dim=-1)

    def action_vector(self, index: int | np.integer | np.ndarray) -> np.ndarray:
        """The action vector ``[U]`` (or ``[..., U]`` for an array of indices) of a discrete env's
        action index: what the buffers and models store for it."""
        values = self._values("action_vector")
        idx = np.asarray(index)
        if idx.dtype.kind not in "iu":
            raise TypeError(
                f"{self.name}: action_vector takes action indices (ints), got {idx.dtype}"
            )
        if idx.size and (idx.min() < 0 or idx.max() >= values.shape[0]):
            raise ValueError(
                f"{self.name}: action index must be in [0, {values.shape[0]}), got {index!r}"
            )
        return values[idx]

    def env_action(self, action: Any) -> np.ndarray | int:
        """What ``env.step`` takes for a planner's or policy's action.

        Box env: the action vector ``[U]`` as float32. Discrete env: an action vector ``[U]``
        becomes the index of the nearest action value; an index is checked and passed on.

        Raises:
            TypeError: an index (an int) for a box env.
            ValueError: a vector of the wrong size, or an index out of range.
        """
        arr = action.detach().cpu().numpy() if torch.is_tensor(action) else np.asarray(action)
        is_index = arr.ndim == 0 and arr.dtype.kind in "iu"
        if not self.discrete:
            if is_index:
                raise TypeError(
                    f"{self.name} has a box action space and takes action vectors "
                    f"[U={self.act_dim}]; got the action index {int(arr)} (a discrete action). "
                    "Pass the vector itself"
                )
            if arr.shape != (self.act_dim,):
                raise ValueError(
                    f"{self.name}: expected an action vector [U={self.act_dim}], got "
                    f"{list(arr.shape)}"
                )
            return arr.astype(np.float32)
        if is_index:
            i = int(arr)
            if not 0 <= i < self.num_actions:
                raise ValueError(
                    f"{self.name}: action index must be in [0, {self.num_actions}), got {i}"
                )
            return i
        if arr.shape != (self.act_dim,):
            raise ValueError(
                f"{self.name} takes an action index in [0, {self.num_actions}) or an action "
                f"vector [U={self.act_dim}] (mapped to the nearest action value); got "
                f"{list(arr.shape)} {arr.dtype}"
            )
        return int(self.action_index(torch.tensor(arr, dtype=torch.float32)))

    def _values(self, what: str) -> np.ndarray:
        if self.action_values is None:
            raise ValueError(
                f"{what}: {self.name} has a box action space (no action_values); "
                "discretize it first with mbrl.envs.discrete.discretize(spec, per_dim)"
            )
        return self.action_values

    def action_bounds(
        self, device: torch.device | str | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Action bounds as float32 tensors ``([U], [U])``."""
        low = torch.as_tensor(self.action_low, dtype=torch.float32, device=device)
        high = torch.as_tensor(self.action_high, dtype=torch.float32, device=device)
        return low, high
