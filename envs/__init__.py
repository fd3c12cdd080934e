"""Environments: the registry of gymnasium envs with batched torch reward and termination.

Importing ``mbrl.envs`` registers the gymnasium tasks cartpole-balance, cartpole-swingup,
pendulum, inverted-pendulum, reacher, pusher, half-cheetah, hopper and the discrete-action
CartPole-v1 and Acrobot-v1 (:mod:`mbrl.envs.tasks`, :mod:`mbrl.envs.discrete`), and the
analytic systems of :mod:`mbrl.envs.systems` (pendulum-swingup, cartpole-swingup-analytic,
acrobot-swingup, double-integrator).
"""

from mbrl.envs.discrete import DiscreteActions, discretize
from mbrl.envs.registry import make, names, register
from mbrl.envs.spec import EnvSpec, RewardFn, TerminationFn, never_terminates
from mbrl.envs.tasks import register_all

register_all()

__all__ = [
    "DiscreteActions",
    "EnvSpec",
    "RewardFn",
    "TerminationFn",
    "discretize",
    "make",
    "names",
    "never_terminates",
    "register",
]

# analytic systems with torch and casadi twins: pendulum-swingup, cartpole-swingup-analytic,
# acrobot-swingup, double-integrator (see mbrl.envs.systems)
from mbrl.envs import systems as _systems  # noqa: E402, F401
