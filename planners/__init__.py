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
