"""What the Dyna-style runs share at the edge: their configs (checked when they load) and
:class:`DynaRun`, the real-env side and bookkeeping of a run.

The algorithms differ only where the model is used, each in its own loop over
:mod:`mbrl.imagination`: real data only (SAC, TD3, DDPG, NAF: :func:`train_model_free`),
branched rollouts into a model buffer (MBPO, MBA), value-expansion targets (MVE).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Annotated, ClassVar, Literal

import gymnasium as gym
import numpy as np
import torch
from tqdm import tqdm

from mbrl import envs
from mbrl.algorithms import loop
from mbrl.algorithms.common import Summary, progress_bar, resolve_device
from mbrl.algorithms.factory import (
    EnsembleConfig,
    LearnerConfig,
    check_env,
    config_fit,
    make_ensemble,
    make_learner,
)
from mbrl.buffer import ReplayBuffer
from mbrl.config import (
    ConfigError,
    Count,
    Natural,
    Positive,
    ProperFraction,
    Range,
    Seed,
    check_ranges,
)
from mbrl.control.mpc import run_episode
from mbrl.dynamics.base import DynamicsModel
from mbrl.imagination import (
    ActFn,
    ImaginedPolicy,
    ModelBuffer,
    NonFiniteModelError,
    RolloutLengths,
    branched_rollout,
    mixed_batch,
    model_buffer_capacity,
    schedule,
    uniform_actions,
)
from mbrl.learners import Learner
from mbrl.planners.base import PlanningProblem
from mbrl.runs import Run

LEARNERS = ("sac", "td3", "ddpg", "naf")
DYNA_PROPAGATIONS = ("ts1", "expectation")


class DivergenceError(RuntimeError):
    """A learner's loss became non-finite or its Q-values exceeded the allowed scale."""


# ----------------------------------------------------------------------------- configs


@dataclass
class DynaConfig:
    """What every Dyna-style run needs: env, budget, learner, schedule."""

    label: ClassVar[str] = "Dyna"  # the algorithm's name in logs, plots and errors
    learners: ClassVar[tuple[str, ...]] = LEARNERS  # learner names the algorithm runs

    env: str = "pendulum"
    """Registry name of the env (``mbrl envs`` lists them)."""
    seed: Seed = 0
    """Seeds networks, model, env resets, random actions and batch sampling."""
    total_steps: Count = 10_000
    """Env steps of the whole run."""
    epoch_length: Count = 1000
    """Env steps per epoch: one evaluation, metrics row and checkpoint per epoch."""
    start_steps: Natural = 1000
    """Uniform random actions before the learner acts (and before any update); fewer than
    total_steps."""
    updates_per_step: Count = 1
    """G, learner updates per env step."""
    buffer_capacity: Count = 1_000_000
    """Most real transitions kept."""
    eval_episodes: Count = 5
    """Deterministic-policy episodes at the end of each epoch."""
    q_limit: Positive = 1e6
    """Stop with an error when |Q| exceeds this (a diverging critic)."""
    ignore_positions: bool = True
    """Learner and model do not read the env's position features (``EnvSpec.position_obs``:
    HalfCheetah's and Hopper's x, in the observation only for the reward), as in the SAC and
    MBPO papers' observations; the model still predicts their change."""
    learner: LearnerConfig = field(default_factory=LearnerConfig)

    def __post_init__(self) -> None:
        check_ranges(self)
        check_env(self.env)
        if self.learner.name not in self.learners:
            raise ConfigError(
                f"{self.label} does not run learner.name={self.learner.name!r}; valid: "
                f"{', '.join(self.learners)}"
            )
        if self.start_steps >= self.total_steps:
            raise ConfigError(
                f"start_steps={self.start_steps} is not below total_steps={self.total_steps}, "
                "so the learner would never act or update; lower start_steps or raise total_steps"
            )


def dyna_ensemble(**changes) -> EnsembleConfig:
    """The ensemble of the Dyna runs (MBPO Appendix C), with ``changes``."""
    return EnsembleConfig(**changes)


