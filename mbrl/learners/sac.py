"""Soft actor-critic (Haarnoja et al. 2018, "Soft Actor-Critic Algorithms and Applications").

Twin soft Q-functions (one batched network, members as the leading axis) with Polyak-averaged
targets, a tanh-squashed Gaussian policy, and the automatic temperature of Section 5:
``J(alpha) = E[-alpha (log pi(a|s) + H_target)]`` with target entropy ``H_target = -U``.

Policy (Appendix C, "Enforcing action bounds"): ``u ~ N(mu(s), sigma(s)^2)``, ``a = tanh(u)`` in
``[-1, 1]``, and ``log pi(a|s) = log N(u) - sum_i log(1 - tanh(u_i)^2)``; the last term is
computed stably as ``2 (log 2 - u - softplus(-2u))``. Log-probabilities and entropies are those of
the unit-box action (the affine map to env units only adds a constant).

Soft Bellman target (Eq. 3, with the clipped double-Q of Section 6):
``y = r + gamma (1 - d) (min_j Q'_j(s', a') - alpha log pi(a'|s'))``, ``a' ~ pi(.|s')``.

Speed (one update is most of an MBPO env step): both critics are one batched network
(``[2, ...]`` weights, one ``baddbmm`` per layer), narrow layers take the transposed products
(:class:`~mbrl.learners.networks.EnsembleLinear`), the optimizers are fused Adam, the
temperature's gradient is written in closed form, the statistics leave the tensors in one
transfer, and the target critics are Polyak-averaged by one ``_foreach_lerp_``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F

from mbrl.dynamics.base import Transitions
from mbrl.learners.base import check_rates, one_step_target
from mbrl.learners.networks import (
    ActionScale,
    EnsembleMLP,
    adam,
    as_batch,
    frozen_copy,
    load_adam,
    observation_inputs,
    soft_update,
)

LOG_STD_MIN, LOG_STD_MAX = -20.0, 2.0
STATS = ("q_loss", "actor_loss", "alpha", "alpha_loss", "entropy", "q_mean", "q_abs_max")


def squashed_gaussian_log_prob(
    u: torch.Tensor, mean: torch.Tensor, log_std: torch.Tensor
) -> torch.Tensor:
    """``log pi(tanh(u))`` ``[B]`` of pre-squash ``u [B, U]`` under ``N(mean, exp(log_std)^2)``.

    Change of variables for ``a = tanh(u)``: the Gaussian log-density minus
    ``sum_i log(1 - tanh(u_i)^2) = sum_i 2 (log 2 - u_i - softplus(-2 u_i))``.
    """
    z = (u - mean) / log_std.exp()
    gauss = -0.5 * z.pow(2) - log_std - 0.5 * math.log(2 * math.pi)  # [B, U]
    log_det = 2.0 * (math.log(2.0) - u - F.softplus(-2.0 * u))  # [B, U]
    return (gauss - log_det).sum(-1)


class SAC:
    """Soft actor-critic with twin critics and automatic temperature.

    Args:
        obs_dim: ``X``.
        act_dim: ``U``.
        action_low, action_high: env action bounds ``[U]``; the policy acts in ``[-1, 1]`` and is
            mapped affinely to them.
        hidden_size, num_layers: MLP sizes of actor and critics (paper: 256, 2).
        gamma: discount.
        tau: Polyak rate of the target critics.
        lr: Adam learning rate of actor, critics and temperature.
        init_alpha: initial temperature.
        learn_alpha: adjust the temperature towards ``target_entropy`` (Section 5); a fixed
            ``init_alpha`` otherwise.
        target_entropy: defaults to ``-U``.
        device: where networks and batches live.
        seed: seeds weight initialisation and the learner's own generator (sampling in
            ``update`` and ``target_value``).
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
        lr: float = 3e-4,
        init_alpha: float = 1.0,
        learn_alpha: bool = True,
        target_entropy: float | None = None,
        device: torch.device | str = "cpu",
        seed: int = 0,
        ignored_obs: Sequence[int] = (),
    ) -> None:
        check_rates(gamma, tau)
        if init_alpha <= 0:
            raise ValueError(f"need init_alpha > 0; got {init_alpha}")
        self.obs_dim, self.act_dim = obs_dim, act_dim
        self.gamma, self.tau = gamma, tau
        self.device = torch.device(device)
        self.scale = ActionScale(action_low, action_high, act_dim, self.device)
        init = torch.Generator().manual_seed(seed)
        obs_in, critic_in = observation_inputs(obs_dim, act_dim, ignored_obs)
        self.actor = EnsembleMLP(
            1, obs_dim, 2 * act_dim, hidden_size, num_layers, init, obs_in, narrow=True
        ).to(self.device)
        self.critic = EnsembleMLP(
            2, obs_dim + act_dim, 1, hidden_size, num_layers, init, critic_in, narrow=True
        ).to(self.device)
        self.critic_target = frozen_copy(self.critic)
        self.log_alpha = torch.tensor(math.log(init_alpha), device=self.device, requires_grad=True)
        self.learn_alpha = learn_alpha
        self.target_entropy = float(-act_dim if target_entropy is None else target_entropy)
        self.actor_opt = adam(self.actor.parameters(), lr)
        self.critic_opt = adam(self.critic.parameters(), lr)
        self.alpha_opt = adam([self.log_alpha], lr)
        self.generator = torch.Generator(self.device).manual_seed(seed + 1)
        self.updates = 0

    @property
    def alpha(self) -> torch.Tensor:
        return self.log_alpha.detach().exp()

    def _dist(self, obs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.actor(obs)[0]  # [B, 2U]
        mean, log_std = out.chunk(2, dim=-1)  # [B, U], [B, U]
        return mean, log_std.clamp(LOG_STD_MIN, LOG_STD_MAX)

    def sample(
        self, obs: torch.Tensor, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Reparameterised unit-box actions ``[B, U]`` and their log-probabilities ``[B]``."""
        mean, log_std = self._dist(obs)
        g = self.generator if generator is None else generator
        noise = torch.randn(mean.shape, device=mean.device, generator=g)
        u = mean + log_std.exp() * noise  # [B, U]
        return torch.tanh(u), squashed_gaussian_log_prob(u, mean, log_std)

    def q(self, obs: torch.Tensor, act_unit: torch.Tensor) -> torch.Tensor:
        """Both critics ``[2, B]`` at ``obs [B, X]`` and unit-box actions ``[B, U]``."""
        return self.critic(torch.cat([obs, act_unit], dim=-1)).squeeze(-1)

    @torch.no_grad()
    def act(
        self,
        obs: torch.Tensor,
        deterministic: bool = False,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Env-unit actions: ``tanh(mu)`` if ``deterministic``, else a policy sample."""
        x, single = as_batch(obs, self.obs_dim, self.device)
        if deterministic:
            a = torch.tanh(self._dist(x)[0])
        else:
            a = self.sample(x, generator)[0]
        a = self.scale.to_env(a)  # [B, U]
        return a[0] if single else a

    @torch.no_grad()
    def target_value(self, next_obs: torch.Tensor) -> torch.Tensor:
        """Soft value ``min_j Q'_j(s', a') - alpha log pi(a'|s')`` ``[B]``, ``a' ~ pi``."""
        a, logp = self.sample(next_obs)
        q = self.critic_target(torch.cat([next_obs, a], dim=-1)).squeeze(-1)  # [2, B]
        return q.min(0).values - self.alpha * logp

    def update(
        self,
        batch: Transitions,
        target_q: torch.Tensor | None = None,
        actor_obs: torch.Tensor | None = None,
    ) -> dict[str, float]:
        """One step on critics, actor and temperature, then Polyak-average the target critics.

        The critics regress on ``target_q [B]`` when given (else the soft one-step targets);
        actor and temperature train on ``actor_obs [B', X]`` when given (else ``batch.obs``).

        The temperature steps on ``J(alpha)``'s gradient in ``log alpha``,
        ``-(mean log pi + H_target)``, written out instead of back-propagated.

        Returns ``q_loss``, ``actor_loss``, ``alpha``, ``alpha_loss``, ``entropy`` (minus the
        mean log-probability), ``q_mean`` and ``q_abs_max`` of the batch's Q-values.
        """
        target = one_step_target(self, batch, target_q)  # [B]
        q = self.q(batch.obs, self.scale.to_unit(batch.act))  # [2, B]
        q_loss = (q - target).pow(2).mean(-1).sum()
        self.critic_opt.zero_grad(set_to_none=True)
        q_loss.backward()
        self.critic_opt.step()

        obs = batch.obs if actor_obs is None else actor_obs  # [B', X]
        a, logp = self.sample(obs)
        self.critic.requires_grad_(False)
        q_pi = self.q(obs, a).min(0).values  # [B']
        self.critic.requires_grad_(True)
        actor_loss = (self.alpha * logp - q_pi).mean()
        self.actor_opt.zero_grad(set_to_none=True)
        actor_loss.backward()
        self.actor_opt.step()

        mean_logp = logp.detach().mean()
        gap = mean_logp + self.target_entropy  # E[log pi] + H_target
        alpha_loss = -self.log_alpha.detach() * gap  # J(alpha) = -log alpha (E[log pi] + H)
        if self.learn_alpha:
            self.log_alpha.grad = -gap
            self.alpha_opt.step()

        soft_update(self.critic_target, self.critic, self.tau)
        self.updates += 1
        qd = q.detach()
        stats = torch.stack(
            [
                q_loss.detach(),
                actor_loss.detach(),
                self.alpha,
                alpha_loss,
                -mean_logp,
                qd.mean(),
                qd.abs().max(),
            ]
        )
        return dict(zip(STATS, stats.tolist(), strict=True))

    def state_dict(self) -> dict[str, Any]:
        return {
            "actor": self.actor.state_dict(),
            "critic": self.critic.state_dict(),
            "critic_target": self.critic_target.state_dict(),
            "log_alpha": self.log_alpha.detach().clone(),
            "actor_opt": self.actor_opt.state_dict(),
            "critic_opt": self.critic_opt.state_dict(),
            "alpha_opt": self.alpha_opt.state_dict(),
            "generator": self.generator.get_state(),
            "updates": self.updates,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.actor.load_state_dict(state["actor"])
        self.critic.load_state_dict(state["critic"])
        self.critic_target.load_state_dict(state["critic_target"])
        with torch.no_grad():
            self.log_alpha.copy_(state["log_alpha"])
        load_adam(self.actor_opt, state["actor_opt"])
        load_adam(self.critic_opt, state["critic_opt"])
        load_adam(self.alpha_opt, state["alpha_opt"])
        self.generator.set_state(state["generator"])
        self.updates = int(state["updates"])
