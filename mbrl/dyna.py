"""What the Dyna-style algorithms share: branched model rollouts, the model buffer with retention,
mixed real/model batches, value-expansion targets, evaluation, and the one training loop.

The algorithms differ only where the model is used:

- ``"none"`` (SAC, TD3, DDPG, NAF): the learner trains on real transitions only.
- ``"branch"`` (MBPO, Janner et al. 2019, Algorithm 2; MBA, Gu et al. 2016, Section 5):
  every ``train_every`` env steps the model is refitted, and every ``rollout_every`` steps
  ``k``-step rollouts branched from real states under the current policy fill a model buffer;
  the learner trains on batches mixing a share ``real_ratio`` of real transitions with
  imagined ones.
- ``"mve"`` (MVE, Feinberg et al. 2018, Section 3): the learner trains on real transitions and
  on the ``H`` states imagined after each, with ``H``-step value-expansion targets
  (:func:`value_expansion_batch`) instead of one-step targets.

The library parts take plain typed arguments; :func:`train` is the edge that reads a config.
"""

from __future__ import annotations

import functools
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import gymnasium as gym
import numpy as np
import torch
from tqdm import tqdm

from mbrl import envs
from mbrl.algorithms.common import Summary, progress_bar, resolve_device
from mbrl.buffer import ReplayBuffer
from mbrl.config import ConfigError
from mbrl.control.mpc import run_episode
from mbrl.dynamics.base import DynamicsModel, Transitions
from mbrl.dynamics.ensemble import ProbabilisticEnsemble
from mbrl.envs.spec import RewardFn, TerminationFn
from mbrl.learners import NAF, SAC, TD3, Learner
from mbrl.plots import learning_curve, related_runs
from mbrl.runs import Run, numpy_rng_state, set_numpy_rng_state

ActFn = Callable[[torch.Tensor], torch.Tensor]
"""``obs [B, X] -> act [B, U]`` in env units, the policy that drives model rollouts."""


class NonFiniteModelError(RuntimeError):
    """A model rollout produced NaN or inf observations or rewards."""


class DivergenceError(RuntimeError):
    """A learner's loss became non-finite or its Q-values exceeded the allowed scale."""


# ----------------------------------------------------------------------------- model rollouts


@dataclass(frozen=True)
class BranchedRollout:
    """Imagined transitions of rollouts branched from real states."""

    transitions: Transitions  # [M] every step taken by a live rollout, termination included
    starts: int  # B, rollouts started
    steps: int  # rollout steps run (<= length: all rollouts may terminate early)
    mean_length: float  # mean number of steps a rollout lasted


def _check_finite(next_obs: torch.Tensor, reward: torch.Tensor, alive: torch.Tensor, t: int):
    bad = alive & ~(torch.isfinite(next_obs).all(-1) & torch.isfinite(reward))  # [B]
    n = int(bad.sum())
    if n:
        raise NonFiniteModelError(
            f"the model produced NaN/inf in {n} of {int(alive.sum())} live rollouts at rollout "
            f"step {t + 1}; the model fit has diverged (lower the model learning rate, raise its "
            "weight decay, or check the data for NaN)"
        )


@torch.no_grad()
def branched_rollout(
    model: DynamicsModel,
    act_fn: ActFn,
    start_obs: torch.Tensor,
    length: int,
    reward_fn: RewardFn,
    termination_fn: TerminationFn,
    generator: torch.Generator | None,
) -> BranchedRollout:
    """Roll the model ``length`` steps from each real state ``start_obs [B, X]`` (MBPO
    Algorithm 2, lines 8-10), one particle per start, actions from ``act_fn``.

    The reward is the model's (``model.learns_reward``) or ``reward_fn(obs, act, next_obs)``;
    ``termination_fn(next_obs)`` ends a rollout after the step that terminates it (that step is
    kept, flagged terminated). Stops early once every rollout has terminated.

    Raises:
        NonFiniteModelError: a live rollout reached a NaN/inf observation or reward.
    """
    if length < 0:
        raise ValueError(f"rollout length must be >= 0, got {length}")
    state = model.rollout_start(start_obs, 1, generator)
    alive = torch.ones(start_obs.shape[0], dtype=torch.bool, device=state.obs.device)  # [B]
    lived = torch.zeros(start_obs.shape[0], device=state.obs.device)  # [B]
    parts: list[tuple[torch.Tensor, ...]] = []
    steps = 0
    for t in range(length):
        obs = state.obs  # [B, X]
        act = act_fn(obs)  # [B, U]
        state = model.rollout_step(state, act, generator)
        reward = state.reward if model.learns_reward else reward_fn(obs, act, state.obs)  # [B]
        _check_finite(state.obs, reward, alive, t)
        term = termination_fn(state.obs) & alive  # [B]
        parts.append((obs[alive], act[alive], state.obs[alive], reward[alive], term[alive]))
        lived += alive.float()
        alive = alive & ~term
        steps = t + 1
        if not bool(alive.any()):
            break
    if parts:
        cols = [torch.cat(c) for c in zip(*parts, strict=True)]
    else:
        x, u = start_obs.shape[-1], model.act_dim
        dev = state.obs.device
        cols = [
            torch.zeros(0, x, device=dev),
            torch.zeros(0, u, device=dev),
            torch.zeros(0, x, device=dev),
            torch.zeros(0, device=dev),
            torch.zeros(0, dtype=torch.bool, device=dev),
        ]
    return BranchedRollout(
        transitions=Transitions(*cols),
        starts=start_obs.shape[0],
        steps=steps,
        mean_length=lived.mean().item() if length else 0.0,
    )