@dataclass
class ModelBasedConfig(DynaConfig):
    """A Dyna-style run with a learned model."""

    model: EnsembleConfig = field(default_factory=dyna_ensemble)
    """The ensemble; ``model.train_every`` is the refit period in env steps."""

    def __post_init__(self) -> None:
        super().__post_init__()
        m = self.model
        m.check("model")
        if m.propagation not in DYNA_PROPAGATIONS:
            raise ConfigError(
                f"model.propagation={m.propagation!r} is not offered for Dyna rollouts, which "
                f"start one rollout per state; valid: {', '.join(DYNA_PROPAGATIONS)}"
            )
        rows = int(min(self.start_steps, self.buffer_capacity) * (1 - m.val_fraction))
        if rows < m.batch_size:
            kept = (
                f", buffer_capacity={self.buffer_capacity}"
                if self.buffer_capacity < self.start_steps
                else ""
            )
            raise ConfigError(
                f"the first model fit (after start_steps={self.start_steps}{kept}, "
                f"model.val_fraction={m.val_fraction:g} held out) has about {rows} training "
                f"rows, fewer than model.batch_size={m.batch_size}; raise start_steps or lower "
                "model.batch_size"
            )


_EVERY = "branch every n >= 1 env steps, or leave it unset (null) to branch after each model fit"


@dataclass
class BranchConfig:
    """Branched rollouts into the model buffer (MBPO, MBA)."""

    rollout_batch_size: Count = 100_000
    """Rollouts started at each branching (MBPO: 400 per env step x 250)."""
    rollout_every: Annotated[int, Range(1, fix=_EVERY)] | None = None
    """Env steps between branchings; None branches once after each model fit
    (``model.train_every``). Branching more often keeps the imagined actions close to the
    current policy (MBPO's Algorithm 2 branches at every env step)."""
    min_epoch: Natural = 20
    """Rollout length is min_length up to this epoch ..."""
    max_epoch: Natural = 100
    """... and grows linearly to max_length at this epoch."""
    min_length: Count = 1
    """Shortest rollout length k."""
    max_length: Count = 1
    """Longest rollout length k."""
    retain_epochs: Count = 1
    """Epochs of rollouts the model buffer keeps."""
    real_ratio: ProperFraction = 0.05
    """Share of real transitions in each learner batch (below 1: all-real batches would make
    the run its model-free learner)."""
    policy: Literal["explore", "uniform"] = "explore"
    """Actions of the imagined steps: ``explore``, the learner's exploration policy (MBPO);
    ``uniform``, uniform in the action box, imagined transitions off the policy everywhere."""
    stop_after: Natural | None = None
    """Env steps after which imagination stops: no more model fits or branchings, and learner
    batches are all real. Imagination is there to speed up learning while real data is scarce;
    later the model's errors can only cost a learner with enough real data. None imagines to
    the end of the run."""

    @property
    def lengths(self) -> RolloutLengths:
        return RolloutLengths(self.min_epoch, self.max_epoch, self.min_length, self.max_length)


@dataclass
class BranchingConfig(ModelBasedConfig):
    """A Dyna-style run that branches rollouts into a model buffer (MBPO, MBA)."""

    branch: BranchConfig = field(default_factory=BranchConfig)

    def __post_init__(self) -> None:
        super().__post_init__()
        b = self.branch
        n, real = self.learner.batch_size, round(self.learner.batch_size * b.real_ratio)
        if real == n or (real == 0 and b.real_ratio > 0):
            what = "no imagined" if real == n else "no real"
            raise ConfigError(
                f"branch.real_ratio={b.real_ratio:g} of learner.batch_size={n} leaves {what} "
                "transition in a learner batch; change either (real_ratio=0 is all imagined)"
            )
        if b.stop_after is not None and b.stop_after <= self.start_steps:
            raise ConfigError(
                f"branch.stop_after={b.stop_after} is not after start_steps={self.start_steps}, "
                "so nothing would be imagined; raise it, or run the model-free learner"
            )

    @property
    def rollout_every(self) -> int:
        """Env steps between branchings (``branch.rollout_every``, else ``model.train_every``)."""
        return self.branch.rollout_every or self.model.train_every


