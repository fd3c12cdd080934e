"""Known dynamics behind the model seam: a deterministic ``x' = f(x, u)`` given as a function."""

from __future__ import annotations

from collections.abc import Callable

import torch

from mbrl.dynamics.base import (
    FitReport,
    Prediction,
    RolloutState,
    Transitions,
    check_rows,
    check_start,
    check_transitions,
)

StepFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
"""``f(x [B, X], u [B, U]) -> x' [B, X]``, batched torch."""


class KnownModel:
    """A deterministic model from a known step function (analytic systems, tests, oracles).

    ``fit`` learns nothing and reports no loss; all particles of a start follow one path.
    The mean dynamics are ``f`` itself: a :class:`~mbrl.dynamics.base.DifferentiableModel`
    for gradient planners when ``f`` is autograd-able. ``f`` follows its inputs' dtype.
    Every method checks its shapes (``obs [B, X]``, ``act [B, U]``) and raises
    :class:`~mbrl.shapes.ShapeError` before ``f`` sees a wrong one.
    """

    learns_reward = False

    def __init__(self, step_fn: StepFn, obs_dim: int, act_dim: int) -> None:
        self.step_fn = step_fn
        self.obs_dim = obs_dim
        self.act_dim = act_dim

    def fit(self, data: Transitions, generator: torch.Generator | None = None) -> FitReport:
        """Nothing to learn: checks the shapes of ``data`` and reports no loss."""
        check_transitions(data, self.obs_dim, self.act_dim, finite=())
        return FitReport((), (), 0, 0, (0,), 0.0)

    def predict(self, obs: torch.Tensor, act: torch.Tensor) -> Prediction:
        """``f(obs [B, X], act [B, U])`` with zero variance."""
        check_rows(obs, act, self.obs_dim, self.act_dim)
        mean = self.step_fn(obs, act)
        return Prediction(mean=mean, var=torch.zeros_like(mean))

    def mean_dynamics(self, obs: torch.Tensor, act: torch.Tensor) -> torch.Tensor:
        """``f(obs [B, X], act [B, U]) -> [B, X]``."""
        check_rows(obs, act, self.obs_dim, self.act_dim)
        return self.step_fn(obs, act)

    def rollout_start(
        self, obs: torch.Tensor, particles: int, generator: torch.Generator | None = None
    ) -> RolloutState:
        """``P`` copies of each row of ``obs [B, X]``: ``[B * P, X]``, start-major."""
        check_start(obs, particles, self.obs_dim)
        return RolloutState(obs=obs.repeat_interleave(particles, dim=0))

    def rollout_step(
        self, state: RolloutState, act: torch.Tensor, generator: torch.Generator | None = None
    ) -> RolloutState:
        """``f(state.obs [R, X], act [R, U])``."""
        check_rows(state.obs, act, self.obs_dim, self.act_dim, "state.obs")
        return RolloutState(obs=self.step_fn(state.obs, act))
