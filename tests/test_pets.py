"""PETS end to end: learning on cart-pole balance, exact resume, NaN handling, the CLI."""

from __future__ import annotations

import csv

import numpy as np
import pytest
import torch

from mbrl import cli
from mbrl.control import MPCController
from mbrl.dynamics.ensemble import ProbabilisticEnsemble

TINY = [
    "model.ensemble_size=3",
    "model.hidden_size=100",
    "model.num_layers=2",
    "particles=6",
    "horizon=15",
    "planner.population=100",
    "planner.iterations=3",
]


def _rows(path):
    with open(path / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    return [{k: v for k, v in r.items() if "seconds" not in k} for r in rows]


@pytest.mark.learning
def test_pets_learns_cartpole_balance(tmp_path, capsys):
    """A small PETS solves cart-pole balance (random actions score about 20 of 200)."""
    args = ["run", "pets", "--env", "cartpole-balance", "--runs-dir", str(tmp_path), *TINY,
            "trials=3", "stop_when_solved=1", "--name", "learn"]  # fmt: skip
    assert cli.main(args) == 0
    returns = [float(r["return"]) for r in _rows(tmp_path / "learn") if r["trial"] != "0"]
    assert max(returns) >= 190, returns
    out = capsys.readouterr().out
    assert "solved: return >= 200" in out or "not solved" in out
    assert (tmp_path / "learn" / "learning_curve.png").stat().st_size > 1000


def test_killed_run_resumes_to_the_same_numbers(tmp_path, monkeypatch):
    args = ["run", "pets", "--env", "cartpole-balance", "--runs-dir", str(tmp_path), *TINY,
            "trials=2", "seed_steps=50", "planner.population=30", "model.max_epochs=3"]  # fmt: skip
    assert cli.main([*args, "--name", "full"]) == 0
    full = _rows(tmp_path / "full")
    assert [r["trial"] for r in full][-2:] == ["1", "2"]

    from mbrl.runs import Run

    original, saves = Run.save_checkpoint, []

    def save_then_die(self, state):
        original(self, state)
        saves.append(1)
        if len(saves) == 2:  # after trial 1
            raise KeyboardInterrupt

    monkeypatch.setattr(Run, "save_checkpoint", save_then_die)
    assert cli.main([*args, "--name", "killed"]) == 130  # Ctrl-C: exit code 130
    monkeypatch.setattr(Run, "save_checkpoint", original)
    assert _rows(tmp_path / "killed")[-1]["trial"] == "1"
    assert cli.main(["resume", str(tmp_path / "killed")]) == 0
    assert _rows(tmp_path / "killed") == full
    a = torch.load(tmp_path / "full" / "checkpoint.pt", weights_only=True)["state"]["parts"]
    b = torch.load(tmp_path / "killed" / "checkpoint.pt", weights_only=True)["state"]["parts"]
    _assert_same(a["model"], b["model"])
    _assert_same(a["buffer"], b["buffer"])


def _assert_same(a, b, path="state"):
    if isinstance(a, dict):
        assert a.keys() == b.keys(), path
        for key in a:
            _assert_same(a[key], b[key], f"{path}.{key}")
    elif isinstance(a, torch.Tensor):
        assert torch.equal(a, b), path
    else:
        assert a == b, path


def test_nonfinite_model_predictions_are_counted_and_never_reach_the_env(tmp_path, monkeypatch):
    original = ProbabilisticEnsemble.rollout_step
    sent = []

    def sometimes_nan(self, state, act, generator=None):
        nxt = original(self, state, act, generator)
        bad = (act[:, 0] > 0.5)[:, None]
        return type(nxt)(obs=nxt.obs.masked_fill(bad, float("nan")), reward=nxt.reward)

    monkeypatch.setattr(ProbabilisticEnsemble, "rollout_step", sometimes_nan)
    import mbrl.algorithms.mpc_loop as loop

    real_run_episode = loop.run_episode

    def spy(env, policy, *args, **kwargs):
        if not isinstance(policy, MPCController):
            return real_run_episode(env, policy, *args, **kwargs)
        act = policy.act

        def checked(obs):
            action = act(obs)
            sent.append(action)
            return action

        policy.act = checked
        return real_run_episode(env, policy, *args, **kwargs)

    monkeypatch.setattr(loop, "run_episode", spy)
    args = ["run", "pets", "--env", "cartpole-balance", "--runs-dir", str(tmp_path), *TINY,
            "trials=1", "seed_steps=50", "--name", "nan"]  # fmt: skip
    assert cli.main(args) == 0
    rows = _rows(tmp_path / "nan")
    assert int(rows[-1]["nonfinite"]) > 0
    assert sent and np.isfinite(np.stack(sent)).all()
    assert np.stack(sent).max() <= 0.5 + 1e-6  # candidates that went NaN are never chosen


def test_cli_lists_envs(capsys):
    assert cli.main(["envs"]) == 0
    out = capsys.readouterr().out
    for name in ("cartpole-balance", "cartpole-swingup", "half-cheetah", "pendulum", "hopper"):
        assert name in out


@pytest.mark.parametrize(
    "argv, message",
    [
        (["run", "petz", "--env", "pendulum"], "unknown algorithm 'petz'; valid names: "),
        (["run", "pets", "--env", "pendulm"], "unknown env 'pendulm'; valid names: "),
        (["run", "pets", "--env", "pendulum", "horizn=3"], "unknown config key(s) horizn"),
        (["run", "pets", "--env", "pendulum", "model.hidden=3"], "valid keys: model.ensemble_size"),
        (["run", "pets", "--config", "nope.yaml"], "config file 'nope.yaml' does not exist"),
        (["resume", "runs/does-not-exist"], "is not a run folder"),
    ],
)
def test_cli_bad_input_names_the_problem(argv, message, capsys, tmp_path):
    assert cli.main([*argv, "--runs-dir", str(tmp_path)] if argv[0] == "run" else argv) == 2
    assert message in capsys.readouterr().err


def test_cli_refuses_to_overwrite_a_run(tmp_path, capsys):
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "config.yaml").write_text("{}")
    (tmp_path / "x" / "run.yaml").write_text("algo: pets\n")
    argv = ["run", "pets", "--env", "pendulum", "--runs-dir", str(tmp_path), "--name", "x"]
    assert cli.main(argv) == 2
    assert "mbrl resume" in capsys.readouterr().err


