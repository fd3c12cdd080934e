"""The run helper every training loop stands on (the Dyna learners and the MPC loop): the
checkpoint as one typed record, resuming from it, timing, and the end of a run (learning curves
and the summary).

A :class:`Checkpoint` holds the run's :class:`Counters`, the state dict of every stateful part
(buffer, model, learner, model buffer), the state of every torch generator and of the numpy
generator. :func:`checkpoint_of` is the one function that builds it and :func:`resume` the one
that reads it back; on disk it is plain tensors, numbers, strings, lists and dicts, read with
``torch.load(weights_only=True)``.

A loop calls :func:`stop_if_requested` right after each checkpoint: when the run was asked to
stop (:meth:`mbrl.runs.Run.request_stop`, the CLI's first Ctrl-C) it raises :class:`Stopped`
there, so the run ends on a checkpoint and resumes exactly.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from tqdm import tqdm

from mbrl.algorithms.common import Summary
from mbrl.plots import learning_curve, related_runs
from mbrl.runs import CheckpointError, Run, numpy_rng_state, set_numpy_rng_state


class Stateful(Protocol):
    """A part of a run that round-trips through a checkpoint."""

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...


@dataclass(frozen=True)
class Counters:
    """Where a run stands. Dyna runs count env steps and evaluations; MPC runs count trials,
    and ``returns`` holds one return per evaluation (Dyna) or per trial (MPC)."""

    env_steps: int = 0
    episodes: int = 0  # real episodes begun (their reset seeds follow from it)
    trial: int = 0  # MPC trials run
    streak: int = 0  # consecutive solved trials (MPC)
    wall_seconds: float = 0.0
    returns: tuple[float, ...] = ()
    rollout_length: int = 0  # k of the last branching (Dyna)
    fit_train_loss: float = math.nan  # of the last model fit
    fit_val_loss: float = math.nan


@dataclass(frozen=True)
class Checkpoint:
    """Everything a run needs to continue exactly, as it is written to disk."""

    counters: Counters
    parts: Mapping[str, dict] = field(default_factory=dict)  # name -> state dict
    generators: Mapping[str, torch.Tensor] = field(default_factory=dict)  # name -> state
    numpy_rng: Mapping[str, Any] = field(default_factory=dict)  # checkpoint-safe numpy state


def checkpoint_of(
    counters: Counters,
    parts: Mapping[str, Stateful],
    generators: Mapping[str, torch.Generator],
    rng: np.random.Generator,
) -> Checkpoint:
    """The checkpoint of a run: ``counters``, the state dict of each of ``parts``, the state of
    each torch generator and of ``rng``."""
    return Checkpoint(
        counters=counters,
        parts={name: part.state_dict() for name, part in parts.items()},
        generators={name: g.get_state() for name, g in generators.items()},
        numpy_rng=numpy_rng_state(rng),
    )


def save(run: Run, checkpoint: Checkpoint) -> None:
    """Write ``checkpoint`` atomically into ``run`` as plain containers."""
    counters = dataclasses.asdict(checkpoint.counters)
    counters["returns"] = list(checkpoint.counters.returns)
    run.save_checkpoint(
        {
            "counters": counters,
            "parts": dict(checkpoint.parts),
            "generators": dict(checkpoint.generators),
            "numpy_rng": dict(checkpoint.numpy_rng),
        }
    )


def resume(
    run: Run,
    parts: Mapping[str, Stateful],
    generators: Mapping[str, torch.Generator],
    rng: np.random.Generator,
) -> Counters | None:
    """Restore ``parts``, ``generators`` and ``rng`` from the run's last checkpoint and return
    its counters; ``None`` (nothing restored) when the run has no checkpoint yet.

    A part the checkpoint does not hold keeps its state (a model saved only once fitted); a
    part or generator the checkpoint holds that is not given is an error.

    Raises:
        CheckpointError: the checkpoint holds parts this run does not have, or lacks a
            generator.
    """
    state = run.load_checkpoint()
    if state is None:
        return None
    try:
        ckpt = Checkpoint(
            counters=Counters(
                **{**state["counters"], "returns": tuple(state["counters"]["returns"])}
            ),
            parts=state["parts"],
            generators=state["generators"],
            numpy_rng=state["numpy_rng"],
        )
    except (KeyError, TypeError) as e:
        raise CheckpointError(
            f"{run.checkpoint_path} does not hold a run checkpoint of this version ({e}); "
            "start a new run under another --name"
        ) from None
    unknown = sorted(set(ckpt.parts) - set(parts))
    missing = sorted(set(generators) - set(ckpt.generators))
    if unknown or missing:
        raise CheckpointError(
            f"{run.checkpoint_path} does not fit this run (parts it holds that this run lacks: "
            f"{unknown or 'none'}; generators it lacks: {missing or 'none'}); resume it with the "
            "algorithm that wrote it"
        )
    for name, part_state in ckpt.parts.items():
        parts[name].load_state_dict(part_state)
    for name, g in generators.items():
        g.set_state(ckpt.generators[name])
    set_numpy_rng_state(rng, dict(ckpt.numpy_rng))
    return ckpt.counters


class Stopped(KeyboardInterrupt):
    """The run stopped on request right after writing a checkpoint."""


def stop_if_requested(run: Run) -> None:
    """Raise :class:`Stopped` when ``run`` was asked to stop; call it right after a checkpoint.

    Raises:
        Stopped: ``run.stop_requested`` is set.
    """
    if run.stop_requested:
        raise Stopped(f"stopped on request; {run.latest_checkpoint_text()}")


class Stopwatch:
    """Seconds spent per named activity (``with watch("fit"): ...``) since the last
    :meth:`reset`, and the wall time of the run across resumes (:meth:`lap`)."""

    def __init__(self, names: tuple[str, ...], wall_seconds: float = 0.0) -> None:
        self.names = names
        self.seconds = dict.fromkeys(names, 0.0)
        self.wall_seconds = wall_seconds
        self._start = time.perf_counter()

    @contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] += time.perf_counter() - t0

    def start(self) -> None:
        """Start timing the wall from now (the time before is not the run's)."""
        self._start = time.perf_counter()

    def lap(self) -> float:
        """Add the time since the last lap to the wall time and return it."""
        now = time.perf_counter()
        self.wall_seconds += now - self._start
        self._start = now
        return self.wall_seconds

    def reset(self) -> None:
        self.seconds = dict.fromkeys(self.names, 0.0)


def write_learning_curves(
    run: Run, label: str, seed: int, env: str, target: float | None
) -> list[Path]:
    """This run's ``learning_curve.png`` with the runs of the same env, seed and learner in the
    same parent folder (the model-free baseline of a model-based run, and back) on the same
    axes. Their PNGs are redrawn too, so whichever run ends last, each shows all of them."""
    related = related_runs(run.path)
    out = []
    for algo, path in [(None, run.path), *related]:
        name = label if algo is None else algo.upper()
        curves = [(f"{name} seed {seed}", path / "metrics.csv")]
        curves += [(f"{a.upper()} seed {seed}", p / "metrics.csv") for a, p in related_runs(path)]
        png = path / "learning_curve.png"
        out.append(learning_curve(curves, png, title=f"{name} on {env}", target=target))
    return out


def finish(
    run: Run,
    label: str,
    seed: int,
    env: str,
    solved_return: float | None,
    counters: Counters,
    unit: str,
) -> Summary:
    """End a run: draw its learning curves and return its summary."""
    write_learning_curves(run, label, seed, env, solved_return)
    return Summary.from_returns(counters.returns, solved_return, counters.wall_seconds, unit=unit)


def resumed_message(run: Run, where: str, transitions: int) -> None:
    tqdm.write(f"resumed {run.path} {where} ({transitions} transitions)")
