"""The manifest of a sweep, ``runs/sweep-<name>/sweep.yaml``: how it was started and every
run's state.

A run is ``pending`` (not started, stopped by a Ctrl-C, or waiting for its next attempt),
``running``, ``done`` (its command ended with status 0) or ``failed`` (every attempt it was
given failed). The sweep's process alone writes the file, atomically (a temporary file renamed
over it), on every change; ``yaml.safe_load`` reads it back.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, get_args

import yaml

from mbrl.sweep.plan import RunSpec

MANIFEST = "sweep.yaml"
State = Literal["pending", "running", "done", "failed"]
Backend = Literal["local", "ray"]


class SweepFolderError(RuntimeError):
    """A sweep folder or manifest that cannot be used."""


@dataclass(frozen=True)
class RunRecord:
    """One run of the sweep and where it stands.

    Fields:
        spec: what the run is (name, setting, algorithm, seed, ``mbrl run`` command).
        state: pending, running, done or failed.
        attempts: the attempts started so far, over every ``mbrl sweep`` of the folder.
        last_return: the last ``return`` in its ``metrics.csv`` (None before the first row).
        error: why its last attempt failed (None when it did not).
    """

    spec: RunSpec
    state: State = "pending"
    attempts: int = 0
    last_return: float | None = None
    error: str | None = None


@dataclass(frozen=True)
class Manifest:
    """A sweep: its settings of execution and its runs.

    Fields:
        name: the sweep's name (its folder is ``sweep-<name>``).
        command: the ``mbrl sweep`` arguments it was started with.
        backend: ``local`` (a pool of processes on this machine) or ``ray`` (Ray tasks).
        cpus_per_run: the CPUs (and torch threads) each run gets.
        retries: attempts a crashed run gets after its first, per ``mbrl sweep``.
        address: the Ray cluster's address (None: a Ray instance of its own on this machine).
        threshold: the return whose first env step the report gives (None: not reported).
        runs: every run, in order.
    """

    name: str
    command: tuple[str, ...]
    backend: Backend
    cpus_per_run: int
    retries: int
    address: str | None
    threshold: float | None
    runs: tuple[RunRecord, ...]

    def save(self, folder: Path) -> Path:
        """Write ``folder/sweep.yaml`` atomically; returns its path."""
        data = dataclasses.asdict(self)
        data["command"] = list(self.command)
        for run in data["runs"]:
            run["spec"]["argv"] = list(run["spec"]["argv"])
        path = Path(folder) / MANIFEST
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(yaml.safe_dump(data, sort_keys=False))
        os.replace(tmp, path)
        return path

    @classmethod
    def load(cls, folder: Path) -> Manifest:
        """The manifest of the sweep folder ``folder``.

        Raises:
            SweepFolderError: no ``sweep.yaml`` there, or one that is not a sweep manifest.
        """
        path = Path(folder) / MANIFEST
        if not path.is_file():
            raise SweepFolderError(
                f"{folder} is not a sweep folder (no {MANIFEST} in it); pass the folder "
                "`mbrl sweep` wrote, runs/sweep-<name>"
            )
        try:
            data = yaml.safe_load(path.read_text())
            runs = tuple(
                RunRecord(
                    **{**r, "spec": RunSpec(**{**r["spec"], "argv": tuple(r["spec"]["argv"])})}
                )
                for r in data.pop("runs")
            )
            manifest = cls(**{**data, "command": tuple(data["command"]), "runs": runs})
        except (yaml.YAMLError, TypeError, KeyError, AttributeError) as e:
            first = (str(e).strip().splitlines() or [""])[0][:200]
            raise SweepFolderError(
                f"{path} is not a sweep manifest ({type(e).__name__}: {first}); put the file "
                "back, or start the sweep over under another --name"
            ) from None
        bad = [r.spec.name for r in manifest.runs if r.state not in get_args(State)]
        if bad or manifest.backend not in get_args(Backend):
            raise SweepFolderError(
                f"{path}: unknown state or backend (runs {', '.join(bad) or 'none'}, backend "
                f"{manifest.backend!r}); states are {', '.join(get_args(State))}"
            )
        return manifest

    def counts(self) -> dict[str, int]:
        """How many runs are in each state."""
        counts = dict.fromkeys(get_args(State), 0)
        for r in self.runs:
            counts[r.state] += 1
        return counts
