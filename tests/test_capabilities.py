"""Typed capabilities: which model declares what, the dispatch of the gradient planners and
NMPC on them, and the clear errors for what a model or reward cannot do."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mbrl.control.nmpc import NMPC
from mbrl.dynamics import (
    CasadiModel,
    DifferentiableModel,
    DynamicsModel,
    Filter,
    KnownModel,
    Linearizable,
    SystemModel,
    Transitions,
)
from mbrl.dynamics.ensemble import ProbabilisticEnsemble
from mbrl.envs import make
from mbrl.envs.systems import SYSTEMS, double_integrator
from mbrl.planners.base import PlanningProblem, StageCost, WarmStart
from mbrl.planners.derivatives import (
    CasadiStageCost,
    TerminalCost,
    dynamics_jacobians,
    mean_step,
    stage_cost_of,
)
from mbrl.planners.ilqr import ILQR
from mbrl.planners.lqr import LQR

F64 = torch.float64


def _toy(n: int, seed: int) -> Transitions:
    """``x' = 0.9 x + 0.5 u`` (X = U = 2), a little noise: stabilizable at the origin."""
    g = torch.Generator().manual_seed(seed)
    obs = torch.rand(n, 2, generator=g) * 2 - 1
    act = torch.rand(n, 2, generator=g) * 2 - 1
    nxt = 0.9 * obs + 0.5 * act + 0.01 * torch.randn(n, 2, generator=g)
    return Transitions(obs, act, nxt, torch.zeros(n), torch.zeros(n, dtype=torch.bool))


def _quadratic_reward(obs: torch.Tensor, act: torch.Tensor, nxt: torch.Tensor) -> torch.Tensor:
    return -(obs**2).sum(-1) - 0.1 * (act**2).sum(-1)


@pytest.fixture(scope="module")
def ensemble() -> ProbabilisticEnsemble:
    model = ProbabilisticEnsemble(2, 2, ensemble_size=2, hidden_size=16, num_layers=2, seed=0)
    model.max_epochs = 5
    model.fit(_toy(200, 0), torch.Generator().manual_seed(0))
    return model


@pytest.fixture(scope="module")
def gp():
    from mbrl.dynamics.gp import GaussianProcessModel

    model = GaussianProcessModel(2, 2, iterations=20, seed=0)
    model.fit(_toy(80, 1))
    return model


@pytest.fixture(scope="module")
def mujoco_cartpole():
    from mbrl.dynamics.mujoco_model import MujocoModel

    spec = make("cartpole-swingup")
    model = MujocoModel.from_spec(spec, nthread=0)
    yield spec, model
    model.close()


def _problem(model, reward_fn=_quadratic_reward, horizon: int = 5, **kwargs) -> PlanningProblem:
    bound = torch.full((model.act_dim,), 2.0)
    return PlanningProblem(model, reward_fn, None, horizon, -bound, bound, **kwargs)


# ---------------------------------------------------------------------------- declarations


def test_every_model_declares_its_capabilities(ensemble, gp, mujoco_cartpole) -> None:
    system = SYSTEMS["pendulum"]()
    _, mujoco = mujoco_cartpole
    known = KnownModel(system.step, 2, 1)
    table = {
        # model: (Differentiable, Linearizable, Casadi, Filter)
        "known": (known, (True, False, False, False)),
        "system": (SystemModel(system), (True, True, True, False)),
        "mujoco": (mujoco, (False, True, False, False)),
        "ensemble": (ensemble, (True, False, False, False)),
        "gp": (gp, (True, False, False, False)),
    }
    for name, (model, expected) in table.items():
        assert isinstance(model, DynamicsModel), name
        got = tuple(
            isinstance(model, p) for p in (DifferentiableModel, Linearizable, CasadiModel, Filter)
        )
        assert got == expected, (name, got)


