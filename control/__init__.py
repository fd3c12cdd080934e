"""The MPC controller and closed-loop evaluation."""

from mbrl.control.mpc import Episode, MPCController, MPCStats, Policy, RandomPolicy, run_episode

__all__ = ["Episode", "MPCController", "MPCStats", "Policy", "RandomPolicy", "run_episode"]

from mbrl.control.nmpc import NMPC, NMPCSolution  # noqa: E402
from mbrl.control.study import StudyResult, run_study  # noqa: E402

__all__ += ["NMPC", "NMPCSolution", "StudyResult", "run_study"]
