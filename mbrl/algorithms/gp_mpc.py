"""GP-MPC: Gaussian-process dynamics with model-predictive control (in the spirit of
Kamthe & Deisenroth 2018, "Data-efficient RL with probabilistic MPC", with sampling planners
in place of their moment-matching gradient MPC).

    run ``random_episodes`` episodes with uniform random actions
    for trial = 1 .. trials:
        fit the GP (one per state dimension, state deltas) on every stored transition
        run one episode with MPC: CEM (or iLQR) over GP rollouts
        store the episode's transitions

The loop, its metrics and checkpoints are :func:`mbrl.algorithms.mpc_loop.train_mpc`, shared
with PETS. By default the planner scores the GP's mean trajectory (``propagation=expectation``, one
particle), which needs no predictive variance in the planning loop; ``propagation=sample`` with
``particles > 1`` draws next states from the GP's one-step predictive distribution instead.
After each trial the run logs one row of ``metrics.csv`` and writes a checkpoint (buffer, GP,
RNG streams, counters); a killed run resumes from it (``mbrl resume runs/<name>``). The GP is
refitted from the buffer at every trial, so resuming refits exactly what the killed run would
have.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch

from mbrl import envs
from mbrl.algorithms.common import Summary, resolve_device
from mbrl.algorithms.factory import PlannerConfig, make_planner
from mbrl.algorithms.mpc_loop import MPCRunConfig, train_mpc
from mbrl.config import ConfigError, Count, Natural, Positive, ProperFraction
from mbrl.dynamics.base import FitReport
from mbrl.dynamics.gp import GaussianProcessModel
from mbrl.runs import Run


@dataclass
class GPConfig:
    """The Gaussian-process model (:class:`mbrl.dynamics.gp.GaussianProcessModel`)."""

    kernel: Literal["rbf", "matern"] = "rbf"
    """rbf (ARD squared exponential) or matern (ARD Matern 5/2)."""
    max_exact_points: Natural = 2000
    """Largest number of transitions fitted by the exact GP; SGPR above."""
    inducing_points: Count = 128
    """Inducing points of the sparse GP (k-means initialised)."""
    iterations: Count = 100
    """Marginal-likelihood optimiser iterations per fit."""
    optimizer: Literal["adam", "lbfgs"] = "adam"
    """adam or lbfgs."""
    lr: Positive = 0.1
    """Optimiser step size."""
    val_fraction: ProperFraction = 0.0
    """Held-out share for a validation NLL per iteration (0: none, all data used)."""
    love_rank: Count = 100
    """Rank of the LOVE predictive-variance cache of the exact GP."""
    propagation: Literal["expectation", "sample"] = "expectation"
    """expectation (GP mean, no sampling) or sample (one Gaussian draw per particle and step)."""


@dataclass
class Config(MPCRunConfig):
    """GP-MPC. The defaults are the pendulum benchmark: 1 random + 2 MPC episodes.

    Loop fields (env, seed, trials, random_episodes, horizon, particles, ...) are documented on
    :class:`~mbrl.algorithms.mpc_loop.MPCRunConfig`; use particles = 1 with
    propagation=expectation.
    """

    env: str = "pendulum"
    trials: Natural = 2
    random_episodes: Natural = 1
    horizon: Count = 20
    buffer_capacity: Count = 100_000
    model: GPConfig = field(default_factory=GPConfig)
    planner: PlannerConfig = field(
        default_factory=lambda: PlannerConfig(population=200, iterations=3)
    )
    """The planner: cem (default), icem, random, mppi, or ilqr on the GP mean
    (``planner.max_iterations``)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.model.propagation == "expectation" and self.particles > 1:
            raise ConfigError(
                f"particles={self.particles} with model.propagation=expectation rolls out "
                f"{self.particles} identical mean trajectories; set particles=1, or "
                "model.propagation=sample"
            )


def build_model(cfg: Config, spec: envs.EnvSpec, device: torch.device) -> GaussianProcessModel:
    m = cfg.model
    return GaussianProcessModel(
        spec.obs_dim,
        spec.act_dim,
        kernel=m.kernel,
        max_exact_points=m.max_exact_points,
        inducing_points=m.inducing_points,
        iterations=m.iterations,
        optimizer=m.optimizer,
        lr=m.lr,
        val_fraction=m.val_fraction,
        love_rank=m.love_rank,
        propagation=m.propagation,
        seed=cfg.seed,
        device=device,
    )


def train(cfg: Config, run: Run, device: str = "cpu") -> Summary:
    """Run (or resume) GP-MPC as configured, logging to ``run``; returns the summary."""
    dev = resolve_device(device)
    model = build_model(cfg, envs.make(cfg.env), dev)

    def gp_metrics(report: FitReport) -> dict[str, float]:
        return {"sparse": int(model.diagnostics.sparse), "jitter": model.diagnostics.jitter}

    return train_mpc(
        run,
        cfg,
        model,
        make_planner(cfg.planner),
        label="GP-MPC",
        fit_generator="run",
        fit_metrics=gp_metrics,
        extra_columns=("sparse", "jitter"),
        device=dev,
    )
