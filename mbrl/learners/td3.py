"""TD3 (Fujimoto et al. 2018, "Addressing Function Approximation Error in Actor-Critic Methods")
with DDPG (Lillicrap et al. 2016) as its special case.

TD3 (Algorithm 1): twin critics (one batched network, members as the leading axis) and the
clipped double-Q target ``y = r + gamma (1 - d) min_j Q'_j(s', clip(pi'(s') + eps, -1, 1))``
with target policy smoothing ``eps = clip(N(0, sigma~), -c, c)`` (Section 5.3); the actor and
the target networks are updated once every ``policy_delay`` critic updates (Section 5.2),
the actor by maximising ``Q_1(s, pi(s))``.

DDPG is ``num_critics=1, policy_delay=1, target_noise=0`` (:meth:`TD3.ddpg`).
Policies act in ``[-1, 1]`` (tanh output), mapped affinely to the env's action bounds;
exploration adds ``N(0, exploration_noise^2)`` in that unit box and clips.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from mbrl.dynamics.base import Transitions
from mbrl.learners.base import check_rates, one_step_target
from mbrl.learners.networks import (
    ActionScale,
    EnsembleMLP,
    as_batch,
    frozen_copy,
    observation_inputs,
    soft_update,
)


class TD3:
    """Twin delayed DDPG; DDPG when built by :meth:`ddpg`.

    Args:
        obs_dim: ``X``.
        act_dim: ``U``.
        action_low, action_high: env action bounds ``[U]``.
        hidden_size, num_layers: MLP sizes (paper: 256, 2).
        gamma: discount.
        tau: Polyak rate of target actor and critics.
        actor_lr, critic_lr: Adam learning rates.
        num_critics: 2 for TD3's clipped double Q, 1 for DDPG.
        policy_delay: critic updates per actor and target update (TD3: 2, DDPG: 1).
        target_noise: ``sigma~``, std of the target policy smoothing noise in the unit box
            (TD3: 0.2, DDPG: 0).
        noise_clip: ``c``, clip of the smoothing noise (TD3: 0.5).
        exploration_noise: std of the Gaussian exploration noise in the unit box (0.1).
        device: where networks and batches live.
        seed: seeds weight initialisation and the learner's own generator.
        ignored_obs: observation features the networks never read, e.g. an absolute x
            position that neither the dynamics nor the value depend on.
    """

    def __init__(
        self,
        obs_dim: int,
        act_dim: int,
        action_low: torch.Tensor | list[float],
        action_high: torch.Tensor | list[float],
        hidden_size: int = 256,
        num_layers: int = 2,
        gamma: float = 0.99,
        tau: float = 0.005,
        actor_lr: float = 3e-4,
        critic_lr: float = 3e-4,
        num_critics: int = 2,
        policy_delay: int = 2,
        target_noise: float = 0.2,
        noise_clip: float = 0.5,
        exploration_noise: float = 0.1,
        device: torch.device | str = "cpu",
        seed: int = 0,
        ignored_obs: Sequence[int] = (),
    ) -> None:
        if num_critics < 1 or policy_delay < 1 or target_noise < 0 or noise_clip < 0:
            raise ValueError(
                f"need num_critics >= 1, policy_delay >= 1, target_noise >= 0, noise_clip >= 0; "
                f"got {num_critics}, {policy_delay}, {target_noise}, {noise_clip}"
            )
        check_rates(gamma, tau)
        self.obs_dim, self.act_dim = obs_dim, act_dim
        self.gamma, self.tau = gamma, tau
        self.policy_delay = policy_delay
        self.target_noise, self.noise_clip = target_noise, noise_clip
        self.exploration_noise = exploration_noise
        self.device = torch.device(device)
        self.scale = ActionScale(action_low, action_high, act_dim, self.device)
        init = torch.Generator().manual_seed(seed)
        obs_in, critic_in = observation_inputs(obs_dim, act_dim, ignored_obs)
        self.actor = EnsembleMLP(1, obs_dim, act_dim, hidden_size, num_layers, init, obs_in).to(
            self.device
        )
        self.critic = EnsembleMLP(
            num_critics, obs_dim + act_dim, 1, hidden_size, num_layers, init, critic_in
        ).to(self.device)
        self.actor_target = frozen_copy(self.actor)
        self.critic_target = frozen_copy(self.critic)
        self.actor_opt = torch.optim.Adam(self.actor.parameters(), lr=actor_lr)
        self.critic_opt = torch.optim.Adam(self.critic.parameters(), lr=critic_lr)
        self.generator = torch.Generator(self.device).manual_seed(seed + 1)
        self.updates = 0
        self._last_actor_loss = float("nan")

    @classmethod
    def ddpg(
        cls,
        obs_dim: int,
        act_dim: int,
        action_low: torch.Tensor | list[float],
        action_high: torch.Tensor | list[float],
        **kwargs: Any,
    ) -> TD3:
        """DDPG: one critic, no policy delay, no target policy smoothing."""
        for key in ("num_critics", "policy_delay", "target_noise"):
            if key in kwargs:
                raise ValueError(f"TD3.ddpg fixes {key}; build TD3(...) directly to change it")
        return cls(
            obs_dim,
            act_dim,
            action_low,
            action_high,
            num_critics=1,
            policy_delay=1,
            target_noise=0.0,
            **kwargs,
        )

    def policy(self, obs: torch.Tensor) -> torch.Tensor:
        """Deterministic unit-box actions ``tanh(pi(s))`` ``[B, U]``."""
        return torch.tanh(self.actor(obs)[0])

    def q(self, obs: torch.Tensor, act_unit: torch.Tensor) -> torch.Tensor:
        """All critics ``[E, B]`` at ``obs [B, X]`` and unit-box actions ``[B, U]``."""
        return self.critic(torch.cat([obs, act_unit], dim=-1)).squeeze(-1)

    @torch.no_grad()
    def act(
        self,
        obs: torch.Tensor,
        deterministic: bool = False,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Env-unit actions ``pi(s)``, plus clipped Gaussian exploration noise unless
        ``deterministic``."""
        x, single = as_batch(obs, self.obs_dim, self.device)
        a = self.policy(x)  # [B, U]
        if not deterministic:
            g = self.generator if generator is None else generator
            noise = torch.randn(a.shape, device=a.device, generator=g)
            a = (a + self.exploration_noise * noise).clamp(-1.0, 1.0)
        a = self.scale.to_env(a)
        return a[0] if single else a

    @torch.no_grad()
    def target_act(self, obs: torch.Tensor) -> torch.Tensor:
        """Env-unit actions ``pi'(s)`` ``[B, U]`` of the target actor, without smoothing noise."""
        return self.scale.to_env(torch.tanh(self.actor_target(obs)[0]))

    @torch.no_grad()
    def target_value(self, next_obs: torch.Tensor) -> torch.Tensor:
        """``min_j Q'_j(s', clip(pi'(s') + eps, -1, 1))`` ``[B]`` with smoothing noise ``eps``."""
        a = torch.tanh(self.actor_target(next_obs)[0])  # [B, U]
        if self.target_noise > 0:
            noise = torch.randn(a.shape, device=a.device, generator=self.generator)
            eps = (self.target_noise * noise).clamp(-self.noise_clip, self.noise_clip)
            a = (a + eps).clamp(-1.0, 1.0)
        q = self.critic_target(torch.cat([next_obs, a], dim=-1)).squeeze(-1)  # [E, B]
        return q.min(0).values

    def update(
        self,
        batch: Transitions,
        target_q: torch.Tensor | None = None,
        actor_obs: torch.Tensor | None = None,
    ) -> dict[str, float]:
        """One critic step; every ``policy_delay``-th call also an actor step and a Polyak
        update of both target networks.

        The critics regress on ``target_q [B]`` when given (else the one-step targets); the
        actor trains on ``actor_obs [B', X]`` when given (else ``batch.obs``).

        Returns ``q_loss``, ``actor_loss`` (of the latest actor step), ``q_mean``, ``q_abs_max``.
        """
        target = one_step_target(self, batch, target_q)  # [B]
        q = self.q(batch.obs, self.scale.to_unit(batch.act))  # [E, B]
        q_loss = (q - target).pow(2).mean(-1).sum()
        self.critic_opt.zero_grad(set_to_none=True)
        q_loss.backward()
        self.critic_opt.step()
        self.updates += 1

        if self.updates % self.policy_delay == 0:
            self.critic.requires_grad_(False)
            obs = batch.obs if actor_obs is None else actor_obs  # [B', X]
            actor_loss = -self.q(obs, self.policy(obs))[0].mean()
            self.critic.requires_grad_(True)
            self.actor_opt.zero_grad(set_to_none=True)
            actor_loss.backward()
            self.actor_opt.step()
            soft_update(self.actor_target, self.actor, self.tau)
            soft_update(self.critic_target, self.critic, self.tau)
            self._last_actor_loss = actor_loss.item()
        qd = q.detach()
        return {
            "q_loss": q_loss.item(),
            "actor_loss": self._last_actor_loss,
            "q_mean": qd.mean().item(),
            "q_abs_max": qd.abs().max().item(),
        }

    def state_dict(self) -> dict[str, Any]:
        return {
            "actor": self.actor.state_dict(),
            "critic": self.critic.state_dict(),
            "actor_target": self.actor_target.state_dict(),
            "critic_target": self.critic_target.state_dict(),
            "actor_opt": self.actor_opt.state_dict(),
            "critic_opt": self.critic_opt.state_dict(),
            "generator": self.generator.get_state(),
            "updates": self.updates,
            "last_actor_loss": self._last_actor_loss,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.actor.load_state_dict(state["actor"])
        self.critic.load_state_dict(state["critic"])
        self.actor_target.load_state_dict(state["actor_target"])
        self.critic_target.load_state_dict(state["critic_target"])
        self.actor_opt.load_state_dict(state["actor_opt"])
        self.critic_opt.load_state_dict(state["critic_opt"])
        self.generator.set_state(state["generator"])
        self.updates = int(state["updates"])
        self._last_actor_loss = float(state["last_actor_loss"])
