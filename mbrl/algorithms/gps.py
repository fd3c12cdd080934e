"""Mirror-descent guided policy search (MDGPS; Montgomery and Levine 2016, "Guided Policy Search
via Approximate Mirror Descent", algorithm 2 with the linearized-policy C-step of sec. 4;
cbfinn/gps' ``AlgorithmMDGPS``): local linear-Gaussian controllers improved by LQR-FLM within a
KL bound of the global policy's linearization, and a global Gaussian MLP policy trained on
their actions by supervised learning.

    M start conditions (env reset seeds); local controllers p_m = N(0, init_variance I);
    global policy pi(u | x) = N(mu(x), Sigma)
    for iteration = 1 .. iterations:
        sample N episodes of T steps per condition: from p_m at the first iteration, then from
        pi itself (sample_from=auto or policy) or from p_m (sample_from=local)
        first iteration only: fit pi to the initial controllers on those samples
        fit TVLG dynamics per condition (GMM prior over every condition's recent samples)
        expand the cost about the samples
        linearize pi about each condition's samples: pi_m(u_t | x_t) = N(K_t x_t + k_t, Sigma)
        adapt each condition's KL step: the cost predicted last iteration against the expected
        cost of pi_m under the new fit (cbfinn/gps' "classic" rule)
        C-step: p_m <- argmin E[cost] s.t. mean KL(p || pi_m) per step <= kl_step * step_mult_m
        S-step: fit pi to the samples' states, targets K_t x + k_t of the new p_m, weighted by
        their precisions S_t^-1 (:class:`~mbrl.learners.supervised.GaussianMLPPolicy`)
        evaluate pi alone (noise-free) on the training conditions and on held-out start states,
        and the noise-free p_m; log; checkpoint

BADMM GPS (``method=badmm``; Levine, Finn, Darrell and Abbeel 2016, "End-to-End Training of
Deep Visuomotor Policies", sec. 4.1 and appendix A; cbfinn/gps' ``AlgorithmBADMM``) replaces the
C-step's anchor and the S-step's targets by the terms of a Bregman ADMM on the constraint
"policy mean = controller mean" with Lagrange multipliers ``lambda_t [M, T, U]`` and KL weights
``nu_t [M, T]`` per condition and step::

    samples from p_m (sample_from=auto or local; the paper's off-policy BADMM) or from pi;
    the first fit of pi, the dynamics, the cost and the evaluation as above
    adapt each condition's KL step on E[cost] + sum_t nu_t KL_t(p || pi_m) (cbfinn/gps'
    _stepadjust; first shrunk to the KL the last update actually took when its bound was slack)
    repeat inner_iterations times on the same samples and fits:
        C-step: p_m <- argmin E[cost - lambda_t' u_t] + sum_t nu_t KL_t(p || pi_m)
                s.t. mean KL(p || p_m_prev) per step <= kl_step * step_mult_m
                (pi_m the policy's linearization about the samples, :meth:`LQRFLM.update`)
        S-step: fit pi to targets K_t x + k_t - S_t lambda_t / nu_t at the sampled states,
                precisions S_t^-1, weights nu_t (the exact minimiser of
                E[u' lambda_t] + nu_t KL(pi || p); cbfinn/gps omits the 1 / nu_t)
        dual step: lambda_t += dual_rate nu_t S_t^-1 mean_i (mu_pi(x_it) - (K_t x_it + k_t))
    after the last round: nu_t <- max(0, nu_t + weight_step KL_t(p || pi)), the KL measured at
    the samples (cbfinn/gps' dual gradient step on pol_wt, ``fixed_lg_step = 0``; the step
    constant or geometric over the iterations, :func:`weight_step_at`)

Only the multipliers on the action means are kept (cbfinn/gps' default
``policy_dual_rate_covar = 0`` leaves its gain multipliers at zero). BADMM's metrics columns:
``badmm_violation`` (the root mean square over the samples of the policy's mean action minus
the controller's, after the last S-step), ``badmm_multiplier_norm`` (mean |lambda_t| over
conditions and steps), ``badmm_policy_weight`` (mean nu_t), ``badmm_policy_kl`` (mean KL_t(p ||
pi) at the samples).

The parts it shares with LQR-FLM (sampling, the fit, the cost, the local update) are those of
:mod:`mbrl.algorithms.lqr_flm`; conditions, costs, checkpoints and env steps are as described
there. The checkpoint also holds the policy (weights, observation scaling, covariance, Adam
state), the generators of its sampling noise and minibatches and, with BADMM, its dual state
(:class:`BADMMDuals`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import torch
from tqdm import tqdm

from mbrl import envs
from mbrl.algorithms import loop
from mbrl.algorithms.common import Summary, resolve_device
from mbrl.algorithms.lqr_flm import (
    ActFn,
    LocalConfig,
    LocalControllers,
    LocalStep,
    Sampler,
    Samples,
    TaskCost,
    condition_seed,
    controller_actions,
    cost_columns,
    fit_dynamics,
    initial_controllers,
    initial_state_fit,
    local_step,
    make_lqr,
    make_prior,
    step_columns,
    write_plots,
)
from mbrl.config import ConfigError, Count, Natural, NonNegative, Positive
from mbrl.dynamics.tvlg import TVLGDynamics
from mbrl.learners.supervised import GaussianMLPPolicy, PolicyFitReport, SupervisedPolicy
from mbrl.planners.lqr_flm import (
    LQRFLM,
    LinearGaussianController,
    QuadraticCost,
    adapt_step,
    expected_cost,
    kl_divergence,
    trajectory_distribution,
)
from mbrl.runs import Run

# ---------------------------------------------------------------- config


@dataclass
class PolicyConfig:
    """The global policy: an MLP mean on standardized observations, a state-independent
    covariance (the inverse mean precision of its targets), Adam."""

    hidden_size: Count = 64
    """Units per hidden layer."""
    num_layers: Count = 2
    """Hidden ReLU layers."""
    lr: Positive = 1e-3
    """Adam learning rate."""
    weight_decay: NonNegative = 0.0
    """Adam's L2 penalty (cbfinn/gps uses 0.005)."""
    iterations: Count = 2000
    """Gradient steps per S-step (the weights carry over between iterations)."""
    batch_size: Count = 128
    """Target rows per gradient step."""