@dataclass
class MVEConfig:
    """Model-based value expansion (MVE)."""

    horizon: Count = 10
    """H, imagined steps in each value-expansion target."""
    explore: bool = False
    """Imagine under the exploration policy (the learner's action noise) instead of the
    deterministic one, so the critic also sees actions off the policy at imagined states."""
    target_policy: bool = False
    """Imagine under the learner's target policy ``pi'``, the one the bootstrap ``V'(s_{H+1})``
    evaluates, instead of the online policy, so the whole target follows one slowly moving
    policy (excludes ``explore``)."""
    td_k: bool = True
    """Train the critic on every state of the imagined trajectory (the paper's TD-k trick);
    false trains it on the real transition only, towards its ``(H + 1)``-step target."""


def imagined_policy(cfg: MVEConfig) -> ImaginedPolicy:
    """The :func:`~mbrl.imagination.value_expansion_batch` policy that ``cfg``'s flags name.

    Raises:
        ConfigError: both ``explore`` and ``target_policy`` set.
    """
    if cfg.explore and cfg.target_policy:
        raise ConfigError(
            "mve.explore and mve.target_policy both set: imagination follows one policy; "
            "set one of them to false"
        )
    return "explore" if cfg.explore else "target" if cfg.target_policy else "greedy"


# ----------------------------------------------------------------------------- the run


def check_learner_stats(
    stats: dict[str, float], q_limit: float, learner: LearnerConfig | None = None
) -> None:
    """Raise :class:`DivergenceError` if a statistic of one update is NaN/inf (but a NaN
    ``actor_loss``: TD3 reports NaN before its first delayed actor update) or ``q_abs_max >
    q_limit`` (a diverging critic). The message names the config keys to change, with their
    values when ``learner`` (the run's ``learner`` section) is given."""
    q = stats.get("q_abs_max", 0.0)
    bad = {k: v for k, v in stats.items() if not math.isfinite(v)}
    if math.isnan(bad.get("actor_loss", 0.0)):
        del bad["actor_loss"]  # TD3 before its first delayed actor update
    if bad or q > q_limit:
        shown = {"q_loss": stats.get("q_loss", 0.0), "q_abs_max": q, **bad}
        values = ", ".join(f"{k}={v:.3g}" for k, v in shown.items())
        lr = f" (now {learner.lr:g})" if learner else ""
        tau = f" (now {learner.tau:g})" if learner else ""
        raise DivergenceError(
            f"the learner diverged: {values} (q_limit={q_limit:g}); lower learner.lr{lr}, slow "
            f"the target networks (smaller learner.tau{tau}), or shorten model rollouts"
        )


class LearnerPolicy:
    """A learner as an env policy (``mbrl.control.Policy``): numpy ``[X]`` in, ``[U]`` out."""

    def __init__(
        self, learner: Learner, deterministic: bool, generator: torch.Generator | None = None
    ) -> None:
        self.learner, self.deterministic, self.generator = learner, deterministic, generator

    def reset(self) -> None:
        pass

    def act(self, obs: np.ndarray) -> np.ndarray:
        a = self.learner.act(obs, deterministic=self.deterministic, generator=self.generator)
        return a.cpu().numpy().astype(np.float32)


def evaluate(env: gym.Env, learner: Learner, episodes: int, seed: int) -> list[float]:
    """Returns of ``episodes`` episodes of the deterministic policy, env reset seeds
    ``seed, seed + 1, ...``."""
    policy = LearnerPolicy(learner, deterministic=True)
    return [run_episode(env, policy, seed=seed + i).ret for i in range(episodes)]


STAT_COLUMNS = ("q_loss", "actor_loss", "q_mean", "q_abs_max", "alpha", "entropy", "v_mean")


