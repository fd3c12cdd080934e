"""The everyday edges of the command line: help from the config docstrings, --version,
--show-config, presets, eval, python -m mbrl, missing extras, plain progress lines."""

from __future__ import annotations

import csv
import io
import subprocess
import sys
from dataclasses import dataclass, field
from typing import Annotated, Literal

import numpy as np
import pytest
import yaml

import mbrl
from mbrl import algorithms, cli, presets
from mbrl.algorithms.common import PlainProgress, progress_bar
from mbrl.config import Range, from_dict, load_config, to_dict
from mbrl.config_help import ConfigKey, ConfigSection, config_keys, field_docs, help_text

# -- help from the field docstrings ---------------------------------------------------------------


@dataclass
class _Inner:
    """An inner section."""

    width: Annotated[int, Range(1)] = 4
    """Units per layer."""
    mode: Literal["fast", "exact"] = "fast"
    """fast or exact."""


@dataclass
class _Base:
    steps: int = 10
    """How many steps."""
    rate: float | None = None
    """A rate; None picks one."""


@dataclass
class _Child(_Base):
    steps: int = 20  # a new default, no docstring of its own: the base's text stays
    inner: _Inner = field(default_factory=lambda: _Inner(width=8))
    """The inner part."""


def test_field_docs_walk_the_bases():
    assert field_docs(_Child) == {
        "steps": "How many steps.",
        "rate": "A rate; None picks one.",
        "inner": "The inner part.",
    }


def test_config_keys_are_dotted_with_defaults_choices_and_ranges():
    items = config_keys(_Child)
    keys = {i.key: i for i in items if isinstance(i, ConfigKey)}
    assert [i.key for i in items] == ["steps", "rate", "inner", "inner.width", "inner.mode"]
    assert isinstance(items[2], ConfigSection) and items[2].doc == "The inner part."
    assert keys["steps"].default == 20 and keys["steps"].doc == "How many steps."
    assert keys["rate"].type == "float or null"
    assert keys["inner.width"].default == 8  # the parent's default_factory, not _Inner()'s
    assert keys["inner.width"].markers == ("an integer >= 1",)
    assert keys["inner.mode"].choices == ("fast", "exact")
    text = help_text(_Child)
    assert "  inner.mode: one of fast, exact = fast\n      fast or exact." in text
    assert "  rate: float or null = null" in text


@pytest.mark.parametrize("algo", sorted(algorithms.ALGORITHMS))
def test_run_help_lists_every_key_of_the_algorithm(algo, capsys):
    assert cli.main(["run", algo, "--help"]) == 0
    out = capsys.readouterr().out
    assert "--preset" in out and "--show-config" in out
    cls = algorithms.get(algo).Config
    for item in config_keys(cls):
        if isinstance(item, ConfigKey):
            assert f"\n  {item.key}: {item.type} = " in out, item.key
            for marker in item.markers:
                assert marker in out
    # every field of the algorithm's config has its documentation
    undocumented = [i.key for i in config_keys(cls) if isinstance(i, ConfigKey) and not i.doc]
    assert not undocumented, f"{algo}: fields without a docstring: {undocumented}"


def test_run_help_shows_pets_defaults_and_inherited_docs(capsys):
    assert cli.main(["run", "pets", "--help"]) == 0
    out = capsys.readouterr().out
    assert "  model.propagation: one of ts1, ts_inf, expectation = ts_inf" in out
    assert "  horizon: int = 15" in out and "Planning horizon H." in out


def test_version(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["--version"])
    assert e.value.code == 0
    assert capsys.readouterr().out.strip() == f"mbrl {mbrl.__version__}"


