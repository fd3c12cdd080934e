"""GP-MPC: Gaussian-process dynamics with model-predictive control (in the spirit of
Kamthe & Deisenroth 2018, "Data-efficient RL with probabilistic MPC", with sampling planners
in place of their moment-matching gradient MPC).

    run ``random_episodes`` episodes with uniform random actions
    for trial = 1 .. trials:
        fit the GP (one per state dimension, state deltas) on every stored transition
        run one episode with MPC: CEM (or iLQR) over GP rollouts
        store the episode's transitions

By default the planner scores the GP's mean trajectory (``propagation=expectation``, one
particle), which needs no predictive variance in the planning loop; ``propagation=sample`` with
``particles > 1`` draws next states from the GP's one-step predictive distribution instead.
After each trial the run logs one row of ``metrics.csv`` and writes a checkpoint (buffer, GP,
RNG streams, counters); a killed run resumes from it (``mbrl resume runs/<name>``). The GP is
refitted from the buffer at every trial, so resuming refits exactly what the killed run would
have.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import torch
from tqdm import tqdm

from mbrl import envs
from mbrl.algorithms.common import (
    PlannerConfig,
    Summary,
    make_planner,
    progress_bar,
    resolve_device,
)
from mbrl.buffer import ReplayBuffer
from mbrl.control import MPCController, RandomPolicy, run_episode
from mbrl.dynamics.gp import GaussianProcessModel
from mbrl.planners import PlanningProblem
from mbrl.planners.base import Planner
from mbrl.plots import learning_curve
from mbrl.runs import Run, numpy_rng_state, set_numpy_rng_state


@dataclass
class GPConfig:
    """The Gaussian-process model (:class:`mbrl.dynamics.gp.GaussianProcessModel`)."""

    kernel: str = "rbf"
    """rbf (ARD squared exponential) or matern (ARD Matern 5/2)."""
    max_exact_points: int = 2000
    """Largest number of transitions fitted by the exact GP; SGPR above."""
    inducing_points: int = 128
    """Inducing points of the sparse GP (k-means initialised)."""
    iterations: int = 100
    """Marginal-likelihood optimiser iterations per fit."""
    optimizer: str = "adam"
    """adam or lbfgs."""
    lr: float = 0.1
    """Optimiser step size."""
    val_fraction: float = 0.0
    """Held-out share for a validation NLL per iteration (0: none, all data used)."""
    love_rank: int = 100
    """Rank of the LOVE predictive-variance cache of the exact GP."""
    propagation: str = "expectation"
    """expectation (GP mean, no sampling) or sample (one Gaussian draw per particle and step)."""


@dataclass
class ILQRConfig:
    """iLQR on the GP mean dynamics (used when ``planner_kind=ilqr``)."""

    max_iterations: int = 20
    """iLQR iterations per plan."""


@dataclass
class Config:
    """GP-MPC. The defaults are the pendulum benchmark: 1 random + 2 MPC episodes."""

    env: str = "pendulum"
    """Registry name of the env (``mbrl envs`` lists them)."""
    seed: int = 0
    """Seeds the env resets, the GP fit, the planner and the random episodes."""
    trials: int = 2
    """MPC episodes after the random ones."""
    random_episodes: int = 1
    """Episodes with uniform random actions before the first trial."""
    horizon: int = 20
    """Planning horizon H."""
    particles: int = 1
    """Particles P per candidate (1 for propagation=expectation)."""
    replan_every: int = 1
    """Plan every k env steps."""
    buffer_capacity: int = 100_000
    """Most real transitions kept (the GP switches to SGPR above max_exact_points)."""
    stop_when_solved: int = 0
    """Stop after this many consecutive solved trials (0: run every trial)."""
    planner_kind: str = "sampling"
    """sampling (the planner section: cem, icem or random) or ilqr (on the GP mean)."""
    model: GPConfig = field(default_factory=GPConfig)
    planner: PlannerConfig = field(
        default_factory=lambda: PlannerConfig(population=200, iterations=3)
    )
    ilqr: ILQRConfig = field(default_factory=ILQRConfig)


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


def build_planner(cfg: Config) -> Planner:
    """The sampling planner of ``cfg.planner``, or iLQR when ``planner_kind=ilqr``."""
    if cfg.planner_kind == "sampling":
        return make_planner(cfg.planner)
    if cfg.planner_kind == "ilqr":
        from mbrl.planners.ilqr import ILQR

        return ILQR(max_iterations=cfg.ilqr.max_iterations)
    raise ValueError(f"unknown planner_kind {cfg.planner_kind!r}; valid: sampling, ilqr")


def train(cfg: Config, run: Run, device: str = "cpu") -> Summary:
    """Run (or resume) GP-MPC as configured, logging to ``run``; returns the summary."""
    dev = resolve_device(device)
    spec = envs.make(cfg.env)
    env = spec.make()
    model = build_model(cfg, spec, dev)
    planner = build_planner(cfg)
    buffer = ReplayBuffer(spec.obs_dim, spec.act_dim, cfg.buffer_capacity, device=dev)
    gen = torch.Generator(device=dev).manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    low, high = spec.action_bounds(dev)
    problem = PlanningProblem(
        model, spec.reward_fn, spec.termination_fn, cfg.horizon, low, high, cfg.particles, gen
    )
    controller = MPCController(planner, problem, cfg.replan_every, dev)

    trial, episodes, wall, returns, streak = 0, 0, 0.0, [], 0
    state = run.load_checkpoint()
    if state is not None:
        if state["model"]:
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
                "model": model.state_dict() if model.diagnostics is not None else {},
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

    if trial == 0 and episodes < cfg.random_episodes:
        random_policy = RandomPolicy(spec.action_low, spec.action_high, rng)
        while episodes < cfg.random_episodes:
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
                sparse=0,
                jitter=0.0,
                plan_seconds_per_step=0.0,
                nonfinite=0,
                wall_seconds=wall,
            )
            tqdm.write(f"random episode {episodes}: return {ep.ret:.1f} ({len(ep)} steps)")
        checkpoint()

    while trial < cfg.trials and not (cfg.stop_when_solved and streak >= cfg.stop_when_solved):
        start = time.perf_counter()
        report = model.fit(buffer.all(), generator=gen)
        diag = model.diagnostics
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
            sparse=int(diag.sparse),
            jitter=diag.jitter,
            plan_seconds_per_step=stats.plan_seconds / max(stats.plans, 1),
            nonfinite=stats.nonfinite,
            wall_seconds=wall,
        )
        tqdm.write(
            f"trial {trial}: return {ep.ret:.1f} ({len(ep)} steps), GP "
            f"{'SGPR' if diag.sparse else 'exact'} on {diag.num_points} points, NLL "
            f"{report.final_train_loss:.3f}, fit {report.seconds:.1f} s, "
            f"{stats.plan_seconds / max(stats.plans, 1):.3f} s/plan"
            + (f", {stats.nonfinite} non-finite candidates" if stats.nonfinite else "")
        )
        checkpoint()

    learning_curve(
        [(f"GP-MPC seed {cfg.seed}", run.metrics_path)],
        run.path / "learning_curve.png",
        title=f"GP-MPC on {cfg.env}",
        target=spec.solved_return,
    )
    return Summary.from_returns(returns, spec.solved_return, wall)


def _episode_seed(seed: int, episode: int) -> int:
    return seed * 100_003 + episode