@dataclass
class BADMMConfig:
    """BADMM's dual variables (``method=badmm``): the multipliers ``lambda_t`` on the action
    means and the KL weights ``nu_t`` of each condition and step (Levine et al. 2016, sec. 4.1;
    the defaults are cbfinn/gps' ``ALG_BADMM``)."""

    dual_rate: Positive = 0.1
    """alpha of the multiplier step lambda_t += alpha nu_t S_t^-1 (policy mean - controller
    mean), the mean over the samples (cbfinn/gps policy_dual_rate)."""
    init_policy_weight: Positive = 0.01
    """nu_t of every condition and step before the first update (cbfinn/gps init_pol_wt)."""
    weight_step: NonNegative = 10.0
    """The step of nu_t per unit KL after each iteration: nu_t += weight_step KL_t(p || pi)
    (cbfinn/gps' lg_step_schedule 10.0 with fixed_lg_step 0); 0 keeps nu_t fixed."""
    weight_step_final: Positive | None = None
    """weight_step at the last iteration, interpolated geometrically from weight_step at the
    first (cbfinn/gps' lg_step_schedule as two ends; a run continued with more iterations
    stretches it from there on); None: weight_step throughout."""
    inner_iterations: Count = 4
    """C-step, S-step and multiplier step rounds per iteration on the same samples (cbfinn/gps
    inner_iterations 4); nu_t steps once, after the last."""


