"""MCTS-MPC: model-predictive control by Monte-Carlo tree search on an env's known model.

    build the env's known model (nothing is learned)
    for trial = 1 .. trials:
        run one episode with MPC: a tree search over the known model from every observation
        (planner.name=mcts), replanning every ``replan_every`` steps
        log the episode; write a checkpoint

Known models (:func:`known_model`): the analytic systems' own dynamics (``pendulum-swingup``,
``cartpole-swingup-analytic``, ``acrobot-swingup``, ``double-integrator``:
:class:`~mbrl.dynamics.SystemModel`, with the system's terminal cost as the value at the
horizon), the MuJoCo simulator of the MuJoCo tasks whose observation determines the simulator
state (``cartpole-swingup``, ``inverted-pendulum``, ``half-cheetah``, ``hopper``:
:class:`~mbrl.dynamics.mujoco_model.MujocoModel`), and batched torch twins of the classic-control
steps (``CartPole-v1`` and ``cartpole-balance``: :func:`cartpole_step`; ``pendulum`` and
``pendulum-hanging``: :func:`pendulum_v1_step`).

Actions. Discrete envs (CartPole-v1) plan over their action values. On a box env MCTS with
``planner.actions=discrete`` searches the grid of ``action_grid`` evenly spaced values per
action dimension (:func:`mbrl.envs.discretize`; 11 torques on the pendulum); with
``planner.actions=widening`` or ``sampled`` it searches the box itself. Any other planner
(``planner.name=cem`` ...) plans the same known model over the box, which makes this algorithm
the reference for planning quality at equal model steps.

Each trial logs one row of ``metrics.csv`` and writes a checkpoint (the counters and the RNG
streams: there is no buffer and no model state); a killed run resumes after its last finished
trial with the same numbers (``mbrl resume runs/<name>``). Trial ``i`` resets its env with the
seed :func:`~mbrl.algorithms.mpc_loop.episode_seed` of the run seed and ``i``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Annotated

import numpy as np
import torch
from tqdm import tqdm

from mbrl import envs
from mbrl.algorithms import loop
from mbrl.algorithms.common import Summary, progress_bar, resolve_device
from mbrl.algorithms.factory import PlannerConfig, check_env, make_planner
from mbrl.algorithms.mpc_loop import episode_seed, planning_problem
from mbrl.config import ConfigError, Count, Natural, Range, Seed, check_ranges
from mbrl.control import MPCController, run_episode
from mbrl.dynamics.base import DynamicsModel
from mbrl.dynamics.known import KnownModel
from mbrl.envs import cartpole
from mbrl.envs.spec import EnvSpec
from mbrl.planners import ValueFn
from mbrl.runs import Run

# ---------------------------------------------------------------- known models


def cartpole_step(x: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """CartPole-v1's step (Florian 2007 equations, explicit Euler, tau 0.02 s) with the force
    ``10 clip(u, -1, 1)`` N: ``x [B, 4] = [x, x_dot, theta, theta_dot]``, ``u [B, 1] -> [B, 4]``
    in ``x``'s dtype. CartPole-v1's indices 0 and 1 are ``u = -1`` and ``+1``; cartpole-balance
    plays ``u`` itself."""
    pos, vel, theta, omega = x.unbind(-1)
    force = cartpole.FORCE_MAG * u[..., 0].clamp(-1.0, 1.0)
    cos, sin = torch.cos(theta), torch.sin(theta)
    total = cartpole.MASS_CART + cartpole.MASS_POLE
    pml = cartpole.MASS_POLE * cartpole.HALF_LENGTH
    temp = (force + pml * omega.square() * sin) / total
    theta_acc = (cartpole.GRAVITY * sin - cos * temp) / (
        cartpole.HALF_LENGTH * (4.0 / 3.0 - cartpole.MASS_POLE * cos.square() / total)
    )
    x_acc = temp - pml * theta_acc * cos / total
    tau = cartpole.TAU
    return torch.stack(
        [pos + tau * vel, vel + tau * x_acc, theta + tau * omega, omega + tau * theta_acc], -1
    )


PENDULUM_G, PENDULUM_DT, PENDULUM_MAX_SPEED, PENDULUM_MAX_TORQUE = 10.0, 0.05, 8.0, 2.0


def pendulum_v1_step(x: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Pendulum-v1's step (g 10, m 1, l 1, dt 0.05 s, semi-implicit Euler, speed clipped to
    8 rad/s, torque to 2 N m) on its observation: ``x [B, 3] = [cos th, sin th, th_dot]``,
    ``u [B, 1] -> [B, 3]`` in ``x``'s dtype."""
    th = torch.atan2(x[..., 1], x[..., 0])
    tau = u[..., 0].clamp(-PENDULUM_MAX_TORQUE, PENDULUM_MAX_TORQUE)
    acc = 3.0 * PENDULUM_G / 2.0 * torch.sin(th) + 3.0 * tau
    w = (x[..., 2] + acc * PENDULUM_DT).clamp(-PENDULUM_MAX_SPEED, PENDULUM_MAX_SPEED)
    th = th + w * PENDULUM_DT
    return torch.stack([torch.cos(th), torch.sin(th), w], -1)


