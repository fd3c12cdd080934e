"""The Dyna-style runs: config checks at load time, divergence checks, the training loops
through the CLI (smoke, exact resume, branching, stopping imagination), plots and summaries.
The imagination parts and the schedule are tested in test_imagination.py."""

from __future__ import annotations

import math

import pytest
import torch

from mbrl import cli, envs
from mbrl.algorithms.common import Summary
from mbrl.algorithms.dyna import DivergenceError, DynaConfig, check_learner_stats
from mbrl.algorithms.factory import LearnerConfig, make_learner
from mbrl.algorithms.loop import write_learning_curves
from mbrl.plots import related_runs, summary_table
from mbrl.runs import Run

torch.set_num_threads(1)


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
    assert cli.main([*args, "--name", "killed"]) == 130  # Ctrl-C: exit code 130
    monkeypatch.setattr(Run, "save_checkpoint", original)
    assert len(_rows(tmp_path / "killed")) == 1
    assert cli.main(["resume", str(tmp_path / "killed")]) == 0
    assert _rows(tmp_path / "killed") == rows


@pytest.mark.parametrize("every", [None, 20])
def test_model_buffer_keeps_one_epoch_of_branchings(tmp_path, every):
    """The schedule (test_imagination.py) branches after each fit (every 100 steps) or, with
    rollout_every=20, every 20 steps; the buffer keeps one epoch of branchings: 8 starts x
    k=1 x 200/100 or 200/20 branchings."""
    extra = ["branch.rollout_batch_size=8"]
    extra += [f"branch.rollout_every={every}"] if every else []
    args = ["run", "mba", *TINY, *TINY_MODEL, *extra, "--env", "pendulum"]
    assert cli.main([*args, "--runs-dir", str(tmp_path), "--name", "b"]) == 0
    rows = _rows(tmp_path / "b")
    assert int(rows[-1]["model_buffer"]) == (80 if every else 16)


def test_stop_after_ends_imagination_and_keeps_the_run_before_it(tmp_path):
    """With branch.stop_after=200 (the schedule stops fitting, branching and mixing after env
    step 200, test_imagination.py) the first epoch (to env step 200) is the unstopped run's,
    number for number; after it the rollout length reads 0 and the runs part."""
    args = ["run", "mba", *TINY, *TINY_MODEL, "branch.rollout_batch_size=8", "--env", "pendulum"]
    assert cli.main([*args, "--runs-dir", str(tmp_path), "--name", "all"]) == 0
    stopped = [*args, "branch.stop_after=200"]
    assert cli.main([*stopped, "--runs-dir", str(tmp_path), "--name", "stop"]) == 0
    full, stop = _rows(tmp_path / "all"), _rows(tmp_path / "stop")
    keep = ("return", "q_loss", "model_val_loss", "rollout_length", "model_buffer")
    assert [full[0][k] for k in keep] == [stop[0][k] for k in keep]
    assert stop[1]["rollout_length"] == "0" and stop[1]["return"] != full[1]["return"]
    # no fit after step 200: the model's losses stay those of the fit at step 200
    assert stop[1]["model_val_loss"] == stop[0]["model_val_loss"]
    assert full[1]["model_val_loss"] != full[0]["model_val_loss"]


def test_uniform_branch_policy_imagines_actions_across_the_box(tmp_path):
    from mbrl.runs import load_checkpoint_file

    extra = ["branch.rollout_batch_size=256", "branch.policy=uniform"]
    args = ["run", "mba", *TINY, *TINY_MODEL, *extra, "--env", "pendulum"]
    assert cli.main([*args, "--runs-dir", str(tmp_path), "--name", "u"]) == 0
    act = load_checkpoint_file(tmp_path / "u" / "checkpoint.pt")["state"]["parts"]
    act = act["model_buffer"]["act"]
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
    state = load_checkpoint_file(tmp_path / "h" / "checkpoint.pt")["state"]["parts"]
    assert state["learner"]["actor"]["net.0.weight"].shape[1] == actor_in
    assert state["learner"]["critic"]["net.0.weight"].shape[1] == actor_in + 3
    x_std = float(state["model"]["in_std"][0])  # inf: the model's first layer never reads x
    assert math.isinf(x_std) == ignore


def test_checkpoint_record_round_trips_through_weights_only(tmp_path):
    """One function builds the checkpoint record, one reads it back: parts, generators, the
    numpy generator and the counters are restored exactly; the file loads with
    ``weights_only=True``."""
    import numpy as np

    from mbrl.algorithms import loop
    from mbrl.buffer import ReplayBuffer

    cfg = DynaConfig()
    run = Run(tmp_path / "r", cfg, tensorboard=False)
    buf = ReplayBuffer(1, 1, 10)
    buf.add_batch(torch.ones(3, 1), torch.zeros(3, 1), torch.arange(3.0), torch.ones(3, 1),
                  torch.zeros(3, dtype=torch.bool))  # fmt: skip
    gen, rng = torch.Generator().manual_seed(5), np.random.default_rng(7)
    counters = loop.Counters(
        env_steps=12, episodes=2, returns=(1.5, -2.0), fit_train_loss=1.0, fit_val_loss=0.5
    )
    ckpt = loop.checkpoint_of(counters, {"buffer": buf}, {"batches": gen}, rng)
    assert isinstance(ckpt, loop.Checkpoint) and ckpt.counters == counters
    loop.save(run, ckpt)
    torch.load(run.checkpoint_path, weights_only=True)  # nothing but plain containers
    expected_t, expected_n = torch.rand(3, generator=gen), rng.uniform(size=3)

    other, gen2, rng2 = ReplayBuffer(1, 1, 10), torch.Generator(), np.random.default_rng(0)
    got = loop.resume(Run(tmp_path / "r", cfg), {"buffer": other}, {"batches": gen2}, rng2)
    assert got == counters
    assert torch.equal(other.all().reward, buf.all().reward)
    assert torch.equal(torch.rand(3, generator=gen2), expected_t)
    assert np.array_equal(rng2.uniform(size=3), expected_n)
    from mbrl.runs import CheckpointError

    with pytest.raises(CheckpointError, match="parts it holds that this run lacks"):
        loop.resume(Run(tmp_path / "r", cfg), {}, {"batches": gen2}, rng2)
