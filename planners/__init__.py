"""Planners on the shared planning problem."""

from mbrl.planners.base import Plan, Planner, PlanningProblem

__all__ = ["Plan", "Planner", "PlanningProblem"]
