"""PlaNet: a recurrent state-space model learned from pixels, planned in its latent space
(Hafner et al. 2019, "Learning Latent Dynamics for Planning from Pixels", Algorithm 1).

    collect S random episodes (S = random_episodes, 5 in PlaNet; and seed_steps agent steps)
    for trial = 1 .. trials:
        C times (C = updates_per_trial): draw B chunks of L steps, one model update
        play one episode with MPC: the filter's belief from every frame, CEM over latent
        rollouts (H 12, 1000 candidates, 10 iterations, top 100), Gaussian exploration noise
        0.3 on every action played
        store the episode (uint8 frames)

The loop (:func:`train_latent`) is shared with ``mbrl run latent-mpc``
(:mod:`mbrl.algorithms.latent_mpc`), which plans on the single-step model or the RSSM; only the
model differs. After each trial the run logs a row of ``metrics.csv`` (return, the model's loss
terms averaged over the trial's updates, updates per second, planning time, the open-loop
prediction error) and writes a checkpoint holding the buffer (its uint8 frames), the model with
its optimizer and generator, the RNG streams and the counters, so ``mbrl resume`` continues
exactly; with ``strip_every`` it draws ``open_loop.png``, real frames of the episode just played
against the model's reconstruction of the first ``strip_context`` frames and its open-loop
prediction of the rest. ``env_steps`` counts the env's own steps (agent steps times the task's
action repeat), as PlaNet and the benchmarks count them.

A model update that diverges (a non-finite loss or gradient) stops the run before anything is
changed: the weights stay as they were, the last checkpoint stays the run's, and the error
names the config keys to change.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Annotated, Literal, Protocol

import numpy as np
import torch
from tqdm import tqdm

from mbrl import envs
from mbrl.algorithms import loop
from mbrl.algorithms.common import Summary, progress_bar, resolve_device
from mbrl.algorithms.factory import (
    PlannerConfig,
    config_fit,
    make_planner,
    resolve_planning_dtype,
)
from mbrl.algorithms.mpc_loop import MPCRunConfig, episode_seed
from mbrl.buffer import ReplayBuffer
from mbrl.config import (
    ConfigError,
    Count,
    Natural,
    NonNegative,
    Positive,
    Range,
)
from mbrl.control import MPCController, RandomPolicy, run_episode
from mbrl.data import Episode, Sequences
from mbrl.dynamics.base import Belief, DynamicsModel, FitError
from mbrl.dynamics.latent import LatentLosses, LatentRewardCost
from mbrl.envs.pixels import PixelSpec, postprocess, preprocess
from mbrl.planners import ILQR, PlanningProblem
from mbrl.planners.base import Plan, Planner, WarmStart
from mbrl.plots import image_strip
from mbrl.runs import Run

BitDepth = Annotated[int, Range(1, 8)]
"""Bits per pixel kept by the preprocessing, 1..8."""


class LatentModel(DynamicsModel, Protocol):
    """What the loop needs of a latent image model (:class:`~mbrl.dynamics.rssm.RSSM`,
    :class:`~mbrl.dynamics.single_step.SingleStepLatent`): the dynamics-model and filter
    seams plus one update on chunks, the open-loop frames of an episode, the learned reward as
    a stage cost, and its checkpoint."""

    loss_terms: tuple[str, ...]  # the keys of LatentLosses.terms
    bit_depth: int

    def update(self, chunks: Sequences, generator: torch.Generator | None) -> LatentLosses: ...

    def open_loop(self, obs: torch.Tensor, act: torch.Tensor, context: int) -> torch.Tensor: ...

    def stage_cost(self) -> LatentRewardCost: ...

    def reset_belief(self, batch: int = 1) -> Belief: ...

    def observe(
        self, belief: Belief, obs: torch.Tensor, prev_act: torch.Tensor | None
    ) -> Belief: ...

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> object: ...


@dataclass
class RSSMConfig:
    """The RSSM (:class:`~mbrl.dynamics.rssm.RSSM`); the defaults are PlaNet's (App. A)."""

    deterministic: Count = 200
    """GRU units D."""
    stochastic: Count = 30
    """Stochastic state size Z."""
    hidden: Count = 200
    """Units of the dense layers (transition, prior, posterior, reward head)."""
    depth: Count = 32
    """Channels of the first convolution; layer i has depth * 2^i."""
    conv_layers: Count = 4
    """Convolutions of the encoder and transposed convolutions of the decoder (4 for 64 x 64
    frames)."""
    min_std: Positive = 0.1
    """Floor of the prior's and posterior's std."""
    free_nats: NonNegative = 3.0
    """KL below this many nats per step is not penalised."""
    kl_scale: NonNegative = 1.0
    """Weight of the KL term."""
    kl_balance: Annotated[float, Range(0.0, 1.0, lo_open=True, hi_open=True)] | None = None
    """None: PlaNet's KL; alpha in (0, 1): DreamerV2's KL balancing (0.8 there)."""
    bit_depth: BitDepth = 5
    """Bits per pixel kept by the preprocessing (5 in PlaNet)."""
    lr: Positive = 1e-3
    """Adam learning rate."""
    adam_eps: Positive = 1e-4
    """Adam epsilon."""
    grad_clip: Positive = 1000.0
    """Gradient-norm clip."""
    planning_dtype: Literal["float32", "bfloat16", "auto"] = "float32"
    """Dtype of the latent rollouts while planning (bfloat16: about 1.6x faster CEM plans on
    CPUs with AVX512-BF16; auto: bfloat16 where matmuls run natively in it, else float32);
    training and filtering stay float32."""


