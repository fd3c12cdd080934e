"""Normalized advantage functions (Gu et al. 2016, "Continuous Deep Q-Learning with Model-based
Acceleration", Section 4).

One network gives ``V(s)``, ``mu(s)`` and the entries of a lower-triangular ``L(s)`` whose diagonal
is made positive (see below); with ``P(s) = L(s) L(s)^T`` (positive definite)

    Q(s, a) = V(s) + A(s, a),    A(s, a) = -1/2 (a - mu(s))^T P(s) (a - mu(s))
            = V(s) - 1/2 || L(s)^T (a - mu(s)) ||^2,

so ``argmax_a Q(s, a) = mu(s)`` and ``max_a Q(s, a) = V(s)`` in closed form. The target is
``y = r + gamma (1 - d) V'(s')`` from a Polyak-averaged target network (Algorithm 1).
Actions are in ``[-1, 1]``, mapped affinely to the env's bounds; ``mu = tanh(.)`` keeps the
greedy action inside that box (exploration adds ``N(0, exploration_noise^2)`` in the unit box,
then clips). An unsquashed ``mu`` can leave the box: the clipped env actions then all sit at the
bound, the buffer holds no action variation for those states, ``P`` shrinks to zero there, ``mu``
gets no gradient and the policy stays at full torque (NAF on Pendulum: -1500 after 6,000 steps
with a linear ``mu``, -177 with ``tanh``). For the same reason the diagonal of ``L`` is
``softplus(.) + diag_floor`` rather than the paper's ``exp(.)``: on batches of on-policy
imagined actions (MBA) an unbounded-below diagonal collapsed ``P`` to zero (``Q = V`` to 8
digits) and the policy stopped learning; with the floor ``P >= diag_floor^2 I`` keeps ``mu``
in the loss.

``tanh`` has its own trap: once the pre-activation of ``mu`` is large, ``tanh`` is flat there,
``mu`` sits at the bound, the exploration noise is clipped back onto it, ``P`` falls to its floor
and no gradient reaches ``mu`` again. On Pendulum that is a policy stuck at full torque, about
-1,400 per episode: 3 of 20 NAF runs of 3,000 steps (seeds 0-19) never swung up, nor did seed
21; the two whose networks were kept (15 and 21) ended with ``mu = +1`` at every state of a grid
and ``|pre-tanh mu|`` of 38 and 46 on average. ``mu_penalty`` adds ``mu_penalty * mean(pre^2)``
to the loss, which holds the pre-activation where ``tanh`` still has slope and, where ``Q`` is
flat in the action, draws ``mu`` back towards the centre of the box, where exploration finds
the action's effect again. With 0.001, Pendulum NAF reached -200 on those four seeds and on 36
fresh ones (experiments/naf_pendulum.yaml).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
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


@dataclass(frozen=True)
class NAFHeads:
    """What the NAF network says about a batch of observations."""

    value: torch.Tensor  # [B] V(s)
    mu: torch.Tensor  # [B, U] greedy unit-box action, tanh(mu_pre)
    mu_pre: torch.Tensor  # [B, U] the pre-tanh output of mu
    L: torch.Tensor  # [B, U, U] lower triangular, positive diagonal


class NAF:
    """Continuous Q-learning with a quadratic advantage.

    Args:
        obs_dim: ``X``.
        act_dim: ``U``.
        action_low, action_high: env action bounds ``[U]``.
        hidden_size, num_layers: MLP sizes (paper: 200, 2).
        gamma: discount.
        tau: Polyak rate of the target network (paper: 0.001).
        lr: Adam learning rate.
        exploration_noise: std of the Gaussian exploration noise in the unit box.
        diag_floor: lower bound of ``L``'s diagonal (``P >= diag_floor^2 I``); must be > 0.
        mu_penalty: weight of ``mean(pre^2)`` over the pre-``tanh`` outputs of ``mu`` in the
            loss; 0 leaves it out (see the module docstring); must be >= 0.
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
        lr: float = 1e-3,
        exploration_noise: float = 0.1,
        diag_floor: float = 0.1,
        mu_penalty: float = 0.0,
        device: torch.device | str = "cpu",
        seed: int = 0,
        ignored_obs: Sequence[int] = (),
    ) -> None:
        check_rates(gamma, tau)
        if not diag_floor > 0:
            raise ValueError(
                f"diag_floor must be > 0 (it keeps P positive definite); got {diag_floor}"
            )
        if not mu_penalty >= 0:
            raise ValueError(f"mu_penalty must be >= 0 (0 turns it off); got {mu_penalty}")
        self.diag_floor = diag_floor
        self.mu_penalty = mu_penalty
        self.obs_dim, self.act_dim = obs_dim, act_dim
        self.gamma, self.tau = gamma, tau
        self.exploration_noise = exploration_noise
        self.device = torch.device(device)
        self.scale = ActionScale(action_low, action_high, act_dim, self.device)
        rows, cols = torch.tril_indices(act_dim, act_dim, device=self.device)  # [U(U+1)/2] each
        self._rows, self._cols = rows, cols
        self._diag = rows == cols  # [U(U+1)/2]
        n_out = 1 + act_dim + rows.numel()
        init = torch.Generator().manual_seed(seed)
        obs_in, _ = observation_inputs(obs_dim, act_dim, ignored_obs)
        self.net = EnsembleMLP(1, obs_dim, n_out, hidden_size, num_layers, init, obs_in).to(
            self.device
        )
        self.net_target = frozen_copy(self.net)
        self.opt = torch.optim.Adam(self.net.parameters(), lr=lr)
        self.generator = torch.Generator(self.device).manual_seed(seed + 1)
        self.updates = 0

    def _heads_of(self, out: torch.Tensor) -> NAFHeads:
        u = self.act_dim
        value = out[:, 0]  # [B]
        mu_pre = out[:, 1 : 1 + u]  # [B, U]
        entries = out[:, 1 + u :]  # [B, U(U+1)/2]
        diag = torch.nn.functional.softplus(entries) + self.diag_floor
        entries = torch.where(self._diag, diag, entries)
        L = out.new_zeros(out.shape[0], u, u)  # [B, U, U]
        L[:, self._rows, self._cols] = entries
        return NAFHeads(value=value, mu=torch.tanh(mu_pre), mu_pre=mu_pre, L=L)

    def heads(self, obs: torch.Tensor) -> NAFHeads:
        """``V``, ``mu`` (with its pre-``tanh`` value) and ``L`` of the online network for
        ``obs [B, X]``."""
        return self._heads_of(self.net(obs)[0])

    def q(self, obs: torch.Tensor, act_unit: torch.Tensor) -> torch.Tensor:
        """``Q(s, a) = V(s) - 1/2 ||L^T (a - mu)||^2`` ``[B]`` for unit-box actions ``[B, U]``."""
        return self._q_of(self.heads(obs), act_unit)

    @staticmethod
    def _q_of(h: NAFHeads, act_unit: torch.Tensor) -> torch.Tensor:
        d = (act_unit - h.mu).unsqueeze(-1)  # [B, U, 1]
        lt_d = h.L.transpose(1, 2) @ d  # [B, U, 1]
        return h.value - 0.5 * lt_d.squeeze(-1).pow(2).sum(-1)  # [B]

    @torch.no_grad()
    def act(
        self,
        obs: torch.Tensor,
        deterministic: bool = False,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Env-unit actions ``mu(s)`` (plus Gaussian noise unless ``deterministic``), clipped
        to the bounds."""
        x, single = as_batch(obs, self.obs_dim, self.device)
        a = self.heads(x).mu  # [B, U]
        if not deterministic:
            g = self.generator if generator is None else generator
            noise = torch.randn(a.shape, device=a.device, generator=g)
            a = a + self.exploration_noise * noise
        a = self.scale.to_env(a.clamp(-1.0, 1.0))
        return a[0] if single else a

    @torch.no_grad()
    def target_act(self, obs: torch.Tensor) -> torch.Tensor:
        """Env-unit actions ``mu'(s)`` ``[B, U]`` of the target network, the maximiser of
        ``Q'(s, .)``."""
        return self.scale.to_env(self._heads_of(self.net_target(obs)[0]).mu)

    @torch.no_grad()
    def target_value(self, next_obs: torch.Tensor) -> torch.Tensor:
        """``V'(s') = max_a Q'(s', a)`` ``[B]`` of the target network."""
        return self.net_target(next_obs)[0][:, 0]

    def update(
        self,
        batch: Transitions,
        target_q: torch.Tensor | None = None,
        actor_obs: torch.Tensor | None = None,
    ) -> dict[str, float]:
        """One step on ``(Q(s, a) - y)^2`` and a Polyak update of the target network.

        ``target_q [B]`` replaces the one-step targets when given; ``actor_obs`` is accepted
        for the common signature and unused (NAF's policy ``mu`` is part of its Q-function).

        Returns ``q_loss``, ``q_mean``, ``q_abs_max``, ``v_mean``.
        """
        target = one_step_target(self, batch, target_q)  # [B]
        h = self.heads(batch.obs)
        q = self._q_of(h, self.scale.to_unit(batch.act))  # [B]
        q_loss = (q - target).pow(2).mean()
        loss = q_loss
        if self.mu_penalty > 0:
            loss = loss + self.mu_penalty * h.mu_pre.pow(2).mean()
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        soft_update(self.net_target, self.net, self.tau)
        self.updates += 1
        qd = q.detach()
        return {
            "q_loss": q_loss.item(),
            "q_mean": qd.mean().item(),
            "q_abs_max": qd.abs().max().item(),
            "v_mean": h.value.detach().mean().item(),
        }

    def state_dict(self) -> dict[str, Any]:
        return {
            "net": self.net.state_dict(),
            "net_target": self.net_target.state_dict(),
            "opt": self.opt.state_dict(),
            "generator": self.generator.get_state(),
            "updates": self.updates,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.net.load_state_dict(state["net"])
        self.net_target.load_state_dict(state["net_target"])
        self.opt.load_state_dict(state["opt"])
        self.generator.set_state(state["generator"])
        self.updates = int(state["updates"])