class DynaRun:
    """The real-env side and the bookkeeping of one Dyna-style run, for its algorithm's loop.

    Builds the env (and an evaluation twin), the learner, the real buffer ``D_env``, the
    batch/rollout generator :attr:`gen` (seed + 2), the exploration generator (seed + 3) and
    the numpy generator of the random actions (seed). :meth:`resume` restores them and the
    algorithm's own parts (model, model buffer) from the run's last checkpoint.

    A resumed run starts a fresh env episode (a simulator's internal state is not saved). A
    non-finite model rollout or a diverging critic inside :meth:`running` saves a checkpoint
    and stops the run with its error.
    """

    def __init__(self, cfg: DynaConfig, run: Run, device: str | torch.device) -> None:
        self.cfg, self.run, self.label = cfg, run, cfg.label
        self.device = dev = resolve_device(device)
        self.spec = spec = envs.make(cfg.env)
        self.env, self.eval_env = spec.make(), spec.make()
        self.hidden: Sequence[int] = spec.position_obs if cfg.ignore_positions else ()
        self.learner = make_learner(cfg.learner, spec, dev, cfg.seed, self.hidden)
        self.buffer = ReplayBuffer(spec.obs_dim, spec.act_dim, cfg.buffer_capacity, dev)
        self.gen = torch.Generator(device=dev).manual_seed(cfg.seed + 2)  # batches, rollouts
        self.act_gen = torch.Generator(device=dev).manual_seed(cfg.seed + 3)  # env exploration
        self.rng = np.random.default_rng(cfg.seed)  # uniform random actions
        self.explore = LearnerPolicy(self.learner, deterministic=False, generator=self.act_gen)
        self.parts: dict[str, loop.Stateful] = {"learner": self.learner, "buffer": self.buffer}
        self.env_steps, self.episodes, self.evals = 0, 0, []
        self.rollout_length, self.fit_train, self.fit_val = 0, math.nan, math.nan
        self.watch = loop.Stopwatch(("fit", "rollout", "update"))
        self.stats: dict[str, list[float]] = {}
        self.train_returns: list[float] = []

    def problem(self, model: DynamicsModel, horizon: int) -> PlanningProblem:
        """The one-particle problem the imagined steps take, drawing from :attr:`gen`."""
        low, high = self.spec.action_bounds(self.device)
        s = self.spec
        return PlanningProblem(
            model, s.reward_fn, s.termination_fn, max(1, horizon), low, high, 1, self.gen
        )

    def imagined_actions(self, policy: Literal["explore", "uniform"]) -> ActFn:
        """The policy of branched rollouts: the learner's exploration policy (noise from
        :attr:`gen`) or actions uniform in the action box (from :attr:`gen`)."""
        if policy == "uniform":
            return uniform_actions(*self.spec.action_bounds(self.device), self.gen)
        return lambda obs: self.learner.act(obs, deterministic=False, generator=self.gen)

    def resume(self, **parts: loop.Stateful) -> None:
        """Add the algorithm's ``parts`` to the checkpoint and restore everything from the
        run's last checkpoint, if there is one."""
        self.parts.update(parts)
        c = loop.resume(self.run, self.parts, self._generators(), self.rng)
        if c is not None:
            self.env_steps, self.episodes, self.evals = c.env_steps, c.episodes, list(c.returns)
            self.rollout_length, self.fit_train, self.fit_val = (
                c.rollout_length, c.fit_train_loss, c.fit_val_loss
            )  # fmt: skip
            self.watch.wall_seconds = c.wall_seconds
            loop.resumed_message(self.run, f"at env step {self.env_steps}", len(self.buffer))

    def _generators(self) -> dict[str, torch.Generator]:
        return {"batches": self.gen, "exploration": self.act_gen}

    def checkpoint(self) -> None:
        counters = loop.Counters(
            env_steps=self.env_steps,
            episodes=self.episodes,
            wall_seconds=self.watch.wall_seconds,
            returns=tuple(self.evals),
            rollout_length=self.rollout_length,
            fit_train_loss=self.fit_train,
            fit_val_loss=self.fit_val,
        )
        loop.save(self.run, loop.checkpoint_of(counters, self.parts, self._generators(), self.rng))

    @contextmanager
    def running(self) -> Iterator[None]:
        """Around the loop: a fresh episode, the progress bar, the stop on a model or learner
        error (checkpoint first)."""
        self._obs, _ = self.env.reset(seed=_episode_seed(self.cfg.seed, self.episodes))
        self._ep_ret = 0.0
        self.watch.start()
        self._bar = progress_bar(self.cfg.total_steps, self.label)
        self._bar.update(self.env_steps)
        try:
            yield
        except (NonFiniteModelError, DivergenceError) as e:
            self.watch.lap()
            self.checkpoint()
            tqdm.write(f"{self.label} stopped at env step {self.env_steps}: {e} (checkpoint saved)")
            raise
        finally:
            self._bar.close()

    def act_in_env(self) -> None:
        """One real env step (uniform random actions for the first ``start_steps``, then the
        learner's exploration policy), stored in :attr:`buffer`."""
        if self.env_steps < self.cfg.start_steps:
            act = self.rng.uniform(self.spec.action_low, self.spec.action_high).astype(np.float32)
        else:
            act = self.explore.act(np.asarray(self._obs, dtype=np.float32))
        next_obs, reward, terminated, truncated, _ = self.env.step(act)
        self.buffer.add(self._obs, act, float(reward), next_obs, bool(terminated))
        self._ep_ret += float(reward)
        self._obs = next_obs
        self.env_steps += 1
        self._bar.update(1)
        if terminated or truncated:
            self.train_returns.append(self._ep_ret)
            self.episodes += 1
            self._obs, _ = self.env.reset(seed=_episode_seed(self.cfg.seed, self.episodes))
            self._ep_ret = 0.0

    def fit(self, model: DynamicsModel) -> None:
        """Refit ``model`` on every real transition (its own generator draws the splits)."""
        with self.watch("fit"), config_fit(self.cfg, "model"):
            report = model.fit(self.buffer.all(), None)  # the model's own generator
        self.fit_train, self.fit_val = report.final_train_loss, report.best_val_loss

    def record(self, stats: dict[str, float]) -> None:
        """Check one learner update's statistics (:func:`check_learner_stats`), keep them."""
        check_learner_stats(stats, self.cfg.q_limit, self.cfg.learner)
        for k, v in stats.items():
            self.stats.setdefault(k, []).append(v)

    @property
    def epoch_done(self) -> bool:
        return self.env_steps % self.cfg.epoch_length == 0 or self.env_steps == self.cfg.total_steps

    def end_epoch(self, model_buffer: int | str = "", mve_horizon: int | str = "") -> None:
        """Evaluate the deterministic policy, log the epoch's row, checkpoint (and stop there
        when the run was asked to: :func:`~mbrl.algorithms.loop.stop_if_requested`)."""
        cfg = self.cfg
        seed = 10**9 + cfg.seed * 100_003 + self.env_steps
        ret = evaluate(self.eval_env, self.learner, cfg.eval_episodes, seed)
        self.evals.append(float(np.mean(ret)) if ret else math.nan)
        wall = self.watch.lap()
        branching = model_buffer != ""
        row = {
            "epoch": math.ceil(self.env_steps / cfg.epoch_length),
            "env_steps": self.env_steps,
            "return": self.evals[-1],
            "return_std": float(np.std(ret)) if ret else math.nan,
            "train_return": float(np.mean(self.train_returns)) if self.train_returns else "",
            "episodes": self.episodes,
            "updates": len(self.stats.get("q_loss", [])),
            **_stat_cols(self.stats),
            "model_train_loss": self.fit_train,
            "model_val_loss": self.fit_val,
            "rollout_length": self.rollout_length if branching else "",
            "model_buffer": model_buffer,
            "mve_horizon": mve_horizon,
            "fit_seconds": self.watch.seconds["fit"],
            "rollout_seconds": self.watch.seconds["rollout"],
            "update_seconds": self.watch.seconds["update"],
            "wall_seconds": wall,
            **self.run.checkpoint_columns(),  # of the checkpoint before this row
        }
        self.run.log(**row)
        modelled = "model" in self.parts
        tqdm.write(
            f"{self.label} step {self.env_steps}: eval return {self.evals[-1]:.1f}"
            + (f", train return {np.mean(self.train_returns):.1f}" if self.train_returns else "")
            + (f", q_loss {np.mean(self.stats['q_loss']):.3g}" if self.stats.get("q_loss") else "")
            + (f", model val {self.fit_val:.3g}" if modelled else "")
            + (f", k={self.rollout_length}" if branching else "")
        )
        self.stats, self.train_returns = {}, []
        self.watch.reset()
        self.checkpoint()
        loop.stop_if_requested(self.run)  # a Ctrl-C since the last checkpoint stops the run here

    def summary(self) -> Summary:
        counters = loop.Counters(wall_seconds=self.watch.wall_seconds, returns=tuple(self.evals))
        return loop.finish(
            self.run, self.label, self.cfg.seed, self.cfg.env, self.spec.solved_return, counters,
            unit="evaluation",
        )  # fmt: skip