@dataclass
class Config(LocalConfig):
    """MDGPS. The defaults are a quick run on the point mass from four start states spread over
    the box of cbfinn/gps' four MDGPS starts: 4 conditions x 5 samples x 100 steps, KL step 0.5
    per step, never raised above it (max_step_mult 1, as in cbfinn/gps' MDGPS example; larger
    steps move the local controllers further than the policy can follow), 5 iterations."""

    env: str = "point-mass-spread"
    conditions: Count = 4
    kl_step: Positive = 0.5
    max_step_mult: Positive = 1.0
    method: Literal["mdgps", "badmm"] = "mdgps"
    """mdgps: the C-step is bounded by the KL to the policy's linearization (Montgomery and
    Levine 2016); badmm: bounded by the KL to the previous controller, with the multiplier and
    weighted policy-KL terms of BADMM (Levine et al. 2016; the badmm section)."""
    sample_from: Literal["auto", "policy", "local"] = "auto"
    """Where the samples of the iterations after the first come from: the global policy or the
    local controllers; auto: the policy for mdgps (on-policy MDGPS; sampling the local
    controllers was measured far worse on Reacher-v5: experiments/RESULTS.md, "Guided policy
    search"), the local controllers for badmm (off-policy, as in the paper)."""
    held_out: Natural = 4
    """Start states (reset seeds after the training conditions') the policy alone is evaluated
    on each iteration."""
    policy: PolicyConfig = field(default_factory=PolicyConfig)
    """The global policy and its supervised fit."""
    badmm: BADMMConfig = field(default_factory=BADMMConfig)
    """BADMM's dual variables (used with method=badmm only)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.badmm.weight_step_final is not None and self.badmm.weight_step == 0:
            raise ConfigError(
                f"badmm.weight_step_final={self.badmm.weight_step_final!r} needs "
                "badmm.weight_step > 0 (a geometric schedule runs between two positive steps); "
                "set badmm.weight_step > 0, or drop badmm.weight_step_final to keep nu fixed"
            )

    @property
    def samples_from(self) -> Literal["policy", "local"]:
        """``sample_from`` with ``auto`` resolved for the method."""
        if self.sample_from != "auto":
            return self.sample_from
        return "local" if self.method == "badmm" else "policy"


# ---------------------------------------------------------------- the parts


def make_policy(
    cfg: PolicyConfig, obs_dim: int, act_dim: int, variance: float, seed: int, device: torch.device
) -> GaussianMLPPolicy:
    """The global policy of ``cfg``, its covariance ``variance I`` before the first fit."""
    return GaussianMLPPolicy(
        obs_dim,
        act_dim,
        hidden_size=cfg.hidden_size,
        num_layers=cfg.num_layers,
        lr=cfg.lr,
        weight_decay=cfg.weight_decay,
        iterations=cfg.iterations,
        batch_size=cfg.batch_size,
        init_variance=variance,
        seed=seed,
        device=device,
    )


def policy_actions(
    policy: SupervisedPolicy, generator: torch.Generator | None, noise: bool = True
) -> ActFn:
    """The global policy's actions for any rows: samples drawn with ``generator`` (on the
    policy's device), or the means (``noise=False``)."""

    def act(x: torch.Tensor, t: int) -> torch.Tensor:
        return policy.act(x, deterministic=not noise, generator=generator)

    return act


def policy_linearization(policy: SupervisedPolicy, samples: Samples) -> LinearGaussianController:
    """The global policy as ``M`` linear-Gaussian controllers about each condition's samples:
    ``K_t``, ``k_t`` the mean over the ``N`` samples of the mean's tangent at ``x_t``, the
    covariance the policy's (Montgomery and Levine 2016, sec. 4: the C-step's KL is to this
    linearization)."""
    m, n, h1, nx = samples.obs.shape
    h = h1 - 1
    x = samples.obs[:, :, :-1].reshape(m * n * h, nx)
    K, k = policy.linearize(x)  # [M N T, U, X], [M N T, U]
    nu = K.shape[1]
    K = K.detach().cpu().double().view(m, n, h, nu, nx).mean(1)
    k = k.detach().cpu().double().view(m, n, h, nu).mean(1)
    cov = policy.covariance.detach().cpu().double().expand(m, h, nu, nu)
    return LinearGaussianController(K, k, cov)


def controller_means(controller: LinearGaussianController, samples: Samples) -> torch.Tensor:
    """The ``[M]`` controllers' mean actions ``K_t x + k_t`` at every sampled state ``x_t``
    (``t < T``) of their condition, ``[M, N, T, U]`` float64."""
    x = samples.obs[:, :, :-1].double()  # [M, N, T, X]
    return torch.einsum("mtux,mntx->mntu", controller.K, x) + controller.k[:, None]


