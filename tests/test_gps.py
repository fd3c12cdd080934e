"""LQR-FLM and mirror-descent GPS as algorithms: the point-mass task, the supervised global
policy, the S-step and C-step plumbing, learning on the point mass, exact resume, bad input."""

from __future__ import annotations

import csv
import math

import numpy as np
import pytest
import torch
from state_compare import assert_same

from mbrl import cli, envs
from mbrl.algorithms import gps, lqr_flm
from mbrl.config import ConfigError, load_config
from mbrl.dynamics.tvlg import TVLGDynamics
from mbrl.envs.systems import POINT_MASS_TARGET, point_mass
from mbrl.learners.supervised import GaussianMLPPolicy
from mbrl.planners.derivatives import autograd_cost_expansion
from mbrl.planners.lqr_flm import LQRFLM, LinearGaussianController, QuadraticCost, _backward
from mbrl.runs import Run

torch.set_num_threads(1)

START_DISTANCE = math.hypot(*(POINT_MASS_TARGET - np.array([0.0, 5.0])))  # 15.81 m


def _rows(path):
    with open(path / "metrics.csv", newline="") as f:
        drop = ("seconds", "checkpoint")
        return [
            {k: v for k, v in r.items() if not any(d in k for d in drop)} for r in csv.DictReader(f)
        ]


def _train(module, cfg, path) -> None:
    run = Run(path, cfg, {"algo": module.__name__}, tensorboard=False)
    try:
        module.train(cfg, run)
    finally:
        run.close()


def _distance(terminal_cost: str) -> float:
    """The point mass's distance to the target from its terminal cost 0.5 d^2."""
    return math.sqrt(2.0 * float(terminal_cost))


# ---------------------------------------------------------------- the point mass


def test_point_mass_steps_like_the_box2d_world():
    """One Box2D step at 20 Hz with linear damping 0.1: v' = c u, p' = p + h c u."""
    system = point_mass()
    h, c = 0.05, 1.0 / (1.0 + 0.1 * 0.05)
    x = torch.tensor([[0.0, 5.0, 3.0, -2.0]], dtype=torch.float64)
    u = torch.tensor([[10.0, -4.0]], dtype=torch.float64)
    want = torch.tensor([[h * c * 10.0, 5.0 - h * c * 4.0, c * 10.0, -c * 4.0]])
    torch.testing.assert_close(system.step(x, u), want.double())
    # cost at the start at rest: 0.5 |(0, 5) - (5, 20)|^2 = 125, plus 0.5 * 5e-5 |u|^2
    assert float(system.cost(x, u)[0]) == pytest.approx(125.0 + 2.5e-5 * 116.0)
    spec = envs.make("point-mass")
    obs, _ = spec.make().reset(seed=3)
    np.testing.assert_array_equal(obs, [0.0, 5.0, 0.0, 0.0])
    assert spec.max_episode_steps == 100 and spec.action_high.tolist() == [40.0, 40.0]
    spread = envs.make("point-mass-spread").make()
    starts = np.stack([spread.reset(seed=s)[0] for s in range(20)])
    assert (starts[:, 0] >= 0).all() and (starts[:, 0] <= 10).all()
    assert (starts[:, 1] >= 2.5).all() and (starts[:, 1] <= 12.5).all()


# ---------------------------------------------------------------- the supervised policy