def _stat_cols(stats: dict[str, list[float]]) -> dict[str, float | str]:
    """The epoch mean of every learner statistic column over its finite values; empty for the
    ones this learner does not report or that had none (the csv keeps one set of columns)."""
    out: dict[str, float | str] = {}
    for k in STAT_COLUMNS:
        v = [x for x in stats.get(k, []) if math.isfinite(x)]
        out[k] = float(np.mean(v)) if v else ""
    return out


def _episode_seed(seed: int, episode: int) -> int:
    return seed * 100_003 + episode


def train_model_free(cfg: DynaConfig, run: Run, device: str | torch.device = "cpu") -> Summary:
    """A model-free learner on real transitions only (SAC, TD3, DDPG, NAF)::

    for each env step:
        act (uniform random for the first start_steps steps), store the transition
        G times (from start_steps on): update the learner on a real batch
    each epoch: evaluate the deterministic policy, log, checkpoint
    """
    d = DynaRun(cfg, run, device)
    d.resume()
    with d.running():
        while d.env_steps < cfg.total_steps:
            d.act_in_env()
            if d.env_steps >= cfg.start_steps:
                with d.watch("update"):
                    for _ in range(cfg.updates_per_step):
                        batch = d.buffer.sample(cfg.learner.batch_size, d.gen)
                        d.record(d.learner.update(batch))
            if d.epoch_done:
                d.end_epoch()
    return d.summary()


