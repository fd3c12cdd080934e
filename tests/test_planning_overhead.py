"""The batched rollout of ``PlanningProblem.evaluate`` against its step-by-step definition, the
final-mean options of the sampling planners (``score_mean``), and the compiled rollout
(``compile``): termination, particles, learned rewards, discount, value, non-finite models."""

from __future__ import annotations

import math
import shutil

import pytest
import torch

from mbrl.algorithms import pets
from mbrl.algorithms.factory import make_planner
from mbrl.config import ConfigError, load_config
from mbrl.dynamics import KnownModel, RolloutState
from mbrl.envs.spec import never_terminates
from mbrl.planners import CEM, MPPI, PlanningProblem, RandomShooting
from mbrl.shapes import ShapeError


def reference_evaluate(
    problem: PlanningProblem, x0: torch.Tensor, actions: torch.Tensor
) -> tuple[torch.Tensor, int]:
    """``evaluate``'s definition, one ``problem.step`` per horizon step with its ``finite`` and
    ``alive`` flags (the loop ``evaluate`` ran before its rollout was batched over the
    horizon): returns ``[N]`` or ``[B, N]`` and the number of candidates scored minus
    infinity."""
    root = problem.start(x0)
    p, h = problem.particles, problem.horizon
    b = root.obs.shape[0] // p
    single = actions.ndim == 3
    acts = actions[None] if single else actions  # [B, N, H, U]
    n, rows = acts.shape[1], b * acts.shape[1] * p
    x = root.obs.shape[1]
    obs = root.obs.view(b, 1, p, x).expand(b, n, p, x).reshape(rows, x)
    state = RolloutState(obs=obs)
    acts = acts.repeat_interleave(p, dim=1).reshape(rows, h, -1)  # [B * N * P, H, U]
    total = torch.zeros(rows)
    alive = torch.ones(rows, dtype=torch.bool)
    finite = torch.ones(rows, dtype=torch.bool)
    for t in range(h):
        s = problem.step(state, acts[:, t])
        finite &= s.finite | ~alive
        total.add_(torch.where(alive & s.finite, s.reward, 0.0), alpha=problem.discount**t)
        alive &= s.alive
        state = s.state
    if problem.value_fn is not None:
        value = problem.value_fn(state).float()
        ok = torch.isfinite(value)
        finite &= ok | ~alive
        total.add_(torch.where(alive & ok, value, 0.0), alpha=problem.discount**h)
    returns = total.view(b, n, p).mean(dim=2)
    bad = ~finite.view(b, n, p).all(dim=2)
    returns = returns.masked_fill(bad, float("-inf"))
    return (returns[0] if single else returns), int(bad.sum())


