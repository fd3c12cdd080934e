"""Killed at any moment, resumed to the end, a run equals the run that was never interrupted.

Each seed takes one place in the run in turn (an env episode or step, a model fit, a learner
update, a metrics row, the serialisation or a rename of a checkpoint, the link of
``checkpoint.pt``) and a call of it at random, kills the run there in-process (an exception
nothing in the library catches), then resumes it through the CLI until it ends (a run killed
while its folder was made, before ``run.yaml``, was never started: it is run again under the
same name). Its metric rows (timings aside) and its last checkpoint (buffer, model, learner,
generators, counters) must equal the uninterrupted run's. One more case kills a real
``mbrl run`` process with SIGKILL.
"""

from __future__ import annotations

import csv
import os
import random
import signal
import subprocess
import sys
import time

import pytest
import torch
from state_compare import assert_same

from mbrl import cli, runs
from mbrl.algorithms import dyna, mpc_loop
from mbrl.dynamics.ensemble import ProbabilisticEnsemble
from mbrl.runs import Run

torch.set_num_threads(1)

PETS = ["pets", "--env", "cartpole-balance", "trials=2", "seed_steps=30", "horizon=5",
        "particles=2", "planner.population=20", "planner.iterations=2", "model.ensemble_size=2",
        "model.hidden_size=16", "model.num_layers=2", "model.max_epochs=2"]  # fmt: skip
# reacher episodes are 50 steps: every epoch (and so every checkpoint) ends an episode
MBPO = ["mbpo", "--env", "reacher", "total_steps=150", "epoch_length=50", "start_steps=50",
        "eval_episodes=1", "updates_per_step=1", "learner.hidden_size=16", "learner.batch_size=16",
        "model.ensemble_size=2", "model.num_elites=1", "model.hidden_size=16",
        "model.num_layers=2", "model.max_epochs=2", "model.batch_size=16", "model.train_every=25",
        "branch.rollout_batch_size=16"]  # fmt: skip


class _Killed(BaseException):
    """A simulated kill: neither an Exception nor a KeyboardInterrupt, so nothing handles it."""


class _Os:
    """``os`` as :mod:`mbrl.runs` sees it, with its renames and links counted (or killed)."""

    def __init__(self, hook):
        self._hook = hook

    def __getattr__(self, name):
        return getattr(os, name)

    def replace(self, *args):
        self._hook("os.replace")
        return os.replace(*args)

    def link(self, *args):
        self._hook("os.link")
        return os.link(*args)


def _places(monkeypatch, hook, algo):
    """Wrap every place a run may be killed; ``hook(name)`` runs before each call."""

    def wrap(owner, attr, name):
        original = getattr(owner, attr)

        def wrapped(*args, **kwargs):
            hook(name)
            return original(*args, **kwargs)

        monkeypatch.setattr(owner, attr, wrapped)

    wrap(ProbabilisticEnsemble, "fit", "fit")
    wrap(Run, "log", "log")
    wrap(runs.torch, "save", "torch.save")
    monkeypatch.setattr(runs, "os", _Os(hook))
    if algo == "pets":
        wrap(mpc_loop, "run_episode", "episode")
    else:
        wrap(dyna.DynaRun, "act_in_env", "env step")
        wrap(dyna.DynaRun, "record", "update")


def _rows(path):
    with open(path / "metrics.csv", newline="") as f:
        return [{k: v for k, v in r.items() if "seconds" not in k} for r in csv.DictReader(f)]


def _state(path):
    state = torch.load(path / "checkpoint.pt", weights_only=True)["state"]
    state["counters"].pop("wall_seconds")
    return state


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """``reference(algo)``: the uninterrupted run's folder, and how often it calls each place."""
    done = {}

    def get(algo):
        if algo not in done:
            root = tmp_path_factory.mktemp(algo)
            calls: dict[str, int] = {}
            with pytest.MonkeyPatch.context() as mp:
                _places(mp, lambda name: calls.__setitem__(name, calls.get(name, 0) + 1), algo)
                argv = ["run", *ARGV[algo], "--runs-dir", str(root), "--name", "full"]
                assert cli.main(argv) == 0
            done[algo] = root, calls
        return done[algo]

    return get


ARGV = {"pets": PETS, "mbpo": MBPO}
CASES = [("pets", seed) for seed in range(8)] + [("mbpo", seed) for seed in range(4)]


@pytest.mark.parametrize("algo, seed", CASES)
def test_killed_anywhere_resumes_to_the_uninterrupted_run(
    reference, algo, seed, monkeypatch, capsys
):
    root, calls = reference(algo)
    place = sorted(calls)[seed % len(calls)]  # each place in turn
    at = random.Random(f"{algo}-{seed}").randint(1, calls[place])
    seen = {}

    def kill(name):
        seen[name] = seen.get(name, 0) + 1
        if name == place and seen[name] == at:
            raise _Killed(f"{name} call {at}")

    name = f"killed-{seed}"
    with monkeypatch.context() as mp:
        _places(mp, kill, algo)
        with pytest.raises(_Killed):
            cli.main(["run", *ARGV[algo], "--runs-dir", str(root), "--name", name])
    capsys.readouterr()
    if cli.main(["resume", str(root / name)]) != 0:  # killed before run.yaml was written
        assert "was never started" in capsys.readouterr().err, (place, at)
        assert cli.main(["run", *ARGV[algo], "--runs-dir", str(root), "--name", name]) == 0
    assert _rows(root / name) == _rows(root / "full"), (place, at)
    assert_same(_state(root / name), _state(root / "full"))


def test_sigkill_of_a_real_process_resumes_to_the_uninterrupted_run(tmp_path):
    """``kill -9`` of ``mbrl run`` just after its first checkpoint (the kernel frees the run's
    lock), then ``mbrl resume``: the same rows and final state as a run never killed."""
    argv = ["run", *PETS, "--runs-dir", str(tmp_path)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "mbrl.cli", *argv, "--name", "killed"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    first = tmp_path / "killed" / "checkpoint-1.pt"
    deadline = time.monotonic() + 120
    while not first.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL  # killed, not finished
    assert cli.main([*argv, "--name", "full"]) == 0
    assert cli.main(["resume", str(tmp_path / "killed")]) == 0
    assert _rows(tmp_path / "killed") == _rows(tmp_path / "full")
    assert_same(_state(tmp_path / "killed"), _state(tmp_path / "full"))
