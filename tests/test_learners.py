"""Learners: shapes, the tanh log-prob correction, NAF's closed-form maximum, target-network
math, external value targets, determinism, checkpoints, and a small learning test."""

from __future__ import annotations

import io
import math

import pytest
import torch

from mbrl.dynamics.base import Transitions
from mbrl.learners import NAF, SAC, TD3
from mbrl.learners.networks import EnsembleMLP, soft_update
from mbrl.learners.sac import squashed_gaussian_log_prob

torch.set_num_threads(1)
X, U = 3, 2
LOW, HIGH = [-2.0, 0.0], [2.0, 1.0]


def make(kind: str, seed: int = 0, **kw):
    kw = {"hidden_size": 32, "num_layers": 2, "seed": seed, **kw}
    if kind == "sac":
        return SAC(X, U, LOW, HIGH, **kw)
    if kind == "td3":
        return TD3(X, U, LOW, HIGH, **kw)
    if kind == "ddpg":
        return TD3.ddpg(X, U, LOW, HIGH, **kw)
    return NAF(X, U, LOW, HIGH, **kw)


def batch(n: int = 64, seed: int = 0) -> Transitions:
    g = torch.Generator().manual_seed(seed)
    low, high = torch.tensor(LOW), torch.tensor(HIGH)
    return Transitions(
        obs=torch.randn(n, X, generator=g),
        act=low + (high - low) * torch.rand(n, U, generator=g),
        next_obs=torch.randn(n, X, generator=g),
        reward=torch.randn(n, generator=g),
        terminated=torch.rand(n, generator=g) < 0.2,
    )


KINDS = ["sac", "td3", "ddpg", "naf"]


def same_stats(a: list[dict[str, float]], b: list[dict[str, float]]) -> bool:
    """Equal statistics, NaN equal to NaN (TD3 has no actor loss before its first actor step)."""
    return len(a) == len(b) and all(
        x.keys() == y.keys() and all(x[k] == y[k] or (x[k] != x[k] and y[k] != y[k]) for k in x)
        for x, y in zip(a, b, strict=True)
    )


@pytest.mark.parametrize("kind", KINDS)
def test_act_shapes_and_bounds(kind):
    learner = make(kind)
    b = batch()
    for det in (True, False):
        a = learner.act(b.obs, deterministic=det)
        assert a.shape == (64, U) and a.dtype == torch.float32
        assert (a >= torch.tensor(LOW)).all() and (a <= torch.tensor(HIGH)).all()
        assert learner.act(b.obs[0], deterministic=det).shape == (U,)
    assert learner.target_value(b.next_obs).shape == (64,)
    stats = learner.update(b)
    assert {"q_loss", "q_mean", "q_abs_max"} <= stats.keys()
    assert all(math.isfinite(v) for k, v in stats.items() if k != "actor_loss")


@pytest.mark.parametrize("kind", KINDS)
def test_bad_input_is_named(kind):
    learner = make(kind)
    with pytest.raises(ValueError, match=r"obs: expected \[B, X=3\]"):
        learner.act(torch.zeros(5, 4))
    with pytest.raises(ValueError, match=r"target_q: expected \[B=64\]"):
        learner.update(batch(), target_q=torch.zeros(63))


def test_bad_bounds_are_named():
    with pytest.raises(ValueError, match="action bounds"):
        SAC(X, U, [-1.0], [1.0])
    with pytest.raises(ValueError, match="high > low"):
        TD3(X, U, [1.0, 1.0], [1.0, 2.0])


def test_tanh_log_prob_matches_numerical_density():
    # P(a - h < tanh(u) < a + h) / 2h from the Gaussian CDF of atanh; independent of the formula.
    mean = torch.tensor([[0.3, -1.2]], dtype=torch.float64)
    log_std = torch.tensor([[-0.4, 0.5]], dtype=torch.float64)
    std = log_std.exp()
    normal = torch.distributions.Normal(mean, std)
    for a in ([0.1, -0.5], [0.9, -0.97], [-0.6, 0.2]):
        a = torch.tensor([a], dtype=torch.float64)
        h = 1e-5
        mass = normal.cdf(torch.atanh(a + h)) - normal.cdf(torch.atanh(a - h))  # [1, U]
        numeric = torch.log(mass / (2 * h)).sum(-1)
        u = torch.atanh(a)
        got = squashed_gaussian_log_prob(u, mean, log_std)
        assert torch.allclose(got, numeric, atol=1e-5), (got, numeric)


def test_sac_sample_log_prob_is_consistent_at_large_u():
    # Stable form: no inf/NaN where tanh(u) rounds to +-1 in float32.
    u = torch.tensor([[12.0, -15.0]])
    lp = squashed_gaussian_log_prob(u, torch.zeros(1, 2), torch.zeros(1, 2))
    assert torch.isfinite(lp).all()


