"""The data layer: what crosses between envs, buffers, models and learners.

* :class:`Transitions` — ``B`` i.i.d. rows ``(obs, act, next_obs, reward, terminated)``, the
  input of every :meth:`~mbrl.dynamics.base.DynamicsModel.fit` and of the learners' updates.
* :class:`Episode` — one real episode as played (numpy), with ``terminated`` per step and
  whether the time limit ``truncated`` it.
* :class:`Sequences` — ``B`` contiguous chunks of ``L`` steps, each inside one episode, for
  sequence models (latent image models) and time-varying fits (GPS).

Shape letters follow DESIGN.md: ``B`` batch, ``T`` episode length, ``L`` chunk length, ``X``
observation dim, ``U`` action dim, ``C H W`` image channels, height, width. Observations are
``[..., X]`` float vectors or ``[..., C, H, W]`` images; images stay ``uint8`` in buffers and in
the records here, and models turn them into floats.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


@dataclass(frozen=True)
class Transitions:
    """A batch of transitions, the input of :meth:`DynamicsModel.fit` and learner updates."""

    obs: torch.Tensor  # [B, X] (or [B, C, H, W] uint8 images)
    act: torch.Tensor  # [B, U]
    next_obs: torch.Tensor  # [B, X] (or [B, C, H, W] uint8 images)
    reward: torch.Tensor  # [B]
    terminated: torch.Tensor  # [B] bool

    def __len__(self) -> int:
        return self.obs.shape[0]

    def to(self, device: torch.device | str) -> Transitions:
        return Transitions(
            *(
                t.to(device)
                for t in (self.obs, self.act, self.next_obs, self.reward, self.terminated)
            )
        )


@dataclass(frozen=True)
class Episode:
    """One real episode of ``T`` steps.

    ``obs`` holds every observation seen, the one after the last step included, so the
    transition of step ``t`` is ``(obs[t], act[t], reward[t], obs[t + 1], terminated[t])``.
    ``truncated`` says the episode ended by the time limit (or a step budget), not by
    termination; an episode that is neither terminated nor truncated at its end was cut short
    by its caller.
    """

    obs: np.ndarray  # [T + 1, X] float32 (or [T + 1, C, H, W] uint8 images)
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


@dataclass(frozen=True)
class Sequences:
    """``B`` contiguous chunks of ``L`` steps; no chunk crosses an episode boundary.

    ``obs`` has ``L + 1`` entries per chunk: ``obs[:, t]`` is the observation before step ``t``
    and ``obs[:, L]`` the one after the last step, so ``obs[:, 1:]`` are the next observations.
    ``time[:, t]`` is the step's index within its episode (``time[:, 0] == 0``: the chunk
    starts at the episode's first step, where a recurrent model starts from its prior).
    Steps after a termination never occur inside a chunk: a terminated step is the last of its
    episode, so ``terminated`` can be true only at ``t = L - 1``.
    """

    obs: torch.Tensor  # [B, L + 1, X] (or [B, L + 1, C, H, W] uint8 images)
    act: torch.Tensor  # [B, L, U]
    reward: torch.Tensor  # [B, L]
    terminated: torch.Tensor  # [B, L] bool
    time: torch.Tensor  # [B, L] long, step index within the episode

    def __len__(self) -> int:
        return self.act.shape[0]

    @property
    def length(self) -> int:
        """``L``, steps per chunk."""
        return self.act.shape[1]

    @property
    def first(self) -> torch.Tensor:
        """``[B]`` bool: the chunk starts at its episode's first step."""
        return self.time[:, 0] == 0

    def to(self, device: torch.device | str) -> Sequences:
        return Sequences(
            *(t.to(device) for t in (self.obs, self.act, self.reward, self.terminated, self.time))
        )

    def transitions(self) -> Transitions:
        """The ``B * L`` steps as rows (chunk-major: step ``t`` of chunk ``b`` at ``b * L + t``)."""
        obs_shape = self.obs.shape[2:]
        return Transitions(
            obs=self.obs[:, :-1].reshape(-1, *obs_shape),
            act=self.act.reshape(-1, self.act.shape[-1]),
            next_obs=self.obs[:, 1:].reshape(-1, *obs_shape),
            reward=self.reward.reshape(-1),
            terminated=self.terminated.reshape(-1),
        )
