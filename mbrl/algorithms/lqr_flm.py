"""LQR-FLM: time-varying linear-Gaussian controllers improved by LQR on linear-Gaussian dynamics
fitted to their own samples, each step bounded by a KL divergence (Levine and Abbeel 2014,
"Learning Neural Network Policies with Guided Policy Search under Unknown Dynamics", sec. 3;
cbfinn/gps' ``AlgorithmTrajOpt``).

    M start conditions (env reset seeds); local controllers p_m(u_t | x_t) = N(0, init_variance I)
    for iteration = 1 .. iterations:
        sample N episodes of T steps from each p_m
        fit x_{t+1} ~ N(F_t [x_t; u_t] + f_t, Sigma_t) per condition (GMM prior over every
        condition's recent samples)
        expand the cost about the samples (quadratic per step)
        adapt each condition's KL step from the improvement predicted last iteration and the
        one measured now
        p_m <- argmin E[cost] s.t. mean KL(p || p_m) per step <= kl_step * step_mult_m
        evaluate the noise-free controllers; log; checkpoint

The parts (:class:`Sampler`, :func:`fit_dynamics`, :class:`TaskCost`, :class:`LocalControllers`,
:func:`local_step`) are shared with mirror-descent GPS (:mod:`mbrl.algorithms.gps`), which
replaces the KL anchor by the global policy's linearization.

Conditions. Condition ``m`` is the env reset with seed :func:`condition_seed` ``(seed, m)``:
the same start state (and Reacher's target) in every episode of the condition, since the
registered envs reset deterministically from their seed. The envs must run ``T`` steps without
terminating (the point mass, the analytic pendulum, Reacher); an episode that ends early is an
error, not a shorter sample.

Cost. An analytic system's own stage and terminal cost (its closed-form expansions); for any
other env minus its reward, a function of ``(x_t, u_t, x_{t+1})`` that is expanded with the next
state given by the fitted dynamics and chained through them (:class:`NextStateReward`). Each
sample's expansion is re-centred and averaged over the samples (cbfinn/gps).

Checkpoints. After each iteration: the controllers with their dual variables, step multipliers
and the costs the next step adaptation compares; the GMM prior (its kept trajectories and
mixture); the generators of the action noise and of the prior's restarts. A resumed run repeats
the uninterrupted one exactly (``mbrl resume runs/<name>``).

Env steps count the training samples only; the noise-free evaluation episodes of each
iteration (one per condition) are extra, as the Dyna runs' evaluations are.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Annotated, Any

import gymnasium as gym
import numpy as np
import torch
from tqdm import tqdm

from mbrl import envs
from mbrl.algorithms import loop
from mbrl.algorithms.common import Summary, resolve_device
from mbrl.algorithms.factory import check_env
from mbrl.config import Count, NonNegative, Positive, Range, Seed, check_ranges
from mbrl.dynamics.tvlg import GMMPrior, TVLGDynamics, fit_initial_state, fit_tvlg
from mbrl.envs.spec import EnvSpec
from mbrl.planners.base import StageCost
from mbrl.planners.derivatives import CostExpansion, ProblemCost
from mbrl.planners.lqr_flm import (
    LQRFLM,
    LinearGaussianController,
    LQRFLMResult,
    QuadraticCost,
    adapt_step,
    expected_cost,
    quadratic_cost,
)
from mbrl.plots import learning_curve
from mbrl.runs import Run

ActFn = Callable[[torch.Tensor, int], torch.Tensor]
"""``(x [B, X] float32, t) -> u [B, U]``: the actions of ``B`` episodes at step ``t``."""

KLTolerance = Annotated[float, Range(0.0, 1.0, lo_open=True, hi_open=True)]

# ---------------------------------------------------------------- config


@dataclass
class PriorConfig:
    """The dynamics fit: per-step linear-Gaussian regression with a Gaussian-mixture prior
    (cbfinn/gps' ``DynamicsLRPrior`` with ``DynamicsPriorGMM``; the numbers are those of every
    cbfinn/gps example)."""

    gmm: bool = True
    """Use the GMM prior over (x_t, u_t, x_t+1) of the recent samples of every condition; False
    fits each step by plain regression, which needs samples >= X + U + 1."""
    max_clusters: Count = 20
    """Most mixture components."""
    min_samples_per_cluster: Count = 40
    """Transitions per component: K = clip(points // this, 2, max_clusters)."""
    max_samples: Count = 20
    """Trajectories the prior keeps (the latest)."""
    strength: Positive = 1.0
    """How many samples the prior counts as."""
    regularization: NonNegative = 1e-6
    """Added to the diagonal of the [x, u] covariance of each step's fit."""


@dataclass
class LocalConfig:
    """What LQR-FLM and GPS share: the env, the conditions and samples, the local controllers'
    KL-bounded update and the dynamics fit."""

    env: str = "point-mass"
    """Registry name of an env that runs T steps without terminating (point-mass,
    point-mass-spread, pendulum-swingup, reacher, ...)."""
    seed: Seed = 0
    """Seeds the conditions (env reset seeds), the action noise and the prior's restarts."""
    iterations: Count = 5
    """Iterations: sample, fit, update (each one metrics row and checkpoint)."""
    conditions: Count = 1
    """M start conditions; condition m resets the env with seed seed * 100003 + m."""
    samples: Count = 5
    """N episodes per condition and iteration."""
    horizon: Count | None = None
    """T steps per episode (at most the env's episode length); None: the env's length."""
    init_variance: Positive = 5.0
    """Action variance of the initial zero-mean controllers (cbfinn/gps init_var; 5.0 in its
    point-mass example)."""
    kl_step: Positive = 0.2
    """Base KL step: mean KL per step between new and old controller, times the step
    multiplier (cbfinn/gps' default 0.2)."""
    min_step_mult: Positive = 0.01
    """Smallest step multiplier (cbfinn/gps 0.01; the largest wins if they cross)."""
    max_step_mult: Positive = 10.0
    """Largest step multiplier (cbfinn/gps 10)."""
    max_evaluations: Count = 50
    """Backward and forward passes of the dual search per update (cbfinn/gps 50)."""
    kl_tolerance: KLTolerance = 0.1
    """The dual search stops within this fraction of the KL target (cbfinn/gps 10%)."""
    prior: PriorConfig = field(default_factory=PriorConfig)
    """The dynamics fit and its GMM prior."""

    def __post_init__(self) -> None:
        check_ranges(self)
        check_env(self.env)


@dataclass
class Config(LocalConfig):
    """LQR-FLM (local controllers only). The defaults are cbfinn/gps' box2d point-mass example:
    one condition starting at (0, 5), 5 samples of 100 steps per iteration, initial variance 5,
    KL step 0.2, the GMM prior; 5 iterations."""


# ---------------------------------------------------------------- conditions and samples


def condition_seed(seed: int, condition: int) -> int:
    """The env reset seed of condition ``condition`` of a run seeded ``seed``."""
    return seed * 100_003 + condition


@dataclass(frozen=True)
class Samples:
    """``N`` episodes of ``T`` steps from each of ``M`` conditions (float32, CPU)."""

    obs: torch.Tensor  # [M, N, T + 1, X]
    act: torch.Tensor  # [M, N, T, U] as played (clipped to the action bounds)
    reward: torch.Tensor  # [M, N, T] the env's rewards

    @property
    def returns(self) -> torch.Tensor:
        """Episode returns ``[M, N]`` (float64)."""
        return self.reward.double().sum(-1)

    @property
    def steps(self) -> int:
        """Env steps these samples took, ``M N T``."""
        return self.act.shape[0] * self.act.shape[1] * self.act.shape[2]


class Sampler:
    """Plays batches of fixed-length episodes, one env per episode, actions for all of them
    from one call per step.

    Args:
        spec: the env.
        horizon: ``T``.
    """

    def __init__(self, spec: EnvSpec, horizon: int) -> None:
        if horizon > spec.max_episode_steps:
            raise ValueError(
                f"horizon={horizon} exceeds the {spec.max_episode_steps}-step episodes of "
                f"{spec.name}; lower horizon"
            )
        if spec.discrete:
            raise ValueError(f"{spec.name} has discrete actions; LQR-FLM and GPS need a box env")
        self.spec, self.horizon = spec, horizon
        self.low = torch.as_tensor(spec.action_low, dtype=torch.float32)  # [U]
        self.high = torch.as_tensor(spec.action_high, dtype=torch.float32)  # [U]
        self._envs: list[gym.Env] = []

    def episodes(self, seeds: Sequence[int], act: ActFn) -> Samples:
        """Episodes reset with ``seeds`` (``B = len(seeds)``) under ``act``, returned as one
        condition of ``B`` samples (``Samples`` with ``M = 1``); actions are clipped to the
        bounds before the env sees them.

        Raises:
            ValueError: an episode terminated before ``T`` steps.
        """
        b, h = len(seeds), self.horizon
        while len(self._envs) < b:
            self._envs.append(self.spec.make())
        env_list = self._envs[:b]
        first = [env.reset(seed=int(s))[0] for env, s in zip(env_list, seeds, strict=True)]
        obs = torch.empty(b, h + 1, self.spec.obs_dim)
        played = torch.empty(b, h, self.spec.act_dim)
        reward = torch.empty(b, h)
        obs[:, 0] = torch.as_tensor(np.stack(first), dtype=torch.float32)
        for t in range(h):
            u = act_checked(act, obs[:, t], t, b, self.spec.act_dim)
            u = torch.minimum(torch.maximum(u, self.low), self.high)
            played[:, t] = u
            for i, env in enumerate(env_list):
                o, r, terminated, truncated, _ = env.step(u[i].numpy())
                obs[i, t + 1] = torch.as_tensor(o, dtype=torch.float32)
                reward[i, t] = float(r)
                if terminated or (truncated and t < h - 1):
                    raise ValueError(
                        f"{self.spec.name}: an episode ended at step {t + 1} of {h} "
                        f"({'terminated' if terminated else 'truncated'}); LQR-FLM and GPS fit "
                        "time-varying models to fixed-length episodes: use an env that does not "
                        "terminate, or a horizon within its episode length"
                    )
        return Samples(obs[None], played[None], reward[None])

    def conditions(self, seeds: Sequence[int], samples: int, act: ActFn) -> Samples:
        """``samples`` episodes from each condition reset with ``seeds`` (``M = len(seeds)``);
        ``act`` sees the ``M N`` rows condition-major (row ``m N + i``)."""
        rows = [s for s in seeds for _ in range(samples)]
        one = self.episodes(rows, act)
        m = len(seeds)
        return Samples(
            one.obs.view(m, samples, *one.obs.shape[2:]),
            one.act.view(m, samples, *one.act.shape[2:]),
            one.reward.view(m, samples, -1),
        )


def act_checked(act_fn: ActFn, x: torch.Tensor, t: int, rows: int, dim: int) -> torch.Tensor:
    """``act_fn(x, t)`` as float32 ``[rows, U]``; a wrong shape or a NaN/inf action is an error
    naming the step."""
    u = act_fn(x, t)
    if tuple(u.shape) != (rows, dim):
        raise ValueError(f"actions at step {t}: expected [{rows}, {dim}], got {list(u.shape)}")
    u = u.detach().to(torch.float32).cpu()
    if not bool(torch.isfinite(u).all()):
        raise ValueError(
            f"actions at step {t} hold NaN/inf: the controller or policy diverged (check the "
            "fitted dynamics and the cost for NaN)"
        )
    return u


def controller_actions(
    controller: LinearGaussianController, generator: torch.Generator | None, noise: bool = True
) -> ActFn:
    """The actions of an ``[M]`` batch of controllers for ``M N`` condition-major rows: samples
    of ``N(K_t x + k_t, S_t)`` drawn with ``generator``, or the means (``noise=False``)."""
    m = controller.batch_shape[0]

    def act(x: torch.Tensor, t: int) -> torch.Tensor:
        xs = x.view(m, -1, x.shape[-1])  # [M, N, X]
        u = controller.act(xs, t, generator) if noise else controller.mean_action(xs, t)
        return u.reshape(x.shape[0], -1)

    return act


# ---------------------------------------------------------------- dynamics and cost


def make_prior(cfg: PriorConfig) -> GMMPrior | None:
    """The GMM prior of ``cfg`` (``None`` when it is off)."""
    if not cfg.gmm:
        return None
    return GMMPrior(
        max_clusters=cfg.max_clusters,
        min_samples_per_cluster=cfg.min_samples_per_cluster,
        max_samples=cfg.max_samples,
        strength=cfg.strength,
    )


def fit_dynamics(
    samples: Samples,
    prior: GMMPrior | None,
    regularization: float,
    generator: torch.Generator | None = None,
) -> TVLGDynamics:
    """The TVLG fit ``[M]`` of each condition's samples; the prior first absorbs the samples of
    every condition (one mixture for all of them, as cbfinn/gps shares it)."""
    m, n = samples.act.shape[:2]
    if prior is not None:
        prior.update(
            samples.obs.reshape(m * n, *samples.obs.shape[2:]),
            samples.act.reshape(m * n, *samples.act.shape[2:]),
            generator,
        )
    fits = [fit_tvlg(samples.obs[i], samples.act[i], prior, regularization) for i in range(m)]
    return TVLGDynamics.stack(fits)


class NextStateReward:
    """Minus an env reward of ``(x_t, u_t, x_{t+1})`` as a
    :class:`~mbrl.planners.base.StageCost` on the fitted dynamics of one condition: the next
    state is the fit's mean ``F_t [x; u] + f_t`` and the expansion is chained through ``F_t``
    (:meth:`~mbrl.planners.derivatives.ProblemCost.expansion_along`, Gauss-Newton in the
    dynamics, exact for the linear fit). No terminal cost."""

    def __init__(self, reward_fn: Callable, dyn: TVLGDynamics) -> None:
        self.dyn = dyn
        self._problem = ProblemCost(dyn.horizon, None, None, reward_fn=reward_fn)
        self._reward_fn = reward_fn

    def _next(self, x: torch.Tensor, u: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        F, f = self.dyn.F[t].to(x.dtype), self.dyn.f[t].to(x.dtype)  # [B, X, Z], [B, X]
        return (F @ torch.cat([x, u], -1)[..., None])[..., 0] + f

    def cost(self, x: torch.Tensor, u: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return -self._reward_fn(x, u, self._next(x, u, t))

    def expansion(self, x: torch.Tensor, u: torch.Tensor, t: torch.Tensor) -> CostExpansion:
        F = self.dyn.F[t].to(x.dtype)
        nx = x.shape[-1]
        jac = (F[..., :nx], F[..., nx:])
        return self._problem.expansion_along(x, u, t, self._next(x, u, t), jac)

    def terminal_cost(self, x: torch.Tensor) -> torch.Tensor:
        return torch.zeros(x.shape[0], dtype=x.dtype, device=x.device)

    def terminal_expansion(self, x: torch.Tensor) -> CostExpansion:
        return self._problem.terminal_expansion(x)


class TaskCost:
    """The objective of an env for LQR-FLM: an analytic system's stage and terminal cost, else
    minus the env's reward (see the module docstring)."""

    def __init__(self, spec: EnvSpec) -> None:
        self.spec = spec
        self.stage: StageCost | None = (
            spec.dynamics.stage_cost() if spec.dynamics is not None else None
        )

    def quadratic(self, samples: Samples, dyn: TVLGDynamics) -> QuadraticCost:
        """The cost expanded about each condition's samples and averaged over them, ``[M]``."""
        x, u = samples.obs.double(), samples.act.double()
        if self.stage is not None:
            return quadratic_cost(self.stage, x, u)
        parts = [
            quadratic_cost(NextStateReward(self.spec.reward_fn, dyn.condition(i)), x[i], u[i])
            for i in range(x.shape[0])
        ]
        names = ("C", "c", "c0", "C_final", "c_final", "c0_final")
        return QuadraticCost(*(torch.stack([getattr(p, n) for p in parts]) for n in names))

    def terminal(self, samples: Samples) -> torch.Tensor:
        """The terminal cost of each sample's last state ``[M, N]`` (zeros without one)."""
        x_final = samples.obs[:, :, -1].double()  # [M, N, X]
        if self.stage is None:
            return torch.zeros(x_final.shape[:2], dtype=torch.float64)
        flat = x_final.reshape(-1, x_final.shape[-1])
        return self.stage.terminal_cost(flat).reshape(x_final.shape[:2])

    def totals(self, samples: Samples) -> torch.Tensor:
        """The objective of each sample ``[M, N]``: minus its return plus its terminal cost."""
        return -samples.returns + self.terminal(samples)


# ---------------------------------------------------------------- the local controllers


class LocalControllers:
    """The ``M`` local controllers and what their next KL-bounded update needs: the dual
    variables where the search starts, the step multipliers, and the two costs of the last
    update (of its KL anchor and of its result, under the model it was made on) that the next
    step adaptation compares with the measured one. Round-trips through a checkpoint."""

    def __init__(self, controller: LinearGaussianController) -> None:
        m = controller.batch_shape[0]
        self.controller = controller  # [M]
        self.eta = torch.ones(m, dtype=torch.float64)  # [M]
        self.step_mult = torch.ones(m, dtype=torch.float64)  # [M]
        self.previous_cost = torch.full((m,), math.nan, dtype=torch.float64)  # [M]
        self.predicted_cost = torch.full((m,), math.nan, dtype=torch.float64)  # [M]

    @property
    def updated(self) -> bool:
        """Whether an update was made (the step adaptation has costs to compare)."""
        return bool(torch.isfinite(self.predicted_cost).all())

    def state_dict(self) -> dict[str, Any]:
        c = self.controller
        return {
            "K": c.K,
            "k": c.k,
            "covariance": c.covariance,
            "eta": self.eta,
            "step_mult": self.step_mult,
            "previous_cost": self.previous_cost,
            "predicted_cost": self.predicted_cost,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.controller = LinearGaussianController(state["K"], state["k"], state["covariance"])
        for name in ("eta", "step_mult", "previous_cost", "predicted_cost"):
            setattr(self, name, state[name].to(torch.float64))


@dataclass(frozen=True)
class LocalStep:
    """One KL-bounded update of the ``M`` local controllers."""

    result: LQRFLMResult
    step_mult: torch.Tensor  # [M] the multipliers the update used
    actual_cost: torch.Tensor  # [M] expected cost of the anchor under the new fit (nan at first)


def local_step(
    lqr: LQRFLM,
    local: LocalControllers,
    dyn: TVLGDynamics,
    cost: QuadraticCost,
    anchor: LinearGaussianController,
    x0_mean: torch.Tensor,
    x0_cov: torch.Tensor,
    min_step_mult: float,
    max_step_mult: float,
) -> LocalStep:
    """Adapt the step multipliers, then update ``local`` by LQR-FLM with its KL bound to
    ``anchor`` (LQR-FLM: the controllers themselves; MDGPS: the global policy's linearization).

    The adaptation (after the first update) compares the last update's predicted cost with the
    ``actual`` one: the expected cost of ``anchor``, the controller the new samples came from
    (or its stand-in), under the model and cost refitted to them (:func:`adapt_step`).
    """
    actual = torch.full_like(local.step_mult, math.nan)
    if local.updated:
        actual = expected_cost(dyn, anchor, cost, x0_mean, x0_cov)
        local.step_mult = adapt_step(
            local.step_mult,
            local.previous_cost,
            local.predicted_cost,
            actual,
            min_step_mult=min_step_mult,
            max_step_mult=max_step_mult,
        )
    result = lqr.update(
        dyn, cost, anchor, x0_mean, x0_cov, step_mult=local.step_mult, eta=local.eta
    )
    local.controller = result.controller
    local.eta = result.eta
    local.previous_cost, local.predicted_cost = result.previous_cost, result.expected_cost
    return LocalStep(result, local.step_mult.clone(), actual)


def make_lqr(cfg: LocalConfig) -> LQRFLM:
    """The LQR-FLM step of ``cfg``."""
    return LQRFLM(
        kl_step=cfg.kl_step, max_evaluations=cfg.max_evaluations, kl_tolerance=cfg.kl_tolerance
    )


def initial_controllers(cfg: LocalConfig, spec: EnvSpec, horizon: int) -> LocalControllers:
    """``M`` zero-mean open-loop controllers of variance ``init_variance``."""
    controller = LinearGaussianController.initial(
        horizon,
        spec.obs_dim,
        spec.act_dim,
        variance=cfg.init_variance,
        batch_shape=(cfg.conditions,),
    )
    return LocalControllers(controller)


def initial_state_fit(samples: Samples) -> tuple[torch.Tensor, torch.Tensor]:
    """The initial-state Gaussian of each condition, mean ``[M, X]``, covariance ``[M, X, X]``."""
    return fit_initial_state(samples.obs[:, :, 0])


def step_columns(step: LocalStep, prefix: str = "") -> dict[str, float | int | str]:
    """Metric columns of a local update: mean KL, target, step multiplier, dual variable over
    the conditions; each condition's KL and step multiplier; the dual search's counts."""
    r = step.result
    row: dict[str, float | int | str] = {
        f"{prefix}kl": float(r.kl.mean()),
        f"{prefix}kl_target": float(r.kl_target.mean()),
        f"{prefix}step_mult": float(step.step_mult.mean()),
        f"{prefix}eta": float(r.eta.log10().mean()),
        f"{prefix}kl_met": int(r.met.sum()),
        f"{prefix}dual_evaluations": r.evaluations,
        f"{prefix}indefinite_fixes": r.indefinite_fixes,
        f"{prefix}status": r.status,
    }
    for m in range(r.kl.shape[0]):
        row[f"{prefix}kl_c{m}"] = float(r.kl[m])
        row[f"{prefix}step_mult_c{m}"] = float(step.step_mult[m])
    return row


def cost_columns(cost: TaskCost, samples: Samples) -> dict[str, float]:
    """Each condition's mean sample objective (``cost_c<m>``), their mean, the mean sample
    return and the mean terminal cost (of analytic systems; 0 for the others)."""
    totals = cost.totals(samples)  # [M, N]
    row = {
        "cost": float(totals.mean()),
        "sample_return": float(samples.returns.mean()),
        "sample_terminal_cost": float(cost.terminal(samples).mean()),
    }
    for m in range(totals.shape[0]):
        row[f"cost_c{m}"] = float(totals[m].mean())
    return row


def write_plots(run: Run, label: str, columns: Sequence[str]) -> None:
    """One PNG per metric column against ``iteration`` (``<column>.png`` in the run folder)."""
    for y in columns:
        learning_curve([(label, run.metrics_path)], run.path / f"{y}.png", x="iteration", y=y)


# ---------------------------------------------------------------- the loop


def train(cfg: Config, run: Run, device: str = "cpu") -> Summary:
    """Run (or resume) LQR-FLM as configured, logging to ``run``; returns the summary (one
    point per iteration: the mean return of the noise-free controllers)."""
    resolve_device(device)  # the controllers are small: everything runs on the CPU
    spec = envs.make(cfg.env)
    horizon = cfg.horizon or spec.max_episode_steps
    sampler = Sampler(spec, horizon)
    cost = TaskCost(spec)
    lqr = make_lqr(cfg)
    local = initial_controllers(cfg, spec, horizon)
    prior = make_prior(cfg.prior)
    seeds = [condition_seed(cfg.seed, m) for m in range(cfg.conditions)]
    noise = torch.Generator().manual_seed(cfg.seed)
    prior_gen = torch.Generator().manual_seed(cfg.seed + 1)
    rng = np.random.default_rng(cfg.seed)  # unused by the loop; checkpointed like every run's
    parts = {"local": local, **({"prior": prior} if prior is not None else {})}
    generators = {"noise": noise, "prior": prior_gen}

    resumed = loop.resume(run, parts, generators, rng)
    c = resumed if resumed is not None else loop.Counters()
    iteration, steps, returns = c.trial, c.env_steps, list(c.returns)
    watch = loop.Stopwatch((), c.wall_seconds)
    if resumed is not None:
        loop.resumed_message(run, f"after iteration {iteration}", steps)

    while iteration < cfg.iterations:
        watch.start()
        samples = sampler.conditions(
            seeds, cfg.samples, controller_actions(local.controller, noise)
        )
        steps += samples.steps
        dyn = fit_dynamics(samples, prior, cfg.prior.regularization, prior_gen)
        quad = cost.quadratic(samples, dyn)
        x0_mean, x0_cov = initial_state_fit(samples)
        step = local_step(
            lqr,
            local,
            dyn,
            quad,
            local.controller,
            x0_mean,
            x0_cov,
            cfg.min_step_mult,
            cfg.max_step_mult,
        )
        evaluation = sampler.conditions(seeds, 1, controller_actions(local.controller, None, False))
        iteration += 1
        watch.lap()
        ret = float(evaluation.returns.mean())
        returns.append(ret)
        run.log(
            iteration=iteration,
            env_steps=steps,
            **{"return": ret},
            eval_terminal_cost=float(cost.terminal(evaluation).mean()),
            **cost_columns(cost, samples),
            **step_columns(step),
            predicted_cost=float(step.result.expected_cost.mean()),
            wall_seconds=watch.wall_seconds,
            **run.checkpoint_columns(),
        )
        tqdm.write(
            f"iteration {iteration}: sample cost {float(cost.totals(samples).mean()):.2f}, "
            f"controller return {ret:.2f}, KL {float(step.result.kl.mean()):.3f} "
            f"(target {float(step.result.kl_target.mean()):.3f}, {step.result.status})"
        )
        counters = loop.Counters(
            env_steps=steps,
            episodes=iteration,
            trial=iteration,
            wall_seconds=watch.wall_seconds,
            returns=tuple(returns),
        )
        loop.save(run, loop.checkpoint_of(counters, parts, generators, rng))
        loop.stop_if_requested(run)

    write_plots(run, "LQR-FLM", ("cost", "kl", "step_mult"))
    counters = loop.Counters(wall_seconds=watch.wall_seconds, returns=tuple(returns))
    return loop.finish(run, "LQR-FLM", cfg.seed, cfg.env, spec.solved_return, counters, "iteration")