def policy_means(policy: SupervisedPolicy, samples: Samples) -> torch.Tensor:
    """The policy's mean actions ``mu(x_t)`` at every sampled state (``t < T``), ``[M, N, T, U]``
    float64 on the CPU."""
    m, n, h1, nx = samples.obs.shape
    with torch.no_grad():
        mu = policy.mean(samples.obs[:, :, :-1].reshape(-1, nx))
    return mu.detach().cpu().double().view(m, n, h1 - 1, -1)


def supervised_step(
    policy: SupervisedPolicy,
    controller: LinearGaussianController,
    samples: Samples,
    generator: torch.Generator | None,
    multiplier: torch.Tensor | None = None,
    weight: torch.Tensor | None = None,
) -> PolicyFitReport:
    """The S-step: fit ``policy`` to the ``[M]`` controllers' mean actions ``K_t x + k_t`` at
    every sampled state ``x_t`` (``t < T``), each weighted by the precision ``S_t^-1`` of its
    condition and step.

    BADMM passes its multipliers ``multiplier [M, T, U]`` and KL weights ``weight [M, T] > 0``:
    the targets become ``K_t x + k_t - S_t lambda_t / nu_t``, the minimiser over the policy's
    mean of ``u' lambda_t + nu_t KL(pi || p)`` (Levine et al. 2016, sec. 4.1), and each row
    counts ``nu_t`` in the fit."""
    m, n, h1, nx = samples.obs.shape
    x = samples.obs[:, :, :-1].double()  # [M, N, T, X]
    mean = controller_means(controller, samples)  # [M, N, T, U]
    nu = mean.shape[-1]
    rows = None
    if multiplier is not None and weight is not None:
        shift = (controller.covariance @ multiplier[..., None])[..., 0] / weight[..., None]
        mean = mean - shift[:, None]
        rows = weight[:, None].expand(m, n, h1 - 1).reshape(-1).float()
    elif multiplier is not None or weight is not None:
        raise ValueError("supervised_step: pass the multipliers and their weights together")
    precision = controller.precision[:, None].expand(m, n, h1 - 1, nu, nu)
    return policy.fit(
        x.reshape(-1, nx).float(),
        mean.reshape(-1, nu).float(),
        precision.reshape(-1, nu, nu).float(),
        rows,
        generator=generator,
    )


# ---------------------------------------------------------------- BADMM


class BADMMDuals:
    """BADMM's dual state of ``M`` conditions and ``T`` steps (float64): the multipliers
    ``lam [M, T, U]`` on the action means, the KL weights ``weight [M, T]`` (nu_t) and the mean
    KL per step to the previous controller that the last C-step took, ``kl [M]`` (nan before
    it). Round-trips through a checkpoint."""

    def __init__(self, conditions: int, horizon: int, act_dim: int, init_weight: float) -> None:
        self.lam = torch.zeros(conditions, horizon, act_dim, dtype=torch.float64)
        self.weight = torch.full((conditions, horizon), float(init_weight), dtype=torch.float64)
        self.kl = torch.full((conditions,), math.nan, dtype=torch.float64)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"lam": self.lam, "weight": self.weight, "kl": self.kl}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        for name in ("lam", "weight", "kl"):
            setattr(self, name, state[name].to(torch.float64))


def with_multipliers(cost: QuadraticCost, lam: torch.Tensor) -> QuadraticCost:
    """``cost - lambda_t' u_t`` at every step: the C-step's multiplier term
    (``lam [M, T, U]``)."""
    nu = lam.shape[-1]
    c = cost.c.clone()
    c[..., -nu:] = c[..., -nu:] - lam
    return QuadraticCost(cost.C, c, cost.c0, cost.C_final, cost.c_final, cost.c0_final)


