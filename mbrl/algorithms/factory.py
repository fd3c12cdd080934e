"""The config sections shared by the algorithms and the one function that builds each: the
probabilistic ensemble (:func:`make_ensemble`), a planner by name (:func:`make_planner`) and a
model-free learner (:func:`make_learner`).

Configs stop here: what these functions return are library objects built from plain values.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Annotated, Literal

import torch

from mbrl import envs
from mbrl.config import (
    ConfigError,
    Count,
    Finite,
    Fraction,
    Natural,
    NonNegative,
    Positive,
    ProperFraction,
    Range,
    UnitInterval,
    to_dict,
)
from mbrl.dynamics import FitError
from mbrl.dynamics.ensemble import ProbabilisticEnsemble, auto_planning_dtype
from mbrl.envs.registry import known
from mbrl.learners import NAF, SAC, TD3, Learner
from mbrl.planners import CEM, ILQR, MPPI, RandomShooting
from mbrl.planners.base import Planner
from mbrl.planners.mcts import MCTS

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}

LearnerName = Literal["sac", "td3", "ddpg", "naf"]
PlannerName = Literal["random", "cem", "icem", "mppi", "ilqr", "mcts"]
Propagation = Literal["ts1", "ts_inf", "expectation"]


@dataclass
class EnsembleConfig:
    """The probabilistic ensemble (PETS section 4.1; MBPO Appendix C). The defaults are
    MBPO's: 7 members, 5 elites, 4 x 200 units; PETS's own are in its config."""

    ensemble_size: Count = 7
    """E, Gaussian MLPs trained together on bootstrap resamples."""
    num_elites: Count | None = 5
    """Members used for prediction and rollouts, chosen by held-out loss (None: all); at most
    ensemble_size."""
    hidden_size: Count = 200
    """Units per hidden layer."""
    num_layers: Count = 4
    """Hidden layers per member."""
    lr: Positive = 1e-3
    """Adam learning rate."""
    weight_decay: NonNegative | None = None
    """L2 decay; None is the PETS per-layer schedule 2.5e-5 ... 1e-4."""
    batch_size: Count = 256
    """Rows per member per optimizer step."""
    max_epochs: Count = 50
    """Epoch budget of one fit."""
    patience: Count = 5
    """Epochs without held-out improvement before early stopping."""
    val_fraction: ProperFraction = 0.2
    """Share of the data held out for early stopping and elites (0: none; elites by training
    loss)."""
    learns_reward: bool = True
    """Learn the reward too (MBPO); False scores imagined steps with the env's reward_fn."""
    propagation: Propagation = "ts1"
    """How imagined steps move: ``ts1`` samples each step from a random elite's Gaussian
    (MBPO's rollouts), ``ts_inf`` keeps one member per particle (PETS's TS-inf),
    ``expectation`` takes the mean over elites (a deterministic model; MVE's targets)."""
    planning_dtype: Literal["float32", "bfloat16", "auto"] = "float32"
    """Dtype of the MLP during rollouts; ``auto`` is bfloat16 where matmuls run natively in it
    (CPUs with AVX512-BF16 or AMX, GPUs that support it) and float32 elsewhere, printed at the
    start of the run. Fits are float32 always."""
    angle_features: bool = True
    """Feed the network the sine and cosine of the env's angle features
    (``EnvSpec.angle_obs``: cart-pole swing-up's pole angle) instead of the raw angle, as PETS's
    cart-pole does; their change is still predicted. No effect on envs without them."""
    train_every: Annotated[int, Range(1, fix="refit the model every n >= 1 env steps")] = 250
    """Dyna runs: refit the model every this many env steps (MPC runs refit once per trial)."""

    def check(self, key: str) -> None:
        """Raise :class:`~mbrl.config.ConfigError` if the fields disagree; ``key`` is this
        section's name in its config (``model``)."""
        if self.num_elites is not None and self.num_elites > self.ensemble_size:
            raise ConfigError(
                f"{key}.num_elites={self.num_elites} exceeds {key}.ensemble_size="
                f"{self.ensemble_size}; lower it, or set it to null to use every member"
            )

    @property
    def elites(self) -> int:
        """Members used for prediction and rollouts (``num_elites``, else all)."""
        return self.ensemble_size if self.num_elites is None else self.num_elites


