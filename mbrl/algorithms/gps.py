"""Mirror-descent guided policy search (MDGPS; Montgomery and Levine 2016, "Guided Policy Search
via Approximate Mirror Descent", algorithm 2 with the linearized-policy C-step of sec. 4;
cbfinn/gps' ``AlgorithmMDGPS``): local linear-Gaussian controllers improved by LQR-FLM within a
KL bound of the global policy's linearization, and a global Gaussian MLP policy trained on
their actions by supervised learning.

    M start conditions (env reset seeds); local controllers p_m = N(0, init_variance I);
    global policy pi(u | x) = N(mu(x), Sigma)
    for iteration = 1 .. iterations:
        sample N episodes of T steps per condition: from p_m at the first iteration, then from
        pi itself (sample_from=policy) or from p_m (sample_from=local)
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

The parts it shares with LQR-FLM (sampling, the fit, the cost, the local update) are those of
:mod:`mbrl.algorithms.lqr_flm`; conditions, costs, checkpoints and env steps are as described
there. The checkpoint also holds the policy (weights, observation scaling, covariance, Adam
state) and the generators of its sampling noise and minibatches. BADMM GPS (Levine et al.
2016) is not implemented.
"""

from __future__ import annotations

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
from mbrl.config import Count, Natural, NonNegative, Positive
from mbrl.learners.supervised import GaussianMLPPolicy, PolicyFitReport, SupervisedPolicy
from mbrl.planners.lqr_flm import LinearGaussianController
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
class Config(LocalConfig):
    """MDGPS. The defaults are a quick run on the point mass from four start states spread over
    the box of cbfinn/gps' four MDGPS starts: 4 conditions x 5 samples x 100 steps, KL step 0.5
    per step, never raised above it (max_step_mult 1, as in cbfinn/gps' MDGPS example; larger
    steps move the local controllers further than the policy can follow), 5 iterations."""

    env: str = "point-mass-spread"
    conditions: Count = 4
    kl_step: Positive = 0.5
    max_step_mult: Positive = 1.0
    sample_from: Literal["policy", "local"] = "policy"
    """Where the samples of the iterations after the first come from: the global policy
    (on-policy MDGPS) or the local controllers (measured far worse on Reacher-v5:
    experiments/RESULTS.md, "Guided policy search")."""
    held_out: Natural = 4
    """Start states (reset seeds after the training conditions') the policy alone is evaluated
    on each iteration."""
    policy: PolicyConfig = field(default_factory=PolicyConfig)
    """The global policy and its supervised fit."""


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


def supervised_step(
    policy: SupervisedPolicy,
    controller: LinearGaussianController,
    samples: Samples,
    generator: torch.Generator | None,
) -> PolicyFitReport:
    """The S-step: fit ``policy`` to the ``[M]`` controllers' mean actions ``K_t x + k_t`` at
    every sampled state ``x_t`` (``t < T``), each weighted by the precision ``S_t^-1`` of its
    condition and step."""
    m, n, h1, nx = samples.obs.shape
    x = samples.obs[:, :, :-1].double()  # [M, N, T, X]
    mean = torch.einsum("mtux,mntx->mntu", controller.K, x) + controller.k[:, None]  # [M,N,T,U]
    nu = mean.shape[-1]
    precision = controller.precision[:, None].expand(m, n, h1 - 1, nu, nu)
    return policy.fit(
        x.reshape(-1, nx).float(),
        mean.reshape(-1, nu).float(),
        precision.reshape(-1, nu, nu).float(),
        generator=generator,
    )


# ---------------------------------------------------------------- the loop


def train(cfg: Config, run: Run, device: str = "cpu") -> Summary:
    """Run (or resume) MDGPS as configured, logging to ``run``; returns the summary (one point
    per iteration: the mean return of the noise-free global policy on the training
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
    parts = {"local": local, "policy": policy, **({"prior": prior} if prior is not None else {})}
    generators = {"noise": noise, "prior": prior_gen, "policy_noise": policy_noise, "fit": fit_gen}

    resumed = loop.resume(run, parts, generators, rng)
    c = resumed if resumed is not None else loop.Counters()
    iteration, steps, returns = c.trial, c.env_steps, list(c.returns)
    watch = loop.Stopwatch((), c.wall_seconds)
    if resumed is not None:
        loop.resumed_message(run, f"after iteration {iteration}", steps)

    while iteration < cfg.iterations:
        watch.start()
        on_policy = iteration > 0 and cfg.sample_from == "policy"
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

    write_plots(run, "GPS", ("cost", "kl", "step_mult", "policy_loss", "local_return"))
    counters = loop.Counters(wall_seconds=watch.wall_seconds, returns=tuple(returns))
    return loop.finish(run, "GPS", cfg.seed, cfg.env, spec.solved_return, counters, "iteration")
