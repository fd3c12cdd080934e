"""PETS: probabilistic ensembles with trajectory sampling (Chua et al. 2018, Algorithm 1).

    collect random episodes until ``seed_steps`` transitions are stored
    for trial = 1 .. trials:
        fit the ensemble on every stored transition
        run one episode with MPC: CEM over the ensemble's particle rollouts (TS-inf)
        store the episode's transitions

The loop, its metrics and its checkpoints are :func:`mbrl.algorithms.mpc_loop.train_mpc`,
shared with GP-MPC; a killed run resumes from its last checkpoint (``mbrl resume runs/<name>``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from mbrl import envs
from mbrl.algorithms.common import DTYPES, PlannerConfig, Summary, make_planner, resolve_device
from mbrl.algorithms.mpc_loop import train_mpc
from mbrl.dynamics.ensemble import ProbabilisticEnsemble
from mbrl.runs import Run


@dataclass
class EnsembleConfig:
    """The probabilistic ensemble (PETS section 4.1)."""

    ensemble_size: int = 5
    """E, Gaussian MLPs trained together."""
    hidden_size: int = 200
    """Units per hidden layer."""
    num_layers: int = 3
    """Hidden layers per member."""
    num_elites: int | None = None
    """Members used for prediction, chosen by validation loss (None: all)."""
    lr: float = 1e-3
    """Adam learning rate."""
    weight_decay: float = 5e-5
    """L2 penalty on the weights."""
    batch_size: int = 32
    """Minibatch size per member."""
    max_epochs: int = 50
    """Epoch budget of one fit."""
    patience: int = 5
    """Epochs without held-out improvement before early stopping."""
    val_fraction: float = 0.1
    """Share of the data held out for validation and elite selection."""
    propagation: str = "ts_inf"
    """Particle propagation: ts1, ts_inf or expectation."""
    planning_dtype: str = "float32"
    """Dtype of the MLP during planning rollouts: float32 or bfloat16."""


@dataclass
class Config:
    """PETS. The defaults are the quick demo: cartpole balance solved in a few minutes."""

    env: str = "cartpole-balance"
    """Registry name of the env (``mbrl envs`` lists them)."""
    seed: int = 0
    """Seeds the env resets, the model, the planner and the random episodes."""
    trials: int = 5
    """MPC episodes after the random ones (at most; see stop_when_solved)."""
    seed_steps: int = 200
    """Random-action transitions collected before the first trial."""
    horizon: int = 15
    """Planning horizon H."""
    particles: int = 10
    """Particles P per candidate (a multiple of the elite count for TS-inf)."""
    replan_every: int = 1
    """Plan every k env steps."""
    buffer_capacity: int = 1_000_000
    """Most real transitions kept."""
    stop_when_solved: int = 1
    """Stop after this many consecutive solved trials (0: run every trial)."""
    model: EnsembleConfig = field(default_factory=EnsembleConfig)
    planner: PlannerConfig = field(
        default_factory=lambda: PlannerConfig(population=200, iterations=3)
    )


def build_model(cfg: Config, spec: envs.EnvSpec, device: torch.device) -> ProbabilisticEnsemble:
    m = cfg.model
    return ProbabilisticEnsemble(
        spec.obs_dim,
        spec.act_dim,
        ensemble_size=m.ensemble_size,
        hidden_size=m.hidden_size,
        num_layers=m.num_layers,
        num_elites=m.num_elites,
        lr=m.lr,
        weight_decay=m.weight_decay,
        batch_size=m.batch_size,
        max_epochs=m.max_epochs,
        patience=m.patience,
        val_fraction=m.val_fraction,
        propagation=m.propagation,
        planning_dtype=DTYPES[m.planning_dtype],
        device=device,
        seed=cfg.seed,
    )


def train(cfg: Config, run: Run, device: str = "cpu") -> Summary:
    """Run (or resume) PETS as configured, logging to ``run``; returns the summary."""
    dev = resolve_device(device)
    spec = envs.make(cfg.env)
    return train_mpc(
        run,
        spec,
        build_model(cfg, spec, dev),
        make_planner(cfg.planner),
        label="PETS",
        seed=cfg.seed,
        trials=cfg.trials,
        horizon=cfg.horizon,
        particles=cfg.particles,
        replan_every=cfg.replan_every,
        buffer_capacity=cfg.buffer_capacity,
        stop_when_solved=cfg.stop_when_solved,
        random_steps=cfg.seed_steps,
        device=dev,
    )
