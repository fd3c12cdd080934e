"""The MPC controller, casadi NMPC and the control comparison study.

NMPC and the study import casadi on first use only.
"""

from importlib import import_module

from mbrl.control.mpc import Episode, MPCController, MPCStats, Policy, RandomPolicy, run_episode

_LAZY = {
    "NMPC": "mbrl.control.nmpc",
    "NMPCSolution": "mbrl.control.nmpc",
    "StudyResult": "mbrl.control.study",
    "run_study": "mbrl.control.study",
}

__all__ = [
    "NMPC",
    "Episode",
    "MPCController",
    "MPCStats",
    "NMPCSolution",
    "Policy",
    "RandomPolicy",
    "StudyResult",
    "run_study",
    "run_episode",
]


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'mbrl.control' has no attribute {name!r}")