@dataclass
class PlannerConfig:
    """A planner by name: random shooting, CEM, iCEM, MPPI, iLQR or MCTS."""

    name: PlannerName = "cem"
    """random, cem, icem (CEM with colored noise, kept and shifted elites), mppi, ilqr (on
    the model's mean dynamics) or mcts (Monte-Carlo tree search over the model's steps)."""
    population: Count = 500
    """Candidates N per iteration (sampling planners)."""
    elite_fraction: UnitInterval = 0.1
    """Share of the population refitted to (cem, icem; at least one elite)."""
    iterations: Count = 5
    """Refits (cem, icem) or updates (mppi) per plan."""
    alpha: ProperFraction = 0.1
    """Smoothing: new = alpha * old + (1 - alpha) * elite statistics (cem, icem)."""
    noise_beta: NonNegative = 2.0
    """Colored-noise exponent of the samples (0 is white noise); used by icem and mppi."""
    keep_elites_fraction: Fraction = 0.3
    """Share of elites carried to the next iteration (icem only)."""
    population_decay: Annotated[float, Range(1.0)] = 1.25
    """iCEM's population shrink factor per iteration, >= 1 (icem only)."""
    temperature: Positive = 1.0
    """Softmax temperature lambda of the weights (mppi)."""
    noise_std: Positive = 0.5
    """Exploration std in action units (mppi)."""
    max_iterations: Count = 20
    """Most iterations per plan (ilqr; it stops earlier once converged)."""
    simulations: Count = 64
    """Simulations S per plan, each one path from the root to a new leaf (mcts)."""
    rule: Literal["uct", "puct"] = "uct"
    """Child selection (mcts): uct (UCB1 on the visit counts) or puct (AlphaZero's, weighted
    by the problem's action prior; uniform without one)."""
    exploration: NonNegative = 1.25
    """Exploration constant c of UCT, c1 of PUCT (mcts; 0: greedy in Q)."""
    max_depth: Count | None = None
    """Deepest tree level (mcts); None: the horizon."""
    actions: Literal["discrete", "widening", "sampled"] = "discrete"
    """Which actions the tree branches on (mcts): discrete (the discrete env's action values,
    or a grid on a box env where the algorithm makes one), widening (progressive widening:
    new box actions while k N^alpha exceeds the children) or sampled (num_sampled box actions
    drawn per node)."""
    num_sampled: Count = 8
    """Actions drawn per node with actions=sampled (mcts)."""
    widening_k: Positive = 1.0
    """k of progressive widening, children <= k N^alpha (mcts, actions=widening)."""
    widening_alpha: UnitInterval = 0.5
    """alpha of progressive widening, in (0, 1] (mcts, actions=widening)."""
    double_widening: bool = False
    """Also widen the next states of stochastic models (mcts, actions=widening)."""
    dirichlet_alpha: Positive | None = None
    """Dirichlet noise concentration on the root prior (mcts, rule=puct); None: no noise."""
    dirichlet_fraction: Fraction = 0.25
    """Share of the Dirichlet noise in the root prior (mcts, with dirichlet_alpha)."""
    rollout_depth: Natural = 0
    """Default-policy steps from each new leaf to estimate its value (mcts; 0: the leaf is
    scored by the problem's value_fn, or 0 without one)."""
    rollout_policy: Literal["random", "repeat"] = "random"
    """The rollouts' default policy (mcts): random actions, or repeat (the action into the
    leaf, held for the whole rollout)."""
    normalize_values: bool = True
    """Scale Q values to [0, 1] by the tree's min and max before selection (mcts)."""
    reuse_tree: bool = False
    """Keep the subtree below the played action for the next plan (mcts)."""
    leaves_per_wave: Count = 1
    """Leaves selected per wave with virtual loss and expanded and evaluated by one model call
    (mcts; 1: one leaf per call, the sequential search)."""
    virtual_loss: NonNegative = 1.0
    """What a descent still in its wave takes off the normalized value of each edge it
    passed (mcts, leaves_per_wave > 1)."""
    compile: bool = False
    """Run the rollouts of the sampling planners (random, cem, icem, mppi) through
    torch.compile: fewer, fused kernels on cheap models; each new population size compiles
    once (seconds)."""

    def __post_init__(self) -> None:
        if self.compile and self.name in ("ilqr", "mcts"):
            raise ConfigError(
                f"planner.compile=true compiles the rollouts of the sampling planners (random, "
                f"cem, icem, mppi), not {self.name}; set planner.compile=false or pick one of "
                "those planners"
            )


@dataclass
class LearnerConfig:
    """The model-free learner (SAC, TD3, DDPG or NAF)."""

    name: LearnerName = "sac"
    """sac, td3, ddpg or naf."""
    hidden_size: Count = 256
    """Units per hidden layer of actor and critics."""
    num_layers: Count = 2
    """Hidden layers of actor and critics."""
    gamma: Fraction = 0.99
    """Discount."""
    tau: UnitInterval = 0.005
    """Polyak rate of the target networks."""
    lr: Positive = 3e-4
    """Adam learning rate (actor, critics, temperature)."""
    batch_size: Count = 256
    """Transitions per update."""
    exploration_noise: NonNegative = 0.1
    """Gaussian exploration std in the unit action box (td3, ddpg, naf)."""
    policy_delay: Count = 2
    """Critic updates per actor update (td3)."""
    target_noise: NonNegative = 0.2
    """Target policy smoothing std (td3)."""
    noise_clip: NonNegative = 0.5
    """Clip of the smoothing noise (td3)."""
    init_alpha: Positive = 1.0
    """Initial temperature (sac)."""
    learn_alpha: bool = True
    """Tune the temperature to the target entropy (sac)."""
    target_entropy: Finite | None = None
    """Target entropy (sac); None is -U."""
    diag_floor: Positive = 0.1
    """Lower bound of the diagonal of L in P = L L^T (naf)."""
    mu_penalty: NonNegative = 0.0
    """Weight of the squared pre-tanh mu in the loss (naf), against mu locking at the bound
    where tanh is flat; 0 turns it off."""