def policy_kl(
    policy: SupervisedPolicy, controller: LinearGaussianController, samples: Samples
) -> torch.Tensor:
    """``KL(p(. | x_t) || pi(. | x_t))`` of the ``[M]`` controllers against the policy, in
    closed form at every sampled state and averaged over the ``N`` samples: ``[M, T]``
    (cbfinn/gps ``AlgorithmBADMM._policy_kl``)."""
    d = policy_means(policy, samples) - controller_means(controller, samples)  # [M, N, T, U]
    cov = policy.covariance.detach().cpu().double()  # [U, U]
    chol = torch.linalg.cholesky(cov)
    prec = torch.cholesky_inverse(chol)
    nu = cov.shape[-1]
    trace = (prec * controller.covariance).sum((-1, -2))  # [M, T]
    logdet_pi = 2 * torch.log(torch.diagonal(chol)).sum()
    logdet_p = 2 * torch.log(torch.diagonal(controller.chol, dim1=-2, dim2=-1)).sum(-1)
    maha = torch.einsum("mntu,uv,mntv->mnt", d, prec, d).mean(1)  # [M, T]
    return 0.5 * (trace - nu + logdet_pi - logdet_p + maha)


def badmm_objective(
    dyn: TVLGDynamics,
    controller: LinearGaussianController,
    cost: QuadraticCost,
    policy: LinearGaussianController,
    weight: torch.Tensor,
    x0_mean: torch.Tensor,
    x0_cov: torch.Tensor,
) -> torch.Tensor:
    """``E[cost] + sum_t nu_t KL_t(p || pi)`` ``[M]`` of the controllers under ``dyn`` with the
    policy's linearization ``policy`` and weights ``weight [M, T]``: what BADMM's step
    adaptation compares (cbfinn/gps ``AlgorithmBADMM._stepadjust``, without the multipliers)."""
    traj = trajectory_distribution(dyn, controller, x0_mean, x0_cov)
    kl = kl_divergence(controller, policy, *traj, per_step=True)  # [M, T]
    return expected_cost(dyn, controller, cost, x0_mean, x0_cov) + (weight * kl).sum(-1)


def weight_step_at(
    weight_step: float, weight_step_final: float | None, iteration: int, iterations: int
) -> float:
    """The nu step of iteration ``iteration`` (0-based) of ``iterations``: ``weight_step``, or
    geometric from it to ``weight_step_final`` at the last iteration."""
    if weight_step_final is None or iterations == 1:
        return weight_step
    return weight_step * (weight_step_final / weight_step) ** (iteration / (iterations - 1))


@dataclass(frozen=True)
class BADMMStep:
    """One BADMM iteration's update of the controllers, the policy and the duals."""

    local: LocalStep  # the last C-step (its step multipliers and the adaptation's actual cost)
    fit: PolicyFitReport  # the last S-step
    violation: float  # RMS of mu_pi(x) - (K x + k) over the samples after the last S-step
    policy_kl: float  # mean KL_t(p || pi) at the samples (the one nu stepped on)
    multiplier_norm: float  # mean |lambda_t| over conditions and steps, after the update
    policy_weight: float  # mean nu_t after the update


