"""The control comparison study: LQR, iLQR-MPC, CEM-MPC, random-shooting-MPC and casadi NMPC on
one analytic system, the same cost, horizon and time step, from the same initial states.

Every method is a planner behind :class:`~mbrl.control.mpc.MPCController` (replanning every
step, warm-started with the shifted plan) on a :class:`~mbrl.planners.base.PlanningProblem` whose
model is the system's exact torch dynamics and whose reward is minus the system's stage cost
(plus minus its terminal cost at the horizon, the problem's ``value_fn``). NMPC optimizes the
casadi twins of the same problem's model and cost. Each episode is a closed-loop rollout of the
system's gymnasium env (:func:`~mbrl.control.mpc.run_episode`), reset with seed ``seed + k`` for
initial state ``k``, so all methods start from the same states.

Scenarios: ``"swingup"`` starts from the system's nominal start (hanging down for the
swing-ups) with noise; for the nonlinear systems a ``"stabilize"`` scenario starts near the goal,
where the infinite-horizon LQR around the goal applies. LQR runs in ``"stabilize"`` and, for the
linear system, in the one ``"regulate"`` scenario.

Measured per method and scenario: closed-loop cost ``sum_t c(x_t, u_t) + c_T(x_T)`` (mean and
std over initial states), success rate (the final state satisfies ``system.success``), solve
time per MPC step (median and 95th percentile over all steps), state-constraint violations of
the closed loop (steps outside the study's state bounds, which NMPC imposes as constraints and
the other methods do not know), and plan status counts. Written to ``results.csv`` and
``results.md``; plots ``trajectories_<scenario>.png`` (states and controls of every method from
initial state 0) and ``cost_vs_time.png`` (closed-loop cost against median solve time).
"""

from __future__ import annotations

import csv
import dataclasses
import math
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mbrl.control.mpc import Episode, MPCController, run_episode
from mbrl.control.nmpc import NMPC
from mbrl.dynamics.systems import SystemModel
from mbrl.planners.base import Plan, Planner, PlanningProblem, WarmStart

METHODS = ("lqr", "ilqr", "cem", "random_shooting", "nmpc")
SYSTEM_NAMES = ("linear", "pendulum", "cartpole", "acrobot")


@dataclass(frozen=True)
class StudySetup:
    """Per-system defaults: horizon, episode length, initial-state noise, state bounds."""

    horizon: int  # H planning steps
    episode_steps: int  # T closed-loop steps
    start_noise: float  # half-width of the uniform noise on the nominal start
    stabilize_noise: float  # half-width of the noise around the goal ("stabilize")
    state_low: np.ndarray | None  # [X] study constraint (NMPC imposes it), None for none
    state_high: np.ndarray | None  # [X]


def _setup(name: str) -> StudySetup:
    inf = np.inf
    if name == "linear":
        return StudySetup(20, 50, 0.5, 0.0, np.array([-inf, -0.8]), np.array([inf, 0.8]))
    if name == "pendulum":  # Pendulum-v1's speed limit as the state constraint
        return StudySetup(40, 100, 0.2, 0.3, np.array([-inf, -8.0]), np.array([inf, 8.0]))
    if name == "cartpole":  # the rail
        return StudySetup(
            40, 100, 0.1, 0.2, np.array([-2.0, -inf, -inf, -inf]), np.array([2.0, inf, inf, inf])
        )
    if name == "acrobot":  # Acrobot-v1's velocity limits
        return StudySetup(
            50,
            120,
            0.1,
            0.05,
            np.array([-inf, -inf, -4 * np.pi, -9 * np.pi]),
            np.array([inf, inf, 4 * np.pi, 9 * np.pi]),
        )
    raise ValueError(f"unknown system {name!r}; valid: {', '.join(SYSTEM_NAMES)}")


def make_system(name: str, start_noise: float = 0.0) -> Any:
    """The study's system ``name`` (``"linear"`` is the double integrator)."""
    from mbrl.envs.systems import SYSTEMS, double_integrator

    if name not in SYSTEM_NAMES:
        raise ValueError(f"unknown system {name!r}; valid: {', '.join(SYSTEM_NAMES)}")
    if name == "linear":
        return dataclasses.replace(double_integrator(), start_noise=start_noise)
    return SYSTEMS[name](start_noise=start_noise)


