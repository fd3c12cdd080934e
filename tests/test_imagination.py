"""The imagination parts of the Dyna learners: the schedule, branched rollouts, value
expansion, the model buffer and mixed batches."""

from __future__ import annotations

import pytest
import torch

from mbrl import cli, envs
from mbrl.algorithms import mba, mbpo, mve
from mbrl.algorithms.dyna import BranchConfig, MVEConfig, imagined_policy
from mbrl.algorithms.factory import EnsembleConfig, LearnerConfig, make_ensemble, make_learner
from mbrl.buffer import ReplayBuffer
from mbrl.config import ConfigError
from mbrl.dynamics.base import Transitions
from mbrl.dynamics.known import KnownModel
from mbrl.imagination import (
    ModelBuffer,
    NonFiniteModelError,
    RolloutLengths,
    Schedule,
    branched_rollout,
    mixed_batch,
    model_buffer_capacity,
    rollout_length,
    schedule,
    uniform_actions,
    value_expansion_batch,
    value_expansion_targets,
)
from mbrl.learners import TD3
from mbrl.planners.base import PlanningProblem

torch.set_num_threads(1)


def drift(x: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """``x' = x + u`` (X = U = 1)."""
    return x + u


def reward_fn(obs, act, next_obs):
    return -(next_obs[:, 0] ** 2) - 0.1 * act[:, 0] ** 2


def beyond_one(next_obs):
    return next_obs[:, 0].abs() > 1.0


def problem(model, termination=beyond_one, generator=None, reward=reward_fn, low=-1.0, high=1.0):
    """The one-particle problem of the imagined steps (bounds ``[low, high]`` per action)."""
    u = model.act_dim
    lo, hi = torch.as_tensor(low).float().expand(u), torch.as_tensor(high).float().expand(u)
    return PlanningProblem(model, reward, termination, 10, lo, hi, 1, generator)


# ----- the schedule


def _run(**kw) -> list[Schedule]:
    """The schedule of env steps 1 .. 400 (start 100, epochs of 200)."""
    return [schedule(t, 100, 200, **kw) for t in range(1, 401)]


def test_schedule_of_a_model_free_run_only_updates_from_start_steps():
    plan = _run()
    assert [t for t, s in enumerate(plan, 1) if s.update] == list(range(100, 401))
    assert not any(s.fit or s.branch for s in plan) and all(s.imagining for s in plan)
    assert all(s.k == 0 for s in plan)


@pytest.mark.parametrize("every, calls", [(None, 4), (20, 16)])
def test_branching_follows_rollout_every(every, calls):
    """Without rollout_every the model buffer is refilled after each of the 4 fits (env steps
    100 to 400); with it, every 20 steps from the first fit on (100, 120, ..., 400)."""
    cfg = mba.Config(
        start_steps=100,
        epoch_length=200,
        model=EnsembleConfig(batch_size=32, train_every=100),
        branch=BranchConfig(rollout_every=every),
    )
    plan = _run(train_every=100, rollout_every=cfg.rollout_every, lengths=cfg.branch.lengths)
    fits = [t for t, s in enumerate(plan, 1) if s.fit]
    branches = [t for t, s in enumerate(plan, 1) if s.branch]
    assert fits == [100, 200, 300, 400]
    assert len(branches) == calls and branches[0] == 100 and branches[-1] == 400
    assert branches == list(range(100, 401, every or 100))
    assert all(s.k == 1 for s in plan if s.branch)


def test_stop_after_ends_fits_branchings_and_imagined_batches():
    """With stop_after=200 the model is fitted and branched at env steps 100 and 200 only
    (against 100 to 400 without it), and later updates use real data only."""
    full = _run(train_every=100, rollout_every=100)
    assert sum(s.fit for s in full) == 4 and sum(s.branch for s in full) == 4
    assert all(s.imagining for s in full if s.update)
    stop = _run(train_every=100, rollout_every=100, stop_after=200)
    assert sum(s.fit for s in stop) == 2 and sum(s.branch for s in stop) == 2
    mixes = [s.imagining for s in stop if s.update]
    # one update round per env step 100 ... 400; the first 101 (to step 200) mix in imagined data
    assert len(mixes) == 301 and all(mixes[:101]) and not any(mixes[101:])


def test_schedule_rollout_length_follows_the_epoch():
    lengths = RolloutLengths(min_epoch=0, max_epoch=2, min_length=1, max_length=3)
    plan = _run(train_every=100, rollout_every=100, lengths=lengths)
    assert [s.k for s in plan if s.branch] == [1, 2, 2, 3]  # epochs 0, 1, 1, 2
    assert schedule(99, 100, 200, 100, 100, lengths) == Schedule(False, False, False, 0, True)


def test_model_buffer_capacity_keeps_retain_epochs_of_branchings():
    assert model_buffer_capacity(8, 1, 200, 100, 1) == 16
    assert model_buffer_capacity(8, 1, 200, 20, 1) == 80
    assert model_buffer_capacity(8, 3, 250, 100, 2) == 8 * 3 * 3 * 2
    assert model_buffer_capacity(8, 0, 200, 100, 1) == 1


def test_uniform_actions_cover_the_box_and_follow_the_generator():
    low, high = torch.tensor([-2.0, 0.0]), torch.tensor([2.0, 1.0])
    a = uniform_actions(low, high, torch.Generator().manual_seed(0))(torch.zeros(4000, 3))
    b = uniform_actions(low, high, torch.Generator().manual_seed(0))(torch.zeros(4000, 3))
    assert a.shape == (4000, 2) and torch.equal(a, b)
    assert bool((a >= low).all() and (a <= high).all())
    assert abs(a[:, 0].std().item() - 4 / 12**0.5) < 0.05


def test_branched_rollout_draws_from_the_problems_generator():
    model, _ = _fitted_ensemble("ts1")
    spec = envs.make("pendulum")
    starts = torch.rand(16, 3, generator=torch.Generator().manual_seed(3))
    act = lambda o: torch.zeros(len(o), 1)  # noqa: E731

    def roll(seed):
        p = problem(model, None, torch.Generator().manual_seed(seed), spec.reward_fn, -2.0, 2.0)
        return branched_rollout(p, act, starts, 3).transitions.next_obs

    assert torch.equal(roll(1), roll(1)) and not torch.equal(roll(1), roll(2))


# ----- the parts


def test_rollout_length_schedule_hopper():
    # MBPO Hopper: [20, 100, 1, 15]
    got = [rollout_length(e, 20, 100, 1, 15) for e in (0, 20, 40, 60, 99, 100, 300)]
    assert got == [1, 1, 4, 8, 14, 15, 15]
    assert rollout_length(5, 1, 15, 1, 1) == 1
    assert rollout_length(3, 5, 5, 1, 7) == 1 and rollout_length(5, 5, 5, 1, 7) == 7


def test_branched_rollouts_stop_at_termination():
    model = KnownModel(drift, 1, 1)
    starts = torch.tensor([[0.0], [0.5], [0.95]])
    ro = branched_rollout(problem(model), lambda o: torch.full_like(o, 0.2), starts, 10)
    # start 0.95 terminates at step 1 (1.15), 0.5 at step 3 (1.1), 0.0 at step 6 (1.2)
    assert ro.starts == 3 and ro.steps == 6
    assert len(ro.transitions) == 1 + 3 + 6
    assert ro.mean_length == pytest.approx(10 / 3)
    t = ro.transitions
    assert int(t.terminated.sum()) == 3
    # every terminated transition lands beyond 1, every other one inside
    assert bool((t.next_obs[t.terminated, 0].abs() > 1).all())
    assert bool((t.next_obs[~t.terminated, 0].abs() <= 1).all())
    assert torch.allclose(t.next_obs, t.obs + 0.2)
    assert torch.allclose(t.reward, reward_fn(t.obs, t.act, t.next_obs))
    # step-major order: the first three rows are step 1 of each start
    assert torch.allclose(t.obs[:3, 0], starts[:, 0])


def test_branched_rollout_uses_learned_reward_when_the_model_has_one():
    class RewardModel(KnownModel):
        learns_reward = True

        def rollout_step(self, state, act, generator=None):
            nxt = self.step_fn(state.obs, act)
            return type(state)(obs=nxt, reward=torch.full((len(nxt),), 7.0))

    ro = branched_rollout(
        problem(RewardModel(drift, 1, 1)), lambda o: torch.zeros_like(o), torch.zeros(4, 1), 3
    )
    assert len(ro.transitions) == 12 and bool((ro.transitions.reward == 7.0).all())


def nan_after(threshold: float):
    def step(x, u):
        nx = x + u
        return torch.where(nx > threshold, torch.full_like(nx, float("nan")), nx)

    return step


def test_nan_model_is_detected():
    model = KnownModel(nan_after(0.5), 1, 1)
    starts = torch.tensor([[0.0], [0.4]])
    with pytest.raises(NonFiniteModelError, match=r"NaN/inf in 1 of 2 live rollouts at rollout "):
        branched_rollout(problem(model), lambda o: torch.full_like(o, 0.2), starts, 5)


def test_nan_in_a_terminated_rollout_is_ignored():
    # Rollouts that terminated earlier no longer count: NaN after termination is harmless.
    def step(x, u):
        nx = x + u
        return torch.where(x > 1.0, torch.full_like(nx, float("nan")), nx)

    ro = branched_rollout(
        problem(KnownModel(step, 1, 1)),
        lambda o: torch.full_like(o, 0.6),
        torch.tensor([[0.0], [0.9]]),
        3,
    )
    assert len(ro.transitions) == 1 + 2  # start 0.9 ends at step 1, start 0.0 at step 2


def test_value_expansion_targets_by_hand():
    gamma = 0.5
    rewards = torch.tensor([[1.0, 1.0], [2.0, 2.0], [4.0, 4.0]])  # [H+1=3, B=2]
    terminated = torch.tensor([[False, False], [False, True], [False, False]])
    bootstrap = torch.tensor([8.0, 8.0])
    targets, valid = value_expansion_targets(rewards, terminated, bootstrap, gamma)
    # column 0: no termination
    assert targets[:, 0].tolist() == [1 + 0.5 * 2 + 0.25 * 4 + 0.125 * 8, 2 + 2 + 2, 4 + 4]
    # column 1: the step from row 1 terminates: rows 0, 1 stop there, row 2 is invalid
    assert targets[0, 1].item() == 1 + 0.5 * 2 and targets[1, 1].item() == 2
    assert valid.tolist() == [[True, True], [True, True], [True, False]]


def td3(**kw):
    return TD3(1, 1, [-1.0], [1.0], hidden_size=16, target_noise=0.0, seed=0, **kw)


def real_batch(n: int = 6) -> Transitions:
    g = torch.Generator().manual_seed(0)
    obs = torch.rand(n, 1, generator=g) - 0.5
    act = torch.rand(n, 1, generator=g) * 0.4 - 0.2
    nobs = obs + act
    return Transitions(obs, act, nobs, reward_fn(obs, act, nobs), torch.zeros(n, dtype=bool))


def test_mve_target_equals_hand_computed_h_step_target():
    learner, model, real, h, gamma = td3(gamma=0.9), KnownModel(drift, 1, 1), real_batch(), 3, 0.9
    vb = value_expansion_batch(problem(model), learner, real, h)
    # by hand: walk the known model under the deterministic policy, one start at a time
    expected_rows = []
    for b in range(len(real)):
        rewards, x = [real.reward[b].item()], real.next_obs[b : b + 1]
        states = [x]
        for _ in range(h):
            u = learner.act(x, deterministic=True)
            nx = x + u
            rewards.append(reward_fn(x, u, nx).item())
            x = nx
            states.append(x)
        v = learner.target_value(x).item()
        for t in range(h + 1):
            y = sum(gamma ** (k - t) * rewards[k] for k in range(t, h + 1))
            expected_rows.append((t, b, y + gamma ** (h + 1 - t) * v))
    expected = torch.zeros(h + 1, len(real))
    for t, b, y in expected_rows:
        expected[t, b] = y
    assert vb.horizon == h and len(vb.transitions) == (h + 1) * len(real)
    assert torch.allclose(vb.target_q, expected.reshape(-1), atol=1e-5)
    # row 0 is the real transition, rows of step 1 start at the real next states
    assert torch.equal(vb.transitions.obs[: len(real)], real.obs)
    assert torch.equal(vb.transitions.obs[len(real) : 2 * len(real)], real.next_obs)


def test_mve_without_td_k_trains_on_the_real_row_only():
    learner, model, real = td3(gamma=0.9), KnownModel(drift, 1, 1), real_batch()
    full = value_expansion_batch(problem(model), learner, real, 3)
    only = value_expansion_batch(problem(model), learner, real, 3, td_k=False)
    assert len(only.transitions) == len(real)
    assert torch.equal(only.transitions.obs, real.obs)
    assert torch.equal(only.transitions.act, real.act)
    # the real row keeps its (H + 1)-step target
    assert torch.allclose(only.target_q, full.target_q[: len(real)])


def test_mve_with_horizon_zero_is_the_one_step_target():
    learner, real = td3(gamma=0.9), real_batch()
    vb = value_expansion_batch(problem(KnownModel(drift, 1, 1)), learner, real, 0)
    one_step = real.reward + 0.9 * learner.target_value(real.next_obs)
    assert torch.allclose(vb.target_q, one_step)


def test_mve_drops_states_after_termination():
    learner = td3()
    nobs = torch.tensor([[0.0], [0.3], [0.6]])
    obs, act = nobs.clone(), torch.zeros(3, 1)
    real = Transitions(obs, act, nobs, torch.zeros(3), torch.zeros(3, dtype=torch.bool))
    model = KnownModel(lambda x, u: x + 0.5, 1, 1)  # ignores the action
    vb = value_expansion_batch(problem(model), learner, real, 3)
    # imagined paths: 0.0 -> 0.5 -> 1.0 -> 1.5 (ends at step 3): rows 0..3 valid;
    # 0.3 -> 0.8 -> 1.3 (ends at step 2): rows 0..2; 0.6 -> 1.1 (ends at step 1): rows 0, 1
    assert len(vb.transitions) == 4 + 3 + 2
    assert vb.transitions.obs[:, 0].tolist() == pytest.approx(
        [0.0, 0.3, 0.6, 0.0, 0.3, 0.6, 0.5, 0.8, 1.0]
    )
    # the step 0.6 -> 1.1 terminates: its target is its reward alone
    row = 5
    assert bool(vb.transitions.terminated[row])
    r = reward_fn(vb.transitions.obs[row : row + 1], vb.transitions.act[row : row + 1],
                  torch.tensor([[1.1]]))  # fmt: skip
    assert vb.target_q[row].item() == pytest.approx(r.item(), abs=1e-5)


@pytest.mark.parametrize("explore", [False, True])
def test_mve_imagines_under_the_exploration_policy_when_asked(explore):
    learner, real = td3(exploration_noise=0.3), real_batch()
    model, g = KnownModel(drift, 1, 1), torch.Generator().manual_seed(0)
    policy = "explore" if explore else "greedy"
    vb = value_expansion_batch(problem(model, generator=g), learner, real, 2, policy=policy)
    imagined = vb.transitions.obs[len(real) :], vb.transitions.act[len(real) :]
    greedy = learner.act(imagined[0], deterministic=True)
    assert torch.allclose(imagined[1], greedy) != explore


@pytest.mark.parametrize("name", ["td3", "naf"])
def test_mve_imagines_under_the_target_policy_when_asked(name):
    spec = envs.make("pendulum")
    learner = make_learner(LearnerConfig(name=name, hidden_size=16), spec, torch.device("cpu"), 0)
    # move the online policy away from the target policy
    online = learner.actor if name == "td3" else learner.net
    with torch.no_grad():
        for p in online.parameters():
            p.add_(0.5)
    g = torch.Generator().manual_seed(0)
    obs = torch.rand(6, 3, generator=g) - 0.5
    act = torch.rand(6, 1, generator=g) * 4 - 2
    real = Transitions(obs, act, obs.clone(), torch.zeros(6), torch.zeros(6, dtype=torch.bool))
    model = KnownModel(lambda x, u: x + 0.01 * u, 3, 1)
    zero = lambda o: torch.zeros(len(o), dtype=torch.bool)  # noqa: E731
    pendulum = problem(model, zero, g, spec.reward_fn, spec.action_low, spec.action_high)
    vb = value_expansion_batch(pendulum, learner, real, 2, policy="target")
    states, actions = vb.transitions.obs[len(real) :], vb.transitions.act[len(real) :]
    assert torch.allclose(actions, learner.target_act(states))
    assert not torch.allclose(actions, learner.act(states, deterministic=True), atol=1e-3)
    assert actions.abs().max() <= 2.0  # env units


def _fitted_ensemble(propagation: str):
    cfg = EnsembleConfig(
        ensemble_size=3, num_elites=2, hidden_size=16, num_layers=2, max_epochs=2,
        batch_size=16, propagation=propagation,
    )  # fmt: skip
    model = make_ensemble(cfg, envs.make("pendulum"), torch.device("cpu"), 0)
    g = torch.Generator().manual_seed(0)
    obs, act = torch.rand(64, 3, generator=g), torch.rand(64, 1, generator=g)
    nobs = obs + 0.1 * act
    model.fit(Transitions(obs, act, nobs, torch.zeros(64), torch.zeros(64, dtype=torch.bool)))
    return model, Transitions(
        obs[:8], act[:8], nobs[:8], torch.zeros(8), torch.zeros(8, dtype=bool)
    )


@pytest.mark.parametrize("propagation, same", [("expectation", True), ("ts1", False)])
def test_mve_imagines_deterministically_with_the_mean_model(propagation, same):
    model, real = _fitted_ensemble(propagation)
    learner = TD3(3, 1, [-2.0], [2.0], hidden_size=16, target_noise=0.0, seed=0)
    spec = envs.make("pendulum")
    a, b = (
        value_expansion_batch(
            problem(model, None, torch.Generator().manual_seed(s), spec.reward_fn,
                    spec.action_low, spec.action_high),
            learner, real, 3,
        )
        for s in (1, 2)
    )  # fmt: skip
    assert torch.equal(a.transitions.obs, b.transitions.obs) == same
    assert torch.equal(a.target_q, b.target_q) == same


def test_mve_detects_nan_model():
    with pytest.raises(NonFiniteModelError):
        value_expansion_batch(
            problem(KnownModel(lambda x, u: x * float("nan"), 1, 1)), td3(), real_batch(), 2
        )


def test_model_buffer_resize_keeps_newest_and_round_trips():
    buf = ModelBuffer(1, 1, 10)
    data = Transitions(
        torch.arange(8.0)[:, None],
        torch.zeros(8, 1),
        torch.zeros(8, 1),
        torch.arange(8.0),
        torch.zeros(8, dtype=torch.bool),
    )
    buf.add(data)
    buf.resize(5)
    assert buf.capacity == 5 and len(buf) == 5
    assert buf.buffer.all().reward.tolist() == [3.0, 4.0, 5.0, 6.0, 7.0]
    buf.resize(20)
    buf.add(data)
    assert len(buf) == 13
    other = ModelBuffer(1, 1, 1)
    other.load_state_dict(buf.state_dict())
    assert other.capacity == 20 and torch.equal(other.buffer.all().reward, buf.buffer.all().reward)


def marked_buffer(value: float, n: int = 50) -> ReplayBuffer:
    buf = ReplayBuffer(1, 1, 100)
    buf.add_batch(
        torch.zeros(n, 1), torch.zeros(n, 1), torch.full((n,), value), torch.zeros(n, 1),
        torch.zeros(n, dtype=torch.bool),
    )  # fmt: skip
    return buf


def test_mixed_batch_real_ratio():
    real, imagined = marked_buffer(1.0), ModelBuffer(1, 1, 100)
    imagined.buffer = marked_buffer(-1.0)
    g = torch.Generator().manual_seed(0)
    batch = mixed_batch(real, imagined, 40, 0.05, g)
    assert len(batch) == 40 and int((batch.reward == 1.0).sum()) == 2
    empty = ModelBuffer(1, 1, 10)
    assert bool((mixed_batch(real, empty, 16, 0.05, g).reward == 1.0).all())
    assert bool((mixed_batch(real, imagined, 16, 0.0, g).reward == -1.0).all())


def test_mve_target_policy_excludes_explore_and_needs_a_target_actor(tmp_path, capsys):
    sac = make_learner(LearnerConfig(name="sac", hidden_size=16), envs.make("pendulum"), "cpu", 0)
    model, real = KnownModel(drift, 1, 1), real_batch()
    with pytest.raises(TypeError, match="needs a learner with target_act"):
        value_expansion_batch(problem(model), sac, real, 2, policy="target")
    with pytest.raises(ValueError, match="valid: greedy, explore, target"):
        value_expansion_batch(problem(model), td3(), real, 2, policy="noisy")
    with pytest.raises(ConfigError, match="both set"):
        imagined_policy(MVEConfig(explore=True, target_policy=True))
    assert imagined_policy(MVEConfig(target_policy=True)) == "target"
    args = ["run", "mve", "mve.explore=true", "mve.target_policy=true", "--env", "pendulum"]
    assert cli.main([*args, "--runs-dir", str(tmp_path)]) == 2
    assert "mve.explore and mve.target_policy both set" in capsys.readouterr().err


def test_mve_defaults_to_the_mean_model_and_dyna_refuses_ts_inf():
    assert mve.Config().model.propagation == "expectation"
    assert mbpo.Config().model.propagation == "ts1"
    with pytest.raises(ConfigError, match="valid: ts1, expectation"):
        mbpo.Config(model=EnsembleConfig(propagation="ts_inf"))
