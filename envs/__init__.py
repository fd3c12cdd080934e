"""Environments: the registry of gymnasium envs with batched torch reward and termination."""

from mbrl.envs.registry import make, names, register
from mbrl.envs.spec import EnvSpec, RewardFn, TerminationFn, never_terminates

__all__ = ["EnvSpec", "RewardFn", "TerminationFn", "make", "names", "never_terminates", "register"]