def wobble(x: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    return torch.sin(x) + u * x.cos() + 0.1 * x


def quadratic(obs: torch.Tensor, act: torch.Tensor, nxt: torch.Tensor) -> torch.Tensor:
    return -(nxt**2).sum(-1) - 0.1 * (act**2).sum(-1) + 0.5 * obs[:, 0]


def nan_above(limit: float):
    """``wobble``, but NaN in every entry of a row whose first action exceeds ``limit``."""

    def step(x: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        return torch.where(u[:, :1] > limit, float("nan"), wobble(x, u))

    return step


class NoisyModel(KnownModel):
    """``wobble`` plus Gaussian noise from the generator: particles differ."""

    def rollout_step(self, state, act, generator=None):
        nxt = super().rollout_step(state, act, generator)
        noise = torch.randn(nxt.obs.shape, generator=generator)
        return RolloutState(obs=nxt.obs + 0.1 * noise)


class RewardModel(KnownModel):
    """``wobble`` with a learned reward of its own (``learns_reward``); NaN reward when the
    second action exceeds 0.8."""

    learns_reward = True

    def rollout_step(self, state, act, generator=None):
        nxt = super().rollout_step(state, act, generator)
        reward = -nxt.obs.abs().sum(-1) + act[:, 0]
        reward = torch.where(act[:, 1] > 0.8, float("nan"), reward)
        return RolloutState(obs=nxt.obs, reward=reward)


def problem_of(model=None, reward=quadratic, termination=None, horizon=5, **kw):
    return PlanningProblem(
        model if model is not None else KnownModel(wobble, 2, 2),
        reward,
        termination,
        horizon,
        -torch.ones(2),
        torch.ones(2),
        generator=torch.Generator().manual_seed(3),
        **kw,
    )


def ends_beyond(x: torch.Tensor) -> torch.Tensor:
    return x[:, 0].abs() > 1.1


CASES = {
    "plain": lambda: problem_of(),
    "discount_value": lambda: problem_of(discount=0.9, value_fn=lambda s: -(s.obs[:, 1] ** 2)),
    "termination": lambda: problem_of(termination=ends_beyond, discount=0.95),
    "termination_value_particles": lambda: problem_of(
        termination=ends_beyond, value_fn=lambda s: 3 * s.obs[:, 0], particles=3
    ),
    "never_terminates": lambda: problem_of(termination=never_terminates),
    "noisy_particles": lambda: problem_of(NoisyModel(wobble, 2, 2), particles=4, discount=0.9),
    "learned_reward": lambda: problem_of(RewardModel(wobble, 2, 2), reward=None),
    "learned_reward_termination": lambda: problem_of(
        RewardModel(wobble, 2, 2), reward=None, termination=ends_beyond, particles=2
    ),
    "nan_model": lambda: problem_of(KnownModel(nan_above(0.6), 2, 2)),
    "nan_model_termination": lambda: problem_of(
        KnownModel(nan_above(0.6), 2, 2), termination=ends_beyond, value_fn=lambda s: s.obs[:, 0]
    ),
    "nan_value": lambda: problem_of(
        value_fn=lambda s: torch.where(s.obs[:, 0] > 0.3, float("inf"), s.obs[:, 1])
    ),
    "nan_reward_after_termination": lambda: problem_of(
        reward=lambda o, a, n: torch.where(o[:, 0].abs() > 1.1, float("nan"), n[:, 0]),
        termination=ends_beyond,
    ),
}


MIXED = {
    "learned_reward",
    "learned_reward_termination",
    "nan_model",
    "nan_model_termination",
    "nan_value",
}
"""Cases where some candidates go non-finite while alive and others do not."""


def candidates(n: int = 40, horizon: int = 5, batch: int | None = None) -> torch.Tensor:
    gen = torch.Generator().manual_seed(11)
    shape = (n, horizon, 2) if batch is None else (batch, n, horizon, 2)
    return torch.rand(shape, generator=gen) * 2 - 1


def assert_same_returns(new: torch.Tensor, ref: torch.Tensor) -> None:
    """Equal to float rounding (the batched reward and the discounted sum may round the last
    bit differently), minus infinity at exactly the same candidates."""
    assert torch.equal(torch.isneginf(new), torch.isneginf(ref))
    assert torch.equal(torch.isposinf(new), torch.isposinf(ref))
    finite = torch.isfinite(ref)
    torch.testing.assert_close(new[finite], ref[finite], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("case", sorted(CASES))
def test_evaluate_equals_its_step_by_step_definition(case):
    x0 = torch.tensor([0.4, -0.2])
    actions = candidates()
    new_problem, ref_problem = CASES[case](), CASES[case]()
    new = new_problem.evaluate(x0, actions)
    ref, bad = reference_evaluate(ref_problem, x0, actions)
    assert_same_returns(new, ref)
    assert new_problem.nonfinite == bad
    # the model drew the same random numbers in the same order
    assert torch.equal(new_problem.generator.get_state(), ref_problem.generator.get_state())
    if case in MIXED:
        assert 0 < bad < len(actions)  # the case exercises both kinds of candidates
    if case == "nan_reward_after_termination":  # NaN rewards, all after termination
        assert bad == 0 and bool(torch.isfinite(new).all())


@pytest.mark.parametrize("case", ["termination_value_particles", "nan_model", "learned_reward"])
def test_batched_starts_equal_the_definition(case):
    x0 = torch.tensor([[0.4, -0.2], [-0.7, 0.1], [0.0, 0.9]])
    actions = candidates(n=12, batch=3)
    new_problem, ref_problem = CASES[case](), CASES[case]()
    new = new_problem.evaluate(x0, actions)
    ref, bad = reference_evaluate(ref_problem, x0, actions)
    assert new.shape == (3, 12)
    assert_same_returns(new, ref)
    assert new_problem.nonfinite == bad


def test_returns_are_bit_identical_on_polynomial_models():
    """Without transcendental functions the batched reward is the same arithmetic."""

    def linear(x, u):
        return 0.9 * x + 0.5 * u

    problem = problem_of(KnownModel(linear, 2, 2), termination=ends_beyond, discount=0.9)
    new = problem.evaluate(torch.tensor([0.4, -0.2]), candidates())
    ref, _ = reference_evaluate(problem, torch.tensor([0.4, -0.2]), candidates())
    assert torch.equal(new, ref)


def test_inf_observations_and_sums_that_overflow():
    """An inf observation scores minus infinity; finite values whose sum overflows do not (the
    overflow only sends the rows through the exact check)."""

    def blow_up(x, u):  # inf once the first action is above 0.5
        return torch.where(u[:, :1] > 0.5, float("inf"), x + u)

    huge = 3e38  # finite; a few of them sum to inf
    problems = {
        "inf": problem_of(KnownModel(blow_up, 2, 2)),
        "overflowing_reward": problem_of(reward=lambda o, a, n: torch.full_like(n[:, 0], -huge)),
        "overflowing_obs": problem_of(
            KnownModel(lambda x, u: torch.full_like(x, huge), 2, 2), reward=lambda o, a, n: a[:, 0]
        ),
    }
    x0, actions = torch.tensor([0.4, -0.2]), candidates()
    for name, problem in problems.items():
        ref_problem = problem_of(problem.model, problem.reward_fn)
        new = problem.evaluate(x0, actions)
        ref, bad = reference_evaluate(ref_problem, x0, actions)
        assert torch.equal(new, ref), name
        assert problem.nonfinite == bad, name
    assert problems["inf"].nonfinite > 0
    assert problems["overflowing_reward"].nonfinite == 0  # -inf as a sum, not as a NaN
    assert problems["overflowing_obs"].nonfinite == 0


def test_reward_and_termination_of_the_wrong_shape_are_named():
    x0, actions = torch.tensor([0.4, -0.2]), candidates()
    with pytest.raises(ShapeError, match="reward_fn: expected one reward per row"):
        problem_of(reward=lambda o, a, n: n).evaluate(x0, actions)
    with pytest.raises(ShapeError, match="termination_fn: expected one flag per row"):
        problem_of(termination=lambda n: n > 0).evaluate(x0, actions)


# ----------------------------------------------------------------------------- score_mean


def _counting(problem: PlanningProblem) -> list[int]:
    """Count ``problem.evaluate`` calls (rows of each call) into the returned list."""
    calls: list[int] = []
    evaluate = problem.evaluate

    def counted(x0, actions, compiled=False):
        calls.append(actions.shape[-3])
        return evaluate(x0, actions, compiled)

    problem.evaluate = counted
    return calls


def test_mppi_scores_the_mean_as_asked():
    x0 = torch.tensor([0.4, -0.2])
    scored_problem, skipped_problem = problem_of(), problem_of()
    scored_calls, skipped_calls = _counting(scored_problem), _counting(skipped_problem)
    scored = MPPI(population=30, score_mean=True).plan(scored_problem, x0)
    skipped = MPPI(population=30, score_mean=False).plan(skipped_problem, x0)
    assert scored_calls == [30, 1] and skipped_calls == [30]
    assert torch.equal(scored.actions, skipped.actions)  # the same plan, scored or not
    assert scored.expected_return == float(problem_of().evaluate(x0, scored.actions[None])[0])
    assert scored.diagnostics["mean_scored"] == 1.0
    assert skipped.diagnostics["mean_scored"] == 0.0
    assert math.isfinite(skipped.expected_return)
    # the estimate is a weighted mean of the population's returns: within their range
    returns = problem_of().evaluate(x0, _mppi_population(30))
    assert float(returns.min()) <= skipped.expected_return <= float(returns.max())


def _mppi_population(n: int) -> torch.Tensor:
    """The candidates of ``MPPI(population=n, noise_std=0.5)``'s cold first iteration on
    ``problem_of()`` (generator seed 3, mean 0)."""
    eps = torch.randn((n, 5, 2), generator=torch.Generator().manual_seed(3))
    return torch.clamp(0.5 * eps, -1.0, 1.0)


def test_auto_scores_the_mean_from_two_iterations():
    x0 = torch.tensor([0.4, -0.2])
    for iterations, scored in ((1, False), (2, True), (3, True)):
        problem = problem_of()
        calls = _counting(problem)
        plan = MPPI(population=20, iterations=iterations).plan(problem, x0)
        assert plan.diagnostics["mean_scored"] == float(scored)
        assert calls == [20] * iterations + ([1] if scored else [])
        cem = CEM(population=20, iterations=iterations, return_mean_or_best="mean")
        assert cem.plan(problem_of(), x0).diagnostics["mean_scored"] == float(scored)


def test_a_mean_equal_to_a_scored_candidate_reuses_its_score():
    """With all of MPPI's weight on one candidate the mean is that candidate: its score is the
    mean's, and nothing is run again."""
    x0 = torch.tensor([0.4, -0.2])
    problem = problem_of()
    calls = _counting(problem)
    plan = MPPI(population=30, temperature=1e-6, score_mean=True).plan(problem, x0)
    assert calls == [30]
    assert plan.diagnostics["mean_scored"] == 1.0
    assert plan.expected_return == float(problem_of().evaluate(x0, plan.actions[None])[0])


def test_cem_mean_estimate_and_score():
    x0 = torch.tensor([0.4, -0.2])
    kw = {"population": 40, "iterations": 1, "return_mean_or_best": "mean"}
    scored = CEM(**kw, score_mean=True).plan(problem_of(), x0)
    skipped = CEM(**kw).plan(problem_of(), x0)  # auto: one iteration
    assert torch.equal(scored.actions, skipped.actions)
    assert scored.expected_return == float(problem_of().evaluate(x0, scored.actions[None])[0])
    assert skipped.diagnostics["mean_scored"] == 0.0
    # the mean of the elites' returns lies between the worst elite and the best candidate
    assert skipped.expected_return <= skipped.diagnostics["best_return"]


def test_constant_returns_make_the_estimate_exact():
    """Every candidate returns the same: the estimate is that return."""
    problem = problem_of(reward=lambda o, a, n: torch.full_like(n[:, 0], -0.25))
    plan = MPPI(population=25).plan(problem, torch.tensor([0.4, -0.2]))
    assert plan.diagnostics["mean_scored"] == 0.0
    assert plan.expected_return == pytest.approx(-0.25 * 5, rel=1e-6)


@pytest.mark.parametrize(
    ("factory", "match"),
    [
        (lambda: MPPI(score_mean="yes"), "score_mean must be True, False or 'auto'"),
        (lambda: CEM(score_mean=1), "score_mean must be True, False or 'auto'"),
        (lambda: MPPI(compile="true"), "compile must be True or False"),
        (lambda: RandomShooting(compile=1), "compile must be True or False"),
    ],
)
def test_bad_options_are_refused(factory, match):
    with pytest.raises(ValueError, match=match):
        factory()


# ----------------------------------------------------------------------------- compile


@pytest.mark.parametrize("planner", [RandomShooting(20, compile=True), MPPI(20, compile=True)])
def test_planners_pass_compile_to_every_evaluation(planner):
    problem = problem_of()
    flags: list[bool] = []
    evaluate = problem.evaluate

    def recorded(x0, actions, compiled=False):
        flags.append(compiled)
        return evaluate(x0, actions)  # eager: this test checks the wiring only

    problem.evaluate = recorded
    planner.plan(problem, torch.tensor([0.4, -0.2]))
    assert flags and all(flags)


def test_config_flag_reaches_the_planner_and_is_refused_where_it_does_nothing():
    cfg = load_config(pets.Config, overrides=["planner.name=mppi", "planner.compile=true"])
    assert cfg.planner.compile and make_planner(cfg.planner).compile
    cfg = load_config(pets.Config, overrides=["planner.name=icem", "planner.compile=true"])
    assert make_planner(cfg.planner).compile
    assert not make_planner(load_config(pets.Config).planner).compile
    with pytest.raises(ConfigError, match="planner.compile=true compiles the rollouts"):
        load_config(pets.Config, overrides=["planner.name=mcts", "planner.compile=true"])


def _compile_works() -> bool:
    """Whether ``torch.compile`` can run here: dynamo supports this Python and, for the CPU
    backend, a C++ compiler is on the path."""
    cxx = any(shutil.which(c) for c in ("c++", "g++", "clang++"))
    return torch._dynamo.is_dynamo_supported() and cxx


@pytest.mark.skipif(not _compile_works(), reason="torch.compile cannot run here (no C++ compiler)")
def test_compiled_rollout_gives_the_same_numbers():
    """A small problem with termination, a value and NaN rows: the compiled rollout equals the
    eager one to float rounding and scores the same candidates minus infinity."""
    x0, actions = torch.tensor([0.4, -0.2]), candidates(n=16, horizon=3)

    def make():
        return problem_of(
            KnownModel(nan_above(0.7), 2, 2),
            termination=ends_beyond,
            value_fn=lambda s: -(s.obs[:, 1] ** 2),
            horizon=3,
            discount=0.9,
        )

    eager_problem, compiled_problem = make(), make()
    eager = eager_problem.evaluate(x0, actions)
    compiled = compiled_problem.evaluate(x0, actions, compiled=True)
    assert_same_returns(compiled, eager)
    assert compiled_problem.nonfinite == eager_problem.nonfinite > 0
    again = compiled_problem.evaluate(x0, actions, compiled=True)  # the kept compilation
    assert torch.equal(again, compiled)
