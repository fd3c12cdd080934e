"""The cross product: every model with every planner plans one MPC step deterministically with
the right shapes, or is refused with a message; the README's table is what this test sees."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "experiments"))
import pairs  # noqa: E402

REFUSED = {("ensemble", "nmpc"), ("gp", "nmpc"), ("mujoco", "nmpc"), ("latent", "nmpc")}
"""Pairs that cannot work: NMPC needs the symbolic (casadi) twin only an analytic system has."""
NO_SET_POINT = {("latent", "lqr")}
"""LQR regulates to a set point of the state; a latent model planned from a belief has none."""


@pytest.fixture(scope="module")
def results() -> dict:
    return pairs.all_pairs()


@pytest.mark.parametrize("model", pairs.MODELS)
@pytest.mark.parametrize("planner", pairs.PLANNERS)
def test_pair_plans_deterministically_or_is_refused(results, model: str, planner: str) -> None:
    first = results[model, planner]
    if (model, planner) in REFUSED:
        assert not first.plans
        assert "CasadiModel" in first.message and "plan this problem with" in first.message
        return
    if (model, planner) in NO_SET_POINT:
        assert not first.plans
        assert "no set point" in first.message and "ilqr" in first.message
        return
    assert first.plans, f"{model} + {planner} was refused: {first.message}"
    again = pairs.run_pair(model, planner)
    problem = pairs.task(model).problem(0)
    assert first.action.shape == (problem.act_dim,)
    assert torch.isfinite(first.action).all()
    low, high = problem.action_low.double(), problem.action_high.double()
    action = first.action.double()
    assert bool((action >= low - 1e-6).all() and (action <= high + 1e-6).all())
    torch.testing.assert_close(again.action, first.action, rtol=0, atol=0)


def test_readme_table_is_the_observed_one(results) -> None:
    readme = (ROOT / "README.md").read_text()
    assert pairs.readme_table(readme) == pairs.table(results), (
        "the README table of pairs is stale: python experiments/pairs.py --readme README.md"
    )
