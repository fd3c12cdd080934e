"""PlaNet's recurrent state-space model (Hafner et al. 2019, "Learning Latent Dynamics for
Planning from Pixels", Sec. 3 and App. A), trained on chunks of images and planned in its
latent space.

The state at step ``t`` is a deterministic part ``h_t [D]`` (a GRU) and a stochastic part
``s_t [Z]`` (a diagonal Gaussian); the planning features are ``[h_t, s_t]`` (``F = D + Z``):

    h_t = GRU(h_{t-1}, elu(W [s_{t-1}, a_{t-1}]))          deterministic transition
    p(s_t | h_t)          = N(mu, softplus(sigma) + min_std)  prior, from an ELU MLP of h_t
    q(s_t | h_t, o_t)     = N(mu, softplus(sigma) + min_std)  posterior, from [h_t, enc(o_t)]
    p(o_t | h_t, s_t)     = N(dec([h_t, s_t]), 1)             PlaNet's conv decoder
    p(r_{t-1} | h_t, s_t) = N(rew([h_t, s_t]), 1)             reward of the step into t

Training (:meth:`RSSM.update`, one Adam step on a batch of chunks; PlaNet's Algorithm 1 runs
``C`` of them between episodes): every chunk starts from the zero state with a zero action
before its first frame (as the filter starts an episode), the posterior is rolled over its
``L + 1`` frames with one sample per step, and the loss per step is the reconstruction
``0.5 |o - dec|^2`` summed over pixels, the reward ``0.5 (r - rew)^2``, and
``kl_scale * max(free_nats, KL(q || p))`` with the KL summed over the latent dimensions (free
nats 3 in PlaNet, per step). With ``kl_balance = alpha`` (DreamerV2, Hafner et al. 2021,
Sec. 2.2: 0.8) the KL term is ``alpha max(free, KL(sg(q) || p)) + (1 - alpha) max(free,
KL(q || sg(p)))``, which trains the prior toward the posterior faster than the reverse.
Images are PlaNet's 5-bit preprocessed frames with uniform noise
(:func:`~mbrl.envs.pixels.preprocess`); Adam with ``lr = 1e-3``, ``eps = 1e-4`` and the gradient
norm clipped at 1000, as PlaNet.

Filtering (:class:`~mbrl.dynamics.base.Filter`): the prior belief is the zero state;
:meth:`RSSM.observe` takes one transition step with the action played (zero after a reset)
and draws ``s_t`` from the posterior given the new frame, with the model's own generator
(PlaNet propagates a posterior sample). The belief's ``mean`` is the features ``[h_t, s_t]``,
its ``hidden`` the posterior's ``[mu, std]``.

Planning: :meth:`RSSM.rollout_start` repeats the belief's features per particle and
:meth:`RSSM.rollout_step` takes a prior step (one sample per row from the caller's generator)
and predicts its reward; all ``B * N * P`` rows are one batch, optionally in bfloat16
(``planning_dtype``: a copy of the transition, prior and reward head). As a
:class:`~mbrl.dynamics.base.DifferentiableModel` its mean dynamics are the transition followed
by the prior mean, and :meth:`RSSM.stage_cost` gives iLQR the learned reward as its cost.
"""

from __future__ import annotations

import time
from copy import deepcopy

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

PLANNING_DTYPES = (torch.float32, torch.bfloat16)


