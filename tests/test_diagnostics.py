"""Model diagnostics: known answers for NLL, coverage and multi-step error; the GP-vs-ensemble
table and the rollout plot."""

from __future__ import annotations

import math

import pytest
import torch

from mbrl.dynamics import KnownModel, Prediction, RolloutState, Transitions
from mbrl.dynamics.diagnostics import (
    compare_models,
    multistep_error,
    one_step_scores,
    open_loop_rollout,
    plot_rollout,
    to_markdown,
    write_csv,
)
from mbrl.dynamics.gp import GaussianProcessModel

torch.set_num_threads(1)
SIGMA = 0.1


def linear(x: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    return 0.9 * x + u


class Oracle:
    """The true linear-Gaussian model ``x' ~ N(0.9 x + u, scale² σ²)``."""

    obs_dim, act_dim, learns_reward = 1, 1, False

    def __init__(self, scale: float = 1.0) -> None:
        self.scale = scale

    def fit(self, data):  # pragma: no cover - not used
        raise NotImplementedError

    def predict(self, obs, act):
        mean = linear(obs, act)
        return Prediction(mean=mean, var=torch.full_like(mean, (self.scale * SIGMA) ** 2))

    def rollout_start(self, obs, particles, generator=None):
        return RolloutState(obs=obs.repeat_interleave(particles, 0))

    def rollout_step(self, state, act, generator=None):
        mean = linear(state.obs, act)
        eps = torch.randn(mean.shape, generator=generator)
        return RolloutState(obs=mean + self.scale * SIGMA * eps)


def linear_data(n: int, seed: int) -> Transitions:
    g = torch.Generator().manual_seed(seed)
    obs = torch.randn(n, 1, generator=g)
    act = torch.rand(n, 1, generator=g) - 0.5
    nxt = linear(obs, act) + SIGMA * torch.randn(n, 1, generator=g)
    return Transitions(obs, act, nxt, torch.zeros(n), torch.zeros(n, dtype=torch.bool))


def trajectory(steps: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    act = torch.rand(steps, 1, generator=g) - 0.5
    obs = [torch.ones(1)]
    for t in range(steps):
        obs.append(linear(obs[-1], act[t]) + SIGMA * torch.randn(1, generator=g))
    return torch.stack(obs), act


def test_one_step_scores_known_answers():
    data = linear_data(40_000, 0)
    s = one_step_scores(Oracle(), data)
    assert s.nll == pytest.approx(0.5 * math.log(2 * math.pi * SIGMA**2) + 0.5, abs=0.02)
    assert s.coverage95 == pytest.approx(0.95, abs=0.005)
    assert s.rmse == pytest.approx(SIGMA, rel=0.02)
    assert s.n == 40_000 and len(s.nll_per_dim) == 1
    # a variance twice too small: coverage of |z| < 1.96 / 2 under N(0, 1), about 0.67
    narrow = one_step_scores(Oracle(scale=0.5), data)
    assert narrow.coverage95 == pytest.approx(math.erf(0.98 / math.sqrt(2)), abs=0.01)
    assert narrow.nll > s.nll


def test_multistep_error_known_answer():
    """A model that adds 1 to the truth's mean is off by 1 + 0.9 + ... after k steps when the
    truth has no noise."""
    obs = torch.zeros(11, 1)
    act = torch.zeros(10, 1)  # truth: x stays at 0
    biased = KnownModel(lambda x, u: linear(x, u) + 1.0, 1, 1)
    m = multistep_error(biased, [(obs, act), (obs[:4], act[:3])], steps=3)
    expected = [1.0, 1.9, 2.71]
    assert m.rmse == pytest.approx(expected, rel=1e-5)
    assert m.windows == 8 + 1  # 8 windows in the long trajectory, 1 in the short one
    with pytest.raises(ValueError, match="no trajectory has 20 actions"):
        multistep_error(biased, [(obs, act)], steps=20)


def test_compare_gp_and_ensemble_table(tmp_path):
    from mbrl.dynamics.ensemble import ProbabilisticEnsemble

    train, test = linear_data(200, 1), linear_data(300, 2)
    models = {
        "gp": GaussianProcessModel(1, 1, iterations=40),
        "ensemble": ProbabilisticEnsemble(
            1, 1, ensemble_size=3, hidden_size=32, num_layers=2, max_epochs=20, seed=0
        ),
        "oracle": Oracle(),
    }
    fit_models = {k: v for k, v in models.items() if k != "oracle"}
    rows = compare_models(fit_models, test, [trajectory(30, 3)], steps=5, train=train)
    rows += compare_models({"oracle": models["oracle"]}, test, [trajectory(30, 3)], steps=5)
    assert [r["model"] for r in rows] == ["gp", "ensemble", "oracle"]
    gp, oracle = rows[0], rows[2]
    # the GP on a linear-Gaussian problem is close to the oracle and calibrated
    assert gp["nll"] < oracle["nll"] + 0.15
    assert 0.9 <= gp["coverage95"] <= 0.99
    assert gp["rmse_5step"] < 3 * SIGMA
    md = to_markdown(rows)
    assert md.splitlines()[0].startswith("| model | fit_seconds | nll | coverage95")
    assert len(md.splitlines()) == 5
    path = write_csv(rows, tmp_path / "table.csv")
    assert path.read_text().splitlines()[0].startswith("model,fit_seconds,nll")


def test_plot_rollout_writes_png(tmp_path):
    gp = GaussianProcessModel(1, 1, iterations=20)
    gp.fit(linear_data(100, 4))
    obs, act = trajectory(15, 5)
    path = plot_rollout(
        {"gp": gp, "oracle": Oracle()},
        obs,
        act,
        tmp_path / "rollout.png",
        particles=20,
        generator=torch.Generator().manual_seed(0),
        title="linear system",
    )
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_open_loop_rollout_is_the_planning_step():
    """P sampled rollouts: the same numbers as stepping the model by hand with the same
    generator, shaped [T + 1, P, X] with the start in row 0."""
    obs, act = trajectory(6, 7)
    traj = open_loop_rollout(Oracle(), obs[0], act, 5, torch.Generator().manual_seed(3))
    assert traj.shape == (7, 5, 1)
    assert torch.equal(traj[0], obs[:1].expand(5, 1))
    gen = torch.Generator().manual_seed(3)
    model = Oracle()
    state = model.rollout_start(obs[:1], 5, gen)
    for k in range(6):
        state = model.rollout_step(state, act[k : k + 1].expand(5, -1), gen)
        assert torch.equal(traj[k + 1], state.obs)
    # a deterministic model follows its mean from every particle
    known = KnownModel(linear, 1, 1)
    det = open_loop_rollout(known, obs[0], act, 3)
    assert torch.allclose(det[:, 0], det[:, 2])
    with pytest.raises(ValueError, match=r"x0: expected \[1\], got \[2\]"):
        open_loop_rollout(known, torch.zeros(2), act)


def test_multistep_error_uses_the_predictive_mean_without_mean_dynamics():
    """The oracle has no mean_dynamics (not a DifferentiableModel): its predict mean is used,
    which on noise-free data is exact."""
    obs = torch.zeros(6, 1)
    act = torch.zeros(5, 1)
    m = multistep_error(Oracle(), [(obs, act)], steps=2)
    assert m.rmse == pytest.approx([0.0, 0.0]) and m.windows == 4
