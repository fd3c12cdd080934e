"""The learner seam: what SAC, TD3/DDPG and NAF offer to the Dyna-style algorithms.

A learner acts on observations ``[B, X]`` (or one ``[X]``), updates on a batch of
:class:`~mbrl.dynamics.base.Transitions`, and exposes its bootstrap value ``V'(s')`` so that
value targets can be built outside it (model-based value expansion, Feinberg et al. 2018):
``update(batch, target_q)`` trains the critic on the given targets instead of its own
one-step targets ``r + gamma (1 - d) V'(s')``.
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import torch

from mbrl.dynamics.base import Transitions


@runtime_checkable
class Learner(Protocol):
    """The contract every model-free learner fulfils."""

    obs_dim: int
    act_dim: int
    gamma: float

    def act(
        self,
        obs: torch.Tensor,
        deterministic: bool = False,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Actions in env units, ``[B, U]`` for ``obs [B, X]`` or ``[U]`` for ``obs [X]``."""
        ...

    def target_value(self, next_obs: torch.Tensor) -> torch.Tensor:
        """Bootstrap value ``V'(s') [B]`` of ``next_obs [B, X]`` from the target networks."""
        ...

    def update(
        self,
        batch: Transitions,
        target_q: torch.Tensor | None = None,
        actor_obs: torch.Tensor | None = None,
    ) -> dict[str, float]:
        """One gradient step on ``batch``; ``target_q [B]`` replaces the one-step targets and
        ``actor_obs [B', X]`` the states the policy is improved on (MVE: real states only)."""
        ...

    def state_dict(self) -> dict[str, Any]:
        """Networks, targets, optimizers, counters and the generator state."""
        ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


def one_step_target(
    learner: Learner, batch: Transitions, target_q: torch.Tensor | None
) -> torch.Tensor:
    """``target_q`` if given (checked to be ``[B]``), else ``r + gamma (1 - d) V'(s')`` ``[B]``."""
    n = len(batch)
    if target_q is not None:
        if target_q.shape != (n,):
            raise ValueError(f"target_q: expected [B={n}], got {list(target_q.shape)}")
        return target_q.detach()
    with torch.no_grad():
        alive = (~batch.terminated).to(batch.reward.dtype)  # [B]
        return batch.reward + learner.gamma * alive * learner.target_value(batch.next_obs)


def check_rates(gamma: float, tau: float) -> None:
    """Refuse a discount outside ``[0, 1]`` or a Polyak rate outside ``(0, 1]``."""
    if not 0.0 < tau <= 1.0 or not 0.0 <= gamma <= 1.0:
        raise ValueError(f"need 0 < tau <= 1 and 0 <= gamma <= 1; got tau={tau}, gamma={gamma}")
