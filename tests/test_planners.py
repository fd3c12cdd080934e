"""Sampling planners and colored noise: known optima, determinism, bounds, non-finite rollouts."""

from __future__ import annotations

import gymnasium as gym
import numpy as np
import pytest
import torch

from mbrl.control.mpc import MPCController, run_episode
from mbrl.dynamics.known import KnownModel
from mbrl.planners import (
    CEM,
    MPPI,
    Plan,
    PlanningProblem,
    RandomShooting,
    WarmStart,
    colored_noise,
    shift_actions,
    shift_warm,
)
from mbrl.shapes import ShapeError

H, X = 4, 2
TARGET = torch.tensor([0.5, -0.3])
# x' = x + u, reward -|x' - target|^2: from x0 = 0 the optimum is u_0 = target, then u = 0.
OPTIMUM = torch.cat([TARGET[None], torch.zeros(H - 1, X)])  # [H, U]


def step(x: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    return x + u


def reward(obs: torch.Tensor, act: torch.Tensor, nxt: torch.Tensor) -> torch.Tensor:
    return -((nxt - TARGET) ** 2).sum(dim=-1)


def nan_step(x: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """x + u, but NaN whenever the first action component exceeds 0.25."""
    nxt = x + u
    return torch.where(u[:, :1] > 0.25, torch.full_like(nxt, float("nan")), nxt)


def make_problem(seed: int | None = 0, step_fn=step, horizon: int = H, low: float = -1.0):
    gen = None if seed is None else torch.Generator().manual_seed(seed)
    return PlanningProblem(
        KnownModel(step_fn, X, X),
        reward,
        None,
        horizon,
        torch.full((X,), low),
        torch.ones(X),
        generator=gen,
    )


X0 = torch.zeros(X)

# A direct quadratic objective: the state is the step index t, reward -|u - TRACK[t]|^2, so the
# unique optimum is TRACK itself (a smooth sequence, where colored noise should do well).
HT = 6
TRACK = torch.stack(
    [0.5 * torch.sin(0.5 * torch.arange(HT)), 0.3 * torch.cos(0.5 * torch.arange(HT)) - 0.2], -1
)  # [H, U]


def tracking_problem(seed: int) -> PlanningProblem:
    def tick(t: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        return t + 1

    def track_reward(obs: torch.Tensor, act: torch.Tensor, nxt: torch.Tensor) -> torch.Tensor:
        return -((act - TRACK[obs[:, 0].long()]) ** 2).sum(dim=-1)

    return PlanningProblem(
        KnownModel(tick, 1, 2),
        track_reward,
        None,
        HT,
        -torch.ones(2),
        torch.ones(2),
        generator=torch.Generator().manual_seed(seed),
    )


PLANNERS = {
    "random_shooting": lambda: RandomShooting(population=200),
    "cem": lambda: CEM(population=100, iterations=3),
    "icem": lambda: CEM(
        population=100,
        iterations=3,
        noise_beta=2.0,
        keep_elites_fraction=0.3,
        population_decay=1.25,
        return_mean_or_best="mean",
    ),
    "mppi": lambda: MPPI(population=100, temperature=0.1, noise_std=0.3, iterations=3),
}


# ----------------------------------------------------------------------------- colored noise


@pytest.mark.parametrize("beta", [0.0, 1.0, 2.0, 2.5])
def test_colored_noise_spectrum_slope_and_unit_variance(beta):
    gen = torch.Generator().manual_seed(0)
    horizon = 64
    noise = colored_noise((4000, horizon, 2), beta, gen)  # [N, H, U]
    assert noise.shape == (4000, horizon, 2) and noise.dtype == torch.float32
    var = noise.var(dim=0)  # [H, U]
    assert torch.allclose(var, torch.ones_like(var), atol=0.1)
    assert abs(float(var.mean()) - 1.0) < 0.03
    power = (torch.fft.rfft(noise, dim=1).abs() ** 2).mean(dim=(0, 2))  # [F]
    freqs = torch.arange(1, horizon // 2 + 1) / horizon
    slope = np.polyfit(np.log(freqs.numpy()), np.log(power[1:].numpy()), 1)[0]
    assert slope == pytest.approx(-beta, abs=0.1)


def test_colored_noise_red_is_smoother_than_white():
    gen = torch.Generator().manual_seed(1)
    white = colored_noise((2000, 20, 1), 0.0, gen)
    red = colored_noise((2000, 20, 1), 2.0, gen)
    lag1 = lambda z: float((z[:, 1:] * z[:, :-1]).mean())  # noqa: E731
    assert abs(lag1(white)) < 0.05
    assert lag1(red) > 0.5


@pytest.mark.parametrize("horizon", [1, 2, 7])
def test_colored_noise_short_horizons_have_unit_variance(horizon):
    noise = colored_noise((20000, horizon, 3), 2.0, torch.Generator().manual_seed(2))
    assert torch.allclose(noise.var(dim=0), torch.ones(horizon, 3), atol=0.05)


def test_colored_noise_seeded_and_bad_input():
    a = colored_noise((5, 8, 2), 2.0, torch.Generator().manual_seed(3))
    b = colored_noise((5, 8, 2), 2.0, torch.Generator().manual_seed(3))
    c = colored_noise((5, 8, 2), 2.0, torch.Generator().manual_seed(4))
    assert torch.equal(a, b) and not torch.equal(a, c)
    with pytest.raises(ValueError, match="beta"):
        colored_noise((5, 8, 2), -1.0)
    with pytest.raises(ValueError, match=r"\(N, H, U\)"):
        colored_noise((5, 8), 1.0)


# ----------------------------------------------------------------------------- known optima


@pytest.mark.parametrize(
    "kwargs",
    [
        {},
        {"return_mean_or_best": "mean"},
        {"noise_beta": 2.0},
        {"keep_elites_fraction": 0.3},
        {"population_decay": 1.25},
        {"shift_elites": True},
        {
            "noise_beta": 2.5,
            "keep_elites_fraction": 0.3,
            "population_decay": 1.25,
            "shift_elites": True,
            "return_mean_or_best": "mean",
        },
    ],
    ids=["cem", "mean", "colored", "keep_elites", "decay", "shift", "icem_all"],
)
def test_cem_reaches_known_optimum(kwargs):
    planner = CEM(population=300, iterations=10, **kwargs)
    plan = planner.plan(tracking_problem(0), torch.zeros(1))
    assert isinstance(plan, Plan) and plan.status == "ok"
    assert plan.actions.shape == (HT, 2) and plan.actions.dtype == torch.float32
    assert torch.allclose(plan.actions, TRACK, atol=0.12), plan.actions - TRACK
    assert -0.025 < plan.expected_return <= 0.0
    assert plan.iterations == 10 and plan.nonfinite == 0
    if planner.shift_elites:  # elites are handed on only when the next plan reuses them
        assert plan.warm is not None and plan.warm.elites is not None
        assert plan.warm.elites.shape == (30, HT, 2)
        assert plan.warm.actions is plan.actions
    else:
        assert plan.warm is None and plan.warm_start().elites is None


def test_cem_solves_integrator_through_the_dynamics():
    plan = CEM(population=300, iterations=10).plan(make_problem(0), X0)
    assert torch.allclose(plan.actions, OPTIMUM, atol=0.1), plan.actions
    assert plan.expected_return == pytest.approx(0.0, abs=0.01)


def test_mppi_reaches_known_optimum():
    plan = MPPI(population=400, temperature=0.1, noise_std=0.2, iterations=10).plan(
        tracking_problem(0), torch.zeros(1)
    )
    assert plan.status == "ok" and plan.iterations == 10
    assert torch.allclose(plan.actions, TRACK, atol=0.06), plan.actions - TRACK
    assert -0.01 < plan.expected_return <= 0.0


def test_cem_more_iterations_is_better():
    worse = CEM(population=100, iterations=1).plan(make_problem(0), X0)
    better = CEM(population=100, iterations=6).plan(make_problem(0), X0)
    assert better.expected_return > worse.expected_return


def test_random_shooting_improves_with_population():
    def mean_best(population: int) -> float:
        rets = [
            RandomShooting(population).plan(make_problem(seed), X0).expected_return
            for seed in range(5)
        ]
        return float(np.mean(rets))

    small, large = mean_best(5), mean_best(2000)
    assert large > small
    assert large > -0.6  # the best of 2000 is far better than a typical uniform sequence (~ -3)


def test_optimum_outside_bounds_lands_on_bound():
    # target 0.5 per step but actions capped at 0.2: the optimum pushes at the bound every step
    problem = PlanningProblem(
        KnownModel(step, X, X),
        reward,
        None,
        H,
        torch.full((X,), -0.2),
        torch.full((X,), 0.2),
        generator=torch.Generator().manual_seed(0),
    )
    plan = CEM(population=300, iterations=6).plan(problem, X0)
    expected = torch.tensor([[0.2, -0.2], [0.2, -0.1], [0.1, 0.0], [0.0, 0.0]])
    assert torch.allclose(plan.actions, expected, atol=0.05), plan.actions


# ----------------------------------------------------------------------------- determinism, bounds


@pytest.mark.parametrize("name", sorted(PLANNERS))
def test_deterministic_under_seed_and_differs_across_seeds(name):
    a = PLANNERS[name]().plan(make_problem(7), X0)
    b = PLANNERS[name]().plan(make_problem(7), X0)
    c = PLANNERS[name]().plan(make_problem(8), X0)
    assert torch.equal(a.actions, b.actions) and a.expected_return == b.expected_return
    assert not torch.equal(a.actions, c.actions)


# recorded before the planning step and WarmStart existed (one model start per evaluate call):
# the same seeds give the same numbers now that each plan starts the model once
GOLDEN = {
    "cem": (-0.14663228392601013, 0.1473371684551239, [0.5158529281616211, -0.06909483671188354]),
    "icem": (-0.0299987755715847, 0.28192049264907837, [0.3930673599243164, -0.3364018499851227]),
    "mppi": (
        -0.012769792228937149,
        0.22298650443553925,
        [0.45542076230049133, -0.26897263526916504],
    ),
    "random_shooting": (
        -0.643542468547821,
        0.6843475103378296,
        [0.45827484130859375, -0.8883291482925415],
    ),
}


@pytest.mark.parametrize("name", sorted(PLANNERS))
def test_golden_plans(name):
    expected_return, actions_sum, first_action = GOLDEN[name]
    plan = PLANNERS[name]().plan(make_problem(7), X0)
    assert plan.expected_return == pytest.approx(expected_return, rel=1e-6, abs=1e-7)
    assert float(plan.actions.sum()) == pytest.approx(actions_sum, rel=1e-6, abs=1e-7)
    assert plan.actions[0].tolist() == pytest.approx(first_action, rel=1e-6, abs=1e-7)


@pytest.mark.parametrize("name", sorted(PLANNERS))
def test_actions_within_bounds(name):
    problem = make_problem(0, low=-0.1)  # target's second component (-0.3) is out of reach
    plan = PLANNERS[name]().plan(problem, torch.tensor([2.0, 2.0]))  # far away: pushes bounds
    assert bool((plan.actions >= -0.1).all() and (plan.actions <= 1.0).all())
    assert bool(torch.isfinite(plan.actions).all())


@pytest.mark.parametrize("name", sorted(PLANNERS))
def test_no_generator_still_plans(name):
    plan = PLANNERS[name]().plan(make_problem(None), X0)
    assert plan.actions.shape == (H, X) and plan.status == "ok"


# ----------------------------------------------------------------------------- non-finite rollouts


@pytest.mark.parametrize("name", sorted(PLANNERS))
def test_nonfinite_candidates_are_counted_and_never_chosen(name):
    problem = make_problem(0, step_fn=nan_step)
    plan = PLANNERS[name]().plan(problem, X0)
    assert plan.status == "ok"
    assert plan.nonfinite > 0 and problem.nonfinite >= plan.nonfinite
    assert bool(torch.isfinite(plan.actions).all())
    assert bool((plan.actions[:, 0] <= 0.25).all())  # only finite rollouts are ever returned
    assert np.isfinite(plan.expected_return)
    again = problem.evaluate(X0, plan.actions[None])
    assert bool(torch.isfinite(again).all())


@pytest.mark.parametrize("name", sorted(PLANNERS))
def test_all_nonfinite_returns_warm_start(name):
    def always_nan(x, u):
        return torch.full_like(x, float("nan"))

    warm = torch.full((H, X), 0.3)
    plan = PLANNERS[name]().plan(make_problem(0, step_fn=always_nan), X0, WarmStart(warm))
    assert plan.status == "all_nonfinite"
    assert torch.equal(plan.actions, warm)
    assert plan.expected_return == float("-inf") and plan.nonfinite > 0
    cold = PLANNERS[name]().plan(make_problem(0, step_fn=always_nan), X0)
    assert torch.equal(cold.actions, torch.zeros(H, X))  # middle of [-1, 1]


class Integrator(gym.Env):
    """x' = x + u in 2-D with reward -|x' - target|^2; records every action it receives."""

    def __init__(self) -> None:
        self.observation_space = gym.spaces.Box(-np.inf, np.inf, (X,), np.float32)
        self.action_space = gym.spaces.Box(-1.0, 1.0, (X,), np.float32)
        self.received: list[np.ndarray] = []

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self.x = np.zeros(X, dtype=np.float32)
        return self.x.copy(), {}

    def step(self, action):
        self.received.append(np.array(action))
        self.x = (self.x + action).astype(np.float32)
        r = -float(((self.x - TARGET.numpy()) ** 2).sum())
        return self.x.copy(), r, False, False, {}


@pytest.mark.parametrize("name", sorted(PLANNERS))
def test_mpc_never_sends_nan_to_env(name):
    env = Integrator()
    problem = make_problem(0, step_fn=nan_step)
    controller = MPCController(PLANNERS[name](), problem, replan_every=2)
    episode = run_episode(env, controller, seed=0, max_steps=6)
    sent = np.stack(env.received)
    assert np.isfinite(sent).all() and (sent[:, 0] <= 0.25).all()
    assert np.isfinite(episode.obs).all()
    assert controller.stats.nonfinite > 0 and controller.stats.not_ok == 0


# ----------------------------------------------------------------------------- warm start


def test_cem_warm_start_at_optimum_stays_there():
    plan = CEM(population=50, iterations=1).plan(make_problem(0), X0, WarmStart(OPTIMUM))
    assert torch.equal(plan.actions, OPTIMUM)
    assert plan.expected_return == pytest.approx(0.0, abs=1e-6)
    mean_plan = CEM(population=50, iterations=1, init_std=0.05, return_mean_or_best="mean").plan(
        make_problem(0), X0, WarmStart(OPTIMUM)
    )
    assert torch.allclose(mean_plan.actions, OPTIMUM, atol=0.05)


def test_warm_start_is_scored_by_random_shooting_and_mppi():
    plan = RandomShooting(population=3).plan(make_problem(0), X0, WarmStart(OPTIMUM))
    assert torch.equal(plan.actions, OPTIMUM)
    mppi = MPPI(population=20, temperature=1e-4, noise_std=0.5).plan(
        make_problem(0), X0, WarmStart(OPTIMUM)
    )
    assert torch.allclose(mppi.actions, OPTIMUM, atol=1e-3)


def test_shifted_elites_are_reused():
    first = CEM(population=200, iterations=4, shift_elites=True).plan(make_problem(0), X0)
    elites = first.warm_start().elites  # [K, H, U]
    warm = shift_warm(first.warm_start(), 1, torch.zeros(X))
    shifted = warm.elites  # [K, H, U]
    assert torch.equal(shifted, shift_actions(elites, 1, torch.zeros(X)))
    assert torch.equal(warm.actions, shift_actions(first.actions, 1, torch.zeros(X)))
    assert shifted.shape == elites.shape
    assert torch.equal(shifted[:, :-1], elites[:, 1:])
    assert torch.equal(shifted[:, -1], torch.zeros(20, X))
    # from x1 = target, the shifted elites (≈ 0) are near-optimal: with one tiny iteration they
    # beat what the sampled candidates alone find
    x1 = TARGET.clone()
    cem = CEM(population=10, iterations=1, shift_elites=True, keep_elites_fraction=1.0)
    away = torch.full((H, X), 0.5)  # a poor warm mean, the same with and without the elites
    with_elites = cem.plan(make_problem(1), x1, WarmStart(away, elites=shifted))
    without = cem.plan(make_problem(1), x1, WarmStart(away))
    assert with_elites.expected_return > without.expected_return
    assert with_elites.diagnostics["candidates"] == 10 + 1 + 1  # warm mean + K = 1 elite reused
    alone = cem.plan(make_problem(1), x1)
    assert alone.diagnostics["candidates"] == 10


@pytest.mark.parametrize("name", sorted(PLANNERS))
def test_wrong_warm_start_shape_is_a_clear_error(name):
    with pytest.raises(ShapeError, match=r"warm.actions: expected \[4, 2\], got \[3, 2\]"):
        PLANNERS[name]().plan(make_problem(0), X0, WarmStart(torch.zeros(H - 1, X)))
    with pytest.raises(ValueError, match="NaN"):
        PLANNERS[name]().plan(make_problem(0), X0, WarmStart(torch.full((H, X), float("nan"))))
    with pytest.raises(ShapeError, match="x0"):
        PLANNERS[name]().plan(make_problem(0), torch.zeros(1, X))
    with pytest.raises(TypeError, match=r"WarmStart\(actions\)"):  # the old bare tensor
        PLANNERS[name]().plan(make_problem(0), X0, torch.zeros(H, X))


def test_warm_elites_need_shift_elites():
    mid = torch.zeros(H, X)
    with pytest.raises(ValueError, match="shift_elites=True"):
        CEM(population=10).plan(make_problem(0), X0, WarmStart(mid, torch.zeros(3, H, X)))
    with pytest.raises(ShapeError, match="warm.elites"):
        CEM(population=10, shift_elites=True).plan(
            make_problem(0), X0, WarmStart(mid, torch.zeros(3, H + 1, X))
        )


# ----------------------------------------------------------------------------- constructors


@pytest.mark.parametrize(
    ("factory", "match"),
    [
        (lambda: RandomShooting(population=0), "population"),
        (lambda: CEM(population=2.5), "population"),
        (lambda: CEM(elite_fraction=0.0), "elite_fraction"),
        (lambda: CEM(elite_fraction=1.5), "elite_fraction"),
        (lambda: CEM(iterations=0), "iterations"),
        (lambda: CEM(alpha=1.0), "alpha"),
        (lambda: CEM(init_std=-1.0), "init_std"),
        (lambda: CEM(min_std=-0.1), "min_std"),
        (lambda: CEM(noise_beta=-2.0), "noise_beta"),
        (lambda: CEM(keep_elites_fraction=2.0), "keep_elites_fraction"),
        (lambda: CEM(population_decay=0.5), "population_decay"),
        (lambda: CEM(return_mean_or_best="median"), "return_mean_or_best"),
        (lambda: MPPI(temperature=0.0), "temperature"),
        (lambda: MPPI(noise_std=float("nan")), "noise_std"),
    ],
)
def test_bad_constructor_arguments(factory, match):
    with pytest.raises(ValueError, match=match):
        factory()


def test_icem_population_schedule():
    cem = CEM(population=100, elite_fraction=0.1, iterations=5, population_decay=2.0)
    assert cem.num_elites == 10
    assert cem.populations == (100, 50, 25, 20, 20)  # floored at 2 K