def test_python_dash_m_runs_the_cli():
    out = subprocess.run(
        [sys.executable, "-m", "mbrl", "--version"], capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == f"mbrl {mbrl.__version__}"


def test_show_config_prints_the_resolved_config_and_writes_nothing(tmp_path, capsys):
    argv = ["run", "pets", "--env", "pendulum", "horizon=7", "planner.name=icem"]
    assert cli.main([*argv, "--runs-dir", str(tmp_path), "--show-config"]) == 0
    shown = yaml.safe_load(capsys.readouterr().out)
    cls = algorithms.get("pets").Config
    expected = load_config(cls, None, ["env=pendulum", "horizon=7", "planner.name=icem"])
    assert shown == to_dict(expected)
    assert from_dict(cls, shown) == expected
    assert not list(tmp_path.iterdir())


# -- presets --------------------------------------------------------------------------------------


def test_presets_are_the_experiment_files():
    found = presets.presets()
    root = presets.folder()
    assert {p.name for p in found} == {p.stem for p in root.glob("*.yaml")}
    assert len(found) >= 10
    by_name = {p.name: p for p in found}
    assert by_name["gp_mpc_pendulum"].algorithm == "gp-mpc"
    assert by_name["pets_cartpole"].algorithm == "pets"
    assert all(p.summary and p.algorithm in algorithms.ALGORITHMS for p in found)


def test_presets_command_lists_name_algorithm_and_summary(capsys):
    assert cli.main(["presets"]) == 0
    lines = {ln.split()[0]: ln for ln in capsys.readouterr().out.splitlines() if ln.strip()}
    for p in presets.presets():
        assert p.name in lines and p.algorithm in lines[p.name] and p.summary in lines[p.name]


def test_preset_loads_like_its_file(tmp_path, capsys):
    path = presets.get("pets_cartpole").path
    common = ["--runs-dir", str(tmp_path), "--show-config", "trials=1"]
    assert cli.main(["run", "pets", "--preset", "pets_cartpole", *common]) == 0
    by_preset = capsys.readouterr().out
    assert cli.main(["run", "pets", "--config", str(path), *common]) == 0
    assert by_preset == capsys.readouterr().out
    assert yaml.safe_load(by_preset)["trials"] == 1


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--preset", "nope"], "unknown preset 'nope'; valid names: "),
        (["--preset", "mbpo_hopper"], "preset mbpo_hopper is for mbpo, not pets"),
        (["--preset", "pets_cartpole", "--config", "x.yaml"], "give --preset or --config"),
    ],
)
def test_bad_presets_say_what_to_do(argv, message, tmp_path, capsys):
    assert cli.main(["run", "pets", *argv, "--runs-dir", str(tmp_path)]) == 2
    assert message in capsys.readouterr().err
    assert not list(tmp_path.iterdir())


def test_algorithm_of_a_stem():
    assert presets.algorithm_of("mve_pendulum") == "mve"
    with pytest.raises(ValueError, match="does not start with an algorithm name"):
        presets.algorithm_of("bench_planning")


# -- eval -----------------------------------------------------------------------------------------

SAC_TINY = [
    "total_steps=120",
    "epoch_length=60",
    "start_steps=60",
    "eval_episodes=2",
    "learner.hidden_size=16",
    "learner.batch_size=16",
]


@pytest.fixture(scope="module")
def sac_run(tmp_path_factory):
    runs = tmp_path_factory.mktemp("runs")
    argv = ["run", "sac", "--env", "inverted-pendulum", "--runs-dir", str(runs), "--name", "s"]
    assert cli.main([*argv, *SAC_TINY]) == 0
    return runs / "s"


def test_eval_rebuilds_the_learner_of_the_checkpoint(sac_run):
    """The deterministic policy that ``mbrl eval`` loads scores what the run's own last
    evaluation scored on the same reset seeds."""
    from mbrl.evaluate import evaluate_run, load_run

    with (sac_run / "metrics.csv").open(newline="") as f:
        last = list(csv.DictReader(f))[-1]
    cfg = load_run(sac_run).cfg
    seed = 10**9 + cfg.seed * 100_003 + int(last["env_steps"])  # DynaRun.end_epoch's seeds
    result = evaluate_run(sac_run, episodes=cfg.eval_episodes, seed=seed)
    assert result.algo == "sac" and len(result.returns) == cfg.eval_episodes
    assert float(last["return"]) == pytest.approx(result.mean, rel=1e-5)
    assert (
        evaluate_run(sac_run, episodes=2, seed=3).returns
        == evaluate_run(sac_run, episodes=2, seed=3).returns
    )


def test_eval_writes_a_gif_of_the_first_episode(sac_run, tmp_path, capsys):
    imageio = pytest.importorskip("imageio.v3")
    out = tmp_path / "ep.gif"
    argv = ["eval", str(sac_run), "--episodes", "1", "--video", str(out)]
    assert cli.main(argv) == 0
    text = capsys.readouterr().out
    assert "return" in text and f"video: {out}" in text
    frames = imageio.imread(out, index=None)
    assert frames.ndim == 4 and frames.shape[0] >= 2 and frames.shape[-1] in (3, 4)


