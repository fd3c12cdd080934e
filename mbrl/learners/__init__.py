"""Model-free learners used alone and inside the Dyna-style algorithms: SAC, TD3/DDPG, NAF; and
the supervised Gaussian policy of guided policy search."""

from mbrl.learners.base import Learner
from mbrl.learners.naf import NAF
from mbrl.learners.sac import SAC
from mbrl.learners.supervised import GaussianMLPPolicy, PolicyFitReport, SupervisedPolicy
from mbrl.learners.td3 import TD3

__all__ = [
    "NAF",
    "SAC",
    "TD3",
    "GaussianMLPPolicy",
    "Learner",
    "PolicyFitReport",
    "SupervisedPolicy",
]