def make_rssm(cfg: RSSMConfig, spec: PixelSpec, device: torch.device, seed: int) -> LatentModel:
    """The RSSM ``cfg`` describes for the pixel task ``spec``, seeded ``seed``."""
    from mbrl.dynamics.rssm import RSSM

    return RSSM(
        spec.obs_shape,
        spec.act_dim,
        deterministic=cfg.deterministic,
        stochastic=cfg.stochastic,
        hidden=cfg.hidden,
        depth=cfg.depth,
        conv_layers=cfg.conv_layers,
        min_std=cfg.min_std,
        free_nats=cfg.free_nats,
        kl_scale=cfg.kl_scale,
        kl_balance=cfg.kl_balance,
        bit_depth=cfg.bit_depth,
        lr=cfg.lr,
        adam_eps=cfg.adam_eps,
        grad_clip=cfg.grad_clip,
        planning_dtype=resolve_planning_dtype(cfg.planning_dtype, device)[0],
        device=device,
        seed=seed,
    )


def planet_planner() -> PlannerConfig:
    """PlaNet's planner (Sec. 3): CEM, 1000 candidates, 10 iterations, the top 100 refitted,
    no smoothing."""
    return PlannerConfig(name="cem", population=1000, iterations=10, elite_fraction=0.1, alpha=0.0)


@dataclass
class LatentRunConfig(MPCRunConfig):
    """The loop of PlaNet's Algorithm 1 over any latent image model (``planet``,
    ``latent-mpc``). Loop fields it shares with PETS (env, seed, trials, random_episodes,
    horizon, particles, replan_every, buffer_capacity, stop_when_solved) are documented on
    :class:`~mbrl.algorithms.mpc_loop.MPCRunConfig`; the env must be a pixel task
    (``mbrl envs``: the ``-pixels`` names)."""

    env: str = "dmc-cartpole-swingup-pixels"
    random_episodes: Natural = 5
    trials: Natural = 3
    horizon: Count = 12
    buffer_capacity: Count = 10_000
    """Most agent steps kept (each holds one uint8 frame stack: 12 kB at 3 x 64 x 64)."""
    updates_per_trial: Count = 20
    """C, model updates before each episode (100 in PlaNet)."""
    batch_size: Count = 16
    """B, chunks per update (50 in PlaNet)."""
    chunk_length: Count = 25
    """L, steps per chunk (50 in PlaNet); at most the env's episode length (checked when the
    run starts, before any episode)."""
    exploration_noise: NonNegative = 0.3
    """Std of the Gaussian noise on every action played, in units of half the action range."""
    eval_every: Natural = 0
    """Every this many trials the episode is played without exploration noise (still stored);
    0: never."""
    strip_every: Natural = 1
    """Draw open_loop.png every this many trials (0: never)."""
    strip_context: Count = 5
    """Frames the model filters before it predicts the rest of the strip open loop (at most
    strip_frames - 1)."""
    strip_frames: Annotated[int, Range(2)] = 20
    """Frames in the strip (context included)."""
    planner: PlannerConfig = field(default_factory=planet_planner)

    def __post_init__(self) -> None:
        super().__post_init__()
        spec = envs.make(self.env)
        if not isinstance(spec, PixelSpec):
            pixels = ", ".join(n for n in envs.names() if n.endswith("-pixels"))
            raise ConfigError(
                f"env={self.env} observes states; latent image models plan from pixels: use a "
                f"pixel task ({pixels})"
            )
        if self.planner.name == "mcts" and self.planner.actions == "discrete":
            raise ConfigError(
                "planner.name=mcts with planner.actions=discrete needs discrete actions; latent "
                "image models plan box actions: search the box with planner.actions=widening "
                "or planner.actions=sampled"
            )