def test_analytic_costs_declare_stage_cost_and_casadi_forms() -> None:
    system = double_integrator()
    for cost in (system.reward_fn(), system.stage_cost()):
        assert isinstance(cost, StageCost) and isinstance(cost, CasadiStageCost)
    assert isinstance(system.value_fn(), TerminalCost)
    # the problem's objective: closed form and casadi whenever every part is
    problem = PlanningProblem(
        SystemModel(system), system.reward_fn(), None, 4, system.action_low, system.action_high,
        value_fn=system.value_fn(),
    )  # fmt: skip
    assert isinstance(stage_cost_of(problem), CasadiStageCost)
    plain = _problem(SystemModel(system))
    assert isinstance(stage_cost_of(plain), StageCost)
    assert not isinstance(stage_cost_of(plain), CasadiStageCost)


# ---------------------------------------------------------------------------- dispatch


class _Neither:
    """A model with neither linearize nor mean_dynamics."""

    learns_reward = False
    obs_dim, act_dim = 2, 1

    def predict(self, obs, act):
        raise AssertionError("not called")


def test_a_model_with_neither_capability_names_both() -> None:
    x, u = torch.zeros(3, 2, dtype=F64), torch.zeros(3, 1, dtype=F64)
    with pytest.raises(TypeError, match="Linearizable.*DifferentiableModel"):
        dynamics_jacobians(_Neither(), x, u)
    with pytest.raises(TypeError, match="Linearizable.*DifferentiableModel"):
        mean_step(_Neither())
    system = double_integrator()
    problem = PlanningProblem(
        _Neither(), system.reward_fn(), None, 3, -torch.ones(1), torch.ones(1)
    )
    with pytest.raises(TypeError, match="Linearizable.*DifferentiableModel"):
        ILQR().plan(problem, torch.zeros(2, dtype=F64))


def test_time_index_is_passed_through_and_checked() -> None:
    seen: list[torch.Tensor] = []

    class TimeVarying:
        """``x' = x + (1 + t) u``: a time-varying linear model, linearized by itself."""

        learns_reward = False
        obs_dim, act_dim = 1, 1

        def predict(self, obs, act):
            raise AssertionError("not called")

        def linearize(self, x, u, t=None):
            seen.append(t)
            b = x.shape[0]
            return torch.ones(b, 1, 1, dtype=x.dtype), (1.0 + t.to(x.dtype)).view(b, 1, 1)

    model = TimeVarying()
    x, u = torch.zeros(4, 1, dtype=F64), torch.zeros(4, 1, dtype=F64)
    A, B = dynamics_jacobians(model, x, u, torch.arange(4), horizon=4)
    assert B.flatten().tolist() == [1.0, 2.0, 3.0, 4.0] and seen[-1].tolist() == [0, 1, 2, 3]
    with pytest.raises(ValueError, match="t = 4 is outside the horizon"):
        dynamics_jacobians(model, x, u, torch.tensor([0, 1, 2, 4]), horizon=4)
    cost = stage_cost_of(_problem(SystemModel(double_integrator()), horizon=3))
    xs, us = torch.zeros(2, 2, dtype=F64), torch.zeros(2, 1, dtype=F64)
    with pytest.raises(ValueError, match="t = 3 is outside the horizon"):
        cost.expansion(xs, us, torch.tensor([0, 3]))
    with pytest.raises(ValueError, match="long tensor"):
        cost.cost(xs, us, torch.zeros(2))


# ---------------------------------------------------------------------------- refusals


def test_ilqr_refuses_a_reward_without_gradient_before_autograd() -> None:
    system = double_integrator()

    def numpy_reward(obs, act, nxt):
        r = -(obs.detach().numpy() ** 2).sum(-1) - 0.1 * (act.detach().numpy() ** 2).sum(-1)
        return torch.as_tensor(r)

    def detached_reward(obs, act, nxt):
        return _quadratic_reward(obs, act, nxt).detach()

    x0 = torch.tensor([1.0, 0.0], dtype=F64)
    for reward in (numpy_reward, detached_reward):
        problem = _problem(SystemModel(system), reward)
        with pytest.raises(TypeError, match=f"reward_fn .*{reward.__name__}.* not differentiable"):
            ILQR().plan(problem, x0)
        with pytest.raises(TypeError, match="not differentiable"):
            LQR(goal=np.zeros(2)).plan(problem, x0)
    # a value_fn without gradient is refused the same way
    problem = _problem(SystemModel(system), value_fn=lambda s: s.obs.detach().sum(-1))
    with pytest.raises(TypeError, match="value_fn .* not differentiable"):
        ILQR().plan(problem, x0)


