"""The single-step latent model of the lecture notes (eq. 8.5): a deterministic encoder of the
latest stacked frames ``s = g(o)``, latent dynamics ``s' = f(s, a)`` (deterministic or
Gaussian), a decoder and a reward head, trained jointly, then planned in latent space.

The loss of one chunk (``obs [B, L + 1]``, ``act [B, L]``, ``reward [B, L]``) is the notes'
three terms, averaged over steps:

    reconstruction  0.5 |o_t - d(g(o_t))|^2 summed over pixels, every frame of the chunk
    latent dynamics latent_weight * 0.5 |s^_{t+1} - g(o_{t+1})|^2 summed over Z
                    (Gaussian: the negative log-likelihood of g(o_{t+1}) under N(mu, std))
    reward          reward_weight * 0.5 (r_t - rew(s^_t, a_t))^2

where ``s^_0 = g(o_0)`` and ``s^_{t+1} = f(s^_t, a_t)`` are rolled out open loop over the
chunk, so ``L = 1`` is the notes' one-step loss and longer chunks add the same terms for
multi-step predictions (what the planner uses). Every code is layer-normalised without an
affine part (the encoder's output and each step of ``f``, which predicts a residual
``s' = norm(s + delta(s, a))``), so the latent loss cannot shrink by scaling the code toward
zero (TD-MPC2 normalises its latents for the same reason, with SimNorm). Images are
preprocessed as for the RSSM (:func:`~mbrl.envs.pixels.preprocess`, bit depth and uniform
noise); the frame stack of the pixel task (``C = 3 k``) is what makes velocities visible.

Filtering (:class:`~mbrl.dynamics.base.Filter`): the belief is the encoding of the latest
stacked frames (the previous belief and action are not needed). Planning rows are codes
``[Z]`` (the model's ``obs_dim``); :meth:`SingleStepLatent.rollout_step` applies ``f`` (and
draws one sample per row from the caller's generator when Gaussian) and predicts the step's
reward from ``(s, a)``. As a :class:`~mbrl.dynamics.base.DifferentiableModel` its mean dynamics
are the mean of ``f``; :meth:`SingleStepLatent.stage_cost` gives iLQR the learned reward.
"""

from __future__ import annotations

import time
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from mbrl.data import Sequences
from mbrl.dynamics.base import Belief, FitReport, Prediction, RolloutState, check_rows
from mbrl.dynamics.latent import (
    ConvDecoder,
    ConvEncoder,
    LatentLosses,
    LatentRewardCost,
    check_args,
    check_chunks,
    check_frames,
    check_images_of,
    guarded_step,
    memory_format_for,
    mlp,
    seeded_init,
    start_rows,
)
from mbrl.envs.pixels import preprocess
from mbrl.shapes import check_shape

DYNAMICS = ("deterministic", "gaussian")