@pytest.mark.parametrize(
    "device, message",
    [("gpu", "unknown device 'gpu'; use cpu, or cuda"), ("cuda", "use --device cpu")],
)
def test_cli_bad_device_writes_no_run_folder(device, message, tmp_path, capsys):
    if device == "cuda" and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    argv = ["run", "pets", "--env", "pendulum", "--runs-dir", str(tmp_path), "--name", "d"]
    assert cli.main([*argv, "--device", device]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "d").exists()  # so the same command with a good device can run


def test_resume_refuses_a_truncated_checkpoint(tmp_path, capsys):
    args = ["run", "pets", "--env", "cartpole-balance", "--runs-dir", str(tmp_path), *TINY,
            "trials=0", "seed_steps=20", "--name", "t"]  # fmt: skip
    assert cli.main(args) == 0
    ckpt = tmp_path / "t" / "checkpoint.pt"
    ckpt.write_bytes(ckpt.read_bytes()[:100])
    assert cli.main(["resume", str(tmp_path / "t")]) == 2
    assert "corrupt or truncated" in capsys.readouterr().err


@pytest.mark.parametrize("env, ignore, blind", [("half-cheetah", True, True),
                                                ("half-cheetah", False, False),
                                                ("cartpole-balance", True, False)])  # fmt: skip
def test_pets_model_leaves_out_the_position_features(env, ignore, blind):
    from mbrl import envs
    from mbrl.algorithms import pets
    from mbrl.algorithms.factory import make_ensemble

    cfg = pets.Config(env=env, ignore_positions=ignore)
    spec = envs.make(env)
    hidden = spec.position_obs if cfg.ignore_positions else ()
    model = make_ensemble(cfg.model, spec, torch.device("cpu"), cfg.seed, hidden)
    assert bool(torch.isinf(model.in_std).any()) == blind
    assert model.ignored_obs == ((0,) if blind else ())


@pytest.mark.parametrize("features", [True, False])
def test_pets_model_reads_the_swingup_pole_angle_as_sine_and_cosine(features):
    from mbrl import envs
    from mbrl.algorithms import pets
    from mbrl.algorithms.factory import make_ensemble

    cfg = pets.Config(env="cartpole-swingup")
    cfg.model.angle_features = features
    spec = envs.make("cartpole-swingup")
    model = make_ensemble(cfg.model, spec, torch.device("cpu"), cfg.seed, ())
    assert model.angle_obs == ((1,) if features else ())
    assert model.in_dim == (7 if features else 5)


PLANNERS = [("random", "RandomShooting"), ("cem", "CEM"), ("icem", "CEM"), ("mppi", "MPPI"),
            ("ilqr", "ILQR")]  # fmt: skip


@pytest.mark.parametrize("name, kind", PLANNERS)
def test_the_factory_builds_every_planner_by_name(name, kind):
    from mbrl.algorithms.factory import PlannerConfig, make_planner

    planner = make_planner(PlannerConfig(name=name, population=32, iterations=2))
    assert type(planner).__name__ == kind
    if name == "icem":
        assert planner.noise_beta == 2.0 and planner.shift_elites
    if name == "ilqr":
        assert planner.max_iterations == 20


@pytest.mark.parametrize(
    "algo, override, message",
    [
        ("pets", "planner.name=cme", "unknown planner.name 'cme'; valid: random, cem, icem, mppi"),
        ("pets", "model.propagation=ts2", "unknown model.propagation 'ts2'; valid: ts1, ts_inf"),
        ("pets", "model.planning_dtype=fp16", "valid: float32, bfloat16"),
        ("gp-mpc", "model.kernel=rbff", "unknown model.kernel 'rbff'; valid: rbf, matern"),
        ("sac", "learner.name=ppo", "unknown learner.name 'ppo'; valid: sac, td3, ddpg, naf"),
    ],
)
def test_bad_choices_are_refused_when_the_config_loads(tmp_path, capsys, algo, override, message):
    argv = ["run", algo, override, "--env", "pendulum", "--runs-dir", str(tmp_path)]
    assert cli.main(argv) == 2
    assert message in capsys.readouterr().err
    assert not any(tmp_path.iterdir()), "a refused config leaves no run folder"


def test_pets_and_dyna_share_one_ensemble_config():
    from mbrl.algorithms import mbpo, pets
    from mbrl.algorithms.factory import EnsembleConfig

    p, m = pets.Config().model, mbpo.Config().model
    assert type(p) is EnsembleConfig and type(m) is EnsembleConfig
    assert (p.ensemble_size, p.num_layers, p.propagation, p.learns_reward) == (
        5,
        3,
        "ts_inf",
        False,
    )
    assert (m.ensemble_size, m.num_elites, m.propagation, m.learns_reward) == (7, 5, "ts1", True)
