"""Finished runs taken further: ``mbrl run --continue`` with a larger budget equals the run
started with it, the best checkpoint (``--keep-best``, ``mbrl eval --checkpoint best``), and
``mbrl resume`` of a run whose algorithm needs a missing extra."""

from __future__ import annotations

import csv
import math
import sys

import pytest
import torch
import yaml
from state_compare import assert_same

from mbrl import cli
from mbrl.algorithms import pets
from mbrl.config import ConfigError, from_dict
from mbrl.runs import BEST, BEST_RECORD, Run, load_checkpoint_file

torch.set_num_threads(1)

PETS = ["pets", "--env", "cartpole-balance", "seed_steps=30", "horizon=5", "particles=2",
        "planner.population=20", "planner.iterations=2", "model.ensemble_size=2",
        "model.hidden_size=16", "model.num_layers=2", "model.max_epochs=2"]  # fmt: skip
# reacher episodes are 50 steps: every epoch ends an episode, so a checkpoint loses nothing
SAC = ["sac", "--env", "reacher", "start_steps=50", "epoch_length=50", "eval_episodes=1",
       "learner.hidden_size=16", "learner.batch_size=16"]  # fmt: skip


def _rows(path):
    """metrics.csv without the timing columns (wall, fit, plan and checkpoint seconds)."""
    with open(path / "metrics.csv", newline="") as f:
        return [{k: v for k, v in r.items() if "seconds" not in k} for r in csv.DictReader(f)]


def _state(file):
    payload = load_checkpoint_file(file)
    payload["state"]["counters"].pop("wall_seconds")
    return payload


def _run(tmp_path, name, argv, *extra):
    assert cli.main(["run", *argv, "--runs-dir", str(tmp_path), "--name", name, *extra]) == 0
    return tmp_path / name


@pytest.fixture(scope="module")
def pets_runs(tmp_path_factory):
    """A PETS run of 1 trial continued to 2, and the run started with 2 (both --keep-best)."""
    tmp = tmp_path_factory.mktemp("pets")
    short = _run(tmp, "short", PETS, "trials=1", "--keep-best")
    assert cli.main(["run", "--continue", str(short), "trials=2"]) == 0
    full = _run(tmp, "full", PETS, "trials=2", "--keep-best")
    return short, full


def test_continued_pets_run_equals_the_run_started_with_more_trials(pets_runs):
    short, full = pets_runs
    assert len(_rows(full)) == 4  # 2 random episodes, 2 trials
    assert _rows(short) == _rows(full)
    a, b = _state(short / "checkpoint.pt"), _state(full / "checkpoint.pt")
    assert a["config_hash"] == b["config_hash"]  # the continued run writes under the new config
    assert_same(a["state"], b["state"])
    assert (short / "config.yaml").read_text() == (full / "config.yaml").read_text()
    earlier = yaml.safe_load((short / "config.1.yaml").read_text())
    assert earlier["trials"] == 1 and {**earlier, "trials": 2} == yaml.safe_load(
        (full / "config.yaml").read_text()
    )
    assert yaml.safe_load((short / BEST_RECORD).read_text()) == yaml.safe_load(
        (full / BEST_RECORD).read_text()
    )


def test_a_checkpoint_from_before_the_continue_is_still_accepted(pets_runs, tmp_path):
    """Resuming the continued run from the checkpoint written under trials=1 (its digest is
    that of config.1.yaml) replays trial 2 exactly."""
    short, full = pets_runs
    copy = tmp_path / "short"
    import shutil

    shutil.copytree(short, copy)
    first = min(int(p.stem.split("-")[1]) for p in copy.glob("checkpoint-[0-9]*.pt"))
    old = load_checkpoint_file(copy / f"checkpoint-{first}.pt")
    assert old["state"]["counters"]["trial"] == 1
    assert cli.main(["resume", str(copy), "--from", f"checkpoint-{first}.pt"]) == 0
    assert _rows(copy) == _rows(full)


