"""Planners on the shared planning problem."""

from mbrl.planners.base import Plan, Planner, PlanningProblem
from mbrl.planners.noise import colored_noise
from mbrl.planners.sampling import CEM, MPPI, CEMPlan, RandomShooting, shift_actions

__all__ = [
    "CEM",
    "MPPI",
    "CEMPlan",
    "Plan",
    "Planner",
    "PlanningProblem",
    "RandomShooting",
    "colored_noise",
    "shift_actions",
]

# gradient planners: LQR, iLQR / box-DDP (see mbrl.planners.lqr, mbrl.planners.ilqr)
from mbrl.planners.ilqr import ILQR, box_qp  # noqa: E402
from mbrl.planners.lqr import (  # noqa: E402
    LQR,
    TimeVaryingLQR,
    lqr_backward,
    lqr_gain,
    solve_dare,
)

__all__ += ["ILQR", "LQR", "TimeVaryingLQR", "box_qp", "lqr_backward", "lqr_gain", "solve_dare"]
