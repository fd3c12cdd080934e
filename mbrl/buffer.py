"""Replay buffer of real (or imagined) transitions, a ring of preallocated tensors."""

from __future__ import annotations

import numpy as np
import torch

from mbrl.control.mpc import Episode
from mbrl.dynamics.base import Transitions
from mbrl.shapes import check_shape


class ReplayBuffer:
    """Fixed-capacity FIFO store of transitions; the oldest are overwritten when full.

    Args:
        obs_dim: ``X``.
        act_dim: ``U``.
        capacity: most transitions kept.
        device: where the storage (and every returned batch) lives.
    """

    def __init__(
        self, obs_dim: int, act_dim: int, capacity: int, device: torch.device | str = "cpu"
    ) -> None:
        if capacity < 1:
            raise ValueError(f"capacity must be >= 1, got {capacity}")
        self.obs_dim, self.act_dim, self.capacity = obs_dim, act_dim, capacity
        self.device = torch.device(device)
        f32 = {"dtype": torch.float32, "device": self.device}
        self.obs = torch.zeros(capacity, obs_dim, **f32)  # [C, X]
        self.act = torch.zeros(capacity, act_dim, **f32)  # [C, U]
        self.reward = torch.zeros(capacity, **f32)  # [C]
        self.next_obs = torch.zeros(capacity, obs_dim, **f32)  # [C, X]
        self.terminated = torch.zeros(capacity, dtype=torch.bool, device=self.device)  # [C]
        self._next = 0  # row the next transition goes to
        self._size = 0

    def __len__(self) -> int:
        return self._size

    def add_batch(
        self,
        obs: torch.Tensor | np.ndarray,
        act: torch.Tensor | np.ndarray,
        reward: torch.Tensor | np.ndarray,
        next_obs: torch.Tensor | np.ndarray,
        terminated: torch.Tensor | np.ndarray,
    ) -> None:
        """Append ``B`` transitions: obs ``[B, X]``, act ``[B, U]``, reward ``[B]``,
        next_obs ``[B, X]``, terminated ``[B]``."""
        obs, act, reward, next_obs = (
            torch.as_tensor(v, dtype=torch.float32, device=self.device)
            for v in (obs, act, reward, next_obs)
        )
        terminated = torch.as_tensor(terminated, dtype=torch.bool, device=self.device)
        b = obs.shape[0]
        check_shape("obs", obs, (b, self.obs_dim))
        check_shape("act", act, (b, self.act_dim))
        check_shape("reward", reward, (b,))
        check_shape("next_obs", next_obs, (b, self.obs_dim))
        check_shape("terminated", terminated, (b,))
        if b > self.capacity:  # only the newest fit
            obs, act, reward, next_obs, terminated = (
                v[-self.capacity :] for v in (obs, act, reward, next_obs, terminated)
            )
            b = self.capacity
        rows = (self._next + torch.arange(b, device=self.device)) % self.capacity
        self.obs[rows], self.act[rows], self.reward[rows] = obs, act, reward
        self.next_obs[rows], self.terminated[rows] = next_obs, terminated
        self._next = (self._next + b) % self.capacity
        self._size = min(self._size + b, self.capacity)

    def add(self, obs, act, reward: float, next_obs, terminated: bool) -> None:
        """Append one transition (obs ``[X]``, act ``[U]``)."""
        self.add_batch(
            torch.as_tensor(np.asarray(obs))[None],
            torch.as_tensor(np.asarray(act))[None],
            torch.tensor([float(reward)]),
            torch.as_tensor(np.asarray(next_obs))[None],
            torch.tensor([bool(terminated)]),
        )

    def add_episode(self, episode: Episode) -> None:
        """Append every transition of a real episode."""
        self.add_batch(
            episode.obs[:-1], episode.act, episode.reward, episode.obs[1:], episode.terminated
        )

    def all(self) -> Transitions:
        """Every stored transition, oldest first."""
        if self._size < self.capacity:
            rows = torch.arange(self._size, device=self.device)
        else:
            rows = (self._next + torch.arange(self.capacity, device=self.device)) % self.capacity
        return self._gather(rows)

    def sample(self, batch_size: int, generator: torch.Generator | None = None) -> Transitions:
        """``batch_size`` transitions drawn uniformly with replacement."""
        if self._size == 0:
            raise ValueError("cannot sample from an empty replay buffer; add transitions first")
        rows = torch.randint(self._size, (batch_size,), generator=generator, device="cpu")
        return self._gather(rows.to(self.device))

    def _gather(self, rows: torch.Tensor) -> Transitions:
        return Transitions(
            obs=self.obs[rows],
            act=self.act[rows],
            next_obs=self.next_obs[rows],
            reward=self.reward[rows],
            terminated=self.terminated[rows],
        )

    def state_dict(self) -> dict:
        """Stored rows and cursor (tensors and ints only, safe for ``weights_only`` loads)."""
        n = self._size
        return {
            "obs": self.obs[:n].cpu(),
            "act": self.act[:n].cpu(),
            "reward": self.reward[:n].cpu(),
            "next_obs": self.next_obs[:n].cpu(),
            "terminated": self.terminated[:n].cpu(),
            "next": self._next,
            "size": n,
            "capacity": self.capacity,
        }

    def load_state_dict(self, state: dict) -> None:
        if state["capacity"] != self.capacity:
            raise ValueError(
                f"buffer capacity mismatch: checkpoint has {state['capacity']}, "
                f"this buffer {self.capacity}"
            )
        n = int(state["size"])
        for name in ("obs", "act", "reward", "next_obs", "terminated"):
            getattr(self, name)[:n] = state[name].to(self.device)
        self._next, self._size = int(state["next"]), n
