"""Bad input at the model and env seams: wrong shapes raise ShapeError naming the expected and the
actual shape, a fit whose loss goes non-finite raises FitError, non-finite states terminate and
non-finite actions are refused by every registry env."""

from __future__ import annotations

import dataclasses
import math

import gymnasium as gym
import numpy as np
import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from mbrl import envs
from mbrl.dynamics import (
    DifferentiableModel,
    FitError,
    GaussianProcessModel,
    KnownModel,
    Linearizable,
    ProbabilisticEnsemble,
    SystemModel,
    Transitions,
)
from mbrl.dynamics.base import RolloutState
from mbrl.dynamics.mujoco_model import MujocoModel
from mbrl.envs.spec import NonfiniteTerminates, never_terminates
from mbrl.envs.systems import pendulum
from mbrl.envs.tasks import hopper_termination
from mbrl.planners.base import PlanningProblem
from mbrl.shapes import ShapeError

torch.set_num_threads(1)
E = 3  # ensemble members; particles are multiples of E so that every mode accepts them
SEAM = settings(max_examples=20, deadline=None)


def _data(n: int, x: int, u: int, seed: int = 0) -> Transitions:
    g = torch.Generator().manual_seed(seed)
    obs = torch.randn(n, x, generator=g)
    act = torch.rand(n, u, generator=g) * 2 - 1
    nxt = obs + 0.1 * torch.sin(obs) + 0.1 * act.sum(-1, keepdim=True)
    return Transitions(obs, act, nxt, torch.zeros(n), torch.zeros(n, dtype=torch.bool))


def _ensemble(propagation: str, **kwargs) -> ProbabilisticEnsemble:
    base = dict(ensemble_size=E, hidden_size=8, num_layers=1, propagation=propagation, seed=0)
    return ProbabilisticEnsemble(3, 2, **{**base, **kwargs})


def _gp() -> GaussianProcessModel:
    model = GaussianProcessModel(3, 2, iterations=3, seed=0)
    model.fit(_data(16, 3, 2))
    return model


def _mujoco() -> MujocoModel:
    return MujocoModel.from_spec(envs.make("cartpole-swingup"), nthread=0)


MODELS = {
    "ensemble-ts1": lambda: _ensemble("ts1"),
    "ensemble-ts_inf": lambda: _ensemble("ts_inf"),
    "ensemble-expectation": lambda: _ensemble("expectation"),
    "gp": _gp,
    "known": lambda: KnownModel(lambda x, u: x + u.sum(-1, keepdim=True), 3, 2),
    "system": lambda: SystemModel(pendulum()),
    "mujoco": _mujoco,
}


@pytest.fixture(scope="module")
def models() -> dict:
    built = {name: make() for name, make in MODELS.items()}
    yield built
    built["mujoco"].close()


