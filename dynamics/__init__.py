"""Dynamics models of p(s', r | s, a) behind one rollout interface."""

from mbrl.dynamics.base import (
    DifferentiableModel,
    DynamicsModel,
    FitReport,
    Prediction,
    RolloutState,
    Transitions,
)
from mbrl.dynamics.known import KnownModel

__all__ = [
    "DifferentiableModel",
    "DynamicsModel",
    "FitReport",
    "KnownModel",
    "Prediction",
    "RolloutState",
    "Transitions",
]

from mbrl.dynamics.mujoco_model import MujocoModel  # noqa: E402

__all__ += ["MujocoModel"]

from mbrl.dynamics.ensemble import MemberPrediction, ProbabilisticEnsemble  # noqa: E402

__all__ += ["MemberPrediction", "ProbabilisticEnsemble"]

from mbrl.dynamics.gp import GaussianProcessModel, GPDiagnostics  # noqa: E402

__all__ += ["GPDiagnostics", "GaussianProcessModel"]
