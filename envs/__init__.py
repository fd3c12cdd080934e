"""Environments: the registry of gymnasium envs with batched torch reward and termination.

Importing ``mbrl.envs`` registers the gymnasium tasks cartpole-balance, cartpole-swingup,
pendulum, inverted-pendulum, reacher, pusher, half-cheetah, hopper and the discrete-action
CartPole-v1 and Acrobot-v1 (:mod:`mbrl.envs.tasks`, :mod:`mbrl.envs.discrete`), and the
analytic systems of :mod:`mbrl.envs.systems` (pendulum-swingup, cartpole-swingup-analytic,
acrobot-swingup, double-integrator), the pixel tasks pendulum-pixels and
inverted-pendulum-pixels (:mod:`mbrl.envs.pixels`), and six DeepMind Control tasks with their
-pixels versions (:mod:`mbrl.envs.dmc`; dm-control is imported when one is made).

It also sets ``MUJOCO_GL=egl`` where that variable is unset, the system is Linux and libEGL
loads (:func:`mbrl.envs.pixels.default_mujoco_gl`), before anything here imports mujoco:
headless rendering for the pixel tasks. Set ``MUJOCO_GL`` first to choose another backend.
"""

import os

from mbrl.envs.pixels import PixelObservation, PixelSpec, default_mujoco_gl

os.environ.update(default_mujoco_gl())  # before mujoco is imported (it reads MUJOCO_GL once)

from mbrl.envs.discrete import DiscreteActions, discretize
from mbrl.envs.registry import make, names, register
from mbrl.envs.spec import EnvSpec, RewardFn, TerminationFn, never_terminates
from mbrl.envs.tasks import register_all

register_all()

__all__ = [
    "DiscreteActions",
    "EnvSpec",
    "PixelObservation",
    "PixelSpec",
    "RewardFn",
    "TerminationFn",
    "discretize",
    "make",
    "names",
    "never_terminates",
    "register",
]

# analytic systems with torch and casadi twins: pendulum-swingup, cartpole-swingup-analytic,
# acrobot-swingup, double-integrator (see mbrl.envs.systems); pixel tasks and DeepMind Control
# tasks (dm-control is imported when one is made)
from mbrl.envs import dmc as _dmc  # noqa: E402
from mbrl.envs import pixels as _pixels  # noqa: E402
from mbrl.envs import systems as _systems  # noqa: E402, F401

_pixels.register_all()
_dmc.register_all()
