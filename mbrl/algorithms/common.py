"""What the algorithms share at the edges: devices, progress bars, summaries.

The config sections and their builders (ensemble, planner, learner) are in
:mod:`mbrl.algorithms.factory`; ``PlannerConfig`` stays importable from here.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TextIO

import torch
from tqdm import tqdm

from mbrl.algorithms.factory import PlannerConfig  # noqa: F401  (importable from here too)


def resolve_device(device: str | torch.device) -> torch.device:
    """``torch.device(device)``, refusing unknown names and CUDA when this machine has none."""
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise ValueError(
            f"unknown device {device!r}; use cpu, or cuda (cuda:N for one GPU of several)"
        ) from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(
            f"device {device!r} was asked for but CUDA is not available here; use --device cpu"
        )
    return dev


def progress_bar(total: int, desc: str) -> tqdm | PlainProgress:
    """Step progress on stderr: a bar on a terminal, plain log lines elsewhere (a log file, CI);
    both take ``update(n)``, ``close()`` and ``with``."""
    if sys.stderr.isatty():
        return tqdm(total=total, desc=desc, unit="step", leave=False)
    return PlainProgress(total, desc)


class PlainProgress:
    """Progress as plain lines, ``desc: n/total steps (p%), r steps/s``, on ``stream``
    (default stderr): one when ``every`` seconds have passed since the last, and a last one at
    :meth:`close` if any was written (short stretches stay silent). ``clock`` gives seconds."""

    def __init__(
        self,
        total: int,
        desc: str,
        stream: TextIO | None = None,
        every: float = 30.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.total, self.desc, self.every, self.clock = total, desc, every, clock
        self.stream = stream
        self.n = 0
        self.lines = 0
        self._last_t, self._last_n = clock(), 0

    def update(self, n: int = 1) -> None:
        self.n += n
        if self.clock() - self._last_t >= self.every:
            self._line()

    def close(self) -> None:
        if self.lines and self.n != self._last_n:
            self._line()

    def _line(self) -> None:
        now = self.clock()
        rate = (self.n - self._last_n) / max(now - self._last_t, 1e-9)
        pct = 100.0 * self.n / self.total if self.total else 100.0
        stream = self.stream if self.stream is not None else sys.stderr
        print(
            f"{self.desc}: {self.n}/{self.total} steps ({pct:.0f}%), {rate:.1f} steps/s",
            file=stream,
            flush=True,
        )
        self.lines += 1
        self._last_t, self._last_n = now, self.n

    def __enter__(self) -> PlainProgress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@dataclass(frozen=True)
class Summary:
    """How a run went, printed at its end."""

    returns: tuple[float, ...]  # [points] return of each trial or evaluation
    solved_return: float | None
    first_solved: int | None  # 1-based index of the first solved point
    wall_seconds: float
    unit: str = "trial"  # what a point is: "trial" (MPC episodes) or "evaluation" (Dyna epochs)

    @classmethod
    def from_returns(
        cls,
        returns: Sequence[float],
        solved_return: float | None,
        wall_seconds: float,
        unit: str = "trial",
    ) -> Summary:
        first = None
        if solved_return is not None:
            first = next((i + 1 for i, r in enumerate(returns) if r >= solved_return), None)
        return cls(tuple(float(r) for r in returns), solved_return, first, wall_seconds, unit)

    def text(self, label: str) -> str:
        rets = ", ".join(f"{r:.1f}" for r in self.returns)
        u = self.unit
        lines = [f"{label}: returns per {u} [{rets}] in {self.wall_seconds:.0f} s"]
        if self.solved_return is not None:
            if self.first_solved is not None:
                lines.append(
                    f"solved: return >= {self.solved_return:g} first at {u} {self.first_solved}"
                )
            else:
                lines.append(f"not solved: no {u} reached {self.solved_return:g}")
        return "\n".join(lines)