class BeliefFeatures:
    """A planner of one state ``[X]`` (iLQR) planned from a filter's belief: it plans from the
    belief's features ``mean[0]``, which are the latent model's planning state."""

    def __init__(self, planner: Planner) -> None:
        self.planner = planner

    def plan(
        self, problem: PlanningProblem, x0: torch.Tensor | Belief, warm: WarmStart | None = None
    ) -> Plan:
        return self.planner.plan(problem, x0.mean[0] if isinstance(x0, Belief) else x0, warm)


def latent_problem(
    model: LatentModel,
    spec: PixelSpec,
    cfg: LatentRunConfig,
    generator: torch.Generator,
    device: torch.device,
) -> tuple[Planner, PlanningProblem]:
    """The planner of ``cfg.planner`` and the planning problem on ``model``'s latent space:
    its learned reward, the task's action box, no termination; for iLQR also the learned
    reward as the stage cost, planned from the belief's features."""
    planner = make_planner(cfg.planner)
    gradient = isinstance(planner, ILQR)
    low, high = spec.action_bounds(device)
    problem = PlanningProblem(
        model,
        spec.reward_fn,
        spec.termination_fn,
        cfg.horizon,
        low,
        high,
        cfg.particles,
        generator,
        stage_cost=model.stage_cost() if gradient else None,
    )
    return (BeliefFeatures(planner) if gradient else planner), problem