class RSSM(nn.Module):
    """PlaNet's recurrent state-space model (module docstring).

    Args:
        image_shape: ``(C, H, W)`` of the observed ``uint8`` frames.
        act_dim: ``U``.
        deterministic: ``D``, GRU units (200 in PlaNet).
        stochastic: ``Z``, stochastic state size (30).
        hidden: units of the dense layers of the transition, prior, posterior and the two
            hidden layers of the reward head (200).
        depth: channels of the first convolution (32); layer ``i`` has ``depth * 2^i``.
        conv_layers: convolutions of the encoder and transposed convolutions of the decoder (4
            for 64 x 64 images).
        min_std: floor added to the softplus std of prior and posterior (0.1).
        free_nats: KL below this many nats per step is not penalised (3).
        kl_scale: weight of the KL term (1).
        kl_balance: ``None`` (PlaNet's KL) or DreamerV2's balance ``alpha`` in ``(0, 1)``.
        bit_depth: bits per pixel kept by the preprocessing (5).
        lr, adam_eps: Adam's learning rate and epsilon (1e-3, 1e-4).
        grad_clip: the gradient norm is clipped at this (1000).
        planning_dtype: dtype of the rollouts (:attr:`planning_dtype`): ``torch.float32``, or
            ``torch.bfloat16``, where matmuls run natively in it (CPUs with AVX512-BF16 or AMX,
            GPUs; elsewhere it is slower). Training and filtering stay float32.
        device: where the parameters live (``None``: CPU).
        seed: seeds the initial weights and the model's own generator (the filter's posterior
            samples and preprocessing noise).
    """

    learns_reward = True
    loss_terms = ("recon_loss", "reward_loss", "kl_loss")  # the keys of LatentLosses.terms

    def __init__(
        self,
        image_shape: tuple[int, int, int],
        act_dim: int,
        deterministic: int = 200,
        stochastic: int = 30,
        hidden: int = 200,
        depth: int = 32,
        conv_layers: int = 4,
        min_std: float = 0.1,
        free_nats: float = 3.0,
        kl_scale: float = 1.0,
        kl_balance: float | None = None,
        bit_depth: int = 5,
        lr: float = 1e-3,
        adam_eps: float = 1e-4,
        grad_clip: float = 1000.0,
        planning_dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
        seed: int = 0,
    ) -> None:
        super().__init__()
        check_args(
            image_shape,
            bit_depth,
            counts={
                "act_dim": act_dim, "deterministic": deterministic, "stochastic": stochastic,
                "hidden": hidden, "depth": depth, "conv_layers": conv_layers,
            },
            positives={"min_std": min_std, "lr": lr, "adam_eps": adam_eps, "grad_clip": grad_clip},
            nonnegatives={"free_nats": free_nats, "kl_scale": kl_scale},
        )  # fmt: skip
        if kl_balance is not None and not 0.0 < kl_balance < 1.0:
            raise ValueError(f"kl_balance must be None or in (0, 1), got {kl_balance!r}")
        self.image_shape = tuple(int(s) for s in image_shape)
        self.act_dim, self.deterministic, self.stochastic = act_dim, deterministic, stochastic
        self.obs_dim = deterministic + stochastic  # F: planning rows are latent features
        self.min_std, self.free_nats, self.kl_scale = min_std, free_nats, kl_scale
        self.kl_balance, self.bit_depth, self.grad_clip = kl_balance, bit_depth, grad_clip
        self.lr = lr
        channels, size = self.image_shape[0], (self.image_shape[1], self.image_shape[2])
        device = torch.device("cpu") if device is None else torch.device(device)
        fmt = memory_format_for(device)

        def build() -> None:
            self.encoder = ConvEncoder(channels, size, depth, conv_layers, fmt)
            self.cells = LatentCells(stochastic, act_dim, deterministic, hidden, min_std)
            embedded = deterministic + self.encoder.out_dim
            self.post_net = mlp([embedded, hidden, 2 * stochastic], nn.ELU)
            self.decoder = ConvDecoder(self.obs_dim, channels, size, depth, conv_layers, fmt)

        seeded_init(seed, build)
        self.to(device, memory_format=fmt)
        self.generator = torch.Generator(device=device).manual_seed(seed)
        self.optimizer = torch.optim.Adam(self.parameters(), lr=lr, eps=adam_eps)
        self.planning_dtype = planning_dtype
        self._planning: tuple[tuple, LatentCells] | None = None  # (parameter versions, copy)

    @property
    def device(self) -> torch.device:
        return self.post_net[0].weight.device

    @property
    def planning_dtype(self) -> torch.dtype:
        """Dtype of the rollouts' cells (settable): float32, or bfloat16 (a copy of the cells,
        refreshed whenever a parameter changed)."""
        return self._planning_dtype

    @planning_dtype.setter
    def planning_dtype(self, value: torch.dtype) -> None:
        if value not in PLANNING_DTYPES:
            raise ValueError(
                f"planning_dtype must be torch.float32 or torch.bfloat16, got {value!r}"
            )
        self._planning_dtype = value
        self._planning = None

    def _planning_cells(self) -> LatentCells:
        """The cells rollouts use: ``self.cells`` in float32, else a copy in the planning dtype
        made again when a parameter's version (every optimizer step, every load) changed."""
        if self._planning_dtype == torch.float32:
            return self.cells
        key = tuple(p._version for p in self.cells.parameters())
        if self._planning is None or self._planning[0] != key:
            copy = deepcopy(self.cells).to(self._planning_dtype).requires_grad_(False)
            self._planning = (key, copy)
        return self._planning[1]

    def _split(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return features[:, : self.deterministic], features[:, self.deterministic :]

    def _transition(self, h: torch.Tensor, s: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        return self.cells.transition(h, s, a)

    def _gaussian(self, params: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return gaussian(params, self.min_std)

    # ------------------------------------------------------------------ training

    def update(self, chunks: Sequences, generator: torch.Generator | None = None) -> LatentLosses:
        """One Adam step on ``chunks`` (``obs uint8 [B, L + 1, C, H, W]``, ``act [B, L, U]``,
        ``reward [B, L]``); ``generator`` (on the model's device; ``None``: the model's own)
        draws the preprocessing noise and the posterior samples.

        Returns the loss terms per step: ``recon_loss`` (summed over pixels), ``reward_loss``
        and ``kl_loss`` (the mean ``KL(q || p)`` before free nats).

        Raises:
            TypeError, ValueError, ShapeError: chunks of the wrong kind, dtype or shape.
            FitError: a non-finite loss or gradient (the weights are left as they were).
        """
        start = time.perf_counter()
        b, length = check_chunks(chunks, self.image_shape, self.act_dim, "RSSM.update")
        gen = self.generator if generator is None else generator
        dev = self.device
        self.train()
        frames = preprocess(chunks.obs.to(dev), self.bit_depth, gen).flatten(0, 1)
        embed = self.encoder(frames).view(b, length + 1, -1)  # [B, L + 1, E]
        acts = chunks.act.to(dev)
        h = torch.zeros(b, self.deterministic, device=dev)
        s = torch.zeros(b, self.stochastic, device=dev)
        a = torch.zeros(b, self.act_dim, device=dev)
        hs, ss, priors, posts = [], [], [], []
        for t in range(length + 1):
            h = self._transition(h, s, a if t == 0 else acts[:, t - 1])
            prior = self.cells.prior(h)
            post = self._gaussian(self.post_net(torch.cat([h, embed[:, t]], dim=-1)))
            noise = torch.randn(post[0].shape, generator=gen, device=dev)
            s = torch.addcmul(post[0], post[1], noise)
            hs.append(h), ss.append(s), priors.append(prior), posts.append(post)
        features = torch.cat([torch.stack(hs, 1), torch.stack(ss, 1)], dim=-1)  # [B, L + 1, F]
        recon = self.decoder(features.flatten(0, 1))  # [B (L + 1), C, H, W]
        recon_loss = 0.5 * (recon - frames).square().sum(dim=(1, 2, 3)).mean()
        reward = self.cells.reward(features[:, 1:])  # [B, L]
        reward_loss = 0.5 * (reward - chunks.reward.to(dev)).square().mean()
        pm, ps = (torch.stack([p[i] for p in priors], 1) for i in (0, 1))  # [B, L + 1, Z]
        qm, qs = (torch.stack([q[i] for q in posts], 1) for i in (0, 1))
        kl = _kl(qm, qs, pm, ps)  # [B, L + 1]
        if self.kl_balance is None:
            kl_term = kl.clamp(min=self.free_nats).mean()
        else:
            alpha = self.kl_balance
            to_prior = _kl(qm.detach(), qs.detach(), pm, ps).clamp(min=self.free_nats).mean()
            to_post = _kl(qm, qs, pm.detach(), ps.detach()).clamp(min=self.free_nats).mean()
            kl_term = alpha * to_prior + (1 - alpha) * to_post
        loss = recon_loss + reward_loss + self.kl_scale * kl_term
        norm = guarded_step(
            loss, self, self.optimizer, self.grad_clip, "RSSM update",
            f"lr={self.lr}, grad_clip={self.grad_clip}",
        )  # fmt: skip
        self.eval()
        terms = {
            "recon_loss": float(recon_loss.detach()),
            "reward_loss": float(reward_loss.detach()),
            "kl_loss": float(kl.detach().mean()),
        }
        return LatentLosses(float(loss.detach()), terms, norm, time.perf_counter() - start)

    def fit(self, data: Sequences, generator: torch.Generator | None = None) -> FitReport:
        """One :meth:`update` on the chunks ``data``, as a :class:`FitReport` (the model
        trains on :class:`~mbrl.data.Sequences`, not on i.i.d. transitions)."""
        return self.update(data, generator).report()

    # ------------------------------------------------------------------ filtering

    def reset_belief(self, batch: int = 1) -> Belief:
        """The zero state of ``batch`` systems (features ``[B, F]``, posterior ``[B, 2 Z]``)."""
        dev = self.device
        return Belief(
            mean=torch.zeros(batch, self.obs_dim, device=dev),
            hidden=torch.zeros(batch, 2 * self.stochastic, device=dev),
        )

    @torch.no_grad()
    def observe(self, belief: Belief, obs: torch.Tensor, prev_act: torch.Tensor | None) -> Belief:
        """The posterior after the frames ``obs uint8 [B, C, H, W]`` reached under
        ``prev_act [B, U]`` (``None``: the first frame of an episode, a zero action)."""
        check_frames(obs, self.image_shape, "RSSM.observe")
        b, dev = obs.shape[0], self.device
        check_shape("belief.mean", belief.mean, (b, self.obs_dim))
        if prev_act is None:
            a = torch.zeros(b, self.act_dim, device=dev)
        else:
            check_shape("prev_act", prev_act, (b, self.act_dim))
            a = prev_act.to(device=dev, dtype=torch.float32)
        h, s = self._split(belief.mean.to(dev))
        h = self._transition(h, s, a)
        embed = self.encoder(preprocess(obs.to(dev), self.bit_depth, self.generator))
        mean, std = self._gaussian(self.post_net(torch.cat([h, embed], dim=-1)))
        s = torch.addcmul(mean, std, torch.randn(mean.shape, generator=self.generator, device=dev))
        return Belief(mean=torch.cat([h, s], dim=-1), hidden=torch.cat([mean, std], dim=-1))

    # ------------------------------------------------------------------ rollouts

    def rollout_start(
        self, obs: torch.Tensor | Belief, particles: int, generator: torch.Generator | None
    ) -> RolloutState:
        """``particles`` rows per start from a belief (its features) or features ``[B, F]``."""
        rows = start_rows(obs, particles, self.obs_dim)
        return RolloutState(obs=rows.obs.to(self._planning_dtype))

    @torch.no_grad()
    def rollout_step(
        self, state: RolloutState, act: torch.Tensor, generator: torch.Generator | None
    ) -> RolloutState:
        """One prior step of every row ``state.obs [R, F]`` under ``act [R, U]``: the next
        features (one sample of ``s`` per row; in the planning dtype) and the predicted reward
        ``[R]`` (float32)."""
        check_rows(state.obs, act, self.obs_dim, self.act_dim, "state.obs")
        cells = self._planning_cells()
        dtype = self._planning_dtype
        h, s = self._split(state.obs.to(dtype))
        h = cells.transition(h, s, act.to(dtype))
        mean, std = cells.prior(h)
        noise = torch.randn(mean.shape, generator=generator, device=mean.device, dtype=dtype)
        features = torch.cat([h, torch.addcmul(mean, std, noise)], dim=-1)
        return RolloutState(obs=features, reward=cells.reward(features).float())

    @torch.no_grad()
    def predict(self, obs: torch.Tensor, act: torch.Tensor) -> Prediction:
        """The prior one step ahead of features ``obs [B, F]`` under ``act [B, U]``: mean and
        variance of the next features (``h`` is deterministic: variance 0) and the reward of
        the mean."""
        check_rows(obs, act, self.obs_dim, self.act_dim)
        h = self._transition(*self._split(obs), act)
        mean, std = self.cells.prior(h)
        features = torch.cat([h, mean], dim=-1)
        var = torch.cat([torch.zeros_like(h), std.square()], dim=-1)
        reward = self.cells.reward(features)
        return Prediction(features, var, reward, torch.zeros_like(reward))

    def mean_dynamics(self, obs: torch.Tensor, act: torch.Tensor) -> torch.Tensor:
        """Features ``[B, F]`` after the transition and the prior mean; autograd-able."""
        h = self._transition(*self._split(obs), act)
        return torch.cat([h, self.cells.prior(h)[0]], dim=-1)

    def stage_reward(self, obs: torch.Tensor, act: torch.Tensor) -> torch.Tensor:
        """Reward ``[B]`` of the step from features ``obs [B, F]`` under ``act [B, U]`` along
        the mean dynamics; autograd-able."""
        return self.cells.reward(self.mean_dynamics(obs, act))

    def stage_cost(self) -> LatentRewardCost:
        """Minus :meth:`stage_reward` as a stage cost for gradient planners (iLQR)."""
        return LatentRewardCost(self.stage_reward, self.post_net[0].weight.dtype)

    # ------------------------------------------------------------------ open loop

    @torch.no_grad()
    def open_loop(self, obs: torch.Tensor, act: torch.Tensor, context: int) -> torch.Tensor:
        """Decoded frames ``[B, T + 1, C, H, W]`` (preprocessed scale) of episodes' frames
        ``obs uint8 [B, T + 1, C, H, W]`` under ``act [B, T, U]``: the first ``context``
        frames filtered (posterior means), the rest predicted open loop (prior means)."""
        b, steps = act.shape[:2]
        if not 1 <= context <= steps + 1:
            raise ValueError(f"context must be in [1, T + 1 = {steps + 1}], got {context}")
        check_images_of(obs, (b, steps + 1, *self.image_shape), "RSSM.open_loop")
        dev = self.device
        embed = self.encoder(preprocess(obs[:, :context].to(dev), self.bit_depth).flatten(0, 1))
        embed = embed.view(b, context, -1)
        act = act.to(dev)
        h = torch.zeros(b, self.deterministic, device=dev)
        s = torch.zeros(b, self.stochastic, device=dev)
        features = []
        for t in range(steps + 1):
            a = torch.zeros(b, self.act_dim, device=dev) if t == 0 else act[:, t - 1]
            h = self._transition(h, s, a)
            if t < context:
                s = self._gaussian(self.post_net(torch.cat([h, embed[:, t]], dim=-1)))[0]
            else:
                s = self.cells.prior(h)[0]
            features.append(torch.cat([h, s], dim=-1))
        frames = self.decoder(torch.stack(features, 1).flatten(0, 1))
        return frames.view(b, steps + 1, *self.image_shape)

    # ------------------------------------------------------------------ checkpoints

    def get_extra_state(self) -> dict:
        """Optimizer and generator state, saved in :meth:`state_dict` so training resumes
        exactly."""
        return {"optimizer": self.optimizer.state_dict(), "generator": self.generator.get_state()}

    def set_extra_state(self, state: dict) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        self.generator.set_state(state["generator"])


class LatentCells(nn.Module):
    """The parts of the RSSM a latent rollout runs: the transition (dense layer and GRU), the
    prior and the reward head; kept together so planning can run a copy of them in another
    dtype (:attr:`RSSM.planning_dtype`)."""

    def __init__(
        self, stochastic: int, act_dim: int, deterministic: int, hidden: int, min_std: float
    ) -> None:
        super().__init__()
        self.deterministic, self.min_std = deterministic, min_std
        self.embed = nn.Linear(stochastic + act_dim, hidden)
        self.cell = nn.GRUCell(hidden, deterministic)
        self.prior_net = mlp([deterministic, hidden, 2 * stochastic], nn.ELU)
        self.reward_net = mlp([deterministic + stochastic, hidden, hidden, 1])

    def transition(self, h: torch.Tensor, s: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        """``h_t [R, D]`` from ``h_{t-1} [R, D]``, ``s_{t-1} [R, Z]``, ``a_{t-1} [R, U]``.

        The GRU step of ``self.cell`` (PyTorch's gate order and equations, ``h' = (1 - z) n +
        z h``) written out so that its pointwise part is a few passes over contiguous rows,
        with ``tanh(x) = 2 sigmoid(2 x) - 1`` (on this CPU's torch about 3x cheaper than
        ``tanh``; equal to float rounding); ``nn.GRUCell`` itself spends about as long on its
        pointwise part as on its two matmuls at 1000 rows."""
        x = F.elu(self.embed(torch.cat([s, a], dim=-1)))
        cell, d = self.cell, self.deterministic
        gi = F.linear(x, cell.weight_ih, cell.bias_ih)  # [R, 3 D] gates r, z, n from x
        gh = F.linear(h, cell.weight_hh, cell.bias_hh)  # [R, 3 D] from h
        rz = torch.sigmoid(gi[:, : 2 * d] + gh[:, : 2 * d])  # [R, 2 D]
        n = torch.sigmoid(2 * torch.addcmul(gi[:, 2 * d :], rz[:, :d], gh[:, 2 * d :])) * 2 - 1
        return torch.addcmul(n, rz[:, d:], h - n)  # n + z (h - n); lerp's backward is slow

    def prior(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and std ``[R, Z]`` of ``p(s_t | h_t)``."""
        return gaussian(self.prior_net(h), self.min_std)

    def reward(self, features: torch.Tensor) -> torch.Tensor:
        """Reward ``[...]`` of the step into features ``[..., F]``."""
        return self.reward_net(features).squeeze(-1)


def gaussian(params: torch.Tensor, min_std: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and std ``[R, Z]`` of a prior or posterior from its net's ``[R, 2 Z]``: ``std =
    softplus(raw) + min_std`` (on a contiguous copy: on a strided view softplus is about 10x
    slower)."""
    mean, raw = params.chunk(2, dim=-1)
    return mean, F.softplus(raw.contiguous()) + min_std


def _kl(qm: torch.Tensor, qs: torch.Tensor, pm: torch.Tensor, ps: torch.Tensor) -> torch.Tensor:
    """``KL(N(qm, qs) || N(pm, ps))`` of diagonal Gaussians ``[..., Z]``, summed over ``Z``."""
    ratio = (qs / ps).square()
    return 0.5 * (ratio + ((qm - pm) / ps).square() - 1.0 - ratio.log()).sum(dim=-1)
