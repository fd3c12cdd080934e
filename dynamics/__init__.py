"""Dynamics models of p(s', r | s, a) behind one rollout interface.

The Gaussian-process and MuJoCo models import gpytorch and mujoco on first use only; the latent
image models (``RSSM``, ``SingleStepLatent``) load on first use too (they build on the pixel
tasks of ``mbrl.envs``).
"""

from importlib import import_module

from mbrl.dynamics.base import (
    Belief,
    CasadiModel,
    DifferentiableModel,
    DynamicsModel,
    Filter,
    FitError,
    FitReport,
    Linearizable,
    Prediction,
    RolloutState,
    Transitions,
)
from mbrl.dynamics.ensemble import MemberPrediction, ProbabilisticEnsemble
from mbrl.dynamics.known import KnownModel
from mbrl.dynamics.systems import SystemModel

_LAZY = {
    "GaussianProcessModel": "mbrl.dynamics.gp",
    "GPDiagnostics": "mbrl.dynamics.gp",
    "MujocoModel": "mbrl.dynamics.mujoco_model",
    "RSSM": "mbrl.dynamics.rssm",  # the latent image models import mbrl.envs.pixels
    "SingleStepLatent": "mbrl.dynamics.single_step",
    "LatentLosses": "mbrl.dynamics.latent",
    "LatentRewardCost": "mbrl.dynamics.latent",
    "TVLGDynamics": "mbrl.dynamics.tvlg",  # the TVLG fits import mbrl.planners.derivatives
    "TVLGPrior": "mbrl.dynamics.tvlg",
    "GMMPrior": "mbrl.dynamics.tvlg",
    "ModelPrior": "mbrl.dynamics.tvlg",
    "NormalInverseWishart": "mbrl.dynamics.tvlg",
    "fit_tvlg": "mbrl.dynamics.tvlg",
    "fit_initial_state": "mbrl.dynamics.tvlg",
}

__all__ = [
    "Belief",
    "CasadiModel",
    "DifferentiableModel",
    "DynamicsModel",
    "Filter",
    "FitError",
    "FitReport",
    "GMMPrior",
    "GPDiagnostics",
    "GaussianProcessModel",
    "KnownModel",
    "LatentLosses",
    "LatentRewardCost",
    "Linearizable",
    "MemberPrediction",
    "ModelPrior",
    "MujocoModel",
    "NormalInverseWishart",
    "Prediction",
    "ProbabilisticEnsemble",
    "RSSM",
    "RolloutState",
    "SingleStepLatent",
    "SystemModel",
    "TVLGDynamics",
    "TVLGPrior",
    "Transitions",
    "fit_initial_state",
    "fit_tvlg",
]


def __getattr__(name: str):
    if name in _LAZY:
        try:
            module = import_module(_LAZY[name])
        except ModuleNotFoundError as e:  # gpytorch is the ``gp`` extra: say how to install it
            from mbrl.extras import missing

            raise missing(e, f"mbrl.dynamics.{name}") from None
        return getattr(module, name)
    raise AttributeError(f"module 'mbrl.dynamics' has no attribute {name!r}")