def train_latent(
    run: Run,
    cfg: LatentRunConfig,
    model: LatentModel,
    *,
    label: str,
    model_key: str,
    device: torch.device | str = "cpu",
) -> Summary:
    """Run (or resume from ``run``'s checkpoint) the loop of the module docstring; returns the
    summary. ``model_key`` is the config section of the model (``model``, ``rssm``), named in
    the error of a diverging update."""
    dev = resolve_device(device)
    spec = envs.make(cfg.env)
    if cfg.chunk_length > spec.max_episode_steps:  # before any episode is collected
        raise ValueError(
            f"chunk_length={cfg.chunk_length} exceeds the {spec.max_episode_steps} steps of a "
            f"{cfg.env} episode, so no chunk fits in one; use chunk_length <= "
            f"{spec.max_episode_steps}"
        )
    seed, trials = cfg.seed, cfg.trials
    env = spec.make()
    buffer = ReplayBuffer(
        spec.obs_shape, spec.act_dim, cfg.buffer_capacity, device=dev, obs_dtype=torch.uint8
    )
    plan_gen = torch.Generator(device=dev).manual_seed(seed)
    train_gen = torch.Generator(device=dev).manual_seed(seed + 1)
    explore_gen = torch.Generator(device=dev).manual_seed(seed + 2)
    rng = np.random.default_rng(seed)
    planner, problem = latent_problem(model, spec, cfg, plan_gen, dev)
    controller = MPCController(
        planner, problem, cfg.replan_every, dev, cfg.exploration_noise, explore_gen
    )
    generators = {"planning": plan_gen, "training": train_gen, "exploration": explore_gen}
    repeat = spec.action_repeat

    resumed = loop.resume(run, {"buffer": buffer, "model": model}, generators, rng)
    c = resumed if resumed is not None else loop.Counters()
    trial, episodes, steps = c.trial, c.episodes, c.env_steps  # steps: agent steps
    returns, streak = list(c.returns), c.streak
    watch = loop.Stopwatch((), c.wall_seconds)
    if resumed is not None:
        loop.resumed_message(run, f"after trial {trial}", len(buffer))

    def checkpoint() -> None:
        counters = loop.Counters(
            env_steps=steps,
            episodes=episodes,
            trial=trial,
            streak=streak,
            wall_seconds=watch.wall_seconds,
            returns=tuple(returns),
        )
        parts = {"buffer": buffer, "model": model}
        loop.save(run, loop.checkpoint_of(counters, parts, generators, rng))
        loop.stop_if_requested(run)

    def log(
        ep: Episode, noise: float | str, fit: _FitStats | None, extra: dict[str, float]
    ) -> None:
        run.log(
            trial=trial,
            episodes=episodes,
            env_steps=steps * repeat,
            agent_steps=steps,
            **{"return": ep.ret},
            length=len(ep),
            exploration_noise=noise,
            **{k: fit.terms[k] if fit else "" for k in model.loss_terms},
            grad_norm=fit.grad_norm if fit else "",
            update_seconds=fit.seconds if fit else 0.0,
            plan_seconds_per_step=extra.get("plan_seconds", 0.0),
            nonfinite=int(extra.get("nonfinite", 0)),
            open_loop_mse=extra.get("open_loop_mse", ""),
            wall_seconds=watch.wall_seconds,
            **run.checkpoint_columns(),
        )

    def more_random() -> bool:
        return steps < cfg.seed_steps or episodes < cfg.random_episodes

    if trial == 0 and more_random():
        random_policy = RandomPolicy(spec.action_low, spec.action_high, rng)
        while more_random():
            watch.start()
            ep = run_episode(env, random_policy, seed=episode_seed(seed, episodes))
            buffer.add_episode(ep)
            episodes += 1
            steps += len(ep)
            watch.lap()
            log(ep, "", None, {})
        tqdm.write(f"random actions: {episodes} episodes, {steps * repeat} env steps")
        checkpoint()

    stop = cfg.stop_when_solved
    first, wall0 = trial, watch.wall_seconds  # for the ETA: this process's trials
    while trial < trials and not (stop and streak >= stop):
        watch.start()
        fit = _train_model(model, buffer, cfg, train_gen, model_key, trial, trials)
        evaluation = cfg.eval_every > 0 and (trial + 1) % cfg.eval_every == 0
        noise = 0.0 if evaluation else cfg.exploration_noise
        controller.exploration_std = noise
        controller.reset_stats()
        with progress_bar(spec.max_episode_steps, f"trial {trial + 1}/{trials}: episode") as bar:
            ep = run_episode(
                env,
                controller,
                seed=episode_seed(seed, episodes),
                on_step=lambda t, r: bar.update(1),
            )
        buffer.add_episode(ep)
        trial += 1
        episodes += 1
        steps += len(ep)
        extra: dict[str, float] = {}
        if cfg.strip_every and trial % cfg.strip_every == 0:
            extra["open_loop_mse"] = write_strip(model, ep, cfg, run, f"{label} trial {trial}")
        watch.lap()
        returns.append(ep.ret)
        solved = spec.solved_return is not None and ep.ret >= spec.solved_return
        streak = streak + 1 if solved else 0
        stats = controller.stats
        extra["plan_seconds"] = stats.plan_seconds / max(stats.plans, 1)
        extra["nonfinite"] = stats.nonfinite
        log(ep, noise, fit, extra)
        per_trial = (watch.wall_seconds - wall0) / (trial - first)
        tqdm.write(_trial_line(trial, trials, ep, fit, extra, stats.not_ok, per_trial))
        checkpoint()

    counters = loop.Counters(wall_seconds=watch.wall_seconds, returns=tuple(returns))
    return loop.finish(run, label, seed, spec.name, spec.solved_return, counters, unit="trial")


@dataclass(frozen=True)
class _FitStats:
    """The updates before one episode: loss terms averaged over them, their last gradient
    norm, seconds and updates per second."""

    terms: dict[str, float]
    grad_norm: float
    seconds: float
    rate: float