_TWINS = {
    "CartPole-v1": cartpole_step,
    "cartpole-balance": cartpole_step,
    "pendulum": pendulum_v1_step,
    "pendulum-hanging": pendulum_v1_step,
}
_MUJOCO = ("cartpole-swingup", "inverted-pendulum", "half-cheetah", "hopper")


def known_envs() -> tuple[str, ...]:
    """The registered envs :func:`known_model` has a model of, sorted."""
    from mbrl.envs.systems import ENV_NAMES

    return tuple(sorted({*_TWINS, *_MUJOCO, *ENV_NAMES}))


def known_model(env: str) -> tuple[DynamicsModel, ValueFn | None]:
    """The true dynamics of the registered env ``env`` behind the model seam (on its action
    vectors), and the terminal value to plan with (an analytic system's minus terminal cost;
    ``None`` for the others).

    Raises:
        ValueError: ``env`` is not one of :func:`known_envs` (the message lists them).
    """
    if env not in known_envs():
        raise ValueError(
            f"env {env!r} has no known model to plan on; known: {', '.join(known_envs())} "
            "(a learned model plans with `mbrl run pets --env ... planner.name=mcts`)"
        )
    spec = envs.make(env)
    if spec.dynamics is not None:
        from mbrl.dynamics.systems import SystemModel

        return SystemModel(spec.dynamics), spec.dynamics.value_fn()
    if env in _TWINS:
        return KnownModel(_TWINS[env], spec.obs_dim, spec.act_dim), None
    from mbrl.dynamics.mujoco_model import MujocoModel

    return MujocoModel.from_spec(spec), None


# ---------------------------------------------------------------- config


@dataclass
class Config:
    """MCTS-MPC on a known model. The defaults search CartPole-v1 with 64 simulations and leaf
    value 0; the preset mcts_mpc_cartpole (25-step random rollouts averaged over 4 particles,
    waves of 8 leaves, the tree kept) balances it."""

    env: str = "CartPole-v1"
    """Registry name of an env with a known model (:func:`known_envs`)."""
    seed: Seed = 0
    """Seeds the env resets and the planner."""
    trials: Count = 3
    """MPC episodes (at most; see stop_when_solved)."""
    horizon: Count = 25
    """Planning horizon H: the depth bound of the tree (planner.max_depth may lower it) and the
    length of the plan."""
    particles: Count = 1
    """Particles P per node. Known models are deterministic, so the P particles of a node are
    copies of one state, and P > 1 averages P rollouts per leaf (planner.rollout_depth)."""
    replan_every: Count = 1
    """Plan every k env steps (k <= horizon)."""
    action_grid: Annotated[int, Range(2, fix="give >= 2 values per action dim")] = 11
    """Values per action dimension of the grid a box env is searched on by MCTS with
    planner.actions=discrete (A = action_grid^U); not used on discrete envs or by other
    planners."""
    stop_when_solved: Natural = 0
    """Stop after this many consecutive solved trials (0: run every trial)."""
    planner: PlannerConfig = field(default_factory=lambda: PlannerConfig(name="mcts"))
    """The planner: mcts (default), or any other planner name on the same known model."""

    def __post_init__(self) -> None:
        check_ranges(self)
        check_env(self.env)
        known = known_envs()
        if self.env not in known:
            raise ConfigError(
                f"env={self.env} has no known model to plan on; use one of {', '.join(known)}, "
                "or plan on a learned model: mbrl run pets --env ... planner.name=mcts"
            )
        if self.replan_every > self.horizon:
            raise ConfigError(
                f"replan_every={self.replan_every} exceeds horizon={self.horizon}: a plan holds "
                "H actions; lower replan_every or raise horizon"
            )


