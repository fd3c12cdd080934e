"""The config sections shared by the algorithms and the one function that builds each: the
probabilistic ensemble (:func:`make_ensemble`), a planner by name (:func:`make_planner`) and a
model-free learner (:func:`make_learner`).

Configs stop here: what these functions return are library objects built from plain values.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch

from mbrl import envs
from mbrl.dynamics.ensemble import ProbabilisticEnsemble
from mbrl.learners import NAF, SAC, TD3, Learner
from mbrl.planners import CEM, ILQR, MPPI, RandomShooting
from mbrl.planners.base import Planner

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}

LearnerName = Literal["sac", "td3", "ddpg", "naf"]
PlannerName = Literal["random", "cem", "icem", "mppi", "ilqr"]
Propagation = Literal["ts1", "ts_inf", "expectation"]


@dataclass
class EnsembleConfig:
    """The probabilistic ensemble (PETS section 4.1; MBPO Appendix C). The defaults are
    MBPO's: 7 members, 5 elites, 4 x 200 units; PETS's own are in its config."""

    ensemble_size: int = 7
    """E, Gaussian MLPs trained together on bootstrap resamples."""
    num_elites: int | None = 5
    """Members used for prediction and rollouts, chosen by held-out loss (None: all)."""
    hidden_size: int = 200
    """Units per hidden layer."""
    num_layers: int = 4
    """Hidden layers per member."""
    lr: float = 1e-3
    """Adam learning rate."""
    weight_decay: float | None = None
    """L2 decay; None is the PETS per-layer schedule 2.5e-5 ... 1e-4."""
    batch_size: int = 256
    """Rows per member per optimizer step."""
    max_epochs: int = 50
    """Epoch budget of one fit."""
    patience: int = 5
    """Epochs without held-out improvement before early stopping."""
    val_fraction: float = 0.2
    """Share of the data held out for early stopping and elites."""
    learns_reward: bool = True
    """Learn the reward too (MBPO); False scores imagined steps with the env's reward_fn."""
    propagation: Propagation = "ts1"
    """How imagined steps move: ``ts1`` samples each step from a random elite's Gaussian
    (MBPO's rollouts), ``ts_inf`` keeps one member per particle (PETS's TS-inf),
    ``expectation`` takes the mean over elites (a deterministic model; MVE's targets)."""
    planning_dtype: Literal["float32", "bfloat16"] = "float32"
    """Dtype of the MLP during rollouts."""
    train_every: int = 250
    """Dyna runs: refit the model every this many env steps (MPC runs refit once per trial)."""


@dataclass
class PlannerConfig:
    """A planner by name: random shooting, CEM, iCEM, MPPI or iLQR."""

    name: PlannerName = "cem"
    """random, cem, icem (CEM with colored noise, kept and shifted elites), mppi or ilqr (on
    the model's mean dynamics)."""
    population: int = 500
    """Candidates N per iteration (sampling planners)."""
    elite_fraction: float = 0.1
    """Share of the population refitted to (cem, icem)."""
    iterations: int = 5
    """Refits (cem, icem) or updates (mppi) per plan."""
    alpha: float = 0.1
    """Smoothing: new = alpha * old + (1 - alpha) * elite statistics (cem, icem)."""
    noise_beta: float = 2.0
    """Colored-noise exponent of iCEM (0 is white noise); used by icem only."""
    keep_elites_fraction: float = 0.3
    """Share of elites carried to the next iteration (icem only)."""
    population_decay: float = 1.25
    """iCEM's population shrink factor per iteration (icem only)."""
    temperature: float = 1.0
    """Softmax temperature lambda of the weights (mppi)."""
    noise_std: float = 0.5
    """Exploration std in action units (mppi)."""
    max_iterations: int = 20
    """Most iterations per plan (ilqr; it stops earlier once converged)."""


@dataclass
class LearnerConfig:
    """The model-free learner (SAC, TD3, DDPG or NAF)."""

    name: LearnerName = "sac"
    """sac, td3, ddpg or naf."""
    hidden_size: int = 256
    """Units per hidden layer of actor and critics."""
    num_layers: int = 2
    """Hidden layers of actor and critics."""
    gamma: float = 0.99
    """Discount."""
    tau: float = 0.005
    """Polyak rate of the target networks."""
    lr: float = 3e-4
    """Adam learning rate (actor, critics, temperature)."""
    batch_size: int = 256
    """Transitions per update."""
    exploration_noise: float = 0.1
    """Gaussian exploration std in the unit action box (td3, ddpg, naf)."""
    policy_delay: int = 2
    """Critic updates per actor update (td3)."""
    target_noise: float = 0.2
    """Target policy smoothing std (td3)."""
    noise_clip: float = 0.5
    """Clip of the smoothing noise (td3)."""
    init_alpha: float = 1.0
    """Initial temperature (sac)."""
    learn_alpha: bool = True
    """Tune the temperature to the target entropy (sac)."""
    target_entropy: float | None = None
    """Target entropy (sac); None is -U."""
    diag_floor: float = 0.1
    """Lower bound of the diagonal of L in P = L L^T (naf); must be > 0."""
    mu_penalty: float = 0.0
    """Weight of the squared pre-tanh mu in the loss (naf), against mu locking at the bound
    where tanh is flat; 0 turns it off."""