def _wrong(shape: tuple[int, int], kind: str, k: int) -> tuple[int, ...]:
    """A wrong variant of ``[rows, cols]``; ``k >= 1`` sizes the change."""
    rows, cols = shape
    if kind == "transposed":
        return (cols, rows)
    if kind == "flattened":
        return (rows * cols,)
    if kind == "wrong_cols":
        return (rows, cols + k)
    if kind == "wrong_rows":
        return (rows + k, cols)
    if kind == "wrong_split":  # the same numbers split differently: [rows / k, cols * k]
        return (rows // (k + 1), cols * (k + 1)) if rows % (k + 1) == 0 else (rows * cols, 1)
    return [(1, rows, cols), (rows, 1, cols), (rows, cols, 1)][k % 3]  # extra axis


KINDS = st.sampled_from(
    ["transposed", "flattened", "wrong_cols", "wrong_rows", "wrong_split", "extra_axis"]
)


def _raises_with_shapes(fn, expected: str, actual: tuple[int, ...]) -> None:
    with pytest.raises(ShapeError) as info:
        fn()
    message = str(info.value)
    assert f"expected {expected}" in message, message
    assert f"got {list(actual)}" in message, message


@pytest.mark.parametrize("name", list(MODELS))
@SEAM
@given(b=st.integers(1, 3), p=st.sampled_from([E, 2 * E]), kind=KINDS, k=st.integers(1, 3))
def test_rollout_step_refuses_wrong_action_shapes(models, name, b, p, kind, k) -> None:
    model = models[name]
    x, u = model.obs_dim, model.act_dim
    state = model.rollout_start(torch.zeros(b, x), p, torch.Generator().manual_seed(0))
    rows = b * p
    bad = _wrong((rows, u), kind, k)
    assume(bad != (rows, u))
    act = torch.zeros(bad)
    _raises_with_shapes(lambda: model.rollout_step(state, act), str([rows, u]), bad)
    nxt = model.rollout_step(state, torch.zeros(rows, u), torch.Generator().manual_seed(0))
    assert nxt.obs.shape == (rows, x)


@pytest.mark.parametrize("name", list(MODELS))
@SEAM
@given(b=st.integers(1, 4), kind=KINDS, k=st.integers(1, 3))
def test_start_and_predict_refuse_wrong_shapes(models, name, b, kind, k) -> None:
    model = models[name]
    x, u = model.obs_dim, model.act_dim
    bad_obs = _wrong((b, x), kind, k)
    assume(len(bad_obs) != 2 or bad_obs[1] != x)  # any number of starts is right
    obs = torch.zeros(bad_obs)
    _raises_with_shapes(lambda: model.rollout_start(obs, E, None), f"[B, {x}]", bad_obs)
    bad_act = _wrong((b, u), kind, k)
    assume(bad_act != (b, u))
    act = torch.zeros(bad_act)
    good = torch.zeros(b, x)
    _raises_with_shapes(lambda: model.predict(good, act), str([b, u]), bad_act)
    assert model.predict(good, torch.zeros(b, u)).mean.shape == (b, x)
    if isinstance(model, DifferentiableModel):
        _raises_with_shapes(lambda: model.mean_dynamics(good, act), str([b, u]), bad_act)
    if isinstance(model, Linearizable):
        _raises_with_shapes(lambda: model.linearize(good, act), str([b, u]), bad_act)
        a, bm = model.linearize(good.double(), torch.zeros(b, u, dtype=torch.float64))
        assert a.shape == (b, x, x) and bm.shape == (b, x, u)


@pytest.mark.parametrize("name", list(MODELS))
def test_fit_and_state_shapes_are_checked(models, name) -> None:
    model = models[name]
    x, u = model.obs_dim, model.act_dim
    data = _data(40, x, u)
    wrong = Transitions(data.obs, data.act[:, :1].repeat(1, u + 1), *_rest(data))
    _raises_with_shapes(lambda: model.fit(wrong), str([40, u]), (40, u + 1))
    state = model.rollout_start(torch.zeros(2, x), E, None)
    flat = RolloutState(obs=state.obs.reshape(-1), hidden=state.hidden)
    act = torch.zeros(2 * E, u)
    _raises_with_shapes(lambda: model.rollout_step(flat, act), f"[B, {x}]", (2 * E * x,))
    with pytest.raises(ValueError, match="particles must be an int >= 1, got 0"):
        model.rollout_start(torch.zeros(2, x), 0, None)


def _rest(data: Transitions) -> tuple[torch.Tensor, ...]:
    return data.next_obs, data.reward, data.terminated


def test_ts_inf_refuses_rows_that_do_not_split_over_the_elites() -> None:
    model = _ensemble("ts_inf")
    state = RolloutState(obs=torch.zeros(4, 3))  # 4 rows, not from rollout_start with E = 3
    with pytest.raises(ShapeError, match=r"multiple of E=3.*got \[4, 3\]"):
        model.rollout_step(state, torch.zeros(4, 2))


# ---------------------------------------------------------------- non-finite fits


def test_ensemble_fit_with_infinite_lr_raises_instead_of_keeping_old_weights() -> None:
    model = _ensemble("ts_inf", lr=math.inf, weight_decay=1e-4, max_epochs=3)
    with pytest.raises(FitError, match=r"training loss nan at epoch 0 with lr=inf, "):
        model.fit(_data(64, 3, 2))
    assert issubclass(FitError, RuntimeError)
    message = "weight_decay=0.0001, batch_size=32; lower lr"
    with pytest.raises(FitError, match=message):
        _ensemble("ts_inf", lr=math.inf, weight_decay=1e-4).fit(_data(64, 3, 2))


def test_ensemble_fit_raises_on_a_nonfinite_validation_loss(monkeypatch) -> None:
    model = _ensemble("ts_inf", max_epochs=3)
    monkeypatch.setattr(model, "_member_loss", lambda x, y: torch.full((E,), math.inf))
    with pytest.raises(FitError, match="validation loss inf at epoch 0 with lr=0.001"):
        model.fit(_data(64, 3, 2))


@pytest.mark.parametrize("optimizer", ["adam", "lbfgs"])
def test_gp_fit_with_infinite_lr_raises(optimizer: str) -> None:
    model = GaussianProcessModel(3, 2, iterations=4, lr=math.inf, optimizer=optimizer)
    message = f"loss nan at iteration 1 with lr=inf, optimizer='{optimizer}'"
    with pytest.raises(FitError, match=message):
        model.fit(_data(16, 3, 2))


@pytest.mark.parametrize("name", ["ensemble-ts_inf", "gp"])
def test_fit_refuses_nonfinite_data_naming_rows_and_columns(name: str) -> None:
    model = MODELS[name]() if name == "ensemble-ts_inf" else GaussianProcessModel(3, 2)
    data = _data(40, 3, 2)
    act = data.act.clone()
    act[[3, 7], 1] = math.nan
    act[7, 0] = math.inf
    bad = Transitions(data.obs, act, *_rest(data))
    message = r"data.act contains NaN/inf in 2 of 40 rows \(columns \[0, 1\]\); remove"
    with pytest.raises(ValueError, match=message):
        model.fit(bad)


# ---------------------------------------------------------------- non-finite states terminate


def _finite_states(spec) -> torch.Tensor:
    """A few real observations ``[4, X]`` of the env: its reset and three random steps."""
    env = spec.make()
    obs, _ = env.reset(seed=0)
    env.action_space.seed(0)
    rows = [obs]
    for _ in range(3):
        obs, *_ = env.step(env.action_space.sample())
        rows.append(obs)
    env.close()
    return torch.as_tensor(np.stack(rows), dtype=torch.float32)


@pytest.mark.parametrize("name", envs.names())
def test_every_termination_fn_ends_nonfinite_rows(name: str) -> None:
    spec = envs.make(name)
    if len(getattr(spec, "obs_shape", ())) > 1:
        pytest.skip("pixel tasks never terminate from images (tests/test_pixels.py)")
    finite = _finite_states(spec)  # [4, X]
    x = spec.obs_dim
    bad = finite[:1].repeat(3 * x, 1)  # one bad entry per row: each column NaN, inf, -inf
    for i, value in enumerate((math.nan, math.inf, -math.inf)):
        bad[i * x + torch.arange(x), torch.arange(x)] = value
    batch = torch.cat([finite, bad])  # [4 + 3 X, X]
    term = spec.termination_fn(batch)
    assert term.dtype == torch.bool and term.shape == (4 + 3 * x,)
    assert term[4:].all()
    assert torch.equal(term[:4], spec.termination_fn(finite))
    inner = getattr(spec.termination_fn, "fn", spec.termination_fn)
    assert torch.equal(term[:4], inner(finite))
    assert torch.equal(spec.termination_fn(batch[:, None]).reshape(-1), term)


def test_specs_wrap_their_termination_once() -> None:
    hopper = envs.make("hopper")
    assert isinstance(hopper.termination_fn, NonfiniteTerminates)
    assert hopper.termination_fn.fn is hopper_termination
    grid = envs.discretize(hopper, 2)  # dataclasses.replace runs __post_init__ again
    assert grid.termination_fn.fn is hopper_termination
    assert envs.make("pendulum").termination_fn is never_terminates
    none = dataclasses.replace(envs.make("pendulum"), termination_fn=None)
    assert none.termination_fn is never_terminates


def test_never_terminates_and_a_problem_without_termination_end_nonfinite_rows() -> None:
    obs = torch.tensor([[0.0, 1.0], [math.nan, 0.0], [0.0, -math.inf]])
    assert never_terminates(obs).tolist() == [False, True, True]
    model = KnownModel(lambda x, u: x * u, 2, 1)
    problem = PlanningProblem(model, lambda o, a, n: -(n**2).sum(-1), None, 2, [-1.0], [1.0])
    state = problem.start(torch.ones(3, 2))
    step = problem.step(state, torch.tensor([[1.0], [math.nan], [1.0]]))
    assert step.alive.tolist() == [True, False, True]
    assert step.finite.tolist() == [True, False, True]


@pytest.mark.filterwarnings("ignore:.*not within the observation space")
def test_raw_cartpole_balance_ends_a_nan_episode_at_once() -> None:
    env = gym.make("mbrl/CartpoleBalance-v0")  # the env itself, without the spec's wrapper
    env.reset(seed=0)
    ret, steps, terminated = 0.0, 0, False
    while not terminated and steps < 200:
        _, reward, terminated, _, _ = env.step(np.array([math.nan], dtype=np.float32))
        ret, steps = ret + reward, steps + 1
    assert (steps, ret, terminated) == (1, 1.0, True)


def test_analytic_env_terminates_on_a_nonfinite_state() -> None:
    env = envs.make("pendulum-swingup").make()
    env.reset(seed=0)
    _, _, terminated, _, _ = env.step(np.zeros(1, dtype=np.float32))
    assert not terminated
    env.unwrapped.state = np.array([math.nan, 0.0])
    _, _, terminated, _, _ = env.step(np.zeros(1, dtype=np.float32))
    assert terminated


# ---------------------------------------------------------------- non-finite actions


def _finite_action(spec, env) -> np.ndarray | int:
    return 0 if spec.discrete else env.action_space.sample()


@pytest.mark.parametrize("name", envs.names())
def test_every_registry_env_refuses_a_nonfinite_action(name: str) -> None:
    spec = envs.make(name)
    env = spec.make()
    env.reset(seed=0)
    env.action_space.seed(0)
    for value in (math.nan, math.inf):
        action = np.full(spec.act_dim, value, dtype=np.float32)
        with pytest.raises(ValueError, match=rf"{name}: action \[{value}.*is not finite"):
            env.step(action)
    env.step(_finite_action(spec, env))  # a finite action still plays
    env.close()


def test_discretized_env_refuses_a_nonfinite_action() -> None:
    spec = envs.discretize(envs.make("pendulum"), 3)
    env = spec.make()
    env.reset(seed=0)
    with pytest.raises(ValueError, match="pendulum-grid3: action"):
        env.step(torch.tensor([math.nan]))
    env.step(1)
    env.close()
