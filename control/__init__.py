"""The MPC controller and closed-loop evaluation."""

from mbrl.control.mpc import Episode, MPCController, MPCStats, Policy, RandomPolicy, run_episode

__all__ = ["Episode", "MPCController", "MPCStats", "Policy", "RandomPolicy", "run_episode"]
