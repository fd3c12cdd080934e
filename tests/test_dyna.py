"""Dyna-style parts: rollout schedule, branched rollouts, model buffer, mixed batches, value
expansion targets, divergence checks, and the training loop (CLI smoke and exact resume)."""

from __future__ import annotations

import math

import pytest
import torch

from mbrl import cli, envs
from mbrl.algorithms import mbpo, mve
from mbrl.algorithms.common import Summary
from mbrl.buffer import ReplayBuffer
from mbrl.config import ConfigError
from mbrl.dyna import (
    DivergenceError,
    DynaConfig,
    LearnerConfig,
    ModelBuffer,
    ModelConfig,
    MVEConfig,
    NonFiniteModelError,
    branched_rollout,
    check_learner_stats,
    imagined_policy,
    make_learner,
    make_model,
    mixed_batch,
    rollout_length,
    value_expansion_batch,
    value_expansion_targets,
    write_learning_curves,
)
from mbrl.dynamics.base import Transitions
from mbrl.dynamics.known import KnownModel
from mbrl.learners import TD3
from mbrl.plots import related_runs, summary_table
from mbrl.runs import Run

torch.set_num_threads(1)


def drift(x: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """``x' = x + u`` (X = U = 1)."""
    return x + u


def reward_fn(obs, act, next_obs):
    return -(next_obs[:, 0] ** 2) - 0.1 * act[:, 0] ** 2


def beyond_one(next_obs):
    return next_obs[:, 0].abs() > 1.0


def test_rollout_length_schedule_hopper():
    # MBPO Hopper: [20, 100, 1, 15]
    got = [rollout_length(e, 20, 100, 1, 15) for e in (0, 20, 40, 60, 99, 100, 300)]
    assert got == [1, 1, 4, 8, 14, 15, 15]
    assert rollout_length(5, 1, 15, 1, 1) == 1
    assert rollout_length(3, 5, 5, 1, 7) == 1 and rollout_length(5, 5, 5, 1, 7) == 7


def test_branched_rollouts_stop_at_termination():
    model = KnownModel(drift, 1, 1)
    starts = torch.tensor([[0.0], [0.5], [0.95]])
    ro = branched_rollout(
        model, lambda o: torch.full_like(o, 0.2), starts, 10, reward_fn, beyond_one, None
    )
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
        RewardModel(drift, 1, 1),
        lambda o: torch.zeros_like(o),
        torch.zeros(4, 1),
        3,
        reward_fn,
        beyond_one,
        None,
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
        branched_rollout(
            model, lambda o: torch.full_like(o, 0.2), starts, 5, reward_fn, beyond_one, None
        )


def test_nan_in_a_terminated_rollout_is_ignored():
    # Rollouts that terminated earlier no longer count: NaN after termination is harmless.
    def step(x, u):
        nx = x + u
        return torch.where(x > 1.0, torch.full_like(nx, float("nan")), nx)

    ro = branched_rollout(
        KnownModel(step, 1, 1),
        lambda o: torch.full_like(o, 0.6),
        torch.tensor([[0.0], [0.9]]),
        3,
        reward_fn,
        beyond_one,
        None,
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
    vb = value_expansion_batch(model, learner, real, h, reward_fn, beyond_one, None)
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
    full = value_expansion_batch(model, learner, real, 3, reward_fn, beyond_one, None)
    only = value_expansion_batch(model, learner, real, 3, reward_fn, beyond_one, None, td_k=False)
    assert len(only.transitions) == len(real)
    assert torch.equal(only.transitions.obs, real.obs)
    assert torch.equal(only.transitions.act, real.act)
    # the real row keeps its (H + 1)-step target
    assert torch.allclose(only.target_q, full.target_q[: len(real)])


def test_mve_with_horizon_zero_is_the_one_step_target():
    learner, real = td3(gamma=0.9), real_batch()
    vb = value_expansion_batch(
        KnownModel(drift, 1, 1), learner, real, 0, reward_fn, beyond_one, None
    )
    one_step = real.reward + 0.9 * learner.target_value(real.next_obs)
    assert torch.allclose(vb.target_q, one_step)


def test_mve_drops_states_after_termination():
    learner = td3()
    nobs = torch.tensor([[0.0], [0.3], [0.6]])
    obs, act = nobs.clone(), torch.zeros(3, 1)
    real = Transitions(obs, act, nobs, torch.zeros(3), torch.zeros(3, dtype=torch.bool))
    model = KnownModel(lambda x, u: x + 0.5, 1, 1)  # ignores the action
    vb = value_expansion_batch(model, learner, real, 3, reward_fn, beyond_one, None)
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
    vb = value_expansion_batch(model, learner, real, 2, reward_fn, beyond_one, g, policy=policy)
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
    vb = value_expansion_batch(model, learner, real, 2, spec.reward_fn, zero, g, policy="target")
    states, actions = vb.transitions.obs[len(real) :], vb.transitions.act[len(real) :]
    assert torch.allclose(actions, learner.target_act(states))
    assert not torch.allclose(actions, learner.act(states, deterministic=True), atol=1e-3)
    assert actions.abs().max() <= 2.0  # env units


def test_mve_target_policy_excludes_explore_and_needs_a_target_actor(tmp_path, capsys):
    sac = make_learner(LearnerConfig(name="sac", hidden_size=16), envs.make("pendulum"), "cpu", 0)
    model, real = KnownModel(drift, 1, 1), real_batch()
    with pytest.raises(TypeError, match="needs a learner with target_act"):
        value_expansion_batch(model, sac, real, 2, reward_fn, beyond_one, None, policy="target")
    with pytest.raises(ValueError, match="valid: greedy, explore, target"):
        value_expansion_batch(model, td3(), real, 2, reward_fn, beyond_one, None, policy="noisy")
    with pytest.raises(ConfigError, match="both set"):
        imagined_policy(MVEConfig(explore=True, target_policy=True))
    assert imagined_policy(MVEConfig(target_policy=True)) == "target"
    args = ["run", "mve", "mve.explore=true", "mve.target_policy=true", "--env", "pendulum"]
    assert cli.main([*args, "--runs-dir", str(tmp_path)]) == 2
    assert "mve.explore and mve.target_policy both set" in capsys.readouterr().err


def _fitted_ensemble(propagation: str):
    cfg = ModelConfig(
        ensemble_size=3, num_elites=2, hidden_size=16, num_layers=2, max_epochs=2,
        batch_size=16, propagation=propagation,
    )  # fmt: skip
    model = make_model(cfg, envs.make("pendulum"), torch.device("cpu"), 0)
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
    a, b = (
        value_expansion_batch(
            model, learner, real, 3, envs.make("pendulum").reward_fn,
            lambda o: torch.zeros(len(o), dtype=torch.bool), torch.Generator().manual_seed(s),
        )
        for s in (1, 2)
    )  # fmt: skip
    assert torch.equal(a.transitions.obs, b.transitions.obs) == same
    assert torch.equal(a.target_q, b.target_q) == same


def test_mve_defaults_to_the_mean_model_and_dyna_refuses_ts_inf():
    assert mve.Config().model.propagation == "expectation"
    assert mbpo.Config().model.propagation == "ts1"
    with pytest.raises(ConfigError, match="valid: ts1, expectation"):
        make_model(ModelConfig(propagation="ts_inf"), envs.make("pendulum"), "cpu", 0)


def test_mve_detects_nan_model():
    with pytest.raises(NonFiniteModelError):
        value_expansion_batch(
            KnownModel(lambda x, u: x * float("nan"), 1, 1),
            td3(),
            real_batch(),
            2,
            reward_fn,
            beyond_one,
            None,
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


def test_divergence_is_detected():
    check_learner_stats({"q_loss": 1.0, "q_abs_max": 10.0, "actor_loss": math.nan}, 1e6)
    with pytest.raises(DivergenceError, match="q_abs_max=2e\\+06"):
        check_learner_stats({"q_loss": 1.0, "q_abs_max": 2e6}, 1e6)
    with pytest.raises(DivergenceError, match="q_loss=nan"):
        check_learner_stats({"q_loss": math.nan, "q_abs_max": 1.0}, 1e6)


# ----- the training loop through the CLI

TINY = [
    "total_steps=400",
    "epoch_length=200",  # = the pendulum's episode length: checkpoints fall on episode ends
    "start_steps=100",
    "eval_episodes=1",
    "updates_per_step=1",
    "learner.hidden_size=16",
    "learner.batch_size=32",
]
TINY_MODEL = [
    "model.ensemble_size=3",
    "model.num_elites=2",
    "model.hidden_size=16",
    "model.num_layers=2",
    "model.max_epochs=2",
    "model.batch_size=32",
    "model.train_every=100",
]


def _rows(path):
    import csv

    with open(path / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    return [{k: v for k, v in r.items() if not k.endswith("seconds")} for r in rows]


@pytest.mark.parametrize(
    "algo, extra",
    [
        ("td3", []),
        ("mbpo", [*TINY_MODEL, "branch.rollout_batch_size=64", "branch.max_length=2",
                  "branch.min_epoch=0", "branch.max_epoch=2"]),
        ("mve", [*TINY_MODEL, "mve.horizon=2"]),
    ],
)  # fmt: skip
def test_cli_run_and_exact_resume(tmp_path, monkeypatch, algo, extra):
    args = ["run", algo, *TINY, *extra, "--env", "pendulum", "--runs-dir", str(tmp_path)]
    assert cli.main([*args, "--name", "full"]) == 0
    full = tmp_path / "full"
    assert (full / "learning_curve.png").exists() and (full / "checkpoint.pt").exists()
    rows = _rows(full)
    assert [r["env_steps"] for r in rows] == ["200", "400"]
    assert float(rows[-1]["updates"]) == 200 and math.isfinite(float(rows[-1]["q_loss"]))
    if algo == "mbpo":
        assert rows[-1]["rollout_length"] == "2" and int(rows[-1]["model_buffer"]) > 0

    # kill a second run right after its first checkpoint, then resume it
    from mbrl.runs import Run

    original = Run.save_checkpoint

    def save_then_die(self, state):
        original(self, state)
        raise KeyboardInterrupt

    monkeypatch.setattr(Run, "save_checkpoint", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        cli.main([*args, "--name", "killed"])
    monkeypatch.setattr(Run, "save_checkpoint", original)
    assert len(_rows(tmp_path / "killed")) == 1
    assert cli.main(["resume", str(tmp_path / "killed")]) == 0
    assert _rows(tmp_path / "killed") == rows


@pytest.mark.parametrize("every, calls", [(None, 4), (20, 16)])
def test_branching_follows_rollout_every(tmp_path, monkeypatch, every, calls):
    """Without rollout_every the model buffer is refilled after each of the 4 fits (env steps
    100 to 400); with it, every 20 steps from the first fit on (100, 120, ..., 400). The buffer
    keeps one epoch of branchings: 8 starts x k=1 x 200/100 or 200/20 branchings."""
    from mbrl import dyna

    steps = []
    original = dyna.branched_rollout

    def counting(model, act_fn, start_obs, *args, **kwargs):
        steps.append(len(start_obs))
        return original(model, act_fn, start_obs, *args, **kwargs)

    monkeypatch.setattr(dyna, "branched_rollout", counting)
    extra = ["branch.rollout_batch_size=8"]
    extra += [f"branch.rollout_every={every}"] if every else []
    args = ["run", "mba", *TINY, *TINY_MODEL, *extra, "--env", "pendulum"]
    assert cli.main([*args, "--runs-dir", str(tmp_path), "--name", "b"]) == 0
    assert steps == [8] * calls
    rows = _rows(tmp_path / "b")
    assert int(rows[-1]["model_buffer"]) == (80 if every else 16)


def test_stop_after_ends_imagination_and_keeps_the_run_before_it(tmp_path, monkeypatch):
    """With branch.stop_after=200 the model is fitted and branched at env steps 100 and 200
    only (against 100 to 400 without it), later batches are all real, and the first epoch (to
    env step 200) is the unstopped run's, number for number."""
    from mbrl import dyna
    from mbrl.dynamics.ensemble import ProbabilisticEnsemble

    calls = {"fit": 0, "branch": 0}
    original, original_fit = dyna.branched_rollout, ProbabilisticEnsemble.fit

    def counting(*args, **kwargs):
        calls["branch"] += 1
        return original(*args, **kwargs)

    def counting_fit(self, *args, **kwargs):
        calls["fit"] += 1
        return original_fit(self, *args, **kwargs)

    monkeypatch.setattr(dyna, "branched_rollout", counting)
    monkeypatch.setattr(ProbabilisticEnsemble, "fit", counting_fit)
    mixes = []
    original_mix = dyna.mixed_batch

    def recording(real, imagined, *args, **kwargs):
        mixes.append(imagined is not None)
        return original_mix(real, imagined, *args, **kwargs)

    monkeypatch.setattr(dyna, "mixed_batch", recording)
    args = ["run", "mba", *TINY, *TINY_MODEL, "branch.rollout_batch_size=8", "--env", "pendulum"]
    assert cli.main([*args, "--runs-dir", str(tmp_path), "--name", "all"]) == 0
    assert calls == {"fit": 4, "branch": 4} and all(mixes)
    calls.update(fit=0, branch=0)
    mixes.clear()
    stopped = [*args, "branch.stop_after=200"]
    assert cli.main([*stopped, "--runs-dir", str(tmp_path), "--name", "stop"]) == 0
    assert calls == {"fit": 2, "branch": 2}
    # one update per env step 100 ... 400; the first 101 (to step 200) mix in imagined data
    assert len(mixes) == 301 and all(mixes[:101]) and not any(mixes[101:])
    full, stop = _rows(tmp_path / "all"), _rows(tmp_path / "stop")
    keep = ("return", "q_loss", "model_val_loss", "rollout_length", "model_buffer")
    assert [full[0][k] for k in keep] == [stop[0][k] for k in keep]
    assert stop[1]["rollout_length"] == "0" and stop[1]["return"] != full[1]["return"]


def test_uniform_branch_policy_imagines_actions_across_the_box(tmp_path):
    from mbrl.runs import load_checkpoint_file

    extra = ["branch.rollout_batch_size=256", "branch.policy=uniform"]
    args = ["run", "mba", *TINY, *TINY_MODEL, *extra, "--env", "pendulum"]
    assert cli.main([*args, "--runs-dir", str(tmp_path), "--name", "u"]) == 0
    act = load_checkpoint_file(tmp_path / "u" / "checkpoint.pt")["state"]["model_buffer"]["act"]
    assert act.shape == (512, 1)  # one epoch: two fits of 256 one-step rollouts
    assert -2 <= act.min() < -1.9 and 1.9 < act.max() <= 2  # Pendulum's torque box [-2, 2]
    assert abs(act.std() - 4 / 12**0.5) < 0.1  # the std of U(-2, 2)


@pytest.mark.parametrize(
    "override, message",
    [
        ("branch.rollout_every=0", "branch.rollout_every=0: branch every n >= 1 env steps"),
        ("branch.policy=greedy", "unknown branch.policy 'greedy'; valid: explore, uniform"),
        ("model.train_every=0", "model.train_every=0: refit the model every n >= 1 env steps"),
        ("branch.stop_after=100", "branch.stop_after=100 is not after start_steps=100"),
    ],
)
def test_bad_branch_settings_are_named(tmp_path, capsys, override, message):
    args = ["run", "mba", *TINY, *TINY_MODEL, override, "--env", "pendulum"]
    assert cli.main([*args, "--runs-dir", str(tmp_path)]) == 2
    assert message in capsys.readouterr().err
    assert not any(tmp_path.iterdir()), "a refused config leaves no run folder"


def test_nan_model_stops_the_run_after_a_checkpoint(tmp_path, monkeypatch, capsys):
    from mbrl.dynamics.ensemble import ProbabilisticEnsemble

    def nan_step(self, state, act, generator=None):
        return type(state)(obs=state.obs * float("nan"), reward=torch.zeros(len(state.obs)))

    monkeypatch.setattr(ProbabilisticEnsemble, "rollout_step", nan_step)
    args = ["run", "mbpo", *TINY, *TINY_MODEL, "branch.rollout_batch_size=16"]
    code = cli.main([*args, "--env", "pendulum", "--runs-dir", str(tmp_path), "--name", "nan"])
    assert code == 2
    assert "the model produced NaN/inf" in capsys.readouterr().err
    assert (tmp_path / "nan" / "checkpoint.pt").exists()


def test_unknown_learner_for_an_algorithm_is_named(tmp_path, capsys):
    args = ["run", "sac", "learner.name=td3", "--env", "pendulum", "--runs-dir", str(tmp_path)]
    assert cli.main(args) == 2
    assert "SAC does not run learner.name='td3'; valid: sac" in capsys.readouterr().err
    assert not any(tmp_path.iterdir()), "a refused config leaves no run folder"


def test_naf_diag_floor_comes_from_the_config(tmp_path, capsys):
    spec = envs.make("pendulum")
    naf = make_learner(LearnerConfig(name="naf", diag_floor=0.3), spec, torch.device("cpu"), 0)
    assert naf.diag_floor == 0.3
    args = ["run", "naf", "learner.diag_floor=0", "--env", "pendulum", "--runs-dir", str(tmp_path)]
    assert cli.main(args) == 2
    assert "diag_floor must be > 0" in capsys.readouterr().err


def _fake_run(root, name, algo, learner, seed=0, env="pendulum", returns=(-1000.0, -500.0)):
    cfg = DynaConfig(env=env, seed=seed, learner=LearnerConfig(name=learner))
    run = Run(root / name, cfg, {"algo": algo, "device": "cpu"}, tensorboard=False)
    for i, r in enumerate(returns):
        run.log(env_steps=1000 * (i + 1), **{"return": r})
    return run


def test_baseline_curves_share_the_axes_of_the_model_based_run(tmp_path):
    sac = _fake_run(tmp_path, "sac", "sac", "sac")
    mbpo = _fake_run(tmp_path, "mbpo", "mbpo", "sac", returns=(-900.0, -200.0))
    _fake_run(tmp_path, "mbpo-seed1", "mbpo", "sac", seed=1)  # another seed: not a baseline
    _fake_run(tmp_path, "mve", "mve", "td3")  # another learner: not a baseline
    _fake_run(tmp_path, "sac-hopper", "sac", "sac", env="hopper")  # another env
    assert related_runs(mbpo.path) == [("sac", sac.path)]
    assert related_runs(sac.path) == [("mbpo", mbpo.path)]

    pngs = write_learning_curves(mbpo, "MBPO", 0, "pendulum", -200.0)
    assert pngs == [mbpo.path / "learning_curve.png", sac.path / "learning_curve.png"]
    assert all(p.stat().st_size > 1000 for p in pngs)


def test_cli_plot_groups_seeds_and_prints_their_table(tmp_path, capsys):
    runs = [_fake_run(tmp_path, f"td3-{s}", "td3", "td3", seed=s).path for s in range(2)]
    out = tmp_path / "cmp.png"
    assert cli.main(["plot", *map(str, runs), "--out", str(out)]) == 0
    assert out.stat().st_size > 1000
    assert cli.main(["plot", *map(str, runs), "--out", str(out), "--threshold", "-600"]) == 0
    table = capsys.readouterr().out
    assert "| TD3 | 2 | 2000 | -750 (-750, -750) | -500 (-500, -500) | 2000, 2000 |" in table


def test_summary_table_by_hand(tmp_path):
    a = _fake_run(tmp_path, "a", "td3", "td3", returns=(-900.0, -300.0, -100.0)).path
    b = _fake_run(tmp_path, "b", "td3", "td3", seed=1, returns=(-500.0, -700.0, -600.0)).path
    c = _fake_run(tmp_path, "c", "mve", "td3", returns=(-800.0, -200.0)).path
    table = summary_table(
        {"TD3": [a / "metrics.csv", b / "metrics.csv"], "MVE": [c / "metrics.csv"]}, threshold=-250
    )
    lines = table.splitlines()
    assert lines[0] == (
        "| group | runs | env_steps up to | mean return over the curve | last return |"
        " first env_steps with return >= -250 |"
    )
    # TD3: run a averages -433.3, run b -600; last -100 and -600; a first reaches -250 at 3000
    assert (
        lines[2] == "| TD3 | 2 | 3000 | -516.7 (-433.3, -600) | -350 (-100, -600) | 3000, never |"
    )
    assert lines[3] == "| MVE | 1 | 2000 | -500 | -200 | 2000 |"


def test_cli_plot_names_a_folder_without_metrics(tmp_path, capsys):
    out = tmp_path / "cmp.png"
    assert cli.main(["plot", str(tmp_path / "nope"), "--out", str(out)]) == 2
    assert "has no metrics.csv" in capsys.readouterr().err


def test_dyna_summary_counts_evaluations_not_trials():
    text = Summary.from_returns([-900.0, -150.0], -200, 3.0, unit="evaluation").text("NAF")
    assert "returns per evaluation [-900.0, -150.0]" in text
    assert "first at evaluation 2" in text


@pytest.mark.parametrize("ignore, actor_in", [(True, 11), (False, 12)])
def test_learner_and_model_leave_out_hoppers_x(tmp_path, ignore, actor_in):
    """``ignore_positions`` (default on) hides Hopper's x, ``EnvSpec.position_obs``, from the
    SAC networks and the model inputs, through the CLI and into the checkpoint."""
    from mbrl.runs import load_checkpoint_file

    args = ["run", "mbpo", *TINY, *TINY_MODEL, "branch.rollout_batch_size=16",
            f"ignore_positions={str(ignore).lower()}", "--env", "hopper",
            "--runs-dir", str(tmp_path), "--name", "h"]  # fmt: skip
    assert cli.main(args) == 0
    state = load_checkpoint_file(tmp_path / "h" / "checkpoint.pt")["state"]
    assert state["learner"]["actor"]["net.0.weight"].shape[1] == actor_in
    assert state["learner"]["critic"]["net.0.weight"].shape[1] == actor_in + 3
    x_std = float(state["model"]["in_std"][0])  # inf: the model's first layer never reads x
    assert math.isinf(x_std) == ignore