def train_branching(cfg: BranchingConfig, run: Run, device: str | torch.device = "cpu") -> Summary:
    """The loop MBPO and MBA share (see their ``train`` docstrings for the algorithm boxes):
    real env steps into D_env, the ensemble fitted on it, branched rollouts of ``k`` model
    steps from real states into the model buffer, and ``G`` learner updates a step on batches
    mixing the two; MBA's imagination rollouts are MBPO's branched rollouts with NAF as the
    learner."""
    d = DynaRun(cfg, run, device)
    b, x_dim, u_dim = cfg.branch, d.spec.obs_dim, d.spec.act_dim
    model = make_ensemble(cfg.model, d.spec, d.device, cfg.seed + 1, d.hidden)
    model_buffer = ModelBuffer(x_dim, u_dim, 1, d.device)  # D_model
    problem = d.problem(model, b.max_length)
    policy = d.imagined_actions(b.policy)
    d.resume(model=model, model_buffer=model_buffer)
    with d.running():
        while d.env_steps < cfg.total_steps:
            d.act_in_env()
            s = schedule(
                d.env_steps, cfg.start_steps, cfg.epoch_length, cfg.model.train_every,
                cfg.rollout_every, b.lengths, b.stop_after,
            )  # fmt: skip
            if s.fit:
                d.fit(model)
            if s.branch:
                with d.watch("rollout"):
                    size = model_buffer_capacity(
                        b.rollout_batch_size, s.k, cfg.epoch_length, cfg.rollout_every,
                        b.retain_epochs,
                    )  # fmt: skip
                    model_buffer.resize(size)
                    starts = d.buffer.sample(b.rollout_batch_size, d.gen).obs  # [B, X]
                    model_buffer.add(branched_rollout(problem, policy, starts, s.k).transitions)
                d.rollout_length = s.k
            if not s.imagining:
                d.rollout_length = 0
            if s.update:
                imagined = model_buffer if s.imagining else None
                with d.watch("update"):
                    for _ in range(cfg.updates_per_step):
                        batch = mixed_batch(
                            d.buffer, imagined, cfg.learner.batch_size, b.real_ratio, d.gen
                        )
                        d.record(d.learner.update(batch))
            if d.epoch_done:
                d.end_epoch(model_buffer=len(model_buffer))
    return d.summary()