def make_ensemble(
    cfg: EnsembleConfig,
    spec: envs.EnvSpec,
    device: torch.device | str,
    seed: int,
    ignored_obs: Sequence[int] = (),
) -> ProbabilisticEnsemble:
    """The ensemble ``cfg`` describes for the env ``spec``, seeded ``seed`` and blind to the
    observation features ``ignored_obs``."""
    return ProbabilisticEnsemble(
        spec.obs_dim,
        spec.act_dim,
        ensemble_size=cfg.ensemble_size,
        hidden_size=cfg.hidden_size,
        num_layers=cfg.num_layers,
        learns_reward=cfg.learns_reward,
        propagation=cfg.propagation,
        num_elites=cfg.num_elites,
        lr=cfg.lr,
        weight_decay=cfg.weight_decay,
        batch_size=cfg.batch_size,
        max_epochs=cfg.max_epochs,
        patience=cfg.patience,
        val_fraction=cfg.val_fraction,
        planning_dtype=DTYPES[cfg.planning_dtype],
        device=device,
        seed=seed,
        ignored_obs=tuple(ignored_obs),
    )


def make_planner(cfg: PlannerConfig) -> Planner:
    """The planner named ``cfg.name``, with the fields of ``cfg`` it reads."""
    if cfg.name == "random":
        return RandomShooting(population=cfg.population)
    if cfg.name == "mppi":
        return MPPI(
            population=cfg.population,
            temperature=cfg.temperature,
            noise_std=cfg.noise_std,
            iterations=cfg.iterations,
            noise_beta=cfg.noise_beta,
        )
    if cfg.name == "ilqr":
        return ILQR(max_iterations=cfg.max_iterations)
    cem = {
        "population": cfg.population,
        "elite_fraction": cfg.elite_fraction,
        "iterations": cfg.iterations,
        "alpha": cfg.alpha,
    }
    if cfg.name == "cem":
        return CEM(**cem)
    if cfg.name == "icem":
        return CEM(
            **cem,
            noise_beta=cfg.noise_beta,
            keep_elites_fraction=cfg.keep_elites_fraction,
            shift_elites=True,
            population_decay=cfg.population_decay,
        )
    raise ValueError(
        f"unknown planner {cfg.name!r}; valid names: {', '.join(PlannerName.__args__)}"
    )


def make_learner(
    cfg: LearnerConfig,
    spec: envs.EnvSpec,
    device: torch.device | str,
    seed: int,
    ignored_obs: Sequence[int] = (),
) -> Learner:
    """The learner ``cfg`` describes for the env ``spec``, its networks blind to the
    observation features ``ignored_obs``."""
    low, high = spec.action_bounds(device)
    common = {
        "hidden_size": cfg.hidden_size,
        "num_layers": cfg.num_layers,
        "gamma": cfg.gamma,
        "tau": cfg.tau,
        "device": device,
        "seed": seed,
        "ignored_obs": tuple(ignored_obs),
    }
    dims = (spec.obs_dim, spec.act_dim, low, high)
    if cfg.name == "sac":
        return SAC(
            *dims,
            lr=cfg.lr,
            init_alpha=cfg.init_alpha,
            learn_alpha=cfg.learn_alpha,
            target_entropy=cfg.target_entropy,
            **common,
        )
    if cfg.name in ("td3", "ddpg"):
        kw = {"actor_lr": cfg.lr, "critic_lr": cfg.lr, "exploration_noise": cfg.exploration_noise}
        if cfg.name == "ddpg":
            return TD3.ddpg(*dims, **kw, **common)
        return TD3(
            *dims,
            policy_delay=cfg.policy_delay,
            target_noise=cfg.target_noise,
            noise_clip=cfg.noise_clip,
            **kw,
            **common,
        )
    if cfg.name == "naf":
        return NAF(
            *dims,
            lr=cfg.lr,
            exploration_noise=cfg.exploration_noise,
            diag_floor=cfg.diag_floor,
            mu_penalty=cfg.mu_penalty,
            **common,
        )
    raise ValueError(
        f"unknown learner {cfg.name!r}; valid names: {', '.join(LearnerName.__args__)}"
    )