def badmm_step(
    lqr: LQRFLM,
    local: LocalControllers,
    duals: BADMMDuals,
    policy: SupervisedPolicy,
    samples: Samples,
    dyn: TVLGDynamics,
    cost: QuadraticCost,
    x0_mean: torch.Tensor,
    x0_cov: torch.Tensor,
    kl_step: float,
    min_step_mult: float,
    max_step_mult: float,
    dual_rate: float,
    weight_step: float,
    inner_iterations: int,
    generator: torch.Generator | None,
) -> BADMMStep:
    """One BADMM iteration on ``samples`` (the module docstring): adapt the step multipliers,
    then ``inner_iterations`` rounds of C-step, S-step and multiplier step, then the weights'
    step. Updates ``local``, ``duals`` and ``policy`` in place."""
    prev = local.controller
    anchor = policy_linearization(policy, samples)
    actual = torch.full_like(local.step_mult, math.nan)
    if local.updated:
        actual = badmm_objective(dyn, prev, cost, anchor, duals.weight, x0_mean, x0_cov)
        taken = (duals.kl / kl_step).clamp_min(min_step_mult)  # a slack bound: what it took
        local.step_mult = adapt_step(
            torch.minimum(local.step_mult, taken),
            local.previous_cost,
            local.predicted_cost,
            actual,
            min_step_mult=min_step_mult,
            max_step_mult=max_step_mult,
        )
    eta = local.eta
    for i in range(inner_iterations):
        if i > 0:
            anchor = policy_linearization(policy, samples)
        result = lqr.update(
            dyn,
            with_multipliers(cost, duals.lam),
            prev,
            x0_mean,
            x0_cov,
            step_mult=local.step_mult,
            eta=eta,
            policy=anchor,
            policy_weight=duals.weight,
        )
        eta = result.eta
        fit = supervised_step(
            policy, result.controller, samples, generator, duals.lam, duals.weight
        )
        gap = policy_means(policy, samples) - controller_means(result.controller, samples)
        increment = (result.controller.precision @ gap.mean(1)[..., None])[..., 0]  # [M, T, U]
        duals.lam = duals.lam + dual_rate * duals.weight[..., None] * increment
    kl = policy_kl(policy, result.controller, samples)  # [M, T]
    duals.weight = (duals.weight + weight_step * kl).clamp_min(0.0)
    duals.kl = result.kl
    local.controller, local.eta = result.controller, result.eta
    anchor = policy_linearization(policy, samples)
    local.previous_cost = badmm_objective(dyn, prev, cost, anchor, duals.weight, x0_mean, x0_cov)
    local.predicted_cost = badmm_objective(
        dyn, result.controller, cost, anchor, duals.weight, x0_mean, x0_cov
    )
    return BADMMStep(
        local=LocalStep(result, local.step_mult.clone(), actual),
        fit=fit,
        violation=float(gap.square().sum(-1).mean().sqrt()),
        policy_kl=float(kl.mean()),
        multiplier_norm=float(duals.lam.norm(dim=-1).mean()),
        policy_weight=float(duals.weight.mean()),
    )


def badmm_columns(step: BADMMStep) -> dict[str, float]:
    """BADMM's metric columns (the module docstring)."""
    return {
        "badmm_violation": step.violation,
        "badmm_multiplier_norm": step.multiplier_norm,
        "badmm_policy_weight": step.policy_weight,
        "badmm_policy_kl": step.policy_kl,
    }


# ---------------------------------------------------------------- the loop


