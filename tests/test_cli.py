"""Smoke tests of the CLI entry points not covered by the algorithms' own tests."""

from __future__ import annotations

from mbrl import cli


def test_study_control_writes_table_and_plots(tmp_path, capsys):
    argv = ["study", "control", "--system", "linear", "--initial-states", "1", "--steps", "10"]
    argv += ["--methods", "lqr", "ilqr", "nmpc", "--runs-dir", str(tmp_path), "--name", "s"]
    assert cli.main(argv) == 0
    out = tmp_path / "s"
    assert (out / "results.csv").exists() and (out / "results.md").exists()
    assert list(out.glob("*.png"))
    assert "| regulate | nmpc |" in capsys.readouterr().out


def test_study_unknown_system_lists_valid_ones(capsys):
    assert cli.main(["study", "control", "--system", "pendulm"]) == 2
    assert "unknown system 'pendulm'; valid names: pendulum" in capsys.readouterr().err