def rollout_length(
    epoch: int, min_epoch: int, max_epoch: int, min_length: int, max_length: int
) -> int:
    """MBPO's rollout-length schedule (Appendix C): ``min_length`` until ``min_epoch``, then
    linear in the epoch up to ``max_length`` at ``max_epoch``, floored to an int.

    E.g. Hopper ``(20, 100, 1, 15)``: length 1 up to epoch 20, 8 at epoch 60, 15 from epoch 100.
    """
    if max_epoch <= min_epoch:
        return max_length if epoch >= max_epoch else min_length
    frac = min(max((epoch - min_epoch) / (max_epoch - min_epoch), 0.0), 1.0)
    return int(min_length + frac * (max_length - min_length))


class ModelBuffer:
    """FIFO store of imagined transitions whose capacity follows the rollout length.

    MBPO keeps the rollouts of the last ``retain_epochs`` epochs: capacity =
    ``rollout_batch_size * length * (epoch_length / rollout_every) * retain_epochs``.
    :meth:`resize` keeps the newest transitions when the capacity changes.
    """

    def __init__(
        self, obs_dim: int, act_dim: int, capacity: int, device: torch.device | str = "cpu"
    ) -> None:
        self.obs_dim, self.act_dim, self.device = obs_dim, act_dim, torch.device(device)
        self.buffer = ReplayBuffer(obs_dim, act_dim, capacity, self.device)

    @property
    def capacity(self) -> int:
        return self.buffer.capacity

    def __len__(self) -> int:
        return len(self.buffer)

    def resize(self, capacity: int) -> None:
        """Change the capacity, keeping the newest ``min(len, capacity)`` transitions."""
        if capacity == self.capacity:
            return
        old = self.buffer.all() if len(self.buffer) else None
        self.buffer = ReplayBuffer(self.obs_dim, self.act_dim, capacity, self.device)
        if old is not None:
            self.add(old)

    def add(self, data: Transitions) -> None:
        if len(data):
            self.buffer.add_batch(data.obs, data.act, data.reward, data.next_obs, data.terminated)

    def sample(self, batch_size: int, generator: torch.Generator | None) -> Transitions:
        return self.buffer.sample(batch_size, generator)

    def state_dict(self) -> dict:
        return self.buffer.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.buffer = ReplayBuffer(self.obs_dim, self.act_dim, int(state["capacity"]), self.device)
        self.buffer.load_state_dict(state)


def mixed_batch(
    real: ReplayBuffer,
    imagined: ModelBuffer | None,
    batch_size: int,
    real_ratio: float,
    generator: torch.Generator | None,
) -> Transitions:
    """``round(batch_size * real_ratio)`` real transitions followed by imagined ones
    (MBPO Algorithm 2, line 12); all real while the model buffer is empty or absent."""
    if imagined is None or len(imagined) == 0:
        return real.sample(batch_size, generator)
    n_real = round(batch_size * real_ratio)
    if n_real == 0:
        return imagined.sample(batch_size, generator)
    a, b = real.sample(n_real, generator), imagined.sample(batch_size - n_real, generator)
    return Transitions(*(torch.cat([x, y]) for x, y in zip(_fields(a), _fields(b), strict=True)))


def _fields(t: Transitions) -> tuple[torch.Tensor, ...]:
    return (t.obs, t.act, t.next_obs, t.reward, t.terminated)


# ----------------------------------------------------------------------------- value expansion


