"""The dynamics-model seam: what every model of p(s', r | s, a) offers.

A model is fitted on :class:`~mbrl.data.Transitions` (re-exported here) and returns a
:class:`FitReport`. Planners use it through the shared rollout interface:
:meth:`DynamicsModel.rollout_start` turns real observations ``[B, X]`` into ``B * P`` particles
(candidate-major: particle ``p`` of start ``b`` at row ``b * P + p``), and
:meth:`DynamicsModel.rollout_step` advances every particle by one sampled step.
:meth:`DynamicsModel.predict` gives the one-step predictive distribution.
Every model checks the shapes crossing these methods once per call (a tuple comparison,
:func:`mbrl.shapes.check_shape`) and raises :class:`~mbrl.shapes.ShapeError` with the expected
and the actual shape; a fit refuses non-finite data (``ValueError``, :func:`check_transitions`)
and raises :class:`FitError` when its loss becomes non-finite, never keeping old weights
silently.
Optional capabilities are their own runtime-checkable protocols, tested with ``isinstance``:
:class:`DifferentiableModel` (autograd-able mean dynamics), :class:`Linearizable` (Jacobians,
optionally time-indexed), :class:`CasadiModel` (a symbolic twin for NMPC) and :class:`Filter`
(a belief over a hidden state, updated from every real observation; latent models).
"""

from __future__ import annotations

from dataclasses import dataclass
from numbers import Integral
from typing import Any, Protocol, runtime_checkable

import torch

from mbrl.data import Transitions  # re-exported: the data layer lives in mbrl.data
from mbrl.shapes import check_shape


class FitError(RuntimeError):
    """A fit went numerically wrong: its training or validation loss became NaN or inf.

    The message names the epoch (or iteration), the loss value and the constructor arguments
    that drive the fit (learning rate, weight decay, ...). The model is left as the failing
    step made it (weights and optimizer state may be non-finite): build a fresh model or load a
    checkpoint before using it again.
    """


def check_rows(
    obs: torch.Tensor,
    act: torch.Tensor,
    obs_dim: int,
    act_dim: int,
    obs_name: str = "obs",
    act_name: str = "act",
) -> None:
    """Raise :class:`~mbrl.shapes.ShapeError` unless ``obs`` is ``[B, X]`` and ``act`` is
    ``[B, U]`` with the same ``B``: the check of ``predict``, ``mean_dynamics``, ``linearize``
    and ``rollout_step`` (where ``obs`` is ``state.obs [B * P, X]``). Two shape-tuple
    comparisons when the shapes are right."""
    if obs.ndim == 2 and obs.shape[1] == obs_dim and act.shape == (obs.shape[0], act_dim):
        return
    check_shape(obs_name, obs, ("B", obs_dim))
    check_shape(act_name, act, (obs.shape[0], act_dim))


def check_start(obs: torch.Tensor, particles: int, obs_dim: int) -> None:
    """The check of ``rollout_start``: ``obs [B, X]`` (else :class:`~mbrl.shapes.ShapeError`)
    and ``particles`` an int >= 1 (else ``ValueError``)."""
    check_shape("obs", obs, ("B", obs_dim))
    if isinstance(particles, bool) or not isinstance(particles, Integral) or particles < 1:
        raise ValueError(f"particles must be an int >= 1, got {particles!r}")


def check_transitions(
    data: Transitions,
    obs_dim: int,
    act_dim: int,
    finite: tuple[str, ...] = ("obs", "act", "next_obs", "reward"),
) -> int:
    """Check ``data`` at a model's :meth:`~DynamicsModel.fit` and return its ``B`` rows.

    ``obs [B, X]``, ``act [B, U]``, ``next_obs [B, X]``, ``reward [B]``; the fields named in
    ``finite`` must hold no NaN or inf.

    Raises:
        TypeError: ``data`` is not :class:`~mbrl.data.Transitions`.
        ShapeError: a field of the wrong shape (expected and actual shape in the message).
        ValueError: NaN/inf entries, naming the field, how many rows and which columns hold
            them, and the fix.
    """
    if not isinstance(data, Transitions):
        raise TypeError(f"fit expects Transitions, got {type(data).__name__}")
    n = data.obs.shape[0] if data.obs.ndim else 0
    check_shape("data.obs", data.obs, ("B", obs_dim))
    check_shape("data.act", data.act, (n, act_dim))
    check_shape("data.next_obs", data.next_obs, (n, obs_dim))
    check_shape("data.reward", data.reward, (n,))
    for name in finite:
        t = getattr(data, name)
        bad = ~torch.isfinite(t)
        if bool(bad.any()):
            bad = bad.reshape(n, -1)
            rows = int(bad.any(dim=1).sum())
            cols = torch.nonzero(bad.any(dim=0)).flatten().tolist()
            where = f" (columns {cols})" if t.ndim > 1 else ""
            raise ValueError(
                f"data.{name} contains NaN/inf in {rows} of {n} rows{where}; remove those "
                "transitions (e.g. a diverged episode) before fit"
            )
    return n


@dataclass(frozen=True)
class FitReport:
    """What a fit did: per-epoch losses, the epoch kept, the elite members."""

    train_loss: tuple[float, ...]  # [epochs] mean training loss per epoch
    val_loss: tuple[float, ...]  # [epochs] held-out loss per epoch (empty without a split)
    epochs: int  # epochs run (early stopping may end before the budget)
    best_epoch: int  # epoch whose weights were kept
    elites: tuple[int, ...]  # member indices used for prediction (all members when not an ensemble)
    seconds: float  # wall time of the fit

    @property
    def final_train_loss(self) -> float:
        return self.train_loss[-1] if self.train_loss else float("nan")

    @property
    def best_val_loss(self) -> float:
        return self.val_loss[self.best_epoch] if self.val_loss else float("nan")