@dataclass(frozen=True)
class EpisodeResult:
    """One closed-loop episode of one method from one initial state."""

    scenario: str
    method: str
    initial_state: int  # k
    cost: float  # sum_t c(x_t, u_t) + c_T(x_T)
    success: bool
    solve_seconds: tuple[float, ...]  # [T] wall time of each MPC step's plan
    statuses: tuple[str, ...]  # [T] each plan's status
    violations: int  # closed-loop steps with the state outside the study bounds
    max_violation: float  # largest excess over a bound
    obs: np.ndarray  # [T + 1, X]
    act: np.ndarray  # [T, U]


@dataclass(frozen=True)
class MethodSummary:
    """One row of the results table."""

    scenario: str
    method: str
    episodes: int
    cost_mean: float
    cost_std: float
    success_rate: float
    solve_ms_median: float
    solve_ms_p95: float
    violations: int  # total over episodes
    max_violation: float
    status_counts: str  # "ok:200 max_iterations:3"


@dataclass(frozen=True)
class StudyResult:
    """What :func:`run_study` returns: the table rows, every episode, the files written."""

    system: str
    rows: tuple[MethodSummary, ...]
    episodes: tuple[EpisodeResult, ...]
    files: tuple[Path, ...]


class _Timed:
    """A planner wrapper that records each plan's wall time and status."""

    def __init__(self, planner: Planner) -> None:
        self.planner = planner
        self.seconds: list[float] = []
        self.statuses: list[str] = []

    def plan(
        self, problem: PlanningProblem, x0: torch.Tensor, warm: WarmStart | None = None
    ) -> Plan:
        start = time.perf_counter()
        plan = self.planner.plan(problem, x0, warm)
        self.seconds.append(time.perf_counter() - start)
        self.statuses.append(plan.status)
        return plan


def _planner(method: str, system: Any, horizon: int, setup: StudySetup, options: dict) -> Planner:
    from mbrl.planners.ilqr import ILQR
    from mbrl.planners.lqr import LQR
    from mbrl.planners.sampling import CEM, RandomShooting

    opts = options.get(method, {})
    if method == "lqr":
        return LQR(goal=system.goal, **opts)
    if method == "ilqr":
        return ILQR(**{"max_iterations": 50, **opts})
    if method == "cem":
        return CEM(**{"population": 200, "iterations": 4, **opts})
    if method == "random_shooting":
        return RandomShooting(**{"population": 500, **opts})
    if method == "nmpc":
        bounds = None
        if setup.state_low is not None:
            bounds = (setup.state_low, setup.state_high)
        return NMPC(horizon, **{"state_bounds": bounds, "max_iter": 100, **opts})
    raise ValueError(f"unknown method {method!r}; valid: {', '.join(METHODS)}")


def _problem(system: Any, horizon: int, seed: int) -> PlanningProblem:
    """The system's exact dynamics, its reward (the stage cost, closed form and casadi) and its
    terminal reward as ``value_fn``: every method optimises the same objective."""
    return PlanningProblem(
        SystemModel(system),
        system.reward_fn(),
        None,
        horizon,
        torch.as_tensor(system.action_low, dtype=torch.float32),
        torch.as_tensor(system.action_high, dtype=torch.float32),
        generator=torch.Generator().manual_seed(seed),
        value_fn=system.value_fn(),
    )


def _closed_loop_cost(system: Any, ep: Episode) -> float:
    x = torch.as_tensor(ep.obs, dtype=torch.float64)  # [T + 1, X]
    u = torch.as_tensor(ep.act, dtype=torch.float64)  # [T, U]
    u = u.clamp(torch.as_tensor(system.action_low), torch.as_tensor(system.action_high))
    stage = system.cost(x[:-1], u).sum()
    return float(stage + system.terminal_cost(x[-1:])[0])


def _violations(obs: np.ndarray, setup: StudySetup) -> tuple[int, float]:
    if setup.state_low is None:
        return 0, 0.0
    excess = np.maximum(setup.state_low - obs, 0.0) + np.maximum(obs - setup.state_high, 0.0)
    excess = excess[1:].max(axis=1)  # [T] the start is not the controller's doing
    return int((excess > 1e-6).sum()), float(excess.max(initial=0.0))