def value_expansion_targets(
    rewards: torch.Tensor, terminated: torch.Tensor, bootstrap: torch.Tensor, gamma: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """``H``-step value-expansion targets (Feinberg et al. 2018, Eq. 3 and the TD-k trick).

    For a trajectory ``s_0, a_0, r_0, ..., s_H, a_H, r_H, s_{H+1}`` (``rewards [H+1, B]``,
    ``terminated [H+1, B]`` flagging the step into ``s_{t+1}``, ``bootstrap [B] = V'(s_{H+1})``)
    the target of row ``t`` is

        y_t = sum_{k=t}^{H} gamma^{k-t} r_k prod_{j=t}^{k-1} (1 - d_j)
              + gamma^{H+1-t} V'(s_{H+1}) prod_{j=t}^{H} (1 - d_j),

    computed backwards ``y_t = r_t + gamma (1 - d_t) y_{t+1}``, ``y_{H+1} = V'(s_{H+1})``.
    Returns ``targets [H+1, B]`` and ``valid [H+1, B]``: row ``t`` is valid when no step
    before it terminated (rows after a termination are not real states of the trajectory).
    """
    targets = torch.empty_like(rewards)  # [H+1, B]
    y = bootstrap
    alive = (~terminated).to(rewards.dtype)  # [H+1, B]
    for t in range(rewards.shape[0] - 1, -1, -1):
        y = rewards[t] + gamma * alive[t] * y
        targets[t] = y
    ended = torch.cumsum(terminated.int(), 0)  # [H+1, B] terminations up to and including t
    valid = torch.ones_like(terminated)
    valid[1:] = ended[:-1] == 0
    return targets, valid


@dataclass(frozen=True)
class ValueExpansionBatch:
    """Real and imagined transitions with their value-expansion targets."""

    transitions: Transitions  # [M] valid rows of all H + 1 steps, step-major
    target_q: torch.Tensor  # [M]
    horizon: int  # H imagined steps


IMAGINED_POLICIES = ("greedy", "explore", "target")


@torch.no_grad()
def value_expansion_batch(
    model: DynamicsModel,
    learner: Learner,
    real: Transitions,
    horizon: int,
    reward_fn: RewardFn,
    termination_fn: TerminationFn,
    generator: torch.Generator | None,
    policy: str = "greedy",
    td_k: bool = True,
) -> ValueExpansionBatch:
    """MVE (Feinberg et al. 2018, Algorithm 1): imagine ``horizon`` steps after each real
    transition and give every state of the trajectory its ``H``-step target.

    Row 0 is the real transition ``(s_0, a_0, r_0, s_1)``; rows ``1..H`` are model steps from
    ``s_1`` under ``policy``: ``"greedy"``, the learner's deterministic policy
    (``learner.act(..., deterministic=True)``; TD3/DDPG and NAF evaluate their greedy policy),
    ``"explore"``, its exploration policy (noise drawn from ``generator``), or ``"target"``, its
    target policy (``learner.target_act``, the policy the bootstrap ``V'`` evaluates, so that
    every term of the target follows one slowly moving policy); rewards from the model or
    ``reward_fn``.
    The bootstrap is ``learner.target_value(s_{H+1})``. With ``horizon = 0`` the targets are
    the learner's own one-step targets. With ``td_k=False`` only row 0, the real transition
    with its ``(H + 1)``-step target, is returned (the critic never sees imagined states).

    Raises:
        NonFiniteModelError: an imagined state or reward is NaN/inf.
    """
    if horizon < 0:
        raise ValueError(f"MVE horizon must be >= 0, got {horizon}")
    if policy not in IMAGINED_POLICIES:
        raise ValueError(
            f"MVE imagined policy {policy!r} is unknown; valid: {', '.join(IMAGINED_POLICIES)}"
        )
    if policy == "target" and not hasattr(learner, "target_act"):
        raise TypeError(
            f"MVE target_policy needs a learner with target_act (td3, ddpg, naf); "
            f"{type(learner).__name__} has none"
        )
    rows = [_fields(real)]
    if horizon:
        state = model.rollout_start(real.next_obs, 1, generator)
        alive = ~real.terminated
        for t in range(horizon):
            obs = state.obs  # [B, X]
            if policy == "target":
                act = learner.target_act(obs)  # [B, U]
            else:
                act = learner.act(obs, deterministic=policy == "greedy", generator=generator)
            state = model.rollout_step(state, act, generator)
            reward = state.reward if model.learns_reward else reward_fn(obs, act, state.obs)
            _check_finite(state.obs, reward, alive, t)
            term = termination_fn(state.obs)  # [B]
            rows.append((obs, act, state.obs, reward, term))
            alive = alive & ~term
    obs, act, next_obs, reward, term = (torch.stack(c) for c in zip(*rows, strict=True))
    bootstrap = learner.target_value(next_obs[-1])  # [B]
    targets, valid = value_expansion_targets(reward, term, bootstrap, learner.gamma)
    if not td_k:
        return ValueExpansionBatch(real, targets[0], horizon)
    keep = valid.reshape(-1)  # [(H+1) * B]
    flat = Transitions(
        obs=obs.flatten(0, 1)[keep],
        act=act.flatten(0, 1)[keep],
        next_obs=next_obs.flatten(0, 1)[keep],
        reward=reward.flatten(0, 1)[keep],
        terminated=term.flatten(0, 1)[keep],
    )
    return ValueExpansionBatch(flat, targets.reshape(-1)[keep], horizon)


# ----------------------------------------------------------------------------- safety, evaluation


def check_learner_stats(stats: dict[str, float], q_limit: float) -> None:
    """Raise :class:`DivergenceError` if ``q_loss`` or ``q_abs_max`` is NaN/inf or
    ``q_abs_max > q_limit`` (a diverging critic)."""
    q_loss, q = stats.get("q_loss", 0.0), stats.get("q_abs_max", 0.0)
    if not (math.isfinite(q_loss) and math.isfinite(q)) or q > q_limit:
        raise DivergenceError(
            f"the learner diverged: q_loss={q_loss:.3g}, q_abs_max={q:.3g} (limit {q_limit:g}); "
            "lower the learning rate, slow the target networks (smaller tau), or shorten "
            "model rollouts"
        )


class LearnerPolicy:
    """A learner as an env policy (``mbrl.control.Policy``): numpy ``[X]`` in, ``[U]`` out."""

    def __init__(
        self,
        learner: Learner,
        deterministic: bool,
        generator: torch.Generator | None = None,
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


# ----------------------------------------------------------------------------- configs


@dataclass
class LearnerConfig:
    """The model-free learner (SAC, TD3, DDPG or NAF)."""

    name: str = "sac"
    """sac, td3, ddpg or naf."""
    hidden_size: int = 256
    """Units per hidden layer of actor and critics."""
    num_layers: int = 2
    """Hidden layers of actor and critics."""
    gamma: float = 0.99
    """Discount."""
    tau: float = 0.005
    """Polyak rate of the target networks."""
    lr: float = 3e-4
    """Adam learning rate (actor, critics, temperature)."""
    batch_size: int = 256
    """Transitions per update."""
    exploration_noise: float = 0.1
    """Gaussian exploration std in the unit action box (td3, ddpg, naf)."""
    policy_delay: int = 2
    """Critic updates per actor update (td3)."""
    target_noise: float = 0.2
    """Target policy smoothing std (td3)."""
    noise_clip: float = 0.5
    """Clip of the smoothing noise (td3)."""
    init_alpha: float = 1.0
    """Initial temperature (sac)."""
    learn_alpha: bool = True
    """Tune the temperature to the target entropy (sac)."""
    target_entropy: float | None = None
    """Target entropy (sac); None is -U."""
    diag_floor: float = 0.1
    """Lower bound of the diagonal of L in P = L L^T (naf); must be > 0."""
    mu_penalty: float = 0.0
    """Weight of the squared pre-tanh mu in the loss (naf), against mu locking at the bound
    where tanh is flat; 0 turns it off."""


@dataclass
class ModelConfig:
    """The probabilistic ensemble (MBPO Appendix C: 7 members, 5 elites, 4 x 200 units)."""

    ensemble_size: int = 7
    """E, members trained on bootstrap resamples."""
    num_elites: int = 5
    """Members used in rollouts, chosen by held-out loss."""
    hidden_size: int = 200
    """Units per hidden layer."""
    num_layers: int = 4
    """Hidden layers per member."""
    lr: float = 1e-3
    """Adam learning rate."""
    weight_decay: float | None = None
    """L2 decay; None is the PETS per-layer schedule 2.5e-5 ... 1e-4."""
    batch_size: int = 256
    """Rows per member per optimizer step."""
    max_epochs: int = 50
    """Epoch budget of one fit."""
    patience: int = 5
    """Epochs without held-out improvement before early stopping."""
    val_fraction: float = 0.2
    """Share of the data held out for early stopping and elites."""
    learns_reward: bool = True
    """Learn the reward too (MBPO); False scores imagined steps with the env's reward_fn."""
    train_every: int = 250
    """Refit the model every this many env steps."""
    propagation: str = "ts1"
    """How imagined steps move: ``ts1`` samples each step from a random elite's Gaussian
    (MBPO's rollouts); ``expectation`` takes the mean over elites, a deterministic model (MVE's
    targets)."""


BRANCH_POLICIES = ("explore", "uniform")


@dataclass
class BranchConfig:
    """Branched rollouts into the model buffer (MBPO, MBA)."""

    rollout_batch_size: int = 100_000
    """Rollouts started at each branching (MBPO: 400 per env step x 250)."""
    rollout_every: int | None = None
    """Env steps between branchings; None branches once after each model fit
    (``model.train_every``). Branching more often keeps the imagined actions close to the
    current policy (MBPO's Algorithm 2 branches at every env step)."""
    min_epoch: int = 20
    """Rollout length is min_length up to this epoch ..."""
    max_epoch: int = 100
    """... and grows linearly to max_length at this epoch."""
    min_length: int = 1
    """Shortest rollout length k."""
    max_length: int = 1
    """Longest rollout length k."""
    retain_epochs: int = 1
    """Epochs of rollouts the model buffer keeps."""
    real_ratio: float = 0.05
    """Share of real transitions in each learner batch."""
    policy: str = "explore"
    """Actions of the imagined steps: ``explore``, the learner's exploration policy (MBPO);
    ``uniform``, uniform in the action box, imagined transitions off the policy everywhere."""
    stop_after: int | None = None
    """Env steps after which imagination stops: no more model fits or branchings, and learner
    batches are all real. Imagination is there to speed up learning while real data is scarce;
    later the model's errors can only cost a learner with enough real data. None imagines to
    the end of the run."""


@dataclass
class MVEConfig:
    """Model-based value expansion (MVE)."""

    horizon: int = 10
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


def imagined_policy(cfg: MVEConfig) -> str:
    """The :func:`value_expansion_batch` policy that ``cfg``'s flags name.

    Raises:
        ConfigError: both ``explore`` and ``target_policy`` set.
    """
    if cfg.explore and cfg.target_policy:
        raise ConfigError(
            "mve.explore and mve.target_policy both set: imagination follows one policy; "
            "set one of them to false"
        )
    return "explore" if cfg.explore else "target" if cfg.target_policy else "greedy"


@dataclass
class DynaConfig:
    """What every Dyna-style run needs: env, budget, learner, schedule."""

    env: str = "pendulum"
    """Registry name of the env (``mbrl envs`` lists them)."""
    seed: int = 0
    """Seeds networks, model, env resets, random actions and batch sampling."""
    total_steps: int = 10_000
    """Env steps of the whole run."""
    epoch_length: int = 1000
    """Env steps per epoch: one evaluation, metrics row and checkpoint per epoch."""
    start_steps: int = 1000
    """Uniform random actions before the learner acts (and before any update)."""
    updates_per_step: int = 1
    """G, learner updates per env step."""
    buffer_capacity: int = 1_000_000
    """Most real transitions kept."""
    eval_episodes: int = 5
    """Deterministic-policy episodes at the end of each epoch."""
    q_limit: float = 1e6
    """Stop with an error when |Q| exceeds this (a diverging critic)."""
    ignore_positions: bool = True
    """Learner and model do not read the env's position features (``EnvSpec.position_obs``:
    HalfCheetah's and Hopper's x, in the observation only for the reward), as in the SAC and
    MBPO papers' observations; the model still predicts their change."""
    learner: LearnerConfig = field(default_factory=LearnerConfig)


def make_learner(
    cfg: LearnerConfig,
    spec: envs.EnvSpec,
    device: torch.device,
    seed: int,
    ignored_obs: Sequence[int] = (),
) -> Learner:
    """The learner a :class:`LearnerConfig` describes, for the env ``spec``, its networks blind
    to the observation features ``ignored_obs``."""
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
    raise ValueError(f"unknown learner {cfg.name!r}; valid names: sac, td3, ddpg, naf")


@dataclass
class ModelBasedConfig(DynaConfig):
    """A Dyna-style run with a learned model."""

    model: ModelConfig = field(default_factory=ModelConfig)


DYNA_PROPAGATIONS = ("ts1", "expectation")


def make_model(
    cfg: ModelConfig,
    spec: envs.EnvSpec,
    device: torch.device,
    seed: int,
    ignored_obs: Sequence[int] = (),
) -> ProbabilisticEnsemble:
    """The ensemble a :class:`ModelConfig` describes, stepping imagined states with
    ``cfg.propagation`` and blind to the observation features ``ignored_obs``.

    Raises:
        ConfigError: a propagation other than ``ts1`` or ``expectation``.
    """
    if cfg.propagation not in DYNA_PROPAGATIONS:
        raise ConfigError(
            f"model.propagation={cfg.propagation!r} is not offered for Dyna rollouts, which start "
            f"one rollout per state; valid: {', '.join(DYNA_PROPAGATIONS)}"
        )
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
        device=device,
        seed=seed,
        ignored_obs=ignored_obs,
    )


# ----------------------------------------------------------------------------- the training loop

USES = ("none", "branch", "mve")


def train(
    cfg: DynaConfig,
    run: Run,
    device: str,
    use: str,
    label: str,
    learners: tuple[str, ...] = ("sac", "td3", "ddpg", "naf"),
) -> Summary:
    """Run (or resume) a Dyna-style algorithm, logging one row per epoch to ``run``.

    ``use`` says where the model enters: ``"none"``, ``"branch"`` (needs ``cfg.model`` and
    ``cfg.branch``) or ``"mve"`` (needs ``cfg.model`` and ``cfg.mve``); ``learners`` are the
    learner names the algorithm accepts. Per env step::

        act (uniform random for the first start_steps steps), store the real transition
        every model.train_every steps from start_steps:           (branch, mve)
            fit the model on all real transitions
        branch, every branch.rollout_every steps from start_steps (default: after each fit):
            roll k steps from rollout_batch_size real states into the model buffer
        (branch: no fits, branchings or imagined batches after branch.stop_after env steps)
        G times (from start_steps on):
            none:   update on a real batch
            branch: update on a mixed batch (real_ratio real)
            mve:    update the critic on a real batch and its H imagined steps with H-step
                    targets, the actor on the real states
        each epoch_length steps: evaluate the deterministic policy, log, checkpoint

    A checkpoint holds the learner (networks, targets, optimizers), the model and its
    optimizer, both buffers, every RNG state and the counters. A resumed run starts a fresh env
    episode (a simulator's internal state is not saved). A non-finite model rollout or a
    diverging critic saves a checkpoint and stops the run with a clear error.
    """
    if use not in USES:
        raise ValueError(f"unknown model use {use!r}; valid: {', '.join(USES)}")
    if cfg.learner.name not in learners:
        raise ConfigError(
            f"{label} does not run learner.name={cfg.learner.name!r}; valid: {', '.join(learners)}"
        )
    if cfg.total_steps < 1 or cfg.epoch_length < 1 or cfg.updates_per_step < 0:
        raise ConfigError(
            "need total_steps >= 1, epoch_length >= 1, updates_per_step >= 0; got "
            f"{cfg.total_steps}, {cfg.epoch_length}, {cfg.updates_per_step}"
        )
    imagined = imagined_policy(cfg.mve) if use == "mve" else "greedy"
    if use != "none":
        m = cfg.model
        if m.train_every < 1:
            raise ConfigError(
                f"model.train_every={m.train_every}: refit the model every n >= 1 env steps"
            )
        rows = int(min(cfg.start_steps, cfg.buffer_capacity) * (1 - m.val_fraction))
        if rows < m.batch_size:
            raise ConfigError(
                f"the first model fit (after start_steps={cfg.start_steps}) has about {rows} "
                f"training rows, fewer than model.batch_size={m.batch_size}; raise start_steps "
                "or lower model.batch_size"
            )
    rollout_every = 0  # env steps between branchings (branch only)
    if use == "branch":
        b = cfg.branch
        if b.rollout_every is not None and b.rollout_every < 1:
            raise ConfigError(
                f"branch.rollout_every={b.rollout_every}: branch every n >= 1 env steps, or "
                "leave it unset (null) to branch after each model fit"
            )
        if b.policy not in BRANCH_POLICIES:
            raise ConfigError(
                f"unknown branch.policy {b.policy!r}; valid: {', '.join(BRANCH_POLICIES)}"
            )
        if b.stop_after is not None and b.stop_after <= cfg.start_steps:
            raise ConfigError(
                f"branch.stop_after={b.stop_after} is not after start_steps={cfg.start_steps}, "
                "so nothing would be imagined; raise it, or run the model-free learner"
            )
        rollout_every = b.rollout_every or cfg.model.train_every
    stop_after = cfg.branch.stop_after if use == "branch" else None  # last env step imagining
    real_ratio = cfg.branch.real_ratio if use == "branch" else 1.0
    dev = resolve_device(device)
    spec = envs.make(cfg.env)
    env, eval_env = spec.make(), spec.make()
    x_dim, u_dim = spec.obs_dim, spec.act_dim
    hidden = spec.position_obs if cfg.ignore_positions else ()
    learner = make_learner(cfg.learner, spec, dev, cfg.seed, hidden)
    buffer = ReplayBuffer(x_dim, u_dim, cfg.buffer_capacity, dev)
    gen = torch.Generator(device=dev).manual_seed(cfg.seed + 2)  # batches and rollouts
    act_gen = torch.Generator(device=dev).manual_seed(cfg.seed + 3)  # exploration in the env
    rng = np.random.default_rng(cfg.seed)  # uniform random actions
    model = make_model(cfg.model, spec, dev, cfg.seed + 1, hidden) if use != "none" else None
    model_buffer = ModelBuffer(x_dim, u_dim, 1, dev) if use == "branch" else None
    explore = LearnerPolicy(learner, deterministic=False, generator=act_gen)

    env_steps, episodes, wall, evals = 0, 0, 0.0, []
    length, fit_train, fit_val = 0, float("nan"), float("nan")
    state = run.load_checkpoint()
    if state is not None:
        learner.load_state_dict(state["learner"])
        buffer.load_state_dict(state["buffer"])
        gen.set_state(state["torch_rng"])
        act_gen.set_state(state["act_rng"])
        set_numpy_rng_state(rng, state["numpy_rng"])
        if model is not None:
            model.load_state_dict(state["model"])
            model.load_optimizer_state_dict(state["model_optimizer"])
        if model_buffer is not None:
            model_buffer.load_state_dict(state["model_buffer"])
        env_steps, episodes, wall = state["env_steps"], state["episodes"], state["wall_seconds"]
        evals, length = list(state["evals"]), state["rollout_length"]
        fit_train, fit_val = state["fit_train_loss"], state["fit_val_loss"]
        tqdm.write(f"resumed {run.path} at env step {env_steps} ({len(buffer)} transitions)")

    def checkpoint() -> None:
        run.save_checkpoint(
            {
                "learner": learner.state_dict(),
                "buffer": buffer.state_dict(),
                "torch_rng": gen.get_state(),
                "act_rng": act_gen.get_state(),
                "numpy_rng": numpy_rng_state(rng),
                "model": model.state_dict() if model is not None else {},
                "model_optimizer": model.optimizer_state_dict() if model is not None else {},
                "model_buffer": model_buffer.state_dict() if model_buffer is not None else {},
                "env_steps": env_steps,
                "episodes": episodes,
                "wall_seconds": wall,
                "evals": evals,
                "rollout_length": length,
                "fit_train_loss": fit_train,
                "fit_val_loss": fit_val,
            }
        )

    low, high = spec.action_low, spec.action_high
    stats: dict[str, list[float]] = {}
    train_returns: list[float] = []
    seconds = {"fit": 0.0, "rollout": 0.0, "update": 0.0}
    obs, _ = env.reset(seed=_episode_seed(cfg.seed, episodes))
    ep_ret = 0.0
    start = time.perf_counter()
    bar = progress_bar(cfg.total_steps, label)
    bar.update(env_steps)
    try:
        while env_steps < cfg.total_steps:
            # --- act in the real env and store the transition
            if env_steps < cfg.start_steps:
                act = rng.uniform(low, high).astype(np.float32)
            else:
                act = explore.act(np.asarray(obs, dtype=np.float32))
            next_obs, reward, terminated, truncated, _ = env.step(act)
            buffer.add(obs, act, float(reward), next_obs, bool(terminated))
            ep_ret += float(reward)
            obs = next_obs
            env_steps += 1
            bar.update(1)
            if terminated or truncated:
                train_returns.append(ep_ret)
                episodes += 1
                obs, _ = env.reset(seed=_episode_seed(cfg.seed, episodes))
                ep_ret = 0.0

            # --- where the model is used: refit, then branch rollouts
            learning = env_steps >= cfg.start_steps
            imagining = stop_after is None or env_steps <= stop_after
            if not imagining:
                length = 0
            if model is not None and learning and imagining:
                since = env_steps - cfg.start_steps
                if since % cfg.model.train_every == 0:
                    t0 = time.perf_counter()
                    report = model.fit(buffer.all())
                    fit_train, fit_val = report.final_train_loss, report.best_val_loss
                    seconds["fit"] += time.perf_counter() - t0
                if model_buffer is not None and since % rollout_every == 0:
                    t0 = time.perf_counter()
                    length = _branch(
                        cfg, env_steps, rollout_every, spec, model, learner, buffer,
                        model_buffer, gen,
                    )  # fmt: skip
                    seconds["rollout"] += time.perf_counter() - t0

            # --- G learner updates
            if learning:
                t0 = time.perf_counter()
                imagined_data = model_buffer if imagining else None
                for _ in range(cfg.updates_per_step):
                    if use == "mve":
                        real = buffer.sample(cfg.learner.batch_size, gen)
                        h = cfg.mve.horizon
                        vb = value_expansion_batch(
                            model,
                            learner,
                            real,
                            h,
                            spec.reward_fn,
                            spec.termination_fn,
                            gen,
                            policy=imagined,
                            td_k=cfg.mve.td_k,
                        )
                        s = learner.update(vb.transitions, vb.target_q, actor_obs=real.obs)
                    else:
                        batch = mixed_batch(
                            buffer, imagined_data, cfg.learner.batch_size, real_ratio, gen
                        )
                        s = learner.update(batch)
                    check_learner_stats(s, cfg.q_limit)
                    for k, v in s.items():
                        stats.setdefault(k, []).append(v)
                seconds["update"] += time.perf_counter() - t0

            # --- end of an epoch: evaluate, log, checkpoint
            if env_steps % cfg.epoch_length == 0 or env_steps == cfg.total_steps:
                ret = evaluate(
                    eval_env, learner, cfg.eval_episodes, _eval_seed(cfg.seed, env_steps)
                )
                evals.append(float(np.mean(ret)) if ret else float("nan"))
                wall += time.perf_counter() - start
                start = time.perf_counter()
                row = {
                    "epoch": math.ceil(env_steps / cfg.epoch_length),
                    "env_steps": env_steps,
                    "return": evals[-1],
                    "return_std": float(np.std(ret)) if ret else float("nan"),
                    "train_return": float(np.mean(train_returns)) if train_returns else "",
                    "episodes": episodes,
                    "updates": len(stats.get("q_loss", [])),
                    **_stat_cols(stats),
                    "model_train_loss": fit_train,
                    "model_val_loss": fit_val,
                    "rollout_length": length if use == "branch" else "",
                    "model_buffer": len(model_buffer) if model_buffer is not None else "",
                    "mve_horizon": cfg.mve.horizon if use == "mve" else "",
                    "fit_seconds": seconds["fit"],
                    "rollout_seconds": seconds["rollout"],
                    "update_seconds": seconds["update"],
                    "wall_seconds": wall,
                }
                run.log(**row)
                tqdm.write(
                    f"{label} step {env_steps}: eval return {evals[-1]:.1f}"
                    + (f", train return {np.mean(train_returns):.1f}" if train_returns else "")
                    + (f", q_loss {np.mean(stats['q_loss']):.3g}" if stats.get("q_loss") else "")
                    + (f", model val {fit_val:.3g}" if model is not None else "")
                    + (f", k={length}" if use == "branch" else "")
                )
                stats, train_returns = {}, []
                seconds = dict.fromkeys(seconds, 0.0)
                checkpoint()
    except (NonFiniteModelError, DivergenceError) as e:
        wall += time.perf_counter() - start
        checkpoint()
        tqdm.write(f"{label} stopped at env step {env_steps}: {e} (checkpoint saved)")
        raise
    finally:
        bar.close()

    write_learning_curves(run, label, cfg.seed, cfg.env, spec.solved_return)
    return Summary.from_returns(evals, spec.solved_return, wall, unit="evaluation")


def write_learning_curves(
    run: Run, label: str, seed: int, env: str, target: float | None
) -> list[Path]:
    """This run's ``learning_curve.png`` with the runs of the same env, seed and learner in the
    same parent folder (the model-free baseline of a model-based run, and back) on the same
    axes. Their PNGs are redrawn too, so whichever run ends last, each shows all of them."""
    related = related_runs(run.path)
    out = []
    for algo, path in [(None, run.path), *related]:
        name = label if algo is None else algo.upper()
        curves = [(f"{name} seed {seed}", path / "metrics.csv")]
        curves += [(f"{a.upper()} seed {seed}", p / "metrics.csv") for a, p in related_runs(path)]
        png = path / "learning_curve.png"
        out.append(learning_curve(curves, png, title=f"{name} on {env}", target=target))
    return out


STAT_COLUMNS = ("q_loss", "actor_loss", "q_mean", "q_abs_max", "alpha", "entropy", "v_mean")


def _stat_cols(stats: dict[str, list[float]]) -> dict[str, float | str]:
    """The epoch mean of every learner statistic column over its finite values; empty for the
    ones this learner does not report or that had none (the csv keeps one set of columns)."""
    out: dict[str, float | str] = {}
    for k in STAT_COLUMNS:
        v = [x for x in stats.get(k, []) if math.isfinite(x)]
        out[k] = float(np.mean(v)) if v else ""
    return out


def _branch(
    cfg,
    env_steps: int,
    rollout_every: int,
    spec: envs.EnvSpec,
    model: DynamicsModel,
    learner: Learner,
    buffer: ReplayBuffer,
    model_buffer: ModelBuffer,
    gen: torch.Generator,
) -> int:
    """Set the rollout length for this epoch, resize the model buffer, branch rollouts."""
    b = cfg.branch
    epoch = env_steps // cfg.epoch_length
    k = rollout_length(epoch, b.min_epoch, b.max_epoch, b.min_length, b.max_length)
    per_epoch = math.ceil(cfg.epoch_length / rollout_every)
    model_buffer.resize(max(1, b.rollout_batch_size * k * per_epoch * b.retain_epochs))
    starts = buffer.sample(b.rollout_batch_size, gen).obs  # [B, X]

    if b.policy == "uniform":
        low, high = spec.action_bounds(starts.device)

        def act_fn(o: torch.Tensor) -> torch.Tensor:
            u = torch.rand(o.shape[0], low.shape[0], device=o.device, generator=gen)
            return low + (high - low) * u

    else:
        act_fn = functools.partial(learner.act, deterministic=False, generator=gen)

    ro = branched_rollout(model, act_fn, starts, k, spec.reward_fn, spec.termination_fn, gen)
    model_buffer.add(ro.transitions)
    return k


def _episode_seed(seed: int, episode: int) -> int:
    return seed * 100_003 + episode


def _eval_seed(seed: int, env_steps: int) -> int:
    return 10**9 + seed * 100_003 + env_steps