def test_nmpc_refuses_models_without_a_casadi_twin(ensemble, mujoco_cartpole) -> None:
    with pytest.raises(TypeError, match="ProbabilisticEnsemble is not a CasadiModel"):
        NMPC(5).plan(_problem(ensemble), torch.zeros(2))
    # the MuJoCo cart-pole is refused, not planned on another system's dynamics and bounds
    spec, mujoco = mujoco_cartpole
    problem = PlanningProblem(mujoco, spec.reward_fn, None, 5, *spec.action_bounds())
    with pytest.raises(TypeError, match="MujocoModel is not a CasadiModel"):
        NMPC(5).plan(problem, torch.zeros(spec.obs_dim))
    # a casadi model with a torch-only reward: the cost has no casadi form
    system = double_integrator()
    with pytest.raises(TypeError, match="casadi form"):
        NMPC(5).plan(_problem(SystemModel(system)), torch.zeros(2))


def test_nmpc_takes_the_bounds_from_the_problem() -> None:
    system = double_integrator(action_bound=1.0)
    tight = PlanningProblem(
        SystemModel(system), system.reward_fn(), None, 10, torch.full((1,), -0.2),
        torch.full((1,), 0.2), value_fn=system.value_fn(),
    )  # fmt: skip
    plan = NMPC(10).plan(tight, torch.tensor([1.0, 0.0], dtype=F64))
    bound = float(tight.action_high[0])  # 0.2 in float32
    assert plan.status == "ok" and plan.actions.abs().max() <= bound + 1e-12
    assert plan.actions.abs().max() >= bound - 1e-6  # the problem's bound binds


# ---------------------------------------------------------------------------- learned models


@pytest.mark.parametrize("name", ["ensemble", "gp"])
def test_lqr_and_ilqr_plan_on_float32_learned_models(name: str, request) -> None:
    model = request.getfixturevalue(name)
    problem = _problem(model, horizon=5)
    x0 = torch.tensor([0.5, -0.3], dtype=F64)  # float64 start, float32 model
    lqr = LQR(goal=np.zeros(2)).plan(problem, x0)
    assert lqr.status == "ok" and lqr.actions.dtype == F64 and lqr.K.shape == (5, 2, 2)
    assert torch.isfinite(lqr.actions).all() and lqr.expected_return > -10.0
    ilqr = ILQR(max_iterations=5).plan(problem, x0, WarmStart(torch.zeros(5, 2)))
    assert ilqr.actions.shape == (5, 2) and ilqr.x_ref.shape == (6, 2)
    assert ilqr.actions.dtype == F64 and torch.isfinite(ilqr.actions).all()
    assert ilqr.diagnostics["cost"] <= ilqr.diagnostics["initial_cost"]
    # the first action pushes the state toward the origin (x' ~ 0.9 x + 0.5 u)
    assert float(ilqr.actions[0] @ x0.to(ilqr.actions)) < 0.0


def test_ilqr_plans_on_mujoco_through_linearize_and_predict(mujoco_cartpole) -> None:
    spec, mujoco = mujoco_cartpole
    problem = PlanningProblem(mujoco, spec.reward_fn, None, 5, *spec.action_bounds())
    x0 = torch.tensor([0.0, 2.8, 0.0, 0.5], dtype=F64)
    plan = ILQR(max_iterations=2).plan(problem, x0, WarmStart(torch.full((5, 1), 0.3)))
    assert torch.isfinite(plan.actions).all() and plan.K.shape == (5, 1, 4)
