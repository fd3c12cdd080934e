"""Model diagnostics on held-out data, for any :class:`~mbrl.dynamics.base.DynamicsModel`.

- :func:`one_step_scores`: one-step Gaussian negative log-likelihood of the true next
  observation under the model's predictive ``N(mean, var)`` (per dimension, averaged), the
  empirical coverage of the central 95% interval ``mean ± 1.96 σ`` (a calibrated model covers
  about 0.95; less is over-confident, more is under-confident) and the RMSE of the mean.
- :func:`multistep_error`: open-loop prediction error along real trajectories: from every start
  ``t`` the model's mean dynamics are iterated ``k`` steps under the recorded actions and
  compared with the recorded observations; RMSE per number of steps ``1..k``.
- :func:`open_loop_rollout`: ``P`` sampled open-loop model rollouts under recorded actions.
- :func:`compare_models`: both of the above for several models on the same data (e.g. the GP
  against the probabilistic ensemble), as rows for :func:`to_markdown` / :func:`write_csv`.
- :func:`plot_rollout`: predicted vs true trajectories, one panel per observation dimension,
  with the particle mean and a ±2σ band over ``P`` sampled model rollouts. The rollouts are
  loops over the planning step (:meth:`~mbrl.planners.base.PlanningProblem.start` /
  :meth:`~mbrl.planners.base.PlanningProblem.step`), the same step the planners score with.

:func:`multistep_error` iterates the mean dynamics (a
:class:`~mbrl.dynamics.base.DifferentiableModel`'s ``mean_dynamics``, else the predictive mean
of ``predict``), not sampled steps: it measures the error of the mean prediction.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from mbrl.dynamics.base import DifferentiableModel, DynamicsModel, RolloutState, Transitions
from mbrl.planners.base import PlanningProblem
from mbrl.shapes import check_shape

_Z95 = 1.959963984540054  # two-sided 95% normal quantile
_VAR_FLOOR = 1e-12  # variances below this count as this (deterministic models)

Trajectory = tuple[torch.Tensor, torch.Tensor]
"""A real trajectory: observations ``[T + 1, X]`` and actions ``[T, U]``."""


@dataclass(frozen=True)
class OneStepScores:
    """One-step predictive quality on held-out transitions."""

    nll: float  # mean Gaussian NLL per observation dimension (nats)
    coverage95: float  # share of (transition, dimension) pairs inside mean ± 1.96 σ
    rmse: float  # root mean squared error of the predictive mean
    nll_per_dim: tuple[float, ...]  # [X]
    coverage95_per_dim: tuple[float, ...]  # [X]
    n: int  # transitions scored


@dataclass(frozen=True)
class MultiStepError:
    """Open-loop mean-rollout error along real trajectories."""

    rmse: tuple[float, ...]  # [k] RMSE after 1, 2, ..., k steps, over all windows and dims
    windows: int  # (start, trajectory) pairs averaged over


@torch.no_grad()
def one_step_scores(model: DynamicsModel, data: Transitions) -> OneStepScores:
    """Score ``model.predict`` on ``data`` (NLL, 95% coverage, RMSE; see the module docstring).

    Variances are floored at 1e-12, so a deterministic model gets a large (finite) NLL.
    """
    if len(data) == 0:
        raise ValueError("one_step_scores needs at least one transition; data is empty")
    pred = model.predict(data.obs, data.act)
    target = data.next_obs.to(pred.mean)
    var = pred.var.clamp_min(_VAR_FLOOR)  # [B, X]
    err = target - pred.mean  # [B, X]
    nll = 0.5 * (torch.log(2 * math.pi * var) + err**2 / var)  # [B, X]
    inside = (err.abs() <= _Z95 * var.sqrt()).float()  # [B, X]
    return OneStepScores(
        nll=float(nll.mean()),
        coverage95=float(inside.mean()),
        rmse=float((err**2).mean().sqrt()),
        nll_per_dim=tuple(float(v) for v in nll.mean(0)),
        coverage95_per_dim=tuple(float(v) for v in inside.mean(0)),
        n=len(data),
    )


def _mean_step(model: DynamicsModel, obs: torch.Tensor, act: torch.Tensor) -> torch.Tensor:
    """Mean next observation ``[B, X]`` of ``obs [B, X]`` under ``act [B, U]``."""
    if isinstance(model, DifferentiableModel):
        return model.mean_dynamics(obs, act)
    return model.predict(obs, act).mean


@torch.no_grad()
def multistep_error(
    model: DynamicsModel, trajectories: Sequence[Trajectory], steps: int
) -> MultiStepError:
    """RMSE of the ``steps``-step open-loop mean prediction from every start of every trajectory.

    All windows of all trajectories are rolled out together as one batch (one model call per
    step). Trajectories shorter than ``steps`` actions are skipped.

    Raises:
        ValueError: ``steps < 1`` or no trajectory has ``steps`` actions.
    """
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    starts, acts, truth = [], [], []
    for i, (obs, act) in enumerate(trajectories):
        check_shape(f"trajectories[{i}] obs", obs, ("T+1", "X"))
        check_shape(f"trajectories[{i}] act", act, (obs.shape[0] - 1, "U"))
        windows = act.shape[0] - steps + 1
        if windows < 1:
            continue
        idx = torch.arange(windows)[:, None] + torch.arange(steps + 1)[None]  # [W, k + 1]
        starts.append(obs[:windows])
        acts.append(act[idx[:, :steps]])  # [W, k, U]
        truth.append(obs[idx[:, 1:]])  # [W, k, X]
    if not starts:
        raise ValueError(f"no trajectory has {steps} actions; pass longer ones or fewer steps")
    x = torch.cat(starts)  # [W, X]
    a = torch.cat(acts)  # [W, k, U]
    y = torch.cat(truth)  # [W, k, X]
    sq = []
    for t in range(steps):
        x = _mean_step(model, x, a[:, t])
        sq.append(((x - y[:, t]) ** 2).mean())
    return MultiStepError(rmse=tuple(float(s.sqrt()) for s in sq), windows=x.shape[0])


def compare_models(
    models: Mapping[str, DynamicsModel],
    test: Transitions,
    trajectories: Sequence[Trajectory] = (),
    steps: int = 10,
    train: Transitions | None = None,
) -> list[dict[str, float | int | str]]:
    """One row per model: one-step NLL, 95% coverage, RMSE, and the ``steps``-step mean-rollout
    RMSE along ``trajectories`` (when given). With ``train`` every model is fitted on it first
    (and the fit's wall time is reported), so all models see the same data."""
    rows: list[dict[str, float | int | str]] = []
    for name, model in models.items():
        row: dict[str, float | int | str] = {"model": name}
        if train is not None:
            row["fit_seconds"] = round(model.fit(train).seconds, 3)
        s = one_step_scores(model, test)
        row.update(nll=s.nll, coverage95=s.coverage95, rmse=s.rmse, n=s.n)
        if trajectories:
            m = multistep_error(model, trajectories, steps)
            row[f"rmse_{steps}step"] = m.rmse[-1]
        rows.append(row)
    return rows


def to_markdown(rows: Sequence[Mapping[str, float | int | str]], digits: int = 4) -> str:
    """A markdown table of ``rows`` (columns in first-seen order; floats rounded)."""
    cols = _columns(rows)

    def fmt(v: float | int | str | None) -> str:
        if isinstance(v, float):
            return f"{v:.{digits}g}"
        return "" if v is None else str(v)

    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(fmt(r.get(c)) for c in cols) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def write_csv(rows: Sequence[Mapping[str, float | int | str]], path: str | Path) -> Path:
    """Write ``rows`` as CSV with a header line; returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=_columns(rows))
        writer.writeheader()
        writer.writerows(rows)
    return path


def _columns(rows: Sequence[Mapping[str, object]]) -> list[str]:
    cols: list[str] = []
    for r in rows:
        cols += [c for c in r if c not in cols]
    return cols


@torch.no_grad()
def plot_rollout(
    models: Mapping[str, DynamicsModel],
    obs: torch.Tensor,
    act: torch.Tensor,
    path: str | Path,
    particles: int = 50,
    generator: torch.Generator | None = None,
    dim_names: Sequence[str] | None = None,
    title: str = "",
) -> Path:
    """Save a PNG of the true trajectory ``obs [T + 1, X]`` against each model's open-loop
    prediction from ``obs[0]`` under ``act [T, U]``: the mean over ``particles`` sampled
    rollouts (the planning step, :func:`open_loop_rollout`) with a ±2σ band of their spread."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    check_shape("obs", obs, ("T+1", "X"))
    check_shape("act", act, (obs.shape[0] - 1, "U"))
    horizon, dims = act.shape[0], obs.shape[1]
    names = list(dim_names) if dim_names is not None else [f"x[{i}]" for i in range(dims)]
    fig, axes = plt.subplots(dims, 1, figsize=(7, 2.2 * dims), sharex=True, squeeze=False)
    t = torch.arange(horizon + 1).numpy()
    for i in range(dims):
        axes[i, 0].plot(t, obs[:, i].cpu().numpy(), color="black", lw=2, label="true")
        axes[i, 0].set_ylabel(names[i])
    for name, model in models.items():
        traj = open_loop_rollout(model, obs[0], act, particles, generator)  # [T + 1, P, X]
        mean, std = traj.mean(1).cpu(), traj.std(1, correction=0).cpu()  # [T + 1, X]
        for i in range(dims):
            line = axes[i, 0].plot(t, mean[:, i].numpy(), label=f"{name} mean")[0]
            axes[i, 0].fill_between(
                t,
                (mean[:, i] - 2 * std[:, i]).numpy(),
                (mean[:, i] + 2 * std[:, i]).numpy(),
                color=line.get_color(),
                alpha=0.2,
                label=f"{name} ±2σ",
            )
    axes[0, 0].legend(fontsize=7, loc="best")
    axes[-1, 0].set_xlabel("step")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def _no_reward(obs: torch.Tensor, act: torch.Tensor, next_obs: torch.Tensor) -> torch.Tensor:
    return torch.zeros(obs.shape[0], device=obs.device)


@torch.no_grad()
def open_loop_rollout(
    model: DynamicsModel,
    x0: torch.Tensor,
    act: torch.Tensor,
    particles: int = 1,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Observations ``[T + 1, P, X]`` of ``P`` sampled open-loop rollouts of ``model`` from
    ``x0 [X]`` under ``act [T, U]`` (row 0 is the start).

    A loop over the planning step (:meth:`~mbrl.planners.base.PlanningProblem.start` and
    :meth:`~mbrl.planners.base.PlanningProblem.step` of a problem with no reward and no
    termination), drawing from ``generator``; ``T >= 1``.
    """
    check_shape("x0", x0, (model.obs_dim,))
    check_shape("act", act, ("T", model.act_dim))
    if act.shape[0] < 1:
        raise ValueError("act: expected at least one action [T >= 1, U], got none")
    low, high = act.amin(dim=0).float(), act.amax(dim=0).float()  # [U] (the step never clips)
    problem = PlanningProblem(
        model, _no_reward, None, act.shape[0], low, high, particles, generator
    )
    state: RolloutState = problem.start(x0)  # [P] rows
    states = [state.obs]
    for k in range(act.shape[0]):
        state = problem.step(state, act[k : k + 1].expand(particles, -1)).state
        states.append(state.obs)
    return torch.stack(states)  # [T + 1, P, X]