def run_episode_with(
    method: str,
    system: Any,
    setup: StudySetup,
    scenario: str,
    k: int,
    horizon: int,
    episode_steps: int,
    seed: int,
    options: dict,
) -> EpisodeResult:
    """One closed-loop episode of ``method`` from initial state ``k`` (env seed ``seed + k``)."""
    planner = _Timed(_planner(method, system, horizon, setup, options))
    controller = MPCController(planner, _problem(system, horizon, seed + k))
    env = system.spec().make()
    ep = run_episode(env, controller, seed=seed + k, max_steps=episode_steps)
    violations, worst = _violations(ep.obs, setup)
    return EpisodeResult(
        scenario=scenario,
        method=method,
        initial_state=k,
        cost=_closed_loop_cost(system, ep),
        success=bool(system.success(ep.obs[-1])),
        solve_seconds=tuple(planner.seconds),
        statuses=tuple(planner.statuses),
        violations=violations,
        max_violation=worst,
        obs=ep.obs,
        act=ep.act,
    )


def _summarize(episodes: Sequence[EpisodeResult]) -> MethodSummary:
    costs = np.array([e.cost for e in episodes])
    times = np.concatenate([np.asarray(e.solve_seconds) for e in episodes]) * 1e3
    counts = Counter(s for e in episodes for s in e.statuses)
    return MethodSummary(
        scenario=episodes[0].scenario,
        method=episodes[0].method,
        episodes=len(episodes),
        cost_mean=float(costs.mean()),
        cost_std=float(costs.std()),
        success_rate=float(np.mean([e.success for e in episodes])),
        solve_ms_median=float(np.median(times)),
        solve_ms_p95=float(np.percentile(times, 95)),
        violations=int(sum(e.violations for e in episodes)),
        max_violation=float(max(e.max_violation for e in episodes)),
        status_counts=" ".join(f"{k}:{v}" for k, v in sorted(counts.items())),
    )


def run_study(
    system: str,
    out_dir: Path | str,
    num_initial_states: int = 3,
    horizon: int | None = None,
    episode_steps: int | None = None,
    seed: int = 0,
    methods: Sequence[str] = METHODS,
    planner_options: dict[str, dict] | None = None,
    scenarios: Sequence[str] | None = None,
    progress: Callable[[str], None] | None = print,
) -> StudyResult:
    """Run the comparison on ``system`` and write the table and plots to ``out_dir``.

    Args:
        system: one of ``"linear"`` (double integrator), ``"pendulum"``, ``"cartpole"``,
            ``"acrobot"``.
        out_dir: folder for ``results.csv``, ``results.md`` and the PNG plots (created).
        num_initial_states: ``K`` initial states per scenario.
        horizon, episode_steps: ``H`` and ``T``; per-system defaults when ``None``.
        seed: initial state ``k`` comes from env seed ``seed + k``; planners' generators too.
        methods: a subset of :data:`METHODS`. LQR runs only where it applies (the linear
            system, and the ``"stabilize"`` scenario of the nonlinear ones).
        planner_options: per-method constructor overrides, e.g. ``{"cem": {"population": 100}}``.
        scenarios: ``("swingup", "stabilize")`` for nonlinear systems by default,
            ``("regulate",)`` for the linear one.
        progress: called with one line per finished episode (``None``: silent).

    Returns:
        :class:`StudyResult` with one :class:`MethodSummary` per (scenario, method).
    """
    setup = _setup(system)
    bad = [m for m in methods if m not in METHODS]
    if bad:
        raise ValueError(f"unknown methods {bad}; valid: {', '.join(METHODS)}")
    if num_initial_states < 1:
        raise ValueError(f"num_initial_states must be >= 1, got {num_initial_states}")
    horizon = setup.horizon if horizon is None else horizon
    episode_steps = setup.episode_steps if episode_steps is None else episode_steps
    valid = ("regulate",) if system == "linear" else ("swingup", "stabilize")
    scenarios = valid if scenarios is None else tuple(scenarios)
    if any(s not in valid for s in scenarios):
        raise ValueError(f"scenarios for {system!r} are {valid}, got {scenarios}")
    options = planner_options or {}
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    episodes: list[EpisodeResult] = []
    rows: list[MethodSummary] = []
    for scenario in scenarios:
        sys_s = make_system(system, setup.start_noise)
        if scenario == "stabilize":
            sys_s = dataclasses.replace(sys_s, start=sys_s.goal, start_noise=setup.stabilize_noise)
        for method in methods:
            if method == "lqr" and scenario == "swingup":
                continue  # a linearization at the goal does not swing up
            runs = []
            for k in range(num_initial_states):
                ep = run_episode_with(
                    method, sys_s, setup, scenario, k, horizon, episode_steps, seed, options
                )
                runs.append(ep)
                if progress is not None:
                    progress(
                        f"{system} {scenario} {method} start {k}: cost {ep.cost:.2f} "
                        f"success {ep.success} median solve "
                        f"{1e3 * float(np.median(ep.solve_seconds)):.1f} ms"
                    )
            episodes += runs
            rows.append(_summarize(runs))

    files = [
        _write_csv(rows, out / "results.csv"),
        _write_markdown(
            rows,
            out / "results.md",
            system,
            horizon,
            episode_steps,
            setup,
            seed,
            num_initial_states,
        ),
    ]
    files += _plot(episodes, rows, out, system)
    return StudyResult(
        system=system, rows=tuple(rows), episodes=tuple(episodes), files=tuple(files)
    )


