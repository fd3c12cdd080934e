"""PETS: probabilistic ensembles with trajectory sampling (Chua et al. 2018, Algorithm 1).

    collect random episodes until ``seed_steps`` transitions are stored
    for trial = 1 .. trials:
        fit the ensemble on every stored transition
        run one episode with MPC: CEM over the ensemble's particle rollouts (TS-inf)
        store the episode's transitions

After each trial the run logs one row of ``metrics.csv`` and writes a checkpoint holding
everything needed to continue exactly: buffer, model and optimizer, the RNG streams, the
trial counter. A killed run resumes from its last checkpoint (``mbrl resume runs/<name>``).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import torch
from tqdm import tqdm

from mbrl import envs
from mbrl.algorithms.common import (
    DTYPES,
    PlannerConfig,
    Summary,
    make_planner,
    progress_bar,
    resolve_device,
)
from mbrl.buffer import ReplayBuffer
from mbrl.control import MPCController, RandomPolicy, run_episode
from mbrl.dynamics.ensemble import ProbabilisticEnsemble
from mbrl.planners import PlanningProblem
from mbrl.plots import learning_curve
from mbrl.runs import Run, numpy_rng_state, set_numpy_rng_state


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
    env = spec.make()
    model = build_model(cfg, spec, dev)
    buffer = ReplayBuffer(spec.obs_dim, spec.act_dim, cfg.buffer_capacity, device=dev)
    gen = torch.Generator(device=dev).manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    low, high = spec.action_bounds(dev)
    problem = PlanningProblem(
        model, spec.reward_fn, spec.termination_fn, cfg.horizon, low, high, cfg.particles, gen
    )
    controller = MPCController(make_planner(cfg.planner), problem, cfg.replan_every, dev)

    trial, episodes, wall, returns, streak = 0, 0, 0.0, [], 0
    state = run.load_checkpoint()
    if state is not None:
        model.load_state_dict(state["model"])
        buffer.load_state_dict(state["buffer"])
        gen.set_state(state["torch_rng"])
        set_numpy_rng_state(rng, state["numpy_rng"])
        trial, episodes, wall = state["trial"], state["episodes"], state["wall_seconds"]
        returns, streak = list(state["returns"]), state["streak"]
        tqdm.write(f"resumed {run.path} after trial {trial} ({len(buffer)} transitions)")

    def checkpoint() -> None:
        run.save_checkpoint(
            {
                "model": model.state_dict(),  # weights, normalizer, elites, Adam and RNG state
                "buffer": buffer.state_dict(),
                "torch_rng": gen.get_state(),
                "numpy_rng": numpy_rng_state(rng),
                "trial": trial,
                "episodes": episodes,
                "wall_seconds": wall,
                "returns": returns,
                "streak": streak,
            }
        )

    if trial == 0 and len(buffer) < cfg.seed_steps:
        random_policy = RandomPolicy(spec.action_low, spec.action_high, rng)
        while len(buffer) < cfg.seed_steps:
            start = time.perf_counter()
            ep = run_episode(env, random_policy, seed=_episode_seed(cfg.seed, episodes))
            buffer.add_episode(ep)
            episodes += 1
            wall += time.perf_counter() - start
            run.log(
                trial=0,
                env_steps=len(buffer),
                **{"return": ep.ret},
                length=len(ep),
                train_loss="",
                val_loss="",
                fit_seconds=0.0,
                plan_seconds_per_step=0.0,
                nonfinite=0,
                wall_seconds=wall,
            )
        checkpoint()

    while trial < cfg.trials and not (cfg.stop_when_solved and streak >= cfg.stop_when_solved):
        start = time.perf_counter()
        report = model.fit(buffer.all())
        controller.reset_stats()
        with progress_bar(spec.max_episode_steps, f"trial {trial + 1}/{cfg.trials}") as bar:
            ep = run_episode(
                env,
                controller,
                seed=_episode_seed(cfg.seed, episodes),
                on_step=lambda t, r: bar.update(1),
            )
        buffer.add_episode(ep)
        trial += 1
        episodes += 1
        wall += time.perf_counter() - start
        returns.append(ep.ret)
        solved = spec.solved_return is not None and ep.ret >= spec.solved_return
        streak = streak + 1 if solved else 0
        stats = controller.stats
        run.log(
            trial=trial,
            env_steps=len(buffer),
            **{"return": ep.ret},
            length=len(ep),
            train_loss=report.final_train_loss,
            val_loss=report.best_val_loss,
            fit_seconds=report.seconds,
            plan_seconds_per_step=stats.plan_seconds / max(stats.plans, 1),
            nonfinite=stats.nonfinite,
            wall_seconds=wall,
        )
        tqdm.write(
            f"trial {trial}: return {ep.ret:.1f} ({len(ep)} steps), model val loss "
            f"{report.best_val_loss:.4f}, {stats.plan_seconds / max(stats.plans, 1):.3f} s/plan"
            + (f", {stats.nonfinite} non-finite candidates" if stats.nonfinite else "")
        )
        checkpoint()

    learning_curve(
        [(f"PETS seed {cfg.seed}", run.metrics_path)],
        run.path / "learning_curve.png",
        title=f"PETS on {cfg.env}",
        target=spec.solved_return,
    )
    return Summary.from_returns(returns, spec.solved_return, wall)


def _episode_seed(seed: int, episode: int) -> int:
    return seed * 100_003 + episode
