"""Discrete-action tasks: CartPole-v1 and Acrobot-v1 with batched torch twins, and
:func:`discretize` for a box env chosen among a grid of action vectors.

A discrete env takes an action index in ``[0, A)``; the spec's ``action_values [A, U]`` give
the action vector of each index, and that vector is what ``reward_fn``, the models, the buffers
and the planners see (see :mod:`mbrl.envs.spec`). Envs made from these specs are wrapped in
:class:`DiscreteActions`, which refuses anything but an index with a message naming the fix.

Gymnasium 1.x sources, read for the torch twins:
- CartPole-v1: ``force = +10 N`` for index 1 and ``-10 N`` for index 0, so the action values
  are ``[[-1], [1]]``. Terminated when ``x < -2.4`` or ``x > 2.4`` or ``theta < -12 deg`` or
  ``theta > 12 deg`` and rewarded ``+1`` for every step, the terminating one included: the
  equations, thresholds and reward of cartpole-balance, whose torch functions
  (:mod:`mbrl.envs.cartpole`) it shares. 500 steps.
- Acrobot-v1: torque ``[-1, 0, 1][index]`` (no torque noise), so the action values are
  ``[[-1], [0], [1]]``. Observation ``[cos t1, sin t1, cos t2, sin t2, dt1, dt2]`` of the state
  after the step; terminated when ``-cos t1 - cos(t1 + t2) > 1`` (the free end above the bar by
  more than one link length); reward ``-1`` until then and ``0`` on the terminating step.
  500 steps.

The torch functions take any leading batch ``[..., X]`` and work in the inputs' dtype (float32
expected) on the inputs' device.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import gymnasium as gym
import numpy as np
import torch
from gymnasium import spaces

from mbrl.envs import cartpole
from mbrl.envs.spec import EnvSpec


class DiscreteActions(gym.ActionWrapper):
    """An env that takes an action index in ``[0, A)`` and nothing else.

    With ``values [A, U]`` the wrapped env is a box env and index ``i`` is played as the
    vector ``values[i]`` (:func:`discretize`); without, the wrapped env takes the index itself
    (CartPole-v1) and the wrapper only checks it.

    Raises (from ``step``):
        TypeError: an action vector or a float where an index is expected; the message says
            to map vectors with :meth:`~mbrl.envs.spec.EnvSpec.env_action`.
        ValueError: an index outside ``[0, A)``.
    """

    def __init__(
        self, env: gym.Env, name: str, num_actions: int, values: np.ndarray | None = None
    ) -> None:
        super().__init__(env)
        self.action_space = spaces.Discrete(num_actions)
        self._name = name
        self._values = None if values is None else np.asarray(values, dtype=np.float32)

    def action(self, action: Any) -> Any:
        arr = np.asarray(action)
        if arr.ndim != 0 or arr.dtype.kind not in "iu":
            raise TypeError(
                f"{self._name} takes an action index in [0, {self.action_space.n}) (an int); got "
                f"{arr.dtype} {list(arr.shape)}, an action vector. Map a planner's action vector "
                "to its index with EnvSpec.env_action(action)"
            )
        i = int(arr)
        if not 0 <= i < self.action_space.n:
            raise ValueError(
                f"{self._name}: action index must be in [0, {self.action_space.n}), got {i}"
            )
        return i if self._values is None else self._values[i]


# ---------------------------------------------------------------- Acrobot-v1


def acrobot_v1_termination(next_obs: torch.Tensor) -> torch.Tensor:
    """Acrobot-v1: ``-cos t1 - cos(t1 + t2) > 1`` with ``cos(t1 + t2) = cos t1 cos t2 -
    sin t1 sin t2`` from ``[cos t1, sin t1, cos t2, sin t2, dt1, dt2]``: ``bool [...]``."""
    c1, s1, c2, s2 = next_obs[..., 0], next_obs[..., 1], next_obs[..., 2], next_obs[..., 3]
    return -c1 - (c1 * c2 - s1 * s2) > 1.0


def acrobot_v1_reward(obs: torch.Tensor, act: torch.Tensor, next_obs: torch.Tensor) -> torch.Tensor:
    """Acrobot-v1: ``-1`` for a step that does not reach the goal height, ``0`` for the one
    that does (:func:`acrobot_v1_termination` of ``next_obs``): ``[...]``."""
    return acrobot_v1_termination(next_obs).to(next_obs.dtype) - 1.0


# ---------------------------------------------------------------- specs


def _discrete_factory(env_id: str, name: str, num_actions: int) -> Callable[..., gym.Env]:
    def make_env(**kwargs: Any) -> gym.Env:
        if kwargs.keys() - {"render_mode"}:
            raise ValueError(
                f"{env_id}: only render_mode may be passed (the others would change what the "
                f"torch functions reproduce); got {sorted(kwargs)}"
            )
        return DiscreteActions(gym.make(env_id, **kwargs), name, num_actions)

    return make_env


def cartpole_v1() -> EnvSpec:
    values = np.array([[-1.0], [1.0]], dtype=np.float32)
    return EnvSpec(
        name="CartPole-v1",
        make_env=_discrete_factory("CartPole-v1", "CartPole-v1", 2),
        obs_dim=4,
        act_dim=1,
        action_low=values.min(axis=0),
        action_high=values.max(axis=0),
        max_episode_steps=500,
        reward_fn=cartpole.cartpole_balance_reward,
        termination_fn=cartpole.cartpole_balance_termination,
        description="Gymnasium CartPole-v1: push left or right (A=2, values -1, +1), +1 per step.",
        solved_return=475.0,
        num_actions=2,
        action_values=values,
    )


def acrobot_v1() -> EnvSpec:
    values = np.array([[-1.0], [0.0], [1.0]], dtype=np.float32)
    return EnvSpec(
        name="Acrobot-v1",
        make_env=_discrete_factory("Acrobot-v1", "Acrobot-v1", 3),
        obs_dim=6,
        act_dim=1,
        action_low=values.min(axis=0),
        action_high=values.max(axis=0),
        max_episode_steps=500,
        reward_fn=acrobot_v1_reward,
        termination_fn=acrobot_v1_termination,
        description="Gymnasium Acrobot-v1: swing the tip above the bar (A=3 torques -1, 0, 1).",
        solved_return=-100.0,
        num_actions=3,
        action_values=values,
    )


def discretize(spec: EnvSpec, per_dim: int) -> EnvSpec:
    """A discrete-action version of the box env ``spec``: ``A = per_dim^U`` actions, the grid of
    ``per_dim`` evenly spaced values per action dimension from ``action_low`` to
    ``action_high`` (both included).

    ``action_values [per_dim^U, U]`` lists the grid with the last dimension varying fastest
    (index ``i`` has digits ``i_0 ... i_{U-1}`` in base ``per_dim``). The env is wrapped to
    take the index (:class:`DiscreteActions`); reward, termination, bounds and the analytic
    model are the box env's, since they see the action vector.

    Raises:
        ValueError: ``per_dim < 2``, or ``spec`` is already discrete.
    """
    if spec.discrete:
        raise ValueError(f"discretize: {spec.name} is already discrete (A={spec.num_actions})")
    if isinstance(per_dim, bool) or not isinstance(per_dim, int) or per_dim < 2:
        raise ValueError(f"discretize: per_dim must be an int >= 2, got {per_dim!r}")
    low = np.asarray(spec.action_low, dtype=np.float32)
    high = np.asarray(spec.action_high, dtype=np.float32)
    axes = np.linspace(low, high, per_dim, dtype=np.float32).T  # [U, per_dim]
    grid = np.meshgrid(*axes, indexing="ij")  # U arrays [per_dim] * U
    values = np.stack([g.reshape(-1) for g in grid], axis=-1).astype(np.float32)  # [A, U]
    name = f"{spec.name}-grid{per_dim}"
    num_actions = values.shape[0]
    base = spec.make_env

    def make_env(**kwargs: Any) -> gym.Env:
        return DiscreteActions(base(**kwargs), name, num_actions, values)

    return dataclasses.replace(
        spec,
        name=name,
        make_env=make_env,
        description=f"{spec.description} Discretized: {per_dim} values per action dim.",
        num_actions=num_actions,
        action_values=values,
    )