_COLUMNS = [f.name for f in dataclasses.fields(MethodSummary)]


def _write_csv(rows: Sequence[MethodSummary], path: Path) -> Path:
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(_COLUMNS)
        for r in rows:
            writer.writerow([getattr(r, c) for c in _COLUMNS])
    return path


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.3g}" if math.isfinite(v) else str(v)
    return str(v)


def _write_markdown(
    rows: Sequence[MethodSummary],
    path: Path,
    system: str,
    horizon: int,
    steps: int,
    setup: StudySetup,
    seed: int,
    k: int,
) -> Path:
    head = (
        f"# Control study: {system}\n\n"
        f"Horizon H = {horizon}, episode T = {steps} steps, {k} initial states per scenario "
        f"(env seeds {seed}..{seed + k - 1}), replanning every step. Cost: the system's stage "
        "cost summed over the episode plus its terminal cost. Solve time: wall time of one "
        "MPC step's plan. Violations: closed-loop steps outside the state bounds "
        f"({_bounds_text(setup)}), which only NMPC imposes.\n\n"
    )
    lines = ["| " + " | ".join(_COLUMNS) + " |", "|" + "---|" * len(_COLUMNS)]
    lines += ["| " + " | ".join(_fmt(getattr(r, c)) for c in _COLUMNS) + " |" for r in rows]
    path.write_text(head + "\n".join(lines) + "\n")
    return path


def _bounds_text(setup: StudySetup) -> str:
    if setup.state_low is None:
        return "none"
    parts = [
        f"x[{i}] in [{lo:g}, {hi:g}]"
        for i, (lo, hi) in enumerate(zip(setup.state_low, setup.state_high, strict=True))
        if np.isfinite(lo) or np.isfinite(hi)
    ]
    return ", ".join(parts) or "none"


def _plot(
    episodes: Sequence[EpisodeResult], rows: Sequence[MethodSummary], out: Path, system: str
) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    files = []
    for scenario in dict.fromkeys(e.scenario for e in episodes):
        first = [e for e in episodes if e.scenario == scenario and e.initial_state == 0]
        nx, nu = first[0].obs.shape[1], first[0].act.shape[1]
        fig, axes = plt.subplots(nx + nu, 1, figsize=(7, 1.8 * (nx + nu)), sharex=True)
        for e in first:
            for i in range(nx):
                axes[i].plot(e.obs[:, i], label=e.method)
            for j in range(nu):
                axes[nx + j].step(np.arange(len(e.act)), e.act[:, j], where="post")
        for i in range(nx):
            axes[i].set_ylabel(f"x[{i}]")
        for j in range(nu):
            axes[nx + j].set_ylabel(f"u[{j}]")
        axes[-1].set_xlabel("step")
        axes[0].legend(loc="upper right", fontsize="small")
        axes[0].set_title(f"{system} {scenario}: closed loop from initial state 0")
        fig.tight_layout()
        path = out / f"trajectories_{scenario}.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        files.append(path)
    scenarios = list(dict.fromkeys(r.scenario for r in rows))
    colors = {m: f"C{i}" for i, m in enumerate(METHODS)}
    fig, axes = plt.subplots(1, len(scenarios), figsize=(5 * len(scenarios), 4), squeeze=False)
    for ax, scenario in zip(axes[0], scenarios, strict=True):
        for r in rows:
            if r.scenario != scenario:
                continue
            ax.errorbar(
                r.solve_ms_median,
                r.cost_mean,
                yerr=r.cost_std,
                fmt="o",
                capsize=3,
                color=colors[r.method],
                label=r.method,
            )
        ax.set_xscale("log")
        ax.set_xlabel("median solve time per MPC step [ms]")
        ax.set_ylabel("closed-loop cost (mean +- std)")
        ax.set_title(f"{system} {scenario}")
        ax.legend(fontsize="small")
    fig.tight_layout()
    path = out / "cost_vs_time.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    files.append(path)
    return files