def train(cfg: Config, run: Run, device: str = "cpu") -> Summary:
    """Run (or resume) MDGPS or BADMM GPS as configured, logging to ``run``; returns the summary
    (one point per iteration: the mean return of the noise-free global policy on the training
    conditions)."""
    dev = resolve_device(device)
    spec = envs.make(cfg.env)
    horizon = cfg.horizon or spec.max_episode_steps
    sampler = Sampler(spec, horizon)
    cost = TaskCost(spec)
    lqr = make_lqr(cfg)
    local = initial_controllers(cfg, spec, horizon)
    prior = make_prior(cfg.prior)
    policy = make_policy(cfg.policy, spec.obs_dim, spec.act_dim, cfg.init_variance, cfg.seed, dev)
    seeds = [condition_seed(cfg.seed, m) for m in range(cfg.conditions)]
    held_out = [condition_seed(cfg.seed, cfg.conditions + j) for j in range(cfg.held_out)]
    noise = torch.Generator().manual_seed(cfg.seed)
    prior_gen = torch.Generator().manual_seed(cfg.seed + 1)
    policy_noise = torch.Generator(device=dev).manual_seed(cfg.seed + 2)
    fit_gen = torch.Generator(device=dev).manual_seed(cfg.seed + 3)
    rng = np.random.default_rng(cfg.seed)  # unused by the loop; checkpointed like every run's
    badmm = cfg.method == "badmm"
    duals = BADMMDuals(cfg.conditions, horizon, spec.act_dim, cfg.badmm.init_policy_weight)
    parts = {
        "local": local,
        "policy": policy,
        **({"prior": prior} if prior is not None else {}),
        **({"badmm": duals} if badmm else {}),
    }
    generators = {"noise": noise, "prior": prior_gen, "policy_noise": policy_noise, "fit": fit_gen}

    resumed = loop.resume(run, parts, generators, rng)
    c = resumed if resumed is not None else loop.Counters()
    iteration, steps, returns = c.trial, c.env_steps, list(c.returns)
    watch = loop.Stopwatch((), c.wall_seconds)
    if resumed is not None:
        loop.resumed_message(run, f"after iteration {iteration}", steps)

    while iteration < cfg.iterations:
        watch.start()
        on_policy = iteration > 0 and cfg.samples_from == "policy"
        act = (
            policy_actions(policy, policy_noise)
            if on_policy
            else controller_actions(local.controller, noise)
        )
        samples = sampler.conditions(seeds, cfg.samples, act)
        steps += samples.steps
        if policy.fits == 0:  # the first linearization must match the initial controllers
            supervised_step(policy, local.controller, samples, fit_gen)
        dyn = fit_dynamics(samples, prior, cfg.prior.regularization, prior_gen)
        quad = cost.quadratic(samples, dyn)
        x0_mean, x0_cov = initial_state_fit(samples)
        extra: dict[str, float] = {}
        if badmm:
            b = cfg.badmm
            update = badmm_step(
                lqr,
                local,
                duals,
                policy,
                samples,
                dyn,
                quad,
                x0_mean,
                x0_cov,
                cfg.kl_step,
                cfg.min_step_mult,
                cfg.max_step_mult,
                b.dual_rate,
                weight_step_at(b.weight_step, b.weight_step_final, iteration, cfg.iterations),
                b.inner_iterations,
                fit_gen,
            )
            step, report, extra = update.local, update.fit, badmm_columns(update)
        else:
            anchor = policy_linearization(policy, samples)
            step = local_step(
                lqr,
                local,
                dyn,
                quad,
                anchor,
                x0_mean,
                x0_cov,
                cfg.min_step_mult,
                cfg.max_step_mult,
            )
            report = supervised_step(policy, local.controller, samples, fit_gen)
        with torch.no_grad():
            alone = sampler.conditions(seeds, 1, policy_actions(policy, None, noise=False))
            local_eval = sampler.conditions(
                seeds, 1, controller_actions(local.controller, None, noise=False)
            )
            unseen = (
                sampler.conditions(held_out, 1, policy_actions(policy, None, noise=False))
                if held_out
                else None
            )
        iteration += 1
        watch.lap()
        ret = float(alone.returns.mean())
        returns.append(ret)
        run.log(
            iteration=iteration,
            env_steps=steps,
            **{"return": ret},
            local_return=float(local_eval.returns.mean()),
            held_out_return=float(unseen.returns.mean()) if unseen is not None else "",
            eval_terminal_cost=float(cost.terminal(alone).mean()),
            local_terminal_cost=float(cost.terminal(local_eval).mean()),
            held_out_terminal_cost=float(cost.terminal(unseen).mean())
            if unseen is not None
            else "",
            policy_loss=report.final_loss,
            policy_initial_loss=report.initial_loss,
            policy_fit_seconds=report.seconds,
            **cost_columns(cost, samples),
            **step_columns(step),
            predicted_cost=float(step.result.expected_cost.mean()),
            **extra,
            wall_seconds=watch.wall_seconds,
            **run.checkpoint_columns(),
        )
        tqdm.write(
            f"iteration {iteration}: sample cost {float(cost.totals(samples).mean()):.2f}, "
            f"policy return {ret:.2f} (local {float(local_eval.returns.mean()):.2f}"
            + (f", held-out {float(unseen.returns.mean()):.2f}" if unseen is not None else "")
            + f"), KL {float(step.result.kl.mean()):.3f} (target "
            f"{float(step.result.kl_target.mean()):.3f}, {step.result.status}), policy loss "
            f"{report.final_loss:.4g}"
            + (
                f", violation {extra['badmm_violation']:.3g}, nu {extra['badmm_policy_weight']:.3g}"
                if badmm
                else ""
            )
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

    plots = ("cost", "kl", "step_mult", "policy_loss", "local_return")
    write_plots(run, "GPS", plots + (("badmm_violation",) if badmm else ()))
    counters = loop.Counters(wall_seconds=watch.wall_seconds, returns=tuple(returns))
    return loop.finish(run, "GPS", cfg.seed, cfg.env, spec.solved_return, counters, "iteration")