def check_env(name: str) -> None:
    """Raise :class:`~mbrl.config.ConfigError` unless :func:`mbrl.envs.make` takes ``name`` (a
    registered name or a well-formed ``gym:ID``), with ``make``'s message (the valid names, or
    what is wrong with the ``gym:`` name). Cheap for a known name: nothing is built."""
    if known(name):
        return
    try:
        envs.make(name)
    except (KeyError, ValueError) as e:
        raise ConfigError(str(e.args[0]) if e.args else f"unknown env {name!r}") from None


@contextmanager
def config_fit(cfg: object, key: str = "model") -> Iterator[None]:
    """Around a model fit at an algorithm's edge: a :class:`~mbrl.dynamics.FitError` is raised
    again as one line in which the library arguments it names that are fields of the config
    section ``key`` of ``cfg`` become their dotted config keys (``lr=10`` -> ``model.lr=10``),
    so the message says which config value to change."""
    try:
        yield
    except FitError as e:
        section = to_dict(cfg).get(key)
        names = sorted(section, key=len, reverse=True) if isinstance(section, dict) else []
        message, hits = " ".join(str(e).split()), 0
        if names:
            field = re.compile(r"(?<![\w.])(" + "|".join(map(re.escape, names)) + r")(?!\w)")
            message, hits = field.subn(lambda m: f"{key}.{m.group(1)}", message)
        if not hits:
            message += f"; the fit's settings are the {key}.* config keys"
        raise FitError(f"{key} fit diverged: {message}") from e


def make_ensemble(
    cfg: EnsembleConfig,
    spec: envs.EnvSpec,
    device: torch.device | str,
    seed: int,
    ignored_obs: Sequence[int] = (),
) -> ProbabilisticEnsemble:
    """The ensemble ``cfg`` describes for the env ``spec``, seeded ``seed`` and blind to the
    observation features ``ignored_obs``; it reads the env's angle features as sine and cosine
    when ``cfg.angle_features``."""
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
        planning_dtype=resolve_planning_dtype(cfg.planning_dtype, device)[0],
        device=device,
        seed=seed,
        ignored_obs=tuple(ignored_obs),
        angle_obs=spec.angle_obs if cfg.angle_features else (),
    )


def resolve_planning_dtype(name: str, device: torch.device | str) -> tuple[torch.dtype, str]:
    """The dtype ``model.planning_dtype=name`` means on ``device``, and a line for the run's
    header that says what was chosen and why (:func:`~mbrl.dynamics.ensemble.auto_planning_dtype`
    for ``auto``)."""
    if name == "auto":
        dtype, why = auto_planning_dtype(device)
        return dtype, f"planning dtype: {str(dtype).removeprefix('torch.')} (auto: {why})"
    return DTYPES[name], f"planning dtype: {name} (model.planning_dtype)"


def make_planner(cfg: PlannerConfig) -> Planner:
    """The planner named ``cfg.name``, with the fields of ``cfg`` it reads."""
    if cfg.name == "random":
        return RandomShooting(population=cfg.population, compile=cfg.compile)
    if cfg.name == "mppi":
        return MPPI(
            population=cfg.population,
            temperature=cfg.temperature,
            noise_std=cfg.noise_std,
            iterations=cfg.iterations,
            noise_beta=cfg.noise_beta,
            compile=cfg.compile,
        )
    if cfg.name == "ilqr":
        return ILQR(max_iterations=cfg.max_iterations)
    if cfg.name == "mcts":
        return MCTS(
            simulations=cfg.simulations,
            rule=cfg.rule,
            exploration=cfg.exploration,
            max_depth=cfg.max_depth,
            actions=cfg.actions,
            num_sampled=cfg.num_sampled,
            widening_k=cfg.widening_k,
            widening_alpha=cfg.widening_alpha,
            double_widening=cfg.double_widening,
            dirichlet_alpha=cfg.dirichlet_alpha,
            dirichlet_fraction=cfg.dirichlet_fraction,
            rollout_depth=cfg.rollout_depth,
            rollout_policy=cfg.rollout_policy,
            normalize_values=cfg.normalize_values,
            reuse_tree=cfg.reuse_tree,
            leaves_per_wave=cfg.leaves_per_wave,
            virtual_loss=cfg.virtual_loss,
        )
    cem = {
        "population": cfg.population,
        "elite_fraction": cfg.elite_fraction,
        "iterations": cfg.iterations,
        "alpha": cfg.alpha,
        "compile": cfg.compile,
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
