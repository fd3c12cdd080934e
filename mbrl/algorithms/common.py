"""What the algorithms share at the edges: devices, progress bars, summaries.

The config sections and their builders (ensemble, planner, learner) are in
:mod:`mbrl.algorithms.factory`; ``PlannerConfig`` stays importable from here.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from dataclasses import dataclass

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


def progress_bar(total: int, desc: str) -> tqdm:
    """A step progress bar (shown on terminals only)."""
    return tqdm(total=total, desc=desc, unit="step", leave=False, disable=not sys.stderr.isatty())


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