@dataclass(frozen=True)
class Prediction:
    """One-step predictive distribution of the next observation (and reward when learned)."""

    mean: torch.Tensor  # [B, X] mean of the next observation
    var: torch.Tensor  # [B, X] total variance (aleatoric + epistemic) of the next observation
    reward_mean: torch.Tensor | None = None  # [B] when the model learns the reward
    reward_var: torch.Tensor | None = None  # [B]


@dataclass(frozen=True)
class RolloutState:
    """Particles inside a model rollout.

    ``obs`` is what reward and termination functions see; ``hidden`` is model-specific state
    (a latent model's recurrent state, say), ``None`` for models that live in observation space.
    """

    obs: torch.Tensor  # [B * P, X]
    reward: torch.Tensor | None = None  # [B * P] reward of the step that led here, if learned
    hidden: torch.Tensor | None = None  # [B * P, Z] model-specific


@dataclass(frozen=True)
class Belief:
    """A filter's posterior over the hidden state of ``B`` real systems.

    ``mean`` is what a planner starts from (a latent model's posterior features, a Kalman
    filter's mean); ``cov`` and ``hidden`` are filter-specific (a Kalman covariance, an RSSM's
    recurrent state).
    """

    mean: torch.Tensor  # [B, Z]
    cov: torch.Tensor | None = None  # [B, Z, Z]
    hidden: torch.Tensor | None = None  # [B, ...] filter-specific

    @property
    def batch(self) -> int:
        return self.mean.shape[0]


@runtime_checkable
class DynamicsModel(Protocol):
    """The contract every dynamics model fulfils (ensemble, GP, latent model, ground truth)."""

    obs_dim: int
    act_dim: int
    learns_reward: bool  # True when rollout_step also predicts the reward

    def fit(self, data: Transitions, generator: torch.Generator | None = None) -> FitReport:
        """Fit on real transitions (shuffles and initial draws from ``generator``) and report
        the losses."""
        ...

    def predict(self, obs: torch.Tensor, act: torch.Tensor) -> Prediction:
        """One-step predictive distribution for ``obs [B, X]``, ``act [B, U]``."""
        ...

    def rollout_start(
        self, obs: torch.Tensor, particles: int, generator: torch.Generator | None
    ) -> RolloutState:
        """Start ``particles`` rollouts from each row of ``obs [B, X]`` (a :class:`Filter` also
        takes a :class:`Belief` of ``B`` rows): state of ``B * P`` rows, start-major."""
        ...

    def rollout_step(
        self, state: RolloutState, act: torch.Tensor, generator: torch.Generator | None
    ) -> RolloutState:
        """Advance every particle by one sampled step under ``act [B * P, U]``."""
        ...


@runtime_checkable
class DifferentiableModel(Protocol):
    """Models with differentiable mean dynamics ``x' = f(x, u)``, for gradient planners."""

    def mean_dynamics(self, obs: torch.Tensor, act: torch.Tensor) -> torch.Tensor:
        """Mean next observation ``[B, X]`` for ``obs [B, X]``, ``act [B, U]``; autograd-able."""
        ...


@runtime_checkable
class Linearizable(Protocol):
    """Models that give the Jacobians of their mean one-step dynamics themselves (closed form,
    finite differences, or a time-varying linear-Gaussian fit that is indexed by ``t``)."""

    def linearize(
        self, x: torch.Tensor, u: torch.Tensor, t: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``A = df/dx [B, X, X]`` and ``B = df/du [B, X, U]`` at rows ``x [B, X]``,
        ``u [B, U]``; ``t [B]`` (long) is each row's time index for time-varying models and
        is ignored by time-invariant ones."""
        ...


@runtime_checkable
class CasadiModel(Protocol):
    """Models with a symbolic casadi twin of their discrete step, for NMPC (IPOPT)."""

    obs_dim: int
    act_dim: int
    dt: float  # seconds per step (collocation integrates ``ode_casadi`` over it)

    def step_casadi(self, x: Any, u: Any) -> Any:
        """Symbolic next state ``[X, 1]`` of columns ``x [X, 1]``, ``u [U, 1]`` (SX or MX)."""
        ...

    def ode_casadi(self, x: Any, u: Any) -> Any:
        """Symbolic time derivative ``x_dot [X, 1]`` (direct collocation)."""
        ...


@runtime_checkable
class Filter(Protocol):
    """Models whose state is hidden: they keep a belief updated from every real observation.

    :class:`~mbrl.control.mpc.MPCController` calls :meth:`observe` on every env step with the
    action that led to ``obs`` (``None`` right after :meth:`reset_belief`) and plans from the
    belief; ``rollout_start`` accepts that belief.
    """

    def reset_belief(self, batch: int = 1) -> Belief:
        """The prior belief of ``batch`` systems before any observation."""
        ...

    def observe(self, belief: Belief, obs: torch.Tensor, prev_act: torch.Tensor | None) -> Belief:
        """Posterior after ``obs [B, ...]``, reached under ``prev_act [B, U]`` from ``belief``."""
        ...
