"""Latent MPC: a latent image model learned from pixels and planned in its latent space through
the one MPC loop, ``model=single_step`` (the lecture notes' single-step encoder,
:class:`~mbrl.dynamics.single_step.SingleStepLatent`) or ``model=rssm`` (PlaNet's RSSM).

The loop is PlaNet's Algorithm 1 (:func:`mbrl.algorithms.planet.train_latent`, shared with
``mbrl run planet``):

    collect random episodes
    for trial = 1 .. trials:
        C model updates on chunks of the stored episodes
        play one episode with MPC (planner over latent rollouts, exploration noise)
        store the episode

Any planner of :class:`~mbrl.algorithms.factory.PlannerConfig` but MCTS plans on either model
(``planner.name=cem|icem|mppi|random|ilqr``; iLQR plans on the mean latent dynamics with the
learned reward as its cost).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch

from mbrl import envs
from mbrl.algorithms.common import Summary, resolve_device
from mbrl.algorithms.factory import PlannerConfig
from mbrl.algorithms.planet import (
    BitDepth,
    LatentModel,
    LatentRunConfig,
    RSSMConfig,
    make_rssm,
    train_latent,
)
from mbrl.config import Count, Natural, NonNegative, Positive
from mbrl.envs.pixels import PixelSpec
from mbrl.runs import Run


@dataclass
class SingleStepConfig:
    """The single-step latent model (:class:`~mbrl.dynamics.single_step.SingleStepLatent`)."""

    latent: Count = 30
    """Code size Z."""
    hidden: Count = 200
    """Units of the two hidden layers of the latent dynamics and of the reward head."""
    depth: Count = 32
    """Channels of the first convolution; layer i has depth * 2^i."""
    conv_layers: Count = 4
    """Convolutions of the encoder and transposed convolutions of the decoder."""
    dynamics: Literal["deterministic", "gaussian"] = "deterministic"
    """deterministic s' = f(s, a), or gaussian (f also predicts a std; rollouts sample)."""
    min_std: Positive = 0.01
    """Floor of the std of gaussian dynamics."""
    latent_weight: NonNegative = 1.0
    """Weight of the latent-dynamics term."""
    reward_weight: NonNegative = 1.0
    """Weight of the reward term."""
    bit_depth: BitDepth = 5
    """Bits per pixel kept by the preprocessing."""
    lr: Positive = 1e-3
    """Adam learning rate."""
    adam_eps: Positive = 1e-4
    """Adam epsilon."""
    grad_clip: Positive = 1000.0
    """Gradient-norm clip."""


def make_single_step(
    cfg: SingleStepConfig, spec: PixelSpec, device: torch.device, seed: int
) -> LatentModel:
    """The single-step model ``cfg`` describes for the pixel task ``spec``, seeded ``seed``."""
    from mbrl.dynamics.single_step import SingleStepLatent

    return SingleStepLatent(
        spec.obs_shape,
        spec.act_dim,
        latent=cfg.latent,
        hidden=cfg.hidden,
        depth=cfg.depth,
        conv_layers=cfg.conv_layers,
        dynamics=cfg.dynamics,
        min_std=cfg.min_std,
        latent_weight=cfg.latent_weight,
        reward_weight=cfg.reward_weight,
        bit_depth=cfg.bit_depth,
        lr=cfg.lr,
        adam_eps=cfg.adam_eps,
        grad_clip=cfg.grad_clip,
        device=device,
        seed=seed,
    )


@dataclass
class Config(LatentRunConfig):
    """Latent MPC. The defaults are a quick run on pixel Pendulum: 2 random episodes, 3 trials
    of 20 updates on 16 chunks of 16 steps, CEM with 500 candidates and 5 iterations over a
    horizon of 12; ``experiments/latent_mpc_pendulum_pixels.yaml`` is the benchmark's."""

    env: str = "pendulum-pixels"
    random_episodes: Natural = 2
    chunk_length: Count = 16
    model: Literal["single_step", "rssm"] = "single_step"
    """Which latent model: single_step (the notes' encoder of stacked frames) or rssm."""
    single_step: SingleStepConfig = field(default_factory=SingleStepConfig)
    """The single-step model (model=single_step)."""
    rssm: RSSMConfig = field(default_factory=RSSMConfig)
    """The RSSM (model=rssm)."""
    planner: PlannerConfig = field(
        default_factory=lambda: PlannerConfig(population=500, iterations=5, alpha=0.0)
    )


def make_model(cfg: Config, device: torch.device) -> tuple[LatentModel, str, str]:
    """The run's model (``cfg.model``), its label and its config section."""
    spec = envs.make(cfg.env)
    if cfg.model == "rssm":
        return make_rssm(cfg.rssm, spec, device, cfg.seed), "latent MPC (RSSM)", "rssm"
    model = make_single_step(cfg.single_step, spec, device, cfg.seed)
    return model, "latent MPC (single-step)", "single_step"


def train(cfg: Config, run: Run, device: str = "cpu") -> Summary:
    """Run (or resume) latent MPC as configured, logging to ``run``; returns the summary."""
    dev = resolve_device(device)
    model, label, key = make_model(cfg, dev)
    return train_latent(run, cfg, model, label=label, model_key=key, device=dev)