def test_naf_q_is_maximised_at_mu():
    learner = make("naf")
    for _ in range(5):  # move away from the initial weights
        learner.update(batch(seed=1))
    obs = batch(seed=2).obs
    with torch.no_grad():
        h = learner.heads(obs)
        q_mu = learner.q(obs, h.mu)
        assert torch.allclose(q_mu, h.value, atol=1e-6)
        g = torch.Generator().manual_seed(3)
        for _ in range(10):
            other = (h.mu + 0.3 * torch.randn(h.mu.shape, generator=g)).clamp(-1, 1)
            assert (learner.q(obs, other) <= q_mu + 1e-6).all()
        # P = L L^T is positive definite: a positive diagonal of L
        assert (torch.diagonal(h.L, dim1=1, dim2=2) > 0).all()
        assert torch.allclose(h.L, torch.tril(h.L))


def test_naf_q_matches_quadratic_form():
    learner = make("naf")
    obs, act = batch().obs, batch().act
    with torch.no_grad():
        h = learner.heads(obs)
        a = learner.scale.to_unit(act)
        P = h.L @ h.L.transpose(1, 2)
        d = a - h.mu
        expected = h.value - 0.5 * torch.einsum("bi,bij,bj->b", d, P, d)
        assert torch.allclose(learner.q(obs, a), expected, atol=1e-5)


def test_soft_update_math():
    g = torch.Generator().manual_seed(0)
    src = EnsembleMLP(2, 3, 1, 8, 1, g)
    tgt = EnsembleMLP(2, 3, 1, 8, 1, g)
    before = [p.clone() for p in tgt.parameters()]
    soft_update(tgt, src, 0.1)
    for b, s, t in zip(before, src.parameters(), tgt.parameters(), strict=True):
        assert torch.allclose(t, 0.9 * b + 0.1 * s, atol=1e-7)


def test_sac_target_critic_follows_polyak_after_update():
    learner = make("sac", tau=0.25)
    old_target = [p.clone() for p in learner.critic_target.parameters()]
    learner.update(batch())
    for old, new, online in zip(
        old_target, learner.critic_target.parameters(), learner.critic.parameters(), strict=True
    ):
        assert torch.allclose(new, 0.75 * old + 0.25 * online, atol=1e-6)


def test_td3_delays_actor_and_targets():
    learner = make("td3", policy_delay=2)
    actor0 = [p.clone() for p in learner.actor.parameters()]
    target0 = [p.clone() for p in learner.critic_target.parameters()]
    learner.update(batch())
    assert all(torch.equal(a, b) for a, b in zip(actor0, learner.actor.parameters(), strict=True))
    assert all(
        torch.equal(a, b) for a, b in zip(target0, learner.critic_target.parameters(), strict=True)
    )
    learner.update(batch())
    assert not all(
        torch.equal(a, b) for a, b in zip(actor0, learner.actor.parameters(), strict=True)
    )


def test_ddpg_is_single_critic_without_smoothing():
    learner = make("ddpg")
    assert learner.critic.members == 1 and learner.policy_delay == 1
    nobs = batch().next_obs
    v1, v2 = learner.target_value(nobs), learner.target_value(nobs)
    assert torch.equal(v1, v2)  # no smoothing noise
    with torch.no_grad():
        a = torch.tanh(learner.actor_target(nobs)[0])
        q = learner.critic_target(torch.cat([nobs, a], -1))[0, :, 0]
    assert torch.allclose(v1, q)
    with pytest.raises(ValueError, match="fixes num_critics"):
        TD3.ddpg(X, U, LOW, HIGH, num_critics=2)


def test_td3_target_is_min_over_twin_critics():
    learner = make("td3", target_noise=0.0)
    nobs = batch().next_obs
    with torch.no_grad():
        a = torch.tanh(learner.actor_target(nobs)[0])
        q = learner.critic_target(torch.cat([nobs, a], -1))[..., 0]  # [2, B]
    assert torch.allclose(learner.target_value(nobs), torch.minimum(q[0], q[1]))


@pytest.mark.parametrize("kind", KINDS)
def test_external_target_replaces_one_step_target(kind):
    learner = make(kind)
    b = batch()
    target = torch.linspace(-1, 1, len(b))
    with torch.no_grad():
        a = learner.scale.to_unit(b.act)
        q = learner.q(b.obs, a)
        q = q if q.dim() == 2 else q.unsqueeze(0)  # [E, B]
        expected = (q - target).pow(2).mean(-1).sum().item()
    stats = learner.update(b, target_q=target)
    assert stats["q_loss"] == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("kind", KINDS)