def planning_spec(cfg: Config) -> EnvSpec:
    """The env as planned: a box env on the ``action_grid`` grid when MCTS searches discrete
    actions, else the registered spec."""
    spec = envs.make(cfg.env)
    p = cfg.planner
    if p.name == "mcts" and p.actions == "discrete" and not spec.discrete:
        return envs.discretize(spec, cfg.action_grid)
    return spec


# ---------------------------------------------------------------- the loop


def train(cfg: Config, run: Run, device: str = "cpu") -> Summary:
    """Run (or resume) MCTS-MPC as configured, logging to ``run``; returns the summary."""
    dev = resolve_device(device)
    spec = planning_spec(cfg)
    model, value_fn = known_model(cfg.env)
    env = spec.make()
    gen = torch.Generator(device=dev).manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)  # unused by the loop; checkpointed like every run's
    problem = planning_problem(spec, model, cfg.horizon, cfg.particles, gen, dev, value_fn)
    controller = MPCController(make_planner(cfg.planner), problem, cfg.replan_every, dev)
    env_action = spec.env_action if spec.discrete else None
    generators = {"planning": gen}

    resumed = loop.resume(run, {}, generators, rng)
    c = resumed if resumed is not None else loop.Counters()
    trial, steps, returns, streak = c.trial, c.env_steps, list(c.returns), c.streak
    watch = loop.Stopwatch((), c.wall_seconds)
    if resumed is not None:
        loop.resumed_message(run, f"after trial {trial}", steps)

    stop = cfg.stop_when_solved
    while trial < cfg.trials and not (stop and streak >= stop):
        watch.start()
        controller.reset_stats()
        with progress_bar(spec.max_episode_steps, f"trial {trial + 1}/{cfg.trials}") as bar:
            ep = run_episode(
                env,
                controller,
                seed=episode_seed(cfg.seed, trial),
                on_step=lambda t, r: bar.update(1),
                env_action=env_action,
            )
        trial += 1
        steps += len(ep)
        watch.lap()
        returns.append(ep.ret)
        solved = spec.solved_return is not None and ep.ret >= spec.solved_return
        streak = streak + 1 if solved else 0
        stats = controller.stats
        plan_seconds = stats.plan_seconds / max(stats.plans, 1)
        run.log(
            trial=trial,
            env_steps=steps,
            **{"return": ep.ret},
            length=len(ep),
            plan_seconds_per_step=plan_seconds,
            plans_not_ok=stats.not_ok,
            nonfinite=stats.nonfinite,
            wall_seconds=watch.wall_seconds,
            **run.checkpoint_columns(),  # of the checkpoint before this row
        )
        tqdm.write(
            f"trial {trial}: return {ep.ret:.1f} ({len(ep)} steps), {plan_seconds:.3f} s/plan"
            + (f", {stats.nonfinite} non-finite candidates" if stats.nonfinite else "")
            + (f", {stats.not_ok} plans not ok" if stats.not_ok else "")
        )
        counters = loop.Counters(
            env_steps=steps,
            episodes=trial,
            trial=trial,
            streak=streak,
            wall_seconds=watch.wall_seconds,
            returns=tuple(returns),
        )
        loop.save(run, loop.checkpoint_of(counters, {}, generators, rng))
        loop.stop_if_requested(run)

    counters = loop.Counters(wall_seconds=watch.wall_seconds, returns=tuple(returns))
    return loop.finish(run, "MCTS-MPC", cfg.seed, cfg.env, spec.solved_return, counters, "trial")