def _train_model(
    model: LatentModel,
    buffer: ReplayBuffer,
    cfg: LatentRunConfig,
    generator: torch.Generator,
    key: str,
    trial: int,
    trials: int,
) -> _FitStats:
    """``cfg.updates_per_trial`` updates on fresh chunks of the buffer."""
    sums = dict.fromkeys(model.loss_terms, 0.0)
    seconds, norm = 0.0, math.nan
    n = cfg.updates_per_trial
    with progress_bar(n, f"trial {trial + 1}/{trials}: model updates") as bar:
        for _ in range(n):
            try:
                chunks = buffer.sample_chunks(cfg.batch_size, cfg.chunk_length, generator)
            except ValueError as e:
                raise ValueError(f"chunk_length={cfg.chunk_length}: {e}") from None
            try:
                with config_fit(cfg, key):
                    losses = model.update(chunks, generator)
            except FitError as e:
                raise FitError(
                    f"{e}; the run stopped before trial {trial + 1} changed anything it keeps: "
                    f"its last checkpoint (after trial {trial}) holds the model before this "
                    f"update. Start a new run with a lower {key}.lr or {key}.grad_clip"
                ) from e
            for k in sums:
                sums[k] += losses.terms[k] / n
            seconds += losses.seconds
            norm = losses.grad_norm
            bar.update(1)
    return _FitStats(sums, norm, seconds, n / max(seconds, 1e-9))


def write_strip(
    model: LatentModel, ep: Episode, cfg: LatentRunConfig, run: Run, title: str
) -> float:
    """Draw ``open_loop.png`` for the episode ``ep`` (real frames against the model's
    reconstruction of ``strip_context`` frames and its open-loop prediction of the rest, the
    newest frame of each stack) and return the per-pixel squared error of the predicted
    frames in the preprocessed scale (against the centres of the real pixels' bins)."""
    n = min(cfg.strip_frames, len(ep) + 1)
    context = min(cfg.strip_context, n - 1)
    obs = torch.as_tensor(ep.obs[:n])[None]  # [1, n, C, H, W] uint8
    act = torch.as_tensor(ep.act[: n - 1])[None]  # [1, n - 1, U]
    predicted = model.open_loop(obs, act, context)[0].cpu()  # [n, C, H, W]
    bits = model.bit_depth
    truth = preprocess(obs[0], bits) + 0.5 / 2**bits
    mse = float((predicted[context:] - truth[context:]).square().mean())
    frames = [("real", obs[0]), ("model", postprocess(predicted, bits))]
    rows = [(label, f[:, -3:].permute(0, 2, 3, 1).numpy()) for label, f in frames]
    image_strip(
        rows, run.path / "open_loop.png", f"{title}: {context} frames filtered, then open loop"
    )
    return mse


def _trial_line(
    trial: int,
    trials: int,
    ep: Episode,
    fit: _FitStats,
    extra: dict[str, float],
    not_ok: int,
    per_trial: float,
) -> str:
    terms = ", ".join(f"{k.removesuffix('_loss')} {v:.3g}" for k, v in fit.terms.items())
    eta = f", ETA {_duration(per_trial * (trials - trial))}" if trial < trials else ""
    return (
        f"trial {trial}/{trials}: return {ep.ret:.1f} ({len(ep)} steps), {terms}, "
        f"{fit.rate:.2f} updates/s, {extra['plan_seconds']:.3f} s/plan"
        + (f", open-loop mse {extra['open_loop_mse']:.4f}" if "open_loop_mse" in extra else "")
        + (f", {int(extra['nonfinite'])} non-finite candidates" if extra["nonfinite"] else "")
        + (f", {not_ok} plans not ok" if not_ok else "")
        + eta
    )


def _duration(seconds: float) -> str:
    minutes = seconds / 60
    return f"{minutes:.0f} min" if minutes < 120 else f"{minutes / 60:.1f} h"


@dataclass
class Config(LatentRunConfig):
    """PlaNet. The defaults are a quick run (3 trials of 20 updates on 16 chunks of 25 steps)
    with PlaNet's model and planner; ``experiments/planet_cartpole.yaml`` is the benchmark's
    reduced configuration."""

    model: RSSMConfig = field(default_factory=RSSMConfig)
    """The RSSM."""


def make_model(cfg: Config, device: torch.device) -> tuple[LatentModel, str, str]:
    """The run's model, its label and its config section (what ``train`` and the planner
    comparison of ``experiments/bench_latent.py`` build)."""
    return make_rssm(cfg.model, envs.make(cfg.env), device, cfg.seed), "PlaNet", "model"


def train(cfg: Config, run: Run, device: str = "cpu") -> Summary:
    """Run (or resume) PlaNet as configured, logging to ``run``; returns the summary."""
    dev = resolve_device(device)
    model, label, key = make_model(cfg, dev)
    return train_latent(run, cfg, model, label=label, model_key=key, device=dev)