class SingleStepLatent(nn.Module):
    """Encoder ``g``, latent dynamics ``f``, decoder and reward head (module docstring).

    Args:
        image_shape: ``(C, H, W)`` of the observed ``uint8`` stacked frames.
        act_dim: ``U``.
        latent: ``Z``, code size.
        hidden: units of the two hidden layers of ``f`` and of the reward head.
        depth, conv_layers: PlaNet's encoder and decoder (:mod:`mbrl.dynamics.latent`).
        dynamics: ``"deterministic"`` or ``"gaussian"`` (``f`` also predicts a std).
        min_std: floor added to the softplus std of Gaussian dynamics.
        latent_weight, reward_weight: weights of the latent-dynamics and reward terms.
        bit_depth: bits per pixel kept by the preprocessing.
        lr, adam_eps, grad_clip: Adam's learning rate and epsilon, the gradient-norm clip.
        device: where the parameters live (``None``: CPU).
        seed: seeds the initial weights and the model's own generator (preprocessing noise
            of the filter).
    """

    learns_reward = True
    loss_terms = ("recon_loss", "reward_loss", "latent_loss")  # the keys of LatentLosses.terms

    def __init__(
        self,
        image_shape: tuple[int, int, int],
        act_dim: int,
        latent: int = 30,
        hidden: int = 200,
        depth: int = 32,
        conv_layers: int = 4,
        dynamics: Literal["deterministic", "gaussian"] = "deterministic",
        min_std: float = 0.01,
        latent_weight: float = 1.0,
        reward_weight: float = 1.0,
        bit_depth: int = 5,
        lr: float = 1e-3,
        adam_eps: float = 1e-4,
        grad_clip: float = 1000.0,
        device: torch.device | str | None = None,
        seed: int = 0,
    ) -> None:
        super().__init__()
        check_args(
            image_shape,
            bit_depth,
            counts={
                "act_dim": act_dim, "latent": latent, "hidden": hidden, "depth": depth,
                "conv_layers": conv_layers,
            },
            positives={"min_std": min_std, "lr": lr, "adam_eps": adam_eps, "grad_clip": grad_clip},
            nonnegatives={"latent_weight": latent_weight, "reward_weight": reward_weight},
        )  # fmt: skip
        if dynamics not in DYNAMICS:
            raise ValueError(f"unknown dynamics {dynamics!r}; valid: {', '.join(DYNAMICS)}")
        self.image_shape = tuple(int(s) for s in image_shape)
        self.act_dim, self.obs_dim = act_dim, latent  # planning rows are codes [Z]
        self.dynamics, self.min_std = dynamics, min_std
        self.latent_weight, self.reward_weight = latent_weight, reward_weight
        self.bit_depth, self.lr, self.grad_clip = bit_depth, lr, grad_clip
        self.gaussian = dynamics == "gaussian"
        channels, size = self.image_shape[0], (self.image_shape[1], self.image_shape[2])
        device = torch.device("cpu") if device is None else torch.device(device)
        fmt = memory_format_for(device)
        out = 2 * latent if self.gaussian else latent

        def build() -> None:
            self.encoder = ConvEncoder(channels, size, depth, conv_layers, fmt)
            self.code = nn.Linear(self.encoder.out_dim, latent)
            self.dynamics_net = mlp([latent + act_dim, hidden, hidden, out], nn.ELU)
            self.reward_net = mlp([latent + act_dim, hidden, hidden, 1])
            self.decoder = ConvDecoder(latent, channels, size, depth, conv_layers, fmt)

        seeded_init(seed, build)
        self.to(device, memory_format=fmt)
        self.generator = torch.Generator(device=device).manual_seed(seed)
        self.optimizer = torch.optim.Adam(self.parameters(), lr=lr, eps=adam_eps)

    @property
    def device(self) -> torch.device:
        return self.code.weight.device

    # ------------------------------------------------------------------ the parts

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Codes ``[N, Z]`` of preprocessed images ``[N, C, H, W]``."""
        return _norm(self.code(self.encoder(images)))

    def _step(self, s: torch.Tensor, a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Mean ``[R, Z]`` of ``f(s, a)`` and its std (``None`` when deterministic)."""
        out = self.dynamics_net(torch.cat([s, a], dim=-1))
        if not self.gaussian:
            return _norm(s + out), None
        delta, raw = out.chunk(2, dim=-1)
        return _norm(s + delta), F.softplus(raw) + self.min_std

    def _reward(self, s: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        return self.reward_net(torch.cat([s, a], dim=-1)).squeeze(-1)

    # ------------------------------------------------------------------ training

    def update(self, chunks: Sequences, generator: torch.Generator | None = None) -> LatentLosses:
        """One Adam step on ``chunks`` (``obs uint8 [B, L + 1, C, H, W]``, ``act [B, L, U]``,
        ``reward [B, L]``); ``generator`` (on the model's device; ``None``: the model's own)
        draws the preprocessing noise.

        Returns the loss terms per step: ``recon_loss`` (summed over pixels), ``latent_loss``
        and ``reward_loss`` (unweighted).

        Raises:
            TypeError, ValueError, ShapeError: chunks of the wrong kind, dtype or shape.
            FitError: a non-finite loss or gradient (the weights are left as they were).
        """
        start = time.perf_counter()
        b, length = check_chunks(chunks, self.image_shape, self.act_dim, "SingleStepLatent")
        gen = self.generator if generator is None else generator
        dev = self.device
        self.train()
        frames = preprocess(chunks.obs.to(dev), self.bit_depth, gen).flatten(0, 1)
        codes = self.encode(frames)  # [B (L + 1), Z]
        recon_loss = 0.5 * (self.decoder(codes) - frames).square().sum(dim=(1, 2, 3)).mean()
        codes = codes.view(b, length + 1, -1)
        acts = chunks.act.to(dev)
        s = codes[:, 0]
        latent_terms, rewards = [], []
        for t in range(length):
            rewards.append(self._reward(s, acts[:, t]))
            mean, std = self._step(s, acts[:, t])
            target = codes[:, t + 1]
            if std is None:
                latent_terms.append(0.5 * (mean - target).square().sum(dim=-1))
            else:
                z = (target - mean) / std
                latent_terms.append((0.5 * z.square() + std.log()).sum(dim=-1))
            s = mean
        latent_loss = torch.stack(latent_terms, 1).mean()
        reward_loss = 0.5 * (torch.stack(rewards, 1) - chunks.reward.to(dev)).square().mean()
        loss = recon_loss + self.latent_weight * latent_loss + self.reward_weight * reward_loss
        norm = guarded_step(
            loss, self, self.optimizer, self.grad_clip, "SingleStepLatent update",
            f"lr={self.lr}, grad_clip={self.grad_clip}",
        )  # fmt: skip
        self.eval()
        terms = {
            "recon_loss": float(recon_loss.detach()),
            "reward_loss": float(reward_loss.detach()),
            "latent_loss": float(latent_loss.detach()),
        }
        return LatentLosses(float(loss.detach()), terms, norm, time.perf_counter() - start)

    def fit(self, data: Sequences, generator: torch.Generator | None = None) -> FitReport:
        """One :meth:`update` on the chunks ``data``, as a :class:`FitReport`."""
        return self.update(data, generator).report()

    # ------------------------------------------------------------------ filtering

    def reset_belief(self, batch: int = 1) -> Belief:
        """Zero codes ``[B, Z]`` (nothing seen yet)."""
        return Belief(mean=torch.zeros(batch, self.obs_dim, device=self.device))

    @torch.no_grad()
    def observe(self, belief: Belief, obs: torch.Tensor, prev_act: torch.Tensor | None) -> Belief:
        """The code of the latest stacked frames ``obs uint8 [B, C, H, W]`` (the belief and
        action before it are not needed: the frames hold the state)."""
        check_frames(obs, self.image_shape, "SingleStepLatent.observe")
        check_shape("belief.mean", belief.mean, (obs.shape[0], self.obs_dim))
        frames = preprocess(obs.to(self.device), self.bit_depth, self.generator)
        return Belief(mean=self.encode(frames))

    # ------------------------------------------------------------------ rollouts

    def rollout_start(
        self, obs: torch.Tensor | Belief, particles: int, generator: torch.Generator | None
    ) -> RolloutState:
        """``particles`` rows per start from a belief (its code) or codes ``[B, Z]``."""
        return start_rows(obs, particles, self.obs_dim)

    @torch.no_grad()
    def rollout_step(
        self, state: RolloutState, act: torch.Tensor, generator: torch.Generator | None
    ) -> RolloutState:
        """``f`` on every row ``state.obs [R, Z]`` under ``act [R, U]`` (one sample per row when
        Gaussian) and the step's reward ``[R]``."""
        check_rows(state.obs, act, self.obs_dim, self.act_dim, "state.obs")
        mean, std = self._step(state.obs, act)
        reward = self._reward(state.obs, act)
        if std is not None:
            noise = torch.randn(mean.shape, generator=generator, device=mean.device)
            mean = torch.addcmul(mean, std, noise)
        return RolloutState(obs=mean, reward=reward)

    @torch.no_grad()
    def predict(self, obs: torch.Tensor, act: torch.Tensor) -> Prediction:
        """Mean and variance of the next code of ``obs [B, Z]`` under ``act [B, U]`` (variance
        0 when deterministic) and the step's reward."""
        check_rows(obs, act, self.obs_dim, self.act_dim)
        mean, std = self._step(obs, act)
        var = torch.zeros_like(mean) if std is None else std.square()
        reward = self._reward(obs, act)
        return Prediction(mean, var, reward, torch.zeros_like(reward))

    def mean_dynamics(self, obs: torch.Tensor, act: torch.Tensor) -> torch.Tensor:
        """The mean next code ``[B, Z]``; autograd-able."""
        return self._step(obs, act)[0]

    def stage_reward(self, obs: torch.Tensor, act: torch.Tensor) -> torch.Tensor:
        """Reward ``[B]`` of the step from codes ``obs [B, Z]`` under ``act [B, U]``;
        autograd-able."""
        return self._reward(obs, act)

    def stage_cost(self) -> LatentRewardCost:
        """Minus :meth:`stage_reward` as a stage cost for gradient planners (iLQR)."""
        return LatentRewardCost(self.stage_reward, self.code.weight.dtype)

    # ------------------------------------------------------------------ open loop

    @torch.no_grad()
    def open_loop(self, obs: torch.Tensor, act: torch.Tensor, context: int) -> torch.Tensor:
        """Decoded frames ``[B, T + 1, C, H, W]`` (preprocessed scale) of episodes' frames
        ``obs uint8 [B, T + 1, C, H, W]`` under ``act [B, T, U]``: the first ``context`` frames
        encoded, the rest predicted by ``f`` (its mean) from the last encoded code."""
        b, steps = act.shape[:2]
        if not 1 <= context <= steps + 1:
            raise ValueError(f"context must be in [1, T + 1 = {steps + 1}], got {context}")
        check_images_of(obs, (b, steps + 1, *self.image_shape), "SingleStepLatent.open_loop")
        dev = self.device
        frames = preprocess(obs[:, :context].to(dev), self.bit_depth).flatten(0, 1)
        codes = list(self.encode(frames).view(b, context, -1).unbind(1))
        act = act.to(dev)
        for t in range(context, steps + 1):
            codes.append(self._step(codes[-1], act[:, t - 1])[0])
        decoded = self.decoder(torch.stack(codes, 1).flatten(0, 1))
        return decoded.view(b, steps + 1, *self.image_shape)

    # ------------------------------------------------------------------ checkpoints

    def get_extra_state(self) -> dict:
        """Optimizer and generator state, saved in :meth:`state_dict`."""
        return {"optimizer": self.optimizer.state_dict(), "generator": self.generator.get_state()}

    def set_extra_state(self, state: dict) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        self.generator.set_state(state["generator"])


def _norm(x: torch.Tensor) -> torch.Tensor:
    """Layer normalisation without an affine part over the last axis."""
    return F.layer_norm(x, x.shape[-1:], eps=1e-5)