def test_continued_sac_run_equals_the_run_started_with_more_steps(tmp_path):
    short = _run(tmp_path, "short", SAC, "total_steps=100")
    assert cli.main(["run", "sac", "--continue", str(short), "total_steps=150"]) == 0
    full = _run(tmp_path, "full", SAC, "total_steps=150")
    assert [r["env_steps"] for r in _rows(full)] == ["50", "100", "150"]
    assert _rows(short) == _rows(full)
    assert_same(_state(short / "checkpoint.pt")["state"], _state(full / "checkpoint.pt")["state"])


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A finished 1-trial PETS run (the refusals below must leave it as it is)."""
    tmp = tmp_path_factory.mktemp("finished")
    return _run(tmp, "p", PETS, "trials=1")


@pytest.mark.parametrize(
    "argv, message",
    [
        (["horizon=7"], "--continue changes only the run's budget (trials, stop_when_solved), "
         "not horizon"),
        (["planner.population=5"], "not planner.population"),
        (["trials=0"], "trials=0 is below the run's trials=1: --continue extends a run"),
        ([], "needs the larger budget: trials or stop_when_solved, e.g. "),
        (["--env", "pendulum", "trials=2"], "drop --env"),
        (["--keep-best", "trials=2"], "drop --keep-best"),
        (["trials=many"], "trials"),
    ],
)  # fmt: skip
def test_continue_refuses_anything_but_a_larger_budget(finished, argv, message, capsys):
    before = {p.name: p.read_bytes() for p in finished.iterdir() if p.is_file()}
    assert cli.main(["run", "--continue", str(finished), *argv]) == 2
    assert message in capsys.readouterr().err
    after = {p.name: p.read_bytes() for p in finished.iterdir() if p.is_file()}
    assert after == before


def test_continue_names_the_run_s_own_algorithm_and_budget(finished, tmp_path, capsys):
    assert cli.main(["run", "sac", "--continue", str(finished), "trials=2"]) == 2
    assert "is a pets run, not sac: `mbrl run pets --continue`" in capsys.readouterr().err
    sac = _run(tmp_path, "s", SAC, "total_steps=100")
    assert cli.main(["run", "--continue", str(sac), "trials=2"]) == 2
    assert "only the run's budget (total_steps), not trials" in capsys.readouterr().err


def test_continue_show_config_prints_the_new_config_and_touches_nothing(finished, capsys):
    before = (finished / "config.yaml").read_text()
    assert cli.main(["run", "--continue", str(finished), "trials=3", "--show-config"]) == 0
    assert yaml.safe_load(capsys.readouterr().out)["trials"] == 3
    assert (finished / "config.yaml").read_text() == before
    assert not (finished / "config.1.yaml").exists()


def test_run_extend_budget_refuses_another_key_by_its_dotted_name(tmp_path):
    cfg = pets.Config(env="pendulum", trials=1)
    Run(tmp_path / "r", cfg, {"algo": "pets"}, tensorboard=False).close()
    other = from_dict(pets.Config, {"env": "pendulum", "trials": 2, "planner": {"population": 9}})
    with pytest.raises(ConfigError, match=r"planner\.population=9 differs from"):
        Run(tmp_path / "r", other, tensorboard=False, extend_budget=("trials",))
    assert not (tmp_path / "r" / "config.1.yaml").exists()
    more = pets.Config(env="pendulum", trials=3)
    for _ in range(2):  # the same config again records nothing more
        Run(tmp_path / "r", more, tensorboard=False, extend_budget=("trials",)).close()
    assert sorted(p.name for p in (tmp_path / "r").glob("config*.yaml")) == [
        "config.1.yaml",
        "config.yaml",
    ]


# -- the best checkpoint ---------------------------------------------------------------------------


def _logged(run, returns):
    """Log a row and write a checkpoint for each return; the checkpoint holds the return."""
    for r in returns:
        run.log(**{"return": r})
        run.save_checkpoint({"ret": torch.tensor(float(r))})


def _best(path):
    return float(load_checkpoint_file(path / BEST)["state"]["ret"])


def test_best_checkpoint_follows_the_best_return_so_far(tmp_path):
    cfg = pets.Config(env="pendulum")
    run = Run(tmp_path / "r", cfg, {"algo": "pets"}, tensorboard=False, keep_best="return")
    _logged(run, [1.0, 3.0, 2.0, float("nan"), 3.0])
    record = run.best_record()
    assert record == {
        "checkpoint": "checkpoint-2.pt",
        "sequence": 2,
        "column": "return",
        "value": 3.0,
        "metrics_row": 2,
    }
    assert _best(tmp_path / "r") == 3.0  # a tie does not replace it, nor does NaN
    _logged(run, [5.0])
    assert run.best_record()["sequence"] == 6 and _best(tmp_path / "r") == 5.0
    assert not (tmp_path / "r" / "checkpoint-2.pt").exists()  # pruned; the best stays
    run.close()


def test_resume_from_before_the_best_drops_it_and_judges_against_the_best_before(tmp_path):
    cfg = pets.Config(env="pendulum")
    kw = {"tensorboard": False, "keep_best": "return", "keep_checkpoints": 10}
    run = Run(tmp_path / "r", cfg, {"algo": "pets"}, **kw)
    _logged(run, [1.0, 3.0, 2.0, 5.0])
    run.close()
    run = Run(tmp_path / "r", cfg, resume_from="checkpoint-3.pt", **kw)
    run.load_checkpoint()
    assert run.best_record()["sequence"] == 2 and _best(tmp_path / "r") == 3.0
    _logged(run, [2.5])  # below the best before the resumed checkpoint: not the best
    assert run.best_record()["sequence"] == 2
    _logged(run, [4.0])
    assert run.best_record()["sequence"] == 5 and _best(tmp_path / "r") == 4.0
    run.close()


def test_a_best_link_lost_in_a_kill_is_made_again_on_resume(tmp_path):
    cfg = pets.Config(env="pendulum")
    kw = {"tensorboard": False, "keep_best": "return"}
    run = Run(tmp_path / "r", cfg, {"algo": "pets"}, **kw)
    _logged(run, [1.0, 3.0])
    run.close()
    (tmp_path / "r" / BEST).unlink()  # killed after checkpoint.pt, before checkpoint-best.pt
    run = Run(tmp_path / "r", cfg, **kw)
    run.load_checkpoint()
    assert _best(tmp_path / "r") == 3.0 and run.best_record()["sequence"] == 2
    run.close()


def test_eval_plays_the_best_checkpoint(pets_runs, capsys):
    from mbrl.evaluate import evaluate_run, load_run

    short, _ = pets_runs
    record = yaml.safe_load((short / BEST_RECORD).read_text())
    with open(short / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert record["value"] == max(float(r["return"]) for r in rows[2:])  # the trials
    loaded = load_run(short, "best")
    assert loaded.checkpoint == short / BEST and "model" in loaded.parts
    result = evaluate_run(short, episodes=1, checkpoint="best")
    assert result.checkpoint == BEST and math.isfinite(result.mean)
    assert cli.main(["eval", str(short), "--checkpoint", "best", "--episodes", "1"]) == 0
    assert f"({short / BEST})" in capsys.readouterr().out


def test_eval_best_of_a_run_without_one_says_how(finished, capsys):
    assert cli.main(["eval", str(finished), "--checkpoint", "best"]) == 2
    err = capsys.readouterr().err
    assert f"has no {BEST} (the run was not started with `mbrl run --keep-best`" in err
    assert cli.main(["eval", str(finished), "--checkpoint", "checkpoint-99.pt"]) == 2
    assert "give latest, best or a kept checkpoint" in capsys.readouterr().err


# -- resume without an extra ---------------------------------------------------------------------


def test_resume_of_a_gp_mpc_run_without_gpytorch_names_the_extra(tmp_path, monkeypatch, capsys):
    folder = tmp_path / "g"
    folder.mkdir()
    (folder / "run.yaml").write_text("algo: gp-mpc\ndevice: cpu\n")
    (folder / "config.yaml").write_text("env: pendulum\n")
    for name in ("mbrl.algorithms.gp_mpc", "mbrl.dynamics.gp"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    monkeypatch.setitem(sys.modules, "gpytorch", None)
    assert cli.main(["resume", str(folder)]) == 2
    assert "gp-mpc needs gpytorch: pip install 'torch-mbrl[gp]'" in capsys.readouterr().err
    assert cli.main(["run", "--continue", str(folder), "trials=3"]) == 2
    assert "gp-mpc needs gpytorch: pip install 'torch-mbrl[gp]'" in capsys.readouterr().err
