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


def test_envs_lists_discrete_action_counts(capsys):
    """`mbrl envs` shows the number of actions of a discrete task and "box" for the others."""
    from mbrl.cli import main

    assert main(["envs"]) == 0
    lines = {line.split()[0]: line for line in capsys.readouterr().out.splitlines()}
    assert " A=2 " in lines["CartPole-v1"] and " A=3 " in lines["Acrobot-v1"]
    assert " box " in lines["pendulum"]


def test_output_into_a_closed_pipe_stops_quietly():
    """`mbrl run pets --help | head -1`: no error message, no traceback, exit 141 as cat."""
    import os
    import subprocess
    import sys

    read, write = os.pipe()
    os.close(read)  # the reader has left before anything is written
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "mbrl", "run", "pets", "--help"],
            stdout=write,
            stderr=subprocess.PIPE,
        )
    finally:
        os.close(write)
    assert proc.returncode == 141
    assert proc.stderr.decode() == ""
