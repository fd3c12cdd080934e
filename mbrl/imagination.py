"""Imagination parts of the Dyna-style learners, with plain typed arguments.

- :func:`branched_rollout`: ``k``-step model rollouts branched from real states (MBPO,
  Janner et al. 2019, Algorithm 2, lines 8-10; MBA's imagination rollouts, Gu et al. 2016).
- :func:`value_expansion_batch`: ``H`` imagined steps after each real transition with their
  ``H``-step targets (MVE, Feinberg et al. 2018, Algorithm 1).
- :class:`ModelBuffer`: the store of imagined transitions whose capacity follows ``k``.
- :func:`mixed_batch`: learner batches mixing real and imagined transitions.
- :func:`schedule`: what a Dyna loop does at an env step (fit, branch, rollout length,
  whether imagined data is used), a pure function of the step.

Both rollouts are loops over one step, :meth:`~mbrl.planners.base.PlanningProblem.step` of a
problem with one particle per start: the model's (or the env's) reward, termination and the
finiteness check are the planning step's. A live row whose step is not finite raises
:class:`NonFiniteModelError`; rows that terminated earlier no longer count.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch

from mbrl.buffer import ReplayBuffer
from mbrl.dynamics.base import Transitions
from mbrl.learners import Learner
from mbrl.planners.base import PlanningProblem, Step

ActFn = Callable[[torch.Tensor], torch.Tensor]
"""``obs [B, X] -> act [B, U]`` in env units, the policy that drives model rollouts."""

ImaginedPolicy = Literal["greedy", "explore", "target"]
IMAGINED_POLICIES: tuple[str, ...] = ("greedy", "explore", "target")


class NonFiniteModelError(RuntimeError):
    """A model rollout produced NaN or inf observations or rewards."""


def _checked_step(problem: PlanningProblem, state, act: torch.Tensor, alive: torch.Tensor, t: int):
    """``problem.step(state, act)``, raising :class:`NonFiniteModelError` when a row alive
    before the step (``alive [B]``) is not finite after it (rollout step ``t``, from 0)."""
    s: Step = problem.step(state, act)
    n = int((alive & ~s.finite).sum())
    if n:
        raise NonFiniteModelError(
            f"the model produced NaN/inf in {n} of {int(alive.sum())} live rollouts at rollout "
            f"step {t + 1}; the model fit has diverged (lower the model learning rate, raise its "
            "weight decay, or check the data for NaN)"
        )
    return s


def _fields(t: Transitions) -> tuple[torch.Tensor, ...]:
    return (t.obs, t.act, t.next_obs, t.reward, t.terminated)


# ----------------------------------------------------------------------------- branched rollouts


@dataclass(frozen=True)
class BranchedRollout:
    """Imagined transitions of rollouts branched from real states."""

    transitions: Transitions  # [M] every step taken by a live rollout, termination included
    starts: int  # B, rollouts started
    steps: int  # rollout steps run (<= length: all rollouts may terminate early)
    mean_length: float  # mean number of steps a rollout lasted


@torch.no_grad()
def branched_rollout(
    problem: PlanningProblem, act_fn: ActFn, start_obs: torch.Tensor, length: int
) -> BranchedRollout:
    """Roll ``problem``'s model ``length`` steps from each real state ``start_obs [B, X]``
    (MBPO Algorithm 2, lines 8-10), one particle per start, actions ``act_fn(obs)``.

    Rewards, termination and the finiteness check are :meth:`PlanningProblem.step`'s; the
    model's draws come from the problem's generator. A rollout ends after the step that
    terminates it (that step is kept, flagged terminated); the loop stops early once every
    rollout has terminated. Transitions are step-major (step 1 of every live start first).

    Raises:
        NonFiniteModelError: a live rollout reached a NaN/inf observation or reward.
    """
    if length < 0:
        raise ValueError(f"rollout length must be >= 0, got {length}")
    b = start_obs.shape[0]
    state = problem.start(start_obs, particles=1)  # [B] rows
    alive = torch.ones(b, dtype=torch.bool, device=state.obs.device)  # [B]
    lived = torch.zeros(b, device=state.obs.device)  # [B]
    parts: list[tuple[torch.Tensor, ...]] = []
    steps = 0
    for t in range(length):
        obs = state.obs  # [B, X]
        act = act_fn(obs)  # [B, U]
        s = _checked_step(problem, state, act, alive, t)
        term = ~s.alive & alive  # [B]
        parts.append((obs[alive], act[alive], s.state.obs[alive], s.reward[alive], term[alive]))
        lived += alive.float()
        alive = alive & ~term
        state, steps = s.state, t + 1
        if not bool(alive.any()):
            break
    if parts:
        cols = [torch.cat(c) for c in zip(*parts, strict=True)]
    else:
        x, u, dev = start_obs.shape[-1], problem.act_dim, state.obs.device
        cols = [
            torch.zeros(0, x, device=dev),
            torch.zeros(0, u, device=dev),
            torch.zeros(0, x, device=dev),
            torch.zeros(0, device=dev),
            torch.zeros(0, dtype=torch.bool, device=dev),
        ]
    mean_length = lived.mean().item() if length else 0.0
    return BranchedRollout(Transitions(*cols), starts=b, steps=steps, mean_length=mean_length)


def uniform_actions(low: torch.Tensor, high: torch.Tensor, generator: torch.Generator) -> ActFn:
    """The policy of actions uniform in the box ``[low, high]`` (``[U]`` each), drawn from
    ``generator``: imagined transitions off the learner's policy everywhere."""

    def act(obs: torch.Tensor) -> torch.Tensor:
        u = torch.rand(obs.shape[0], low.shape[0], device=obs.device, generator=generator)
        return low + (high - low) * u  # [B, U]

    return act


