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
from mbrl.algorithms.mpc_loop import MPCRunConfig, train_mpc
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
class Config(MPCRunConfig):
    """PETS. The defaults are the quick demo: cartpole balance solved in a few minutes.

    Loop fields (env, seed, trials, seed_steps, horizon, particles, ...) are documented on
    :class:`~mbrl.algorithms.mpc_loop.MPCRunConfig`; particles must be a multiple of the
    elite count for TS-inf.
    """

    seed_steps: int = 200
    particles: int = 10
    stop_when_solved: int = 1
    ignore_positions: bool = True
    """Leave the env's position features (``EnvSpec.position_obs``: HalfCheetah's and Hopper's
    x) out of the model inputs, as PETS's own HalfCheetah observation does; their change is
    still predicted, so the reward can score forward progress."""
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
        ignored_obs=spec.position_obs if cfg.ignore_positions else (),
    )


def train(cfg: Config, run: Run, device: str = "cpu") -> Summary:
    """Run (or resume) PETS as configured, logging to ``run``; returns the summary."""
    dev = resolve_device(device)
    model = build_model(cfg, envs.make(cfg.env), dev)
    return train_mpc(run, cfg, model, make_planner(cfg.planner), label="PETS", device=dev)