def test_one_step_target_is_used_without_external_target(kind):
    # With gamma = 0 the one-step target is the reward itself.
    learner = make(kind, gamma=0.0)
    b = batch()
    with torch.no_grad():
        q = learner.q(b.obs, learner.scale.to_unit(b.act))
        q = q if q.dim() == 2 else q.unsqueeze(0)
        expected = (q - b.reward).pow(2).mean(-1).sum().item()
    assert learner.update(b)["q_loss"] == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("kind", KINDS)
def test_same_seed_same_numbers(kind):
    runs = []
    for seed in (5, 5, 6):
        learner = make(kind, seed=seed)
        stats = [learner.update(batch(seed=i)) for i in range(4)]
        acts = learner.act(batch().obs, deterministic=False)
        runs.append((stats, acts))
    assert same_stats(runs[0][0], runs[1][0]) and torch.equal(runs[0][1], runs[1][1])
    assert not torch.equal(runs[0][1], runs[2][1])


@pytest.mark.parametrize("kind", KINDS)
def test_state_dict_round_trip_resumes_exactly(kind):
    a = make(kind, seed=1)
    for i in range(3):
        a.update(batch(seed=i))
    buf = io.BytesIO()
    torch.save(a.state_dict(), buf)
    buf.seek(0)
    b = make(kind, seed=99)
    b.load_state_dict(torch.load(buf, weights_only=True))
    for i in range(3, 6):
        sa, sb = a.update(batch(seed=i)), b.update(batch(seed=i))
        assert same_stats([sa], [sb])
    obs = batch().obs
    assert torch.equal(a.act(obs), b.act(obs))


# ----- learning on a toy problem -----