# ----------------------------------------------------------------------------- the model buffer


class ModelBuffer:
    """FIFO store of imagined transitions whose capacity follows the rollout length.

    MBPO keeps the rollouts of the last ``retain_epochs`` epochs (:func:`model_buffer_capacity`).
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


def model_buffer_capacity(
    starts: int, length: int, epoch_length: int, rollout_every: int, retain_epochs: int
) -> int:
    """Transitions of ``retain_epochs`` epochs of branchings: ``starts * length *
    ceil(epoch_length / rollout_every) * retain_epochs`` (at least 1)."""
    per_epoch = math.ceil(epoch_length / rollout_every)
    return max(1, starts * length * per_epoch * retain_epochs)


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


def imagined_act_fn(
    learner: Learner, policy: ImaginedPolicy, generator: torch.Generator | None
) -> ActFn:
    """The learner's policy that imagined steps follow: ``"greedy"`` (deterministic),
    ``"explore"`` (its exploration noise, drawn from ``generator``) or ``"target"`` (its target
    policy ``learner.target_act``).

    Raises:
        ValueError: an unknown policy name.
        TypeError: ``"target"`` for a learner without a target policy (SAC).
    """
    if policy not in IMAGINED_POLICIES:
        raise ValueError(
            f"MVE imagined policy {policy!r} is unknown; valid: {', '.join(IMAGINED_POLICIES)}"
        )
    if policy == "target":
        if not hasattr(learner, "target_act"):
            raise TypeError(
                f"MVE target_policy needs a learner with target_act (td3, ddpg, naf); "
                f"{type(learner).__name__} has none"
            )
        return learner.target_act
    deterministic = policy == "greedy"
    return lambda obs: learner.act(obs, deterministic=deterministic, generator=generator)


@torch.no_grad()
def value_expansion_batch(
    problem: PlanningProblem,
    learner: Learner,
    real: Transitions,
    horizon: int,
    policy: ImaginedPolicy = "greedy",
    td_k: bool = True,
) -> ValueExpansionBatch:
    """MVE (Feinberg et al. 2018, Algorithm 1): imagine ``horizon`` steps after each real
    transition and give every state of the trajectory its ``H``-step target.

    Row 0 is the real transition ``(s_0, a_0, r_0, s_1)``; rows ``1..H`` are steps of
    ``problem`` from ``s_1`` under the learner's ``policy`` (:func:`imagined_act_fn`; the
    exploration noise is drawn from the problem's generator). The bootstrap is
    ``learner.target_value(s_{H+1})``. With ``horizon = 0`` the targets are the learner's own
    one-step targets. With ``td_k=False`` only row 0, the real transition with its
    ``(H + 1)``-step target, is returned (the critic never sees imagined states).

    Raises:
        NonFiniteModelError: an imagined state or reward is NaN/inf.
    """
    if horizon < 0:
        raise ValueError(f"MVE horizon must be >= 0, got {horizon}")
    act_fn = imagined_act_fn(learner, policy, problem.generator)
    rows = [_fields(real)]
    if horizon:
        state = problem.start(real.next_obs, particles=1)  # [B] rows
        alive = ~real.terminated  # [B]
        for t in range(horizon):
            obs = state.obs  # [B, X]
            act = act_fn(obs)  # [B, U]
            s = _checked_step(problem, state, act, alive, t)
            term = ~s.alive  # [B]
            rows.append((obs, act, s.state.obs, s.reward, term))
            alive = alive & s.alive
            state = s.state
    obs, act, next_obs, reward, term = (torch.stack(c) for c in zip(*rows, strict=True))
    bootstrap = learner.target_value(next_obs[-1])  # [B]
    targets, valid = value_expansion_targets(reward, term, bootstrap, learner.gamma)
    if not td_k:
        return ValueExpansionBatch(real, targets[0], horizon)
    keep = valid.reshape(-1)  # [(H+1) * B]
    flat = Transitions(*(x.flatten(0, 1)[keep] for x in (obs, act, next_obs, reward, term)))
    return ValueExpansionBatch(flat, targets.reshape(-1)[keep], horizon)


# ----------------------------------------------------------------------------- the schedule


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


@dataclass(frozen=True)
class RolloutLengths:
    """The arguments of :func:`rollout_length` (MBPO's ``[min_epoch, max_epoch, min_length,
    max_length]``)."""

    min_epoch: int = 0
    max_epoch: int = 0
    min_length: int = 1
    max_length: int = 1

    def at(self, epoch: int) -> int:
        return rollout_length(
            epoch, self.min_epoch, self.max_epoch, self.min_length, self.max_length
        )


@dataclass(frozen=True)
class Schedule:
    """What a Dyna loop does right after env step ``t`` (the count of env steps taken)."""

    update: bool  # the learner updates (t >= start_steps)
    fit: bool  # refit the model on the real data
    branch: bool  # branch rollouts into the model buffer
    k: int  # rollout length of this step's branching (0 when not branching)
    imagining: bool  # imagined data is still used (t <= stop_after)


def schedule(
    env_step: int,
    start_steps: int,
    epoch_length: int,
    train_every: int | None = None,
    rollout_every: int | None = None,
    lengths: RolloutLengths = RolloutLengths(),
    stop_after: int | None = None,
) -> Schedule:
    """The Dyna schedule at env step ``env_step`` (steps taken so far, from 1).

    The learner updates from ``start_steps`` on. While imagining (``stop_after`` unset or not
    yet passed), the model is refitted every ``train_every`` steps counted from
    ``start_steps`` (``None``: no model), and rollouts are branched every ``rollout_every``
    steps from ``start_steps`` (``None``: no branching) with length
    ``lengths.at(env_step // epoch_length)``.
    """
    update = env_step >= start_steps
    imagining = stop_after is None or env_step <= stop_after
    since = env_step - start_steps
    active = update and imagining
    fit = active and train_every is not None and since % train_every == 0
    branch = active and rollout_every is not None and since % rollout_every == 0
    k = lengths.at(env_step // epoch_length) if branch else 0
    return Schedule(update=update, fit=fit, branch=branch, k=k, imagining=imagining)
