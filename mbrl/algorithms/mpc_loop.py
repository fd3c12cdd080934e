"""The learning loop shared by the model-based MPC algorithms (PETS, GP-MPC).

    collect random episodes until ``seed_steps`` transitions and ``random_episodes``
    episodes are stored
    for trial = 1 .. trials:
        fit the model on every stored transition
        run one episode with the MPC controller (planner over the model's rollouts)
        store the episode's transitions

After each trial the run logs one row of ``metrics.csv`` and writes a checkpoint holding
everything needed to continue exactly: buffer, model (with its optimizer and RNG state), the
RNG streams, the counters. A killed run resumes from its last checkpoint with nothing lost;
episode ``i`` of a run resets its env with a seed derived from the run seed and ``i``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from tqdm import tqdm

from mbrl import envs
from mbrl.algorithms import loop
from mbrl.algorithms.common import Summary, progress_bar, resolve_device
from mbrl.algorithms.factory import check_env, config_fit
from mbrl.buffer import ReplayBuffer
from mbrl.config import ConfigError, Count, Natural, Seed, check_ranges
from mbrl.control import MPCController, RandomPolicy, run_episode
from mbrl.dynamics.base import DynamicsModel, FitReport
from mbrl.planners import PlanningProblem
from mbrl.planners.base import Planner
from mbrl.runs import Run

FitMetrics = Callable[[FitReport], Mapping[str, float]]
"""Extra metric columns of a model after a fit (say, the GP's jitter)."""


@dataclass
class MPCRunConfig:
    """What every model-based MPC algorithm's config holds (PETS, GP-MPC add model and planner
    sections and their own defaults)."""

    env: str = "cartpole-balance"
    """Registry name of the env (``mbrl envs`` lists them)."""
    seed: Seed = 0
    """Seeds the env resets, the model, the planner and the random episodes."""
    trials: Natural = 5
    """MPC episodes after the random ones (at most; see stop_when_solved; 0 collects the random
    data only)."""
    seed_steps: Natural = 0
    """Random-action transitions collected before the first trial (at most buffer_capacity)."""
    random_episodes: Natural = 1
    """Random-action episodes collected before the first trial (both minimums must be met, and
    one of them must be > 0: the first fit needs data)."""
    horizon: Count = 15
    """Planning horizon H."""
    particles: Count = 1
    """Particles P per candidate."""
    replan_every: Count = 1
    """Plan every k env steps (k <= horizon: a plan holds H actions)."""
    buffer_capacity: Count = 1_000_000
    """Most real transitions kept."""
    stop_when_solved: Natural = 0
    """Stop after this many consecutive solved trials (0: run every trial)."""

    def __post_init__(self) -> None:
        check_ranges(self)
        check_env(self.env)
        if self.seed_steps == 0 and self.random_episodes == 0:
            raise ConfigError(
                "seed_steps=0 and random_episodes=0 leave the first model fit without data; "
                "set seed_steps or random_episodes >= 1"
            )
        if self.seed_steps > self.buffer_capacity:
            raise ConfigError(
                f"seed_steps={self.seed_steps} exceeds buffer_capacity={self.buffer_capacity}, "
                "so the random phase would never end; lower seed_steps or raise buffer_capacity"
            )
        if self.replan_every > self.horizon:
            raise ConfigError(
                f"replan_every={self.replan_every} exceeds horizon={self.horizon}: a plan holds "
                "H actions; lower replan_every or raise horizon"
            )


def train_mpc(
    run: Run,
    cfg: MPCRunConfig,
    model: DynamicsModel,
    planner: Planner,
    *,
    label: str,
    fit_generator: Literal["model", "run"] = "model",
    fit_metrics: FitMetrics | None = None,
    extra_columns: Sequence[str] = (),
    device: torch.device | str = "cpu",
) -> Summary:
    """Run (or resume from ``run``'s checkpoint) the loop above; returns the summary.

    Args:
        cfg: the run's loop settings (env, seed, trials, random data, horizon, particles, ...).
        model: any dynamics model with ``state_dict``/``load_state_dict`` (checkpointed once
            fitted), fitted by ``model.fit(data, generator)``.
        planner: any planner; it plans on ``model`` through one :class:`PlanningProblem`.
        label: the algorithm's name in logs and plots.
        fit_generator: which generator draws the fit's splits and initialisations: the
            model's own (``"model"``: ``generator=None``) or the run's, shared with the
            planner (``"run"``).
        fit_metrics, extra_columns: extra per-trial metrics and their column names.
    """
    dev = resolve_device(device)
    spec = envs.make(cfg.env)
    seed, trials = cfg.seed, cfg.trials
    env = spec.make()
    buffer = ReplayBuffer(spec.obs_dim, spec.act_dim, cfg.buffer_capacity, device=dev)
    gen = torch.Generator(device=dev).manual_seed(seed)
    rng = np.random.default_rng(seed)
    fit_gen = gen if fit_generator == "run" else None
    problem = planning_problem(spec, model, cfg.horizon, cfg.particles, gen, dev)
    env_action = spec.env_action if spec.discrete else None  # action vector -> index
    controller = MPCController(planner, problem, cfg.replan_every, dev)
    generators = {"planning": gen}

    resumed = loop.resume(run, {"buffer": buffer, "model": model}, generators, rng)
    c = resumed if resumed is not None else loop.Counters()
    trial, episodes, returns, streak = c.trial, c.episodes, list(c.returns), c.streak
    watch = loop.Stopwatch((), c.wall_seconds)
    if resumed is not None:
        loop.resumed_message(run, f"after trial {trial}", len(buffer))

    def checkpoint() -> None:
        parts = {"buffer": buffer, **({"model": model} if trial > 0 else {})}  # fitted only
        counters = loop.Counters(
            episodes=episodes,
            trial=trial,
            streak=streak,
            wall_seconds=watch.wall_seconds,
            returns=tuple(returns),
        )
        loop.save(run, loop.checkpoint_of(counters, parts, generators, rng))
        loop.stop_if_requested(run)  # a Ctrl-C since the last checkpoint stops the run here

    def log(ep, report: FitReport | None, plan_seconds: float, nonfinite: int) -> None:
        extra = dict(fit_metrics(report)) if report is not None and fit_metrics else {}
        run.log(
            trial=trial,
            env_steps=len(buffer),
            **{"return": ep.ret},
            length=len(ep),
            train_loss=report.final_train_loss if report else "",
            val_loss=report.best_val_loss if report else "",
            fit_seconds=report.seconds if report else 0.0,
            plan_seconds_per_step=plan_seconds,
            nonfinite=nonfinite,
            wall_seconds=watch.wall_seconds,
            **run.checkpoint_columns(),  # of the checkpoint before this row
            **{c: extra.get(c, "") for c in extra_columns},
        )

    def more_random() -> bool:
        return len(buffer) < cfg.seed_steps or episodes < cfg.random_episodes

    if trial == 0 and more_random():
        random_policy = (
            RandomChoice(spec.action_values, rng)
            if spec.discrete
            else RandomPolicy(spec.action_low, spec.action_high, rng)
        )
        while more_random():
            watch.start()
            ep = run_episode(
                env, random_policy, seed=episode_seed(seed, episodes), env_action=env_action
            )
            buffer.add_episode(ep)
            episodes += 1
            watch.lap()
            log(ep, None, 0.0, 0)
        tqdm.write(f"random actions: {episodes} episodes, {len(buffer)} transitions")
        checkpoint()

    stop = cfg.stop_when_solved
    while trial < trials and not (stop and streak >= stop):
        watch.start()
        with config_fit(cfg, "model"):
            report = model.fit(buffer.all(), fit_gen)
        controller.reset_stats()
        with progress_bar(spec.max_episode_steps, f"trial {trial + 1}/{trials}") as bar:
            ep = run_episode(
                env,
                controller,
                seed=episode_seed(seed, episodes),
                on_step=lambda t, r: bar.update(1),
                env_action=env_action,
            )
        buffer.add_episode(ep)
        trial += 1
        episodes += 1
        watch.lap()
        returns.append(ep.ret)
        solved = spec.solved_return is not None and ep.ret >= spec.solved_return
        streak = streak + 1 if solved else 0
        stats = controller.stats
        plan_seconds = stats.plan_seconds / max(stats.plans, 1)
        log(ep, report, plan_seconds, stats.nonfinite)
        tqdm.write(
            f"trial {trial}: return {ep.ret:.1f} ({len(ep)} steps), model loss "
            f"{report.final_train_loss:.4f}"
            + (f" (held-out {report.best_val_loss:.4f})" if report.val_loss else "")
            + f", fit {report.seconds:.1f} s, {plan_seconds:.3f} s/plan"
            + (f", {stats.nonfinite} non-finite candidates" if stats.nonfinite else "")
            + (f", {stats.not_ok} plans not ok" if stats.not_ok else "")
        )
        checkpoint()

    counters = loop.Counters(wall_seconds=watch.wall_seconds, returns=tuple(returns))
    return loop.finish(run, label, seed, spec.name, spec.solved_return, counters, unit="trial")


class RandomChoice:
    """Uniformly random rows of a discrete env's ``action_values [A, U]``, from an explicit
    numpy generator: the random episodes of a discrete env."""

    def __init__(self, values: np.ndarray, rng: np.random.Generator) -> None:
        self.values, self.rng = np.asarray(values, dtype=np.float32), rng

    def reset(self) -> None:
        pass

    def act(self, obs: np.ndarray) -> np.ndarray:
        return self.values[self.rng.integers(len(self.values))]


def episode_seed(seed: int, episode: int) -> int:
    """The env reset seed of episode ``episode`` of a run seeded ``seed``."""
    return seed * 100_003 + episode


def planning_problem(
    spec: envs.EnvSpec,
    model: DynamicsModel,
    horizon: int,
    particles: int,
    generator: torch.Generator,
    device: torch.device,
    value_fn: Callable | None = None,
) -> PlanningProblem:
    """The planning problem of an MPC run on ``spec``: its reward, termination and action box,
    and the action values ``[A, U]`` of a discrete env."""
    low, high = spec.action_bounds(device)
    values = spec.discrete_actions(device) if spec.discrete else None
    return PlanningProblem(
        model,
        spec.reward_fn,
        spec.termination_fn,
        horizon,
        low,
        high,
        particles,
        generator,
        value_fn=value_fn,
        action_values=values,
    )