def test_policy_fit_matches_targets_and_sets_the_inverse_mean_precision():
    g = torch.Generator().manual_seed(0)
    x = 3 * torch.randn(400, 3, generator=g)
    gain = torch.tensor([[1.0, -2.0, 0.5], [0.0, 1.0, -1.0]])
    target = x @ gain.T + torch.tensor([1.0, -1.0])
    p = torch.stack([torch.diag(torch.tensor([4.0, 1.0])), torch.tensor([[2.0, 0.5], [0.5, 1.0]])])
    precision = p[torch.arange(400) % 2]  # [N, U, U]
    policy = GaussianMLPPolicy(3, 2, hidden_size=64, iterations=1500, seed=0)
    report = policy.fit(x, target, precision, generator=torch.Generator().manual_seed(1))
    assert report.final_loss < 0.02 * report.initial_loss
    torch.testing.assert_close(policy.covariance, torch.linalg.inv(p.mean(0)))
    # the tangent is the mean's Jacobian (here close to the linear target's gain)
    K, k = policy.linearize(x[:5])
    jac = torch.autograd.functional.jacobian(lambda z: policy.mean(z[None])[0], x[0])
    torch.testing.assert_close(K[0], jac)
    torch.testing.assert_close(
        (K @ x[:5, :, None])[..., 0] + k, policy.act(x[:5], deterministic=True)
    )
    assert (K - gain).abs().max() < 0.5
    # same seed, same numbers; state round trip
    again = GaussianMLPPolicy(3, 2, hidden_size=64, iterations=1500, seed=0)
    again.fit(x, target, precision, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(again.mean(x), policy.mean(x), rtol=0, atol=0)
    loaded = GaussianMLPPolicy(3, 2, hidden_size=64, seed=5)
    loaded.load_state_dict(policy.state_dict())
    torch.testing.assert_close(loaded.mean(x), policy.mean(x), rtol=0, atol=0)


@pytest.mark.parametrize(
    "change, message",
    [
        ({"target_mean": torch.zeros(5, 3)}, r"target_mean \[N, U=2\]"),
        ({"precision": -torch.eye(2).expand(5, 2, 2)}, "positive definite"),
        ({"precision": torch.tensor([[1.0, 2.0], [0.0, 1.0]]).expand(5, 2, 2)}, "symmetric"),
        ({"obs": torch.full((5, 3), math.nan)}, "NaN or inf in obs"),
        ({"weight": torch.zeros(5)}, "not all zero"),
    ],
)
def test_policy_fit_refuses_bad_targets(change, message):
    args = {
        "obs": torch.zeros(5, 3),
        "target_mean": torch.zeros(5, 2),
        "precision": torch.eye(2).expand(5, 2, 2),
        "weight": None,
    }
    with pytest.raises(ValueError, match=message):
        GaussianMLPPolicy(3, 2, iterations=1).fit(**{**args, **change})


# ---------------------------------------------------------------- C-step and S-step plumbing


class _LinearPolicy:
    """A SupervisedPolicy with a known linear mean ``G x + g``, recording its fit's targets."""

    obs_dim, act_dim = 4, 2

    def __init__(self) -> None:
        self.G = torch.tensor([[1.0, 0.0, 0.5, 0.0], [0.0, -1.0, 0.0, 2.0]])
        self.g = torch.tensor([0.3, -0.2])
        self.covariance = torch.tensor([[2.0, 0.1], [0.1, 1.0]])
        self.fitted = None

    def mean(self, obs):
        return obs @ self.G.T + self.g

    def act(self, obs, deterministic=False, generator=None):
        return self.mean(obs)

    def linearize(self, obs):
        return self.G.expand(obs.shape[0], 2, 4), self.g.expand(obs.shape[0], 2)

    def fit(self, obs, target_mean, precision, weight=None, generator=None):
        self.fitted = obs, target_mean, precision
        self.weight = weight
        return None


def _samples(m=2, n=3, h=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return lqr_flm.Samples(
        obs=torch.randn(m, n, h + 1, 4, generator=g),
        act=torch.randn(m, n, h, 2, generator=g),
        reward=torch.zeros(m, n, h),
    )


def test_policy_linearization_and_supervised_targets():
    samples, policy = _samples(), _LinearPolicy()
    lin = gps.policy_linearization(policy, samples)
    assert lin.batch_shape == (2,) and lin.horizon == 4
    torch.testing.assert_close(lin.K, policy.G.double().expand(2, 4, 2, 4))
    torch.testing.assert_close(lin.k, policy.g.double().expand(2, 4, 2))
    torch.testing.assert_close(lin.covariance, policy.covariance.double().expand(2, 4, 2, 2))
    g = torch.Generator().manual_seed(1)
    K, k = torch.randn(2, 4, 2, 4, generator=g), torch.randn(2, 4, 2, generator=g)
    cov = torch.eye(2) * torch.arange(1.0, 9.0).view(2, 4, 1, 1)  # [M, T, U, U]
    gps.supervised_step(policy, LinearGaussianController(K, k, cov), samples, None)
    obs, target, precision = policy.fitted
    m, i, t = 1, 2, 3  # condition 1, sample 2, step 3: row (m N + i) T + t
    row = (m * 3 + i) * 4 + t
    x = samples.obs[m, i, t]
    torch.testing.assert_close(obs[row], x)
    torch.testing.assert_close(target[row], (K[m, t] @ x + k[m, t]).float())
    torch.testing.assert_close(precision[row], torch.eye(2) / 8.0)


def test_next_state_reward_expansion_is_chained_through_the_fit():
    """The cost of a reward of the next observation, on a linear fit, equals the exact
    expansion of -reward(x, u, F [x; u] + f) (here a quadratic of the next state)."""
    g = torch.Generator().manual_seed(0)
    F = torch.randn(3, 4, 6, generator=g, dtype=torch.float64)
    f = torch.randn(3, 4, generator=g, dtype=torch.float64)
    dyn = TVLGDynamics(F, f, torch.eye(4, dtype=torch.float64).expand(3, 4, 4))

    def reward(obs, act, next_obs):
        return -(next_obs[..., :2].square().sum(-1) + 0.1 * act.square().sum(-1))

    cost = lqr_flm.NextStateReward(reward, dyn)
    x = torch.randn(5, 4, generator=g, dtype=torch.float64)
    u = torch.randn(5, 2, generator=g, dtype=torch.float64)
    t = torch.tensor([0, 1, 2, 2, 0])
    e = cost.expansion(x, u, t)

    def exact(z):
        rows = [F[ti] @ zi + f[ti] for zi, ti in zip(z, t.repeat(z.shape[0] // 5), strict=True)]
        return -reward(z[:, :4], z[:, 4:], torch.stack(rows))

    want = autograd_cost_expansion(exact, torch.cat([x, u], -1))
    torch.testing.assert_close(e.cost, want.cost)
    torch.testing.assert_close(e.grad, want.grad)
    torch.testing.assert_close(e.hess, want.hess)
    assert float(cost.terminal_expansion(x).hess.abs().max()) == 0.0


# ---------------------------------------------------------------- BADMM


F64 = torch.float64


def _problem(m=2, h=3, nx=4, nu=2, seed=0):
    """Random TVLG dynamics, a convex quadratic cost, a previous controller, a policy
    linearization and an initial state, ``M`` conditions of ``T`` steps."""
    g = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=g, dtype=F64)

    eye_x, nz = torch.eye(nx, dtype=F64), nx + nu
    F = torch.cat([eye_x + 0.1 * randn(m, h, nx, nx), 0.3 * randn(m, h, nx, nu)], -1)
    dyn = TVLGDynamics(F, 0.1 * randn(m, h, nx), 0.01 * eye_x.expand(m, h, nx, nx))
    A = randn(m, h, nz, nz)
    C = A @ A.mT / nz + 0.1 * torch.eye(nz, dtype=F64)
    cost = QuadraticCost(
        C, randn(m, h, nz), torch.zeros(m, h, dtype=F64), eye_x.expand(m, nx, nx),
        randn(m, nx), torch.zeros(m, dtype=F64),
    )  # fmt: skip

    def controller():
        var = 0.5 + torch.rand(m, h, 1, 1, generator=g, dtype=F64)
        eye_u = torch.eye(nu, dtype=F64)
        return LinearGaussianController(0.3 * randn(m, h, nu, nx), randn(m, h, nu), var * eye_u)

    return dyn, cost, controller(), controller(), randn(m, nx), 0.01 * eye_x.expand(m, nx, nx)


def test_badmm_c_step_without_multipliers_or_policy_weight_is_the_lqr_flm_step():
    dyn, cost, prev, lin, x0, x0_cov = _problem()
    lqr = LQRFLM(kl_step=0.3)
    plain = lqr.update(dyn, cost, prev, x0, x0_cov)
    zero = gps.with_multipliers(cost, torch.zeros(2, 3, 2, dtype=F64))
    badmm = lqr.update(dyn, zero, prev, x0, x0_cov, policy=lin, policy_weight=torch.zeros(2, 3))
    for name in ("K", "k", "covariance"):
        torch.testing.assert_close(
            getattr(badmm.controller, name), getattr(plain.controller, name), rtol=0, atol=0
        )
    for name in ("eta", "kl", "expected_cost", "previous_cost"):
        torch.testing.assert_close(getattr(badmm, name), getattr(plain, name), rtol=0, atol=0)
    assert plain.status == badmm.status == "ok"
    # a positive weight pulls the controller toward the policy: a smaller KL to it
    pulled = lqr.update(dyn, cost, prev, x0, x0_cov, policy=lin, policy_weight=50.0)
    kl = [gps.kl_divergence(c, lin, *gps.trajectory_distribution(dyn, c, x0, x0_cov))
          for c in (plain.controller, pulled.controller)]  # fmt: skip
    assert bool((kl[1] < 0.75 * kl[0]).all())


def test_badmm_backward_pass_is_the_weighted_maximum_entropy_solution():
    """One step, no terminal cost: p(u | x) minimises E[cost] + eta KL(p || prev) + w KL(p ||
    pi), a Gaussian of precision (C_uu + eta P_prev + w P_pi) / (eta + w) whose mean minimises
    cost + eta |u - mu_prev|^2_P_prev / 2 + w |u - mu_pi|^2_P_pi / 2."""
    dyn, cost, prev, lin, _, _ = _problem(h=1, seed=3)
    nx = 4
    zero = torch.zeros_like(cost.c_final)
    cost = QuadraticCost(cost.C, cost.c, cost.c0, 0 * cost.C_final, zero, cost.c0_final)
    eta, w = torch.tensor([0.7, 2.0], dtype=F64), torch.tensor([[0.3], [5.0]], dtype=F64)
    ctrl, failed, _ = _backward(dyn, cost, prev, eta, lin, w)
    assert not bool(failed.any())
    C, c = cost.C[:, 0], cost.c[:, 0]
    P1, P2 = prev.precision[:, 0], lin.precision[:, 0]
    e, v = eta[:, None, None], w[:, :, None]
    H = C[:, nx:, nx:] + e * P1 + v * P2
    K = -torch.linalg.solve(H, C[:, nx:, :nx] - e * P1 @ prev.K[:, 0] - v * P2 @ lin.K[:, 0])
    b = c[:, nx:, None] - e * P1 @ prev.k[:, 0, :, None] - v * P2 @ lin.k[:, 0, :, None]
    torch.testing.assert_close(ctrl.K[:, 0], K)
    torch.testing.assert_close(ctrl.k[:, 0], -torch.linalg.solve(H, b)[..., 0])
    torch.testing.assert_close(ctrl.covariance[:, 0], (e + v) * torch.linalg.inv(H))


def test_badmm_supervised_targets_and_policy_kl():
    samples, policy = _samples(), _LinearPolicy()
    lin = gps.policy_linearization(policy, samples)
    # the policy against itself: KL 0; against a shifted mean d: d' Sigma_pi^-1 d / 2
    torch.testing.assert_close(
        gps.policy_kl(policy, lin, samples), torch.zeros(2, 4, dtype=F64), rtol=0, atol=1e-6
    )
    d = torch.tensor([0.5, -1.0], dtype=F64)
    shifted = LinearGaussianController(lin.K, lin.k + d, lin.covariance)
    want = 0.5 * d @ torch.linalg.solve(policy.covariance.double(), d)
    torch.testing.assert_close(gps.policy_kl(policy, shifted, samples), want.expand(2, 4))
    # S-step targets K x + k - S lambda / nu, each row weighted nu
    g = torch.Generator().manual_seed(2)
    lam = torch.randn(2, 4, 2, generator=g, dtype=F64)
    nu = 0.5 + torch.rand(2, 4, generator=g, dtype=F64)
    gps.supervised_step(policy, shifted, samples, None, lam, nu)
    obs, target, precision = policy.fitted
    m, i, t = 1, 2, 3
    row = (m * 3 + i) * 4 + t
    x = samples.obs[m, i, t].double()
    want = shifted.K[m, t] @ x + shifted.k[m, t] - shifted.covariance[m, t] @ lam[m, t] / nu[m, t]
    torch.testing.assert_close(target[row], want.float())
    assert float(policy.weight[row]) == pytest.approx(float(nu[m, t]))
    with pytest.raises(ValueError, match="multipliers and their weights together"):
        gps.supervised_step(policy, shifted, samples, None, lam, None)


def test_badmm_settings_and_sampling():
    assert load_config(gps.Config, None, []).samples_from == "policy"
    assert load_config(gps.Config, None, ["method=badmm"]).samples_from == "local"
    over = ["method=badmm", "sample_from=policy"]
    assert load_config(gps.Config, None, over).samples_from == "policy"
    assert gps.weight_step_at(10.0, None, 3, 5) == 10.0
    assert gps.weight_step_at(1e-2, 1e-4, 0, 5) == pytest.approx(1e-2)
    assert gps.weight_step_at(1e-2, 1e-4, 2, 5) == pytest.approx(1e-3)
    assert gps.weight_step_at(1e-2, 1e-4, 4, 5) == pytest.approx(1e-4)


@pytest.mark.parametrize(
    "over, message",
    [
        (["method=admm"], "mdgps.*badmm"),
        (["badmm.dual_rate=0"], r"badmm\.dual_rate must be > 0"),
        (["badmm.init_policy_weight=-1"], r"badmm\.init_policy_weight must be > 0"),
        (["badmm.weight_step=-0.5"], r"badmm\.weight_step must be >= 0"),
        (["badmm.inner_iterations=0"], r"badmm\.inner_iterations must be an integer >= 1"),
        (["badmm.weight_step=0", "badmm.weight_step_final=1e-3"], "needs badmm.weight_step > 0"),
    ],
)
def test_bad_badmm_settings_are_refused(over, message):
    with pytest.raises(ConfigError, match=message):
        load_config(gps.Config, None, over)


def test_bad_policy_terms_of_the_c_step_are_refused():
    dyn, cost, prev, lin, x0, x0_cov = _problem()
    lqr = LQRFLM()
    with pytest.raises(ValueError, match="needs its policy_weight"):
        lqr.update(dyn, cost, prev, x0, x0_cov, policy=lin)
    with pytest.raises(ValueError, match="without a policy"):
        lqr.update(dyn, cost, prev, x0, x0_cov, policy_weight=1.0)
    with pytest.raises(ValueError, match="finite and >= 0"):
        lqr.update(dyn, cost, prev, x0, x0_cov, policy=lin, policy_weight=-1.0)
    with pytest.raises(ValueError, match=r"policy_weight expected \[\.\.\., T=3\]"):
        lqr.update(dyn, cost, prev, x0, x0_cov, policy=lin, policy_weight=torch.ones(2, 5))


# ---------------------------------------------------------------- learning


def test_lqr_flm_brings_the_point_mass_to_the_target(tmp_path):
    """cbfinn/gps' point-mass example: within 4 iterations (2,000 env steps) the samples end
    within 10% of the initial distance of the target, and the noise-free controller too."""
    cfg = load_config(lqr_flm.Config, None, ["iterations=4"])
    _train(lqr_flm, cfg, tmp_path / "r")
    rows = _rows(tmp_path / "r")
    assert int(rows[-1]["env_steps"]) == 2000
    assert _distance(rows[-1]["sample_terminal_cost"]) < 0.1 * START_DISTANCE
    assert _distance(rows[-1]["eval_terminal_cost"]) < 0.1 * START_DISTANCE
    costs = [float(r["cost"]) for r in rows]
    assert costs == sorted(costs, reverse=True)  # the sample cost falls every iteration
    assert all(r["status"] == "ok" for r in rows)


def test_gps_policy_alone_keeps_the_local_controllers_return(tmp_path):
    """Two start conditions: after 4 iterations the global policy alone ends near the target
    with a cost within 10% of the local controllers', and its cost from held-out starts has
    fallen to under half of the first iteration's."""
    over = ["conditions=2", "iterations=4", "held_out=2", "policy.iterations=600", "kl_step=0.5"]
    cfg = load_config(gps.Config, None, over)
    _train(gps, cfg, tmp_path / "g")
    last = _rows(tmp_path / "g")[-1]
    policy, local = float(last["return"]), float(last["local_return"])
    assert policy >= 1.1 * local  # returns are negative costs
    first = _rows(tmp_path / "g")[0]
    assert float(last["held_out_return"]) > 0.5 * float(first["held_out_return"])
    assert float(last["eval_terminal_cost"]) < 0.05 * float(first["eval_terminal_cost"])


def test_badmm_drives_the_policy_onto_the_local_controllers(tmp_path):
    """The point mass (linear dynamics, quadratic cost), BADMM sampling the local controllers:
    the gap between the policy's and the controllers' mean actions at the samples falls to
    under half its largest value (to under 0.5 N, actions reach 40 N), falling over the last
    three iterations, while the multipliers grow from zero and the policy alone keeps the local
    controllers' cost within 5%."""
    over = ["method=badmm", "conditions=2", "iterations=5", "horizon=50", "held_out=0",
            "policy.iterations=200", "badmm.inner_iterations=2"]  # fmt: skip
    _train(gps, load_config(gps.Config, None, over), tmp_path / "b")
    rows = _rows(tmp_path / "b")
    gap = [float(r["badmm_violation"]) for r in rows]
    assert gap[-1] < 0.5 * max(gap) and gap[-1] < 0.5
    assert gap[-3] > gap[-2] > gap[-1]
    assert 0 < float(rows[0]["badmm_multiplier_norm"]) < float(rows[-1]["badmm_multiplier_norm"])
    assert float(rows[-1]["badmm_policy_weight"]) > 0.01  # nu grew from init_policy_weight
    policy, local = float(rows[-1]["return"]), float(rows[-1]["local_return"])
    assert policy >= 1.05 * local  # returns are negative costs
    costs = [float(r["cost"]) for r in rows]
    assert costs == sorted(costs, reverse=True)


# ---------------------------------------------------------------- runs


TINY = ["conditions=2", "samples=3", "horizon=20", "iterations=3", "held_out=1",
        "policy.iterations=30", "policy.hidden_size=16"]  # fmt: skip


@pytest.mark.parametrize("algo", ["gps", "gps-badmm", "lqr-flm"])
def test_run_resumes_to_the_same_numbers(tmp_path, monkeypatch, algo):
    tiny = {"gps": TINY, "gps-badmm": [*TINY, "method=badmm"], "lqr-flm": TINY[:4]}[algo]
    args = ["run", algo.removesuffix("-badmm"), "--env", "point-mass-spread"]
    args += ["--runs-dir", str(tmp_path), *tiny]
    assert cli.main([*args, "--name", "full"]) == 0
    full = tmp_path / "full"
    assert [r["iteration"] for r in _rows(full)] == ["1", "2", "3"]
    for png in ("learning_curve.png", "kl.png", "cost.png", "step_mult.png"):
        assert (full / png).is_file()

    original, saved = Run.save_checkpoint, []

    def save_then_die(self, state):
        original(self, state)
        saved.append(1)
        if len(saved) == 2:
            raise KeyboardInterrupt  # after iteration 2

    monkeypatch.setattr(Run, "save_checkpoint", save_then_die)
    assert cli.main([*args, "--name", "killed"]) == 130
    monkeypatch.setattr(Run, "save_checkpoint", original)
    killed = tmp_path / "killed"
    assert [r["iteration"] for r in _rows(killed)] == ["1", "2"]
    assert cli.main(["resume", str(killed)]) == 0
    assert _rows(killed) == _rows(full)

    def state(path):
        s = torch.load(path / "checkpoint.pt", weights_only=True)["state"]
        s["counters"].pop("wall_seconds")
        return s

    assert_same(state(killed), state(full))
    if algo == "gps-badmm":  # the multipliers moved and are in the checkpoint
        duals = state(full)["parts"]["badmm"]
        assert float(duals["lam"].abs().max()) > 0 and duals["weight"].shape == (2, 20)
        assert "badmm_violation" in _rows(full)[0]
    # a finished run goes on with a larger budget
    assert cli.main(["run", "--continue", str(full), "iterations=4"]) == 0
    assert [r["iteration"] for r in _rows(full)] == ["1", "2", "3", "4"]


@pytest.fixture(scope="module")
def local_runs(tmp_path_factory):
    """A tiny finished gps and lqr-flm run on the spread point mass (two conditions)."""
    runs = tmp_path_factory.mktemp("runs")
    for algo, tiny in (("gps", TINY), ("lqr-flm", TINY[:4])):
        argv = ["run", algo, "--env", "point-mass-spread", "--runs-dir", str(runs)]
        assert cli.main([*argv, "--name", algo, *tiny]) == 0
    return runs


def test_eval_of_an_lqr_flm_run_plays_each_condition_with_its_controller(local_runs, capsys):
    """The noise-free controllers, one per condition from that condition's reset, score what
    the run's last iteration logged; every episode lasts the run's T = 20 steps."""
    from mbrl.evaluate import evaluate_run

    path = local_runs / "lqr-flm"
    last = _rows(path)[-1]
    result = evaluate_run(path)
    assert result.starts == "conditions" and result.lengths == (20, 20)
    assert result.reset_seeds == (lqr_flm.condition_seed(0, 0), lqr_flm.condition_seed(0, 1))
    assert result.mean == pytest.approx(float(last["return"]), rel=1e-5)
    assert result.returns[0] != pytest.approx(result.returns[1])  # two different starts
    four = evaluate_run(path, episodes=4)  # conditions in turn
    assert four.returns == result.returns * 2
    assert cli.main(["eval", str(path)]) == 0
    assert "over 2 episodes from the training conditions" in capsys.readouterr().out
    with pytest.raises(ValueError, match="time-varying, one per training start condition"):
        evaluate_run(path, starts="resets")


def test_eval_of_a_gps_run_plays_the_global_policy_alone(local_runs, capsys):
    """The global policy's mean action scores the run's logged return on the training
    conditions and its held-out return on the first held-out start (the default starts)."""
    from mbrl.evaluate import StepPolicy, build_policy, evaluate_run, load_run

    path = local_runs / "gps"
    last = _rows(path)[-1]
    trained = evaluate_run(path, starts="conditions")
    assert trained.mean == pytest.approx(float(last["return"]), rel=1e-5)
    held = evaluate_run(path, episodes=1)
    assert held.starts == "held-out" and held.reset_seeds == (lqr_flm.condition_seed(0, 2),)
    assert held.mean == pytest.approx(float(last["held_out_return"]), rel=1e-5)
    resets = evaluate_run(path, episodes=2, seed=7, starts="resets")
    assert resets.reset_seeds == (7, 8) and resets.lengths == (20, 20)
    loaded = load_run(path)
    assert isinstance(build_policy(loaded, envs.make(loaded.cfg.env), "cpu", 0), StepPolicy)
    assert cli.main(["eval", str(path), "--episodes", "1"]) == 0
    assert "over 1 episodes from held-out starts" in capsys.readouterr().out


def test_step_policy_refuses_a_step_past_its_gains(local_runs):
    from mbrl.evaluate import condition_policies, load_run

    loaded = load_run(local_runs / "lqr-flm")
    policy = condition_policies(loaded, envs.make(loaded.cfg.env))[0]
    policy.reset()
    obs = np.zeros(envs.make(loaded.cfg.env).obs_dim, dtype=np.float32)
    for _ in range(20):
        assert policy.act(obs).shape == (2,)
    with pytest.raises(ValueError, match="has gains for 20 steps only"):
        policy.act(obs)


def test_eval_starts_other_than_resets_need_a_local_run(tmp_path, capsys):
    from mbrl.evaluate import evaluate_run

    argv = ["run", "sac", "--env", "pendulum", "--runs-dir", str(tmp_path), "--name", "s"]
    tiny = ["total_steps=40", "epoch_length=20", "start_steps=20", "eval_episodes=1",
            "learner.hidden_size=8", "learner.batch_size=8"]  # fmt: skip
    assert cli.main([*argv, *tiny]) == 0
    with pytest.raises(ValueError, match="sac runs have no start conditions"):
        evaluate_run(tmp_path / "s", starts="conditions")
    with pytest.raises(SystemExit):
        cli.main(["eval", str(tmp_path / "s"), "--starts", "everywhere"])
    assert "invalid choice: 'everywhere'" in capsys.readouterr().err


def test_study_gps_compares_the_learners_with_the_planners(tmp_path, capsys):
    argv = ["study", "gps", "--system", "point-mass", "--initial-states", "1", "--held-out", "1",
            "--iterations", "1", "--samples", "3", "--steps", "10", "--horizon", "5",
            "--option", "cem.population=20", "cem.iterations=2", "--runs-dir", str(tmp_path),
            "--name", "s"]  # fmt: skip
    assert cli.main(argv) == 0
    out = tmp_path / "s"
    with (out / "results.csv").open(newline="") as f:
        rows = {r["method"]: r for r in csv.DictReader(f)}
    assert set(rows) == {"lqr-flm", "gps", "ilqr", "cem"}
    assert rows["gps"]["env_steps"] == "30" and rows["ilqr"]["env_steps"] == "0"
    assert rows["lqr-flm"]["held_out_cost_mean"] == "nan"
    assert all(math.isfinite(float(r["cost_mean"])) for r in rows.values())
    assert (out / "gps_study.png").is_file() and (out / "gps" / "metrics.csv").is_file()
    assert "| ilqr | 1 |" in capsys.readouterr().out
    assert cli.main(["study", "gps", "--system", "reacher", "--runs-dir", str(tmp_path)]) == 2
    assert "runs on an analytic env" in capsys.readouterr().err


# ---------------------------------------------------------------- bad input


def test_an_episode_that_ends_early_is_refused():
    sampler = lqr_flm.Sampler(envs.make("inverted-pendulum"), 100)
    push = lambda x, t: torch.full((x.shape[0], 1), 3.0)  # noqa: E731 falls within 100 steps
    with pytest.raises(ValueError, match=r"ended at step \d+ of 100 \(terminated\).*fixed-length"):
        sampler.episodes([0], push)


def test_bad_sampler_settings_and_actions_are_refused():
    with pytest.raises(ValueError, match="horizon=101 exceeds the 100-step episodes"):
        lqr_flm.Sampler(envs.make("point-mass"), 101)
    with pytest.raises(ValueError, match="discrete actions"):
        lqr_flm.Sampler(envs.make("CartPole-v1"), 10)
    sampler = lqr_flm.Sampler(envs.make("point-mass"), 5)
    with pytest.raises(ValueError, match=r"actions at step 0: expected \[2, 2\], got \[2, 3\]"):
        sampler.episodes([0, 1], lambda x, t: torch.zeros(2, 3))
    with pytest.raises(ValueError, match="actions at step 2 hold NaN/inf"):
        sampler.episodes([0], lambda x, t: torch.full((1, 2), math.nan if t == 2 else 0.0))


def test_a_kl_target_out_of_reach_is_a_named_status_not_a_nan_controller(tmp_path):
    """A KL step the first update cannot reach (from the initial controller): the run logs
    status kl_not_met, keeps a finite controller (the one nearest the target) and goes on."""
    over = ["iterations=2", "kl_step=1e6", "horizon=20"]
    cfg = load_config(lqr_flm.Config, None, over)
    _train(lqr_flm, cfg, tmp_path / "k")
    rows = _rows(tmp_path / "k")
    assert len(rows) == 2 and rows[0]["status"] == "kl_not_met"
    assert float(rows[0]["kl"]) < 1e-3 * float(rows[0]["kl_target"])
    assert all(math.isfinite(float(r["return"])) for r in rows)