def test_eval_of_an_mpc_run_plans_on_the_loaded_model(tmp_path, capsys):
    argv = ["run", "pets", "--env", "pendulum", "--runs-dir", str(tmp_path), "--name", "p"]
    tiny = ["trials=1", "seed_steps=50", "random_episodes=0", "horizon=5", "particles=2",
            "planner.population=20", "planner.iterations=1", "model.ensemble_size=2",
            "model.hidden_size=16", "model.num_layers=2", "model.max_epochs=2"]  # fmt: skip
    assert cli.main([*argv, *tiny]) == 0
    from mbrl.control import MPCController
    from mbrl.evaluate import build_policy, evaluate_run, load_run

    loaded = load_run(tmp_path / "p")
    from mbrl import envs

    spec = envs.make(loaded.cfg.env)
    policy = build_policy(loaded, spec, "cpu", seed=0)
    assert isinstance(policy, MPCController)
    result = evaluate_run(tmp_path / "p", episodes=1, seed=0)
    assert len(result.returns) == 1 and np.isfinite(result.mean) and result.lengths == (200,)


def test_eval_of_a_gp_mpc_run(tmp_path):
    argv = ["run", "gp-mpc", "--env", "pendulum", "--runs-dir", str(tmp_path), "--name", "g"]
    tiny = ["trials=1", "horizon=5", "planner.population=20", "planner.iterations=1",
            "model.iterations=5"]  # fmt: skip
    assert cli.main([*argv, *tiny]) == 0
    from mbrl.evaluate import evaluate_run

    result = evaluate_run(tmp_path / "g", episodes=1, seed=0)
    assert result.algo == "gp-mpc" and np.isfinite(result.mean)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--video", "out.avi"], "must end in .gif or .mp4"),
        (["--episodes", "0"], "--episodes must be >= 1"),
    ],
)
def test_eval_refuses_bad_options(argv, message, sac_run, capsys):
    assert cli.main(["eval", str(sac_run), *argv]) == 2
    assert message in capsys.readouterr().err


def test_eval_of_a_folder_that_is_not_a_run(tmp_path, capsys):
    assert cli.main(["eval", str(tmp_path)]) == 2
    assert "is not a run folder" in capsys.readouterr().err


# -- missing extras -------------------------------------------------------------------------------


def test_video_without_imageio_names_the_extra(sac_run, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "imageio", None)  # import imageio now fails
    monkeypatch.delitem(sys.modules, "imageio.v2", raising=False)
    argv = ["eval", str(sac_run), "--video", str(tmp_path / "x.gif")]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert "writing a video needs imageio: pip install 'torch-mbrl[video]'" in err
    assert not (tmp_path / "x.gif").exists()


def test_gp_mpc_without_gpytorch_names_the_extra(tmp_path, monkeypatch, capsys):
    for name in ("mbrl.algorithms.gp_mpc", "mbrl.dynamics.gp"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    monkeypatch.setitem(sys.modules, "gpytorch", None)
    assert cli.main(["run", "gp-mpc", "--runs-dir", str(tmp_path)]) == 2
    assert "gp-mpc needs gpytorch: pip install 'torch-mbrl[gp]'" in capsys.readouterr().err


def test_gp_model_import_without_gpytorch_names_the_extra(monkeypatch):
    import mbrl.dynamics
    from mbrl.extras import MissingExtraError

    monkeypatch.delitem(sys.modules, "mbrl.dynamics.gp", raising=False)
    monkeypatch.setitem(sys.modules, "gpytorch", None)
    with pytest.raises(MissingExtraError, match=r"needs gpytorch: pip install 'torch-mbrl\[gp\]'"):
        mbrl.dynamics.GaussianProcessModel  # noqa: B018


# -- progress -------------------------------------------------------------------------------------


def test_plain_progress_prints_lines_at_its_interval():
    now = [0.0]
    stream = io.StringIO()
    bar = PlainProgress(100, "trial 1/3", stream=stream, every=10.0, clock=lambda: now[0])
    with bar:
        for _ in range(100):
            now[0] += 0.5
            bar.update(1)
    lines = stream.getvalue().splitlines()
    assert lines[0] == "trial 1/3: 20/100 steps (20%), 2.0 steps/s"
    assert lines[-1] == "trial 1/3: 100/100 steps (100%), 2.0 steps/s"
    assert len(lines) == 5


def test_plain_progress_is_silent_for_short_work():
    stream = io.StringIO()
    with PlainProgress(10, "x", stream=stream, every=30.0, clock=lambda: 0.0) as bar:
        bar.update(10)
    assert stream.getvalue() == ""


def test_progress_bar_is_plain_when_stderr_is_not_a_terminal(monkeypatch):
    monkeypatch.setattr(sys, "stderr", io.StringIO())
    assert isinstance(progress_bar(10, "x"), PlainProgress)