def point_mass_step(x: torch.Tensor, a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """1-D point mass: ``x' = clip(x + 0.25 a, -1, 1)``, reward ``-|x'|``."""
    nx = (x + 0.25 * a).clamp(-1.0, 1.0)
    return nx, -nx.abs().squeeze(-1)


def greedy_return(learner, starts: torch.Tensor, steps: int = 10) -> float:
    x = starts
    total = torch.zeros(len(x))
    for _ in range(steps):
        x, r = point_mass_step(x, learner.act(x, deterministic=True))
        total += r
    return total.mean().item()


@pytest.mark.learning
@pytest.mark.parametrize("kind", ["td3", "sac", "naf"])
def test_learns_point_mass(kind):
    """Off-policy learning from uniformly covering data: drive x to 0 within a 10-step episode.

    From these starts the untrained policy scores about -5.7 and the optimal one (full speed
    towards 0) -0.49; TD3 reaches about -0.54, NAF about -0.70 and SAC about -1.04 (its
    entropy bonus keeps the policy soft).
    """
    torch.manual_seed(0)  # unused by the learners; guards against hidden global randomness
    g = torch.Generator().manual_seed(0)
    n = 4096
    x = torch.rand(n, 1, generator=g) * 2 - 1
    a = torch.rand(n, 1, generator=g) * 2 - 1
    nx, r = point_mass_step(x, a)
    data = Transitions(x, a, nx, r, torch.zeros(n, dtype=torch.bool))
    learner = {"sac": SAC, "td3": TD3, "naf": NAF}[kind](
        1,
        1,
        [-1.0],
        [1.0],
        hidden_size=64,
        gamma=0.9,
        tau=0.02,
        seed=0,
        **({"actor_lr": 1e-3, "critic_lr": 1e-3} if kind == "td3" else {"lr": 1e-3}),
    )
    starts = torch.linspace(-1, 1, 21).unsqueeze(-1)
    untrained = TD3(1, 1, [-1.0], [1.0], seed=3)
    for _ in range(600):
        idx = torch.randint(n, (128,), generator=g)
        learner.update(Transitions(x[idx], a[idx], nx[idx], r[idx], data.terminated[idx]))
    ret = greedy_return(learner, starts)
    assert ret > -1.3, ret
    assert greedy_return(untrained, starts) < -5.0


@pytest.mark.parametrize("kind", ["sac", "ddpg"])
def test_actor_obs_moves_only_the_policy_update(kind):
    b, other = batch(seed=0), batch(seed=7).obs
    a1, a2, a3 = make(kind, seed=2), make(kind, seed=2), make(kind, seed=2)
    s1, s2 = a1.update(b), a2.update(b, actor_obs=b.obs)
    a3.update(b, actor_obs=other)
    assert same_stats([s1], [s2])
    params = lambda m: torch.cat([p.flatten() for p in m.parameters()])  # noqa: E731
    assert torch.equal(params(a1.actor), params(a2.actor))
    assert torch.equal(params(a1.critic), params(a3.critic))  # the critic step comes first
    assert not torch.equal(params(a1.actor), params(a3.actor))


@pytest.mark.parametrize("cls", [SAC, TD3, NAF])
def test_learners_refuse_bad_rates(cls):
    with pytest.raises(ValueError, match="0 <= gamma <= 1; got tau=0.005, gamma=1.5"):
        cls(2, 1, [-1.0], [1.0], gamma=1.5)
    with pytest.raises(ValueError, match="0 < tau <= 1"):
        cls(2, 1, [-1.0], [1.0], tau=0.0)


def test_naf_refuses_a_non_positive_diag_floor():
    with pytest.raises(ValueError, match="diag_floor must be > 0"):
        NAF(2, 1, [-1.0], [1.0], diag_floor=0.0)


def test_naf_curvature_never_falls_below_the_floor():
    learner = make("naf", diag_floor=0.25)
    last = learner.net.net[-1]  # the output layer
    with torch.no_grad():  # every output, L's diagonal pre-activations included, far negative
        last.weight.zero_()
        last.bias.fill_(-1e4)
    h = learner.heads(batch().obs)
    diag = torch.diagonal(h.L, dim1=1, dim2=2)
    assert (diag >= 0.25).all()


def test_naf_refuses_a_negative_mu_penalty():
    with pytest.raises(ValueError, match="mu_penalty must be >= 0"):
        NAF(2, 1, [-1.0], [1.0], mu_penalty=-0.1)


def _saturated_naf(mu_penalty: float) -> NAF:
    """A NAF whose mu sits at the upper bound with pre-activation 40 at every state."""
    learner = make("naf", mu_penalty=mu_penalty, lr=1e-2)
    last = learner.net.net[-1]
    with torch.no_grad():
        last.bias[..., 1 : 1 + U] = 40.0
    return learner


@pytest.mark.parametrize("mu_penalty, unlocked", [(0.0, False), (1e-3, True)])
def test_naf_mu_penalty_unlocks_a_saturated_mu(mu_penalty, unlocked):
    # The buffer of a policy stuck at full torque: every action at the upper bound and nothing
    # to learn about other actions (targets 0). The Q-loss gives mu no gradient through the flat
    # tanh; the penalty brings the pre-activation back to where tanh has slope.
    learner = _saturated_naf(mu_penalty)
    b = batch()
    n = b.obs.shape[0]
    b = Transitions(
        obs=b.obs,
        act=torch.tensor(HIGH).expand(n, U),
        next_obs=b.next_obs,
        reward=torch.zeros(n),
        terminated=torch.ones(n, dtype=torch.bool),
    )
    assert (learner.heads(b.obs).mu_pre.abs() > 30).all()
    for _ in range(300):
        learner.update(b)
    p = learner.heads(b.obs).mu_pre.abs()  # 40 at the start: tanh's slope 1e-34
    if unlocked:
        assert p.max() < 10 and p.mean() < 3  # slope > 0.01 at a typical state
    else:
        assert (p > 30).all()


@pytest.mark.parametrize("kind", KINDS)
def test_ignored_obs_are_never_read(kind):
    """With ``ignored_obs=(0,)`` actions and updates do not depend on feature 0."""
    a, b = make(kind, ignored_obs=(0,)), make(kind, ignored_obs=(0,))
    data = batch()
    shifted = Transitions(
        obs=data.obs + torch.tensor([5.0, 0.0, 0.0]),
        act=data.act,
        next_obs=data.next_obs - torch.tensor([3.0, 0.0, 0.0]),
        reward=data.reward,
        terminated=data.terminated,
    )
    torch.testing.assert_close(
        a.act(data.obs, deterministic=True), a.act(shifted.obs, deterministic=True)
    )
    # targets (sampled for SAC and TD3) are compared through updates from the same seed
    stats_a = [a.update(data) for _ in range(3)]
    stats_b = [b.update(shifted) for _ in range(3)]
    assert same_stats(stats_a, stats_b)
    # and without ignored_obs the shift does change what the learner does
    c = make(kind)
    assert not torch.allclose(
        c.act(data.obs, deterministic=True), c.act(shifted.obs, deterministic=True)
    )


def test_observation_inputs_keep_the_rest_and_refuse_bad_indices():
    from mbrl.learners.networks import observation_inputs

    assert observation_inputs(3, 2, ()) == (None, None)
    assert observation_inputs(3, 2, (0,)) == ([1, 2], [1, 2, 3, 4])
    with pytest.raises(ValueError, match="indices in"):
        observation_inputs(3, 2, (3,))
    with pytest.raises(ValueError, match="every observation feature"):
        observation_inputs(2, 1, (0, 1))
    with pytest.raises(ValueError, match="inputs must be"):
        EnsembleMLP(1, 3, 1, 8, 1, inputs=[4])
