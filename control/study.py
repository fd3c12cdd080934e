"""The control comparison study: LQR, iLQR-MPC, CEM-MPC, random-shooting-MPC, casadi NMPC and
MCTS-MPC on one analytic system, the same cost, horizon and time step, from the same initial
states.

Every method is a planner behind :class:`~mbrl.control.mpc.MPCController` (replanning every
step, warm-started with the shifted plan; the first plan of an episode has no warm start) on a
:class:`~mbrl.planners.base.PlanningProblem` whose model is the system's exact torch dynamics
and whose reward is minus the system's stage cost (plus minus its terminal cost at the horizon,
the problem's ``value_fn``). MCTS searches a grid of :data:`MCTS_GRID` evenly spaced values per
action dimension within the bounds (:func:`mbrl.envs.discretize`), scoring each new leaf with
the same ``value_fn``. NMPC optimizes the casadi twins of the same problem's model and
cost. Each episode is a closed-loop rollout of the system's gymnasium env
(:func:`~mbrl.control.mpc.run_episode`), reset with seed ``seed + k`` for initial state ``k``,
so all methods start from the same states.

Scenarios: ``"swingup"`` starts from the system's nominal start (hanging down for the
swing-ups) with noise; for the nonlinear systems a ``"stabilize"`` scenario starts near the goal,
where the infinite-horizon LQR around the goal applies. LQR runs in ``"stabilize"`` and, for the
linear system, in the one ``"regulate"`` scenario.

Success (:class:`SuccessCriterion`, written with its numbers in the header of ``results.md``):

1. *settled*: the last ``hold_steps + 1`` states (0.5 s) all lie within the system's
   ``success_tolerance`` of the goal, elementwise, angles wrapped to ``(-pi, pi]``;
2. *no extra turn*: every angle, unwrapped along the episode, ends within ``3 pi / 2`` of where
   it started (a swing-up from hanging may end a half turn either way; a full turn away from
   the start fails, although it ends upright in wrapped coordinates);
3. *stays in the basin* (``"stabilize"`` only): every angle stays within ``pi / 2`` of the goal
   (unwrapped) during the whole episode: the pendulum never drops below horizontal.

An episode that fails names the first rule it breaks (``failure``: ``"settled"``, ``"turn"``,
``"basin"``).

Measured per method and scenario (one row of ``results.csv`` / ``results.md``): success rate
and the failures; closed-loop cost ``sum_t c(x_t, u_t) + c_T(x_T)`` (mean and std over initial
states) and, where LQR ran, its ratio to LQR's mean cost; control effort (RMS of the applied
action over the episode, in the action's units); settling time (seconds from the start after
which every state stays within the tolerance of rule 1; the worst over the initial states, inf
when one never settles); overshoot (the largest excursion of an angle or position past its goal,
to the side opposite its start, in percent of its initial distance to the goal; entries that
start within their tolerance are not counted; the worst over the initial states); solve time
per MPC step (median, 95th percentile and maximum over the warm-started steps, and the worst
cold first plan, which includes each planner's one-off setup such as NMPC building its NLP)
against the real-time budget of one step, ``dt``, with the number of warm steps over it;
state-constraint violations of the closed loop (steps outside the study's state bounds, which
NMPC imposes as constraints and the other methods do not know); plan status counts. Plots:
``trajectories_<scenario>.png`` (states and controls of every method from initial state 0
against time in seconds, axes named with units) and ``cost_vs_time.png`` (closed-loop cost
against median solve time).

A user's own system: :func:`load_system` takes ``"module:function"`` (``mbrl study control
--system my_pkg.systems:make_system``), imports the module and calls the function without
arguments; it must return an :class:`~mbrl.envs.systems.AnalyticSystem`, whose dynamics
``step_expr(x, u, ops)``, stage cost ``cost_expr(x, u, ops)`` and terminal cost
``terminal_expr(x, ops)`` are written once over the ``ops`` namespace (``ops.sin``,
``ops.cos``, ``ops.split``, ``ops.stack``, ``ops.quad``, ...) so that they run both as batched
torch functions (LQR, iLQR, CEM, random shooting, the env) and as casadi expressions (NMPC),
with ``dt`` in seconds, ``goal`` (an equilibrium under zero action), ``start`` and
``start_noise``, the action bounds, ``angle_dims`` and ``success_tolerance`` (see
:func:`~mbrl.envs.systems.pendulum` for a complete example). Its study defaults: ``H = 40``,
``T`` its ``max_episode_steps``, ``"stabilize"`` noise twice the smallest success tolerance, no
state bounds; its states are labelled ``x[i]``.
"""

from __future__ import annotations

import csv
import dataclasses
import importlib
import inspect
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
from mbrl.envs.systems import SYSTEMS, AnalyticSystem
from mbrl.planners.base import Plan, Planner, PlanningProblem, WarmStart
from mbrl.planners.ilqr import ILQR
from mbrl.planners.lqr import LQR
from mbrl.planners.mcts import MCTS
from mbrl.planners.sampling import CEM, RandomShooting

METHODS = ("lqr", "ilqr", "cem", "random_shooting", "nmpc", "mcts")
SYSTEM_NAMES = tuple(SYSTEMS)  # "linear" is the double integrator
PLANNERS: dict[str, type] = {
    "lqr": LQR,
    "ilqr": ILQR,
    "cem": CEM,
    "random_shooting": RandomShooting,
    "nmpc": NMPC,
    "mcts": MCTS,
}
"""The planner class behind each method; ``--option METHOD.NAME=VALUE`` sets its keyword
``NAME``."""
_SET_BY_STUDY = {"lqr": ("goal",), "nmpc": ("horizon",)}
_DEFAULTS = {
    "ilqr": {"max_iterations": 50},
    "cem": {"population": 200, "iterations": 4},
    "random_shooting": {"population": 500},
    "nmpc": {"max_iter": 100},
    "mcts": {"simulations": 200},
}
MCTS_GRID = 11  # values per action dimension MCTS searches (11 torques on the pendulum)
HOLD_SECONDS = 0.5  # rule 1 holds over the last 0.5 s
MAX_TURN = 1.5 * math.pi  # rule 2
BASIN = 0.5 * math.pi  # rule 3


@dataclass(frozen=True)
class StudySetup:
    """Per-system defaults: horizon, episode length, initial-state noise, state bounds."""

    horizon: int  # H planning steps
    episode_steps: int  # T closed-loop steps
    start_noise: float  # half-width of the uniform noise on the nominal start
    stabilize_noise: float  # half-width of the noise around the goal ("stabilize")
    state_low: np.ndarray | None  # [X] study constraint (NMPC imposes it), None for none
    state_high: np.ndarray | None  # [X]


@dataclass(frozen=True)
class Labels:
    """Names and units of a system's states and actions, for tables and plot axes."""

    states: tuple[str, ...]  # [X] e.g. "theta [rad]"
    actions: tuple[str, ...]  # [U]
    measured: tuple[int, ...]  # the angles and positions whose overshoot is measured


def labels_of(system: AnalyticSystem) -> Labels:
    """The system's own ``state_labels`` / ``action_labels``, ``x[i]`` / ``u[j]`` where it has
    none. The overshoot is measured on the entries that are not rates (a unit without ``/s``:
    angles and positions), on every entry of a system without state labels."""
    states = system.state_labels or tuple(f"x[{i}]" for i in range(system.obs_dim))
    actions = system.action_labels or tuple(f"u[{j}]" for j in range(system.act_dim))
    if not system.state_labels:
        return Labels(states, actions, tuple(range(system.obs_dim)))
    units = [label.rpartition(" [")[2] if label.endswith("]") else "" for label in states]
    return Labels(states, actions, tuple(i for i, u in enumerate(units) if "/s" not in u))


def _setup(system: AnalyticSystem) -> StudySetup:
    """The built-in defaults for the study's own systems, generic ones for any other."""
    inf = np.inf
    builtin = {"double_integrator": 2, "pendulum": 2, "cartpole": 4, "acrobot": 4}
    if builtin.get(system.name) != system.obs_dim:
        stabilize = 2.0 * float(np.min(system.success_tolerance))
        return StudySetup(40, system.max_episode_steps, system.start_noise, stabilize, None, None)
    if system.name == "double_integrator":
        return StudySetup(20, 50, 0.5, 0.0, np.array([-inf, -0.8]), np.array([inf, 0.8]))
    if system.name == "pendulum":  # Pendulum-v1's speed limit as the state constraint
        return StudySetup(40, 100, 0.2, 0.3, np.array([-inf, -8.0]), np.array([inf, 8.0]))
    if system.name == "cartpole":  # the rail
        return StudySetup(
            40, 100, 0.1, 0.2, np.array([-2.0, -inf, -inf, -inf]), np.array([2.0, inf, inf, inf])
        )
    if system.name == "acrobot":  # Acrobot-v1's velocity limits
        return StudySetup(
            50,
            120,
            0.1,
            0.05,
            np.array([-inf, -inf, -4 * np.pi, -9 * np.pi]),
            np.array([inf, inf, 4 * np.pi, 9 * np.pi]),
        )


def make_system(name: str, start_noise: float = 0.0) -> AnalyticSystem:
    """The study's system ``name`` (``"linear"`` is the double integrator)."""
    from mbrl.envs.systems import double_integrator

    if name not in SYSTEM_NAMES:
        raise ValueError(f"unknown system {name!r}; valid: {', '.join(SYSTEM_NAMES)}")
    if name == "linear":
        return dataclasses.replace(double_integrator(), start_noise=start_noise)
    return SYSTEMS[name](start_noise=start_noise)


def load_system(text: str) -> str | AnalyticSystem:
    """A study system from the command line: a built-in name (returned as it is) or
    ``"module:function"``, imported and called without arguments; the function must return an
    :class:`~mbrl.envs.systems.AnalyticSystem` (the interface is in the module docstring).

    Raises:
        ValueError: an unknown name, a module that does not import, a missing or non-callable
            function, or a result that is not an ``AnalyticSystem`` (the message names it).
    """
    if ":" not in text:
        if text not in SYSTEM_NAMES:
            raise ValueError(
                f"unknown system {text!r}; valid names: {', '.join(SYSTEM_NAMES)}, or "
                "module:function returning an AnalyticSystem (e.g. my_pkg.systems:make_system)"
            )
        return text
    module_name, _, attr = text.partition(":")
    if not module_name or not attr:
        raise ValueError(f"--system {text!r}: expected module:function, e.g. my_pkg.sys:make")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise ValueError(
            f"--system {text!r}: cannot import module {module_name!r} ({e}); is it on "
            "PYTHONPATH or installed?"
        ) from e
    factory = getattr(module, attr, None)
    if not callable(factory):
        raise ValueError(
            f"--system {text!r}: module {module_name!r} has no function {attr!r}; define "
            f"{attr}() returning an AnalyticSystem"
        )
    system = factory()
    if not isinstance(system, AnalyticSystem):
        raise ValueError(
            f"--system {text!r}: {attr}() returned {type(system).__name__}, not an "
            "mbrl.envs.systems.AnalyticSystem; build one with its step_expr, cost_expr and "
            "terminal_expr (see mbrl.envs.systems.pendulum)"
        )
    return system


def parse_planner_options(items: Sequence[str]) -> dict[str, dict[str, Any]]:
    """``["ilqr.max_iterations=50", "cem.population=300"]`` -> ``{"ilqr": {...}, "cem":
    {...}}``. Values are ints, floats, ``true``/``false``/``null`` or lists in YAML
    (``[0.5, 0.1]``), else strings. Names are checked by :func:`check_planner_options`.

    Raises:
        ValueError: an item that is not ``METHOD.NAME=VALUE``.
    """
    import yaml

    options: dict[str, dict[str, Any]] = {}
    for item in items:
        key, eq, raw = item.partition("=")
        method, dot, name = key.partition(".")
        if not eq or not dot or not method or not name:
            raise ValueError(
                f"planner option {item!r}: expected METHOD.NAME=VALUE, e.g. ilqr.max_iterations=50"
            )
        try:
            value: Any = int(raw)
        except ValueError:
            try:
                value = float(raw)
            except ValueError:
                value = yaml.safe_load(raw) if raw else raw
        options.setdefault(method, {})[name] = value
    return options


def check_planner_options(options: dict[str, dict[str, Any]], methods: Sequence[str]) -> None:
    """Refuse options for an unknown method, a method not run, or a keyword the planner does
    not take (or that the study sets itself), naming the valid ones.

    Raises:
        ValueError: the first bad option.
    """
    for method, opts in options.items():
        if method not in PLANNERS:
            raise ValueError(
                f"planner option for unknown method {method!r}; valid: {', '.join(METHODS)}"
            )
        if method not in methods:
            raise ValueError(
                f"planner option for {method!r}, which is not among the methods run "
                f"({', '.join(methods)})"
            )
        params = inspect.signature(PLANNERS[method]).parameters
        fixed = _SET_BY_STUDY.get(method, ())
        valid = [p for p in params if p not in fixed]
        for name in opts:
            if name in fixed:
                raise ValueError(f"planner option {method}.{name} is set by the study")
            if name not in params:
                raise ValueError(
                    f"unknown planner option {method}.{name}; valid for {method}: "
                    f"{', '.join(valid)}"
                )


@dataclass(frozen=True)
class SuccessCriterion:
    """When an episode counts as a success (the rules are in the module docstring)."""

    tolerance: np.ndarray  # [X] rule 1, elementwise, angles wrapped
    angle_dims: tuple[int, ...]  # the entries rules 2 and 3 look at (unwrapped)
    hold_steps: int  # rule 1 holds for the last hold_steps + 1 states
    max_turn: float  # rule 2: |theta_T - theta_0| <= max_turn [rad]
    basin: float | None  # rule 3: max_t |theta_t - goal| <= basin [rad]; None: not checked

    def judge(self, goal: np.ndarray, obs: np.ndarray) -> str:
        """The first rule episode ``obs [T + 1, X]`` breaks (``"settled"``, ``"turn"``,
        ``"basin"``), or ``""`` for a success."""
        within = _within(goal, obs, self.tolerance, self.angle_dims)  # [T + 1]
        if not within[-(self.hold_steps + 1) :].all():
            return "settled"
        if self.angle_dims:
            theta = np.unwrap(obs[:, list(self.angle_dims)].astype(np.float64), axis=0)
            if (np.abs(theta[-1] - theta[0]) > self.max_turn).any():
                return "turn"
            if self.basin is not None:
                if (np.abs(theta - goal[list(self.angle_dims)]) > self.basin).any():
                    return "basin"
        return ""

    def text(self, labels: Labels, dt: float) -> str:
        """The criterion with its numbers, for the results header."""
        tol = ", ".join(
            f"|{labels.states[i].split(' ')[0]}| <= {v:g}" for i, v in enumerate(self.tolerance)
        )
        angles = ", ".join(labels.states[i].split(" ")[0] for i in self.angle_dims) or "none"
        out = (
            f"(1) settled: the last {self.hold_steps + 1} states ({self.hold_steps * dt:g} s) "
            f"within {tol} of the goal (angles wrapped)"
        )
        if self.angle_dims:
            out += (
                f"; (2) no extra turn: each angle ({angles}, unwrapped) ends within "
                f"{self.max_turn:.3g} rad (3 pi / 2) of its start"
            )
            if self.basin is not None:
                out += (
                    f"; (3) basin: each angle stays within {self.basin:.3g} rad (pi / 2) of the "
                    "goal during the whole episode"
                )
        return out


def success_criterion(system: AnalyticSystem, scenario: str) -> SuccessCriterion:
    """The study's criterion for ``system`` in ``scenario`` (rule 3 only in ``"stabilize"``)."""
    return SuccessCriterion(
        tolerance=np.asarray(system.success_tolerance, dtype=np.float64),
        angle_dims=tuple(system.angle_dims),
        hold_steps=max(0, int(round(HOLD_SECONDS / system.dt))),
        max_turn=MAX_TURN,
        basin=BASIN if scenario == "stabilize" else None,
    )


def _wrapped_error(goal: np.ndarray, obs: np.ndarray, angle_dims: Sequence[int]) -> np.ndarray:
    d = np.asarray(obs, dtype=np.float64) - goal  # [T + 1, X]
    if angle_dims:
        idx = list(angle_dims)
        d[..., idx] = np.mod(d[..., idx] + np.pi, 2 * np.pi) - np.pi
    return d


def _within(
    goal: np.ndarray, obs: np.ndarray, tol: np.ndarray, angle_dims: Sequence[int]
) -> np.ndarray:
    return np.all(np.abs(_wrapped_error(goal, obs, angle_dims)) <= tol, axis=-1)  # [T + 1]


def settling_time(system: AnalyticSystem, obs: np.ndarray) -> float:
    """Seconds from the start after which every state of ``obs [T + 1, X]`` stays within the
    success tolerance of the goal (angles wrapped); ``inf`` when the last state is outside."""
    within = _within(system.goal, obs, system.success_tolerance, system.angle_dims)
    if not within[-1]:
        return math.inf
    outside = np.flatnonzero(~within)
    return 0.0 if len(outside) == 0 else float((outside[-1] + 1) * system.dt)


def overshoot_percent(system: AnalyticSystem, obs: np.ndarray, measured: Sequence[int]) -> float:
    """The largest excursion past the goal, to the side opposite the start, of the measured
    entries of ``obs [T + 1, X]``, in percent of their initial distance to the goal; angles
    are unwrapped and measured from the goal image (goal + 2 pi n) they end nearest. Entries
    starting within their success tolerance are skipped; ``nan`` when none is left."""
    x = np.asarray(obs, dtype=np.float64).copy()
    goal = np.broadcast_to(np.asarray(system.goal, dtype=np.float64), x.shape[1:]).copy()
    for i in system.angle_dims:
        x[:, i] = np.unwrap(x[:, i])
        goal[i] += 2 * np.pi * np.round((x[-1, i] - goal[i]) / (2 * np.pi))
    worst = math.nan
    for i in measured:
        e = x[:, i] - goal[i]
        if abs(e[0]) <= system.success_tolerance[i]:
            continue
        past = max(0.0, float(np.max(-np.sign(e[0]) * e)))
        worst = max(0.0 if math.isnan(worst) else worst, 100.0 * past / abs(e[0]))
    return worst


@dataclass(frozen=True)
class EpisodeResult:
    """One closed-loop episode of one method from one initial state."""

    scenario: str
    method: str
    initial_state: int  # k
    cost: float  # sum_t c(x_t, u_t) + c_T(x_T)
    success: bool
    failure: str  # "" on success, else the first rule broken: "settled", "turn", "basin"
    settling_s: float  # seconds; inf when it does not settle
    overshoot_pct: float  # nan when no measured entry starts outside its tolerance
    u_rms: float  # RMS of the applied action over the episode (all entries)
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
    success_rate: float
    failures: str  # "basin:3"; "" when every episode succeeded
    cost_mean: float
    cost_std: float
    cost_vs_lqr: float  # cost_mean / LQR's cost_mean in the scenario; nan where LQR did not run
    u_rms: float  # mean over episodes
    settling_s: float  # worst over episodes
    overshoot_pct: float  # worst over episodes (nan: nothing measured)
    solve_ms_median: float  # warm-started steps
    solve_ms_p95: float
    solve_ms_max: float
    cold_ms_max: float  # the first plan of each episode, worst
    budget_ms: float  # dt: the real-time budget of one step
    over_budget: int  # warm steps slower than dt, over all episodes
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


def _planner(
    method: str, system: AnalyticSystem, horizon: int, setup: StudySetup, options: dict
) -> Planner:
    opts = {**_DEFAULTS.get(method, {}), **options.get(method, {})}
    if method == "lqr":
        return LQR(goal=system.goal, **opts)
    if method == "nmpc":
        bounds = None
        if setup.state_low is not None:
            bounds = (setup.state_low, setup.state_high)
        return NMPC(horizon, **{"state_bounds": bounds, **opts})
    if method in PLANNERS:
        return PLANNERS[method](**opts)
    raise ValueError(f"unknown method {method!r}; valid: {', '.join(METHODS)}")


def _problem(
    system: AnalyticSystem, horizon: int, seed: int, discrete: bool = False
) -> PlanningProblem:
    """The system's exact dynamics, its reward (the stage cost, closed form and casadi) and its
    terminal reward as ``value_fn``: every method optimises the same objective. ``discrete``
    restricts the actions to the :data:`MCTS_GRID` grid (``action_values``) for MCTS."""
    values = None
    if discrete:
        from mbrl.envs import discretize

        values = discretize(system.spec(), MCTS_GRID).discrete_actions()  # [A, U]
    return PlanningProblem(
        SystemModel(system),
        system.reward_fn(),
        None,
        horizon,
        torch.as_tensor(system.action_low, dtype=torch.float32),
        torch.as_tensor(system.action_high, dtype=torch.float32),
        generator=torch.Generator().manual_seed(seed),
        value_fn=system.value_fn(),
        action_values=values,
    )


def _closed_loop_cost(system: AnalyticSystem, ep: Episode) -> float:
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
    system: AnalyticSystem,
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
    problem = _problem(system, horizon, seed + k, discrete=method == "mcts")
    controller = MPCController(planner, problem)
    env = system.spec().make()
    ep = run_episode(env, controller, seed=seed + k, max_steps=episode_steps)
    violations, worst = _violations(ep.obs, setup)
    failure = success_criterion(system, scenario).judge(system.goal, ep.obs)
    act = np.clip(ep.act, system.action_low, system.action_high)
    return EpisodeResult(
        scenario=scenario,
        method=method,
        initial_state=k,
        cost=_closed_loop_cost(system, ep),
        success=not failure,
        failure=failure,
        settling_s=settling_time(system, ep.obs),
        overshoot_pct=overshoot_percent(system, ep.obs, labels_of(system).measured),
        u_rms=float(np.sqrt(np.mean(act.astype(np.float64) ** 2))),
        solve_seconds=tuple(planner.seconds),
        statuses=tuple(planner.statuses),
        violations=violations,
        max_violation=worst,
        obs=ep.obs,
        act=ep.act,
    )


def _worst(values: Sequence[float]) -> float:
    finite = [v for v in values if not math.isnan(v)]
    return max(finite) if finite else math.nan


def _summarize(
    episodes: Sequence[EpisodeResult], dt: float, lqr_cost: float | None
) -> MethodSummary:
    costs = np.array([e.cost for e in episodes])
    warm = [np.asarray(e.solve_seconds[1:]) for e in episodes]
    times = np.concatenate(warm) * 1e3 if sum(len(w) for w in warm) else np.full(1, np.nan)
    cold = [1e3 * e.solve_seconds[0] for e in episodes if e.solve_seconds]
    counts = Counter(s for e in episodes for s in e.statuses)
    failures = Counter(e.failure for e in episodes if e.failure)
    return MethodSummary(
        scenario=episodes[0].scenario,
        method=episodes[0].method,
        episodes=len(episodes),
        success_rate=float(np.mean([e.success for e in episodes])),
        failures=" ".join(f"{k}:{v}" for k, v in sorted(failures.items())),
        cost_mean=float(costs.mean()),
        cost_std=float(costs.std()),
        cost_vs_lqr=math.nan if not lqr_cost else float(costs.mean()) / lqr_cost,
        u_rms=float(np.mean([e.u_rms for e in episodes])),
        settling_s=max(e.settling_s for e in episodes),
        overshoot_pct=_worst([e.overshoot_pct for e in episodes]),
        solve_ms_median=float(np.median(times)),
        solve_ms_p95=float(np.percentile(times, 95)),
        solve_ms_max=float(np.max(times)),
        cold_ms_max=max(cold, default=math.nan),
        budget_ms=1e3 * dt,
        over_budget=int((times > 1e3 * dt).sum()),
        violations=int(sum(e.violations for e in episodes)),
        max_violation=float(max(e.max_violation for e in episodes)),
        status_counts=" ".join(f"{k}:{v}" for k, v in sorted(counts.items())),
    )


def run_study(
    system: str | AnalyticSystem,
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
            ``"acrobot"``, or an :class:`~mbrl.envs.systems.AnalyticSystem` of one's own (see
            the module docstring; :func:`load_system` builds one from ``module:function``).
        out_dir: folder for ``results.csv``, ``results.md`` and the PNG plots (created).
        num_initial_states: ``K`` initial states per scenario.
        horizon, episode_steps: ``H`` and ``T``; per-system defaults when ``None``.
        seed: initial state ``k`` comes from env seed ``seed + k``; planners' generators too.
        methods: a subset of :data:`METHODS`. LQR runs only where it applies (the linear
            system, and the ``"stabilize"`` scenario of the others).
        planner_options: per-method constructor keywords, e.g. ``{"cem": {"population": 100}}``
            (checked by :func:`check_planner_options` before any episode runs).
        scenarios: ``("swingup", "stabilize")`` by default, ``("regulate",)`` for the linear
            system.
        progress: called with one line per finished episode (``None``: silent).

    Returns:
        :class:`StudyResult` with one :class:`MethodSummary` per (scenario, method).

    Raises:
        ValueError: an unknown system, method, scenario or planner option, a bad option value,
            or ``num_initial_states < 1``.
    """
    if isinstance(system, str):
        if system not in SYSTEM_NAMES:
            raise ValueError(f"unknown system {system!r}; valid: {', '.join(SYSTEM_NAMES)}")
        base, linear = make_system(system), system == "linear"
    elif isinstance(system, AnalyticSystem):
        base, linear = system, False
    else:
        raise ValueError(
            f"system must be one of {', '.join(SYSTEM_NAMES)} or an AnalyticSystem, got "
            f"{type(system).__name__}"
        )
    try:
        base.casadi  # noqa: B018 the twins every method uses (derivatives, NMPC), built once
    except Exception as e:
        raise ValueError(
            f"system {base.name!r}: its step_expr / cost_expr / terminal_expr do not build as "
            f"casadi expressions ({type(e).__name__}: {e}); write them over the ops namespace "
            "they receive (ops.sin, ops.split, ...), not torch or numpy calls"
        ) from e
    setup = _setup(base)
    bad = [m for m in methods if m not in METHODS]
    if bad:
        raise ValueError(f"unknown methods {bad}; valid: {', '.join(METHODS)}")
    if num_initial_states < 1:
        raise ValueError(f"num_initial_states must be >= 1, got {num_initial_states}")
    horizon = setup.horizon if horizon is None else horizon
    episode_steps = setup.episode_steps if episode_steps is None else episode_steps
    valid = ("regulate",) if linear else ("swingup", "stabilize")
    scenarios = valid if scenarios is None else tuple(scenarios)
    if any(s not in valid for s in scenarios):
        raise ValueError(f"scenarios for {base.name!r} are {valid}, got {scenarios}")
    options = planner_options or {}
    check_planner_options(options, methods)
    for method in methods:  # bad option values fail here, before any episode
        try:
            _planner(method, base, horizon, setup, options)
        except (TypeError, ValueError) as e:
            given = ", ".join(f"{method}.{k}={v!r}" for k, v in options.get(method, {}).items())
            raise ValueError(f"planner options {given or '(defaults)'}: {e}") from e
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    episodes: list[EpisodeResult] = []
    rows: list[MethodSummary] = []
    for scenario in scenarios:
        sys_s = dataclasses.replace(base, start_noise=setup.start_noise)
        if scenario == "stabilize":
            sys_s = dataclasses.replace(sys_s, start=sys_s.goal, start_noise=setup.stabilize_noise)
        sys_s.casadi  # noqa: B018 built before any plan is timed (replace() drops the cache)
        lqr_cost = None
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
                        f"{base.name} {scenario} {method} start {k}: cost {ep.cost:.2f} "
                        f"success {ep.success}{' (' + ep.failure + ')' if ep.failure else ''} "
                        f"median solve {1e3 * float(np.median(ep.solve_seconds)):.1f} ms"
                    )
            episodes += runs
            if method == "lqr":
                lqr_cost = float(np.mean([e.cost for e in runs]))
            rows.append(_summarize(runs, base.dt, lqr_cost))

    criteria = {s: success_criterion(base, s) for s in scenarios}
    files = [
        _write_csv(rows, out / "results.csv"),
        _write_markdown(
            rows,
            out / "results.md",
            base,
            horizon,
            episode_steps,
            setup,
            seed,
            num_initial_states,
            criteria,
        ),
    ]
    files += _plot(episodes, rows, out, base)
    return StudyResult(
        system=base.name, rows=tuple(rows), episodes=tuple(episodes), files=tuple(files)
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


def cost_weights(system: AnalyticSystem) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Half the Hessians of the stage cost in ``x`` and ``u`` and of the terminal cost at the
    goal with zero action: ``Q [X, X]``, ``R [U, U]``, ``Qf [X, X]`` (exact weights of a
    quadratic cost, the local ones of a smooth cost; ``2 (1 - cos theta)`` gives 1)."""
    goal = torch.as_tensor(system.goal, dtype=torch.float64)
    u0 = torch.zeros(system.act_dim, dtype=torch.float64)
    hess = torch.autograd.functional.hessian

    def stage(x: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        return system.cost(x[None], u[None])[0]

    (hxx, _), (_, huu) = hess(stage, (goal, u0))
    hf = hess(lambda x: system.terminal_cost(x[None])[0], goal)
    return 0.5 * hxx.numpy(), 0.5 * huu.numpy(), 0.5 * hf.numpy()


def _matrix_text(m: np.ndarray) -> str:
    if np.allclose(m, np.diag(np.diag(m))):
        return "diag(" + ", ".join(f"{v:.3g}" for v in np.diag(m)) + ")"
    return "[" + "; ".join(", ".join(f"{v:.3g}" for v in row) for row in m) + "]"


def _write_markdown(
    rows: Sequence[MethodSummary],
    path: Path,
    system: AnalyticSystem,
    horizon: int,
    steps: int,
    setup: StudySetup,
    seed: int,
    k: int,
    criteria: dict[str, SuccessCriterion],
) -> Path:
    labels = labels_of(system)
    dt = system.dt
    Q, R, Qf = cost_weights(system)
    states = ", ".join(labels.states)
    head = (
        f"# Control study: {system.name}\n\n"
        f"State {states}; action {', '.join(labels.actions)}. dt = {dt:g} s; horizon "
        f"H = {horizon} steps ({horizon * dt:g} s); episode T = {steps} steps "
        f"({steps * dt:g} s); {k} initial states per scenario (env seeds {seed}..{seed + k - 1}),"
        " replanning every step.\n\n"
        "Cost: the system's stage cost summed over the episode plus its terminal cost; its "
        f"weights at the goal (half the Hessians): Q = {_matrix_text(Q)}, R = {_matrix_text(R)},"
        f" terminal Qf = {_matrix_text(Qf)}.\n\n"
        "Success: " + " ".join(f"{s}: {c.text(labels, dt)}." for s, c in criteria.items()) + "\n\n"
        "Columns: cost_vs_lqr = cost_mean / LQR's; u_rms = RMS of the applied action; "
        "settling_s = seconds until every state stays within the tolerance of rule 1 (worst "
        "start); overshoot_pct = largest excursion of "
        + ", ".join(labels.states[i].split(" ")[0] for i in labels.measured)
        + " past the goal in % of its initial distance (worst start); solve times are wall "
        f"times of one warm-started MPC step's plan (cold_ms_max: the first plan of an episode) "
        f"against the real-time budget dt = {1e3 * dt:g} ms (over_budget: warm steps slower); "
        f"violations: closed-loop steps outside the state bounds ({_bounds_text(setup, labels)})"
        ", which only NMPC imposes.\n\n"
    )
    lines = ["| " + " | ".join(_COLUMNS) + " |", "|" + "---|" * len(_COLUMNS)]
    lines += ["| " + " | ".join(_fmt(getattr(r, c)) for c in _COLUMNS) + " |" for r in rows]
    path.write_text(head + "\n".join(lines) + "\n")
    return path


def _bounds_text(setup: StudySetup, labels: Labels) -> str:
    if setup.state_low is None:
        return "none"
    parts = [
        f"{labels.states[i].split(' ')[0]} in [{lo:g}, {hi:g}]"
        for i, (lo, hi) in enumerate(zip(setup.state_low, setup.state_high, strict=True))
        if np.isfinite(lo) or np.isfinite(hi)
    ]
    return ", ".join(parts) or "none"


def _plot(
    episodes: Sequence[EpisodeResult],
    rows: Sequence[MethodSummary],
    out: Path,
    system: AnalyticSystem,
) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = labels_of(system)
    files = []
    for scenario in dict.fromkeys(e.scenario for e in episodes):
        first = [e for e in episodes if e.scenario == scenario and e.initial_state == 0]
        nx, nu = first[0].obs.shape[1], first[0].act.shape[1]
        fig, axes = plt.subplots(nx + nu, 1, figsize=(7, 1.8 * (nx + nu)), sharex=True)
        for e in first:
            t = system.dt * np.arange(len(e.obs))
            for i in range(nx):
                axes[i].plot(t, e.obs[:, i], label=e.method)
            for j in range(nu):
                axes[nx + j].step(t[:-1], e.act[:, j], where="post")
        for i in range(nx):
            axes[i].set_ylabel(labels.states[i])
        for j in range(nu):
            axes[nx + j].set_ylabel(labels.actions[j])
        axes[-1].set_xlabel("time [s]")
        axes[0].legend(loc="upper right", fontsize="small")
        axes[0].set_title(f"{system.name} {scenario}: closed loop from initial state 0")
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
        ax.axvline(1e3 * system.dt, color="grey", linestyle=":", label="budget dt")
        ax.set_xscale("log")
        ax.set_xlabel("median solve time per MPC step [ms]")
        ax.set_ylabel("closed-loop cost (mean +- std)")
        ax.set_title(f"{system.name} {scenario}")
        ax.legend(fontsize="small")
    fig.tight_layout()
    path = out / "cost_vs_time.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    files.append(path)
    return files


# ---------------------------------------------------------------- the guided policy search study

GPS_METHODS = ("lqr-flm", "gps", "ilqr", "cem")
"""The methods of :func:`run_gps_study`: LQR-FLM and MDGPS learn from env samples; iLQR-MPC and
CEM-MPC plan on the system's true model."""
_GPS_COLUMNS = (
    "method",
    "conditions",
    "cost_mean",
    "cost_std",
    "held_out_cost_mean",
    "env_steps",
    "iterations",
)


@dataclass(frozen=True)
class GPSStudyRow:
    """One method of the guided policy search study."""

    method: str
    conditions: int  # M training start states
    cost_mean: float  # closed-loop cost sum_t c(x_t, u_t) + c_T(x_T), mean over the conditions
    cost_std: float
    held_out_cost_mean: float  # the same from the held-out starts (nan: LQR-FLM has no policy)
    env_steps: int  # real env steps learned from (0: planning on the true model)
    iterations: int  # LQR-FLM / GPS iterations (0 for the planners)


@dataclass(frozen=True)
class GPSStudyResult:
    """What :func:`run_gps_study` returns."""

    env: str
    rows: tuple[GPSStudyRow, ...]
    files: tuple[Path, ...]


def run_gps_study(
    env: str,
    out_dir: Path | str,
    conditions: int = 4,
    held_out: int = 4,
    iterations: int = 8,
    samples: int = 5,
    horizon: int = 40,
    episode_steps: int | None = None,
    seed: int = 0,
    methods: Sequence[str] = GPS_METHODS,
    planner_options: dict[str, dict] | None = None,
    progress: Callable[[str], None] | None = print,
) -> GPSStudyResult:
    """LQR-FLM, MDGPS's global policy, iLQR-MPC and CEM-MPC on one analytic env, the same cost
    (the system's stage cost summed over the episode plus its terminal cost) and the same
    start states: the ``conditions`` training starts (env reset seeds
    :func:`mbrl.algorithms.lqr_flm.condition_seed` of ``seed``) and ``held_out`` further ones.

    LQR-FLM and GPS train for ``iterations`` iterations of ``samples`` episodes per condition in
    their own run folders under ``out_dir`` (``lqr-flm/``, ``gps/``: metrics, plots,
    checkpoints; ``mbrl resume`` continues them), then the noise-free local controllers (on
    the training starts only: each belongs to its start) and the global policy alone are played
    once from each start. iLQR and CEM replan every step on the true model with planning
    horizon ``horizon`` (their options as in the control study, e.g. ``{"cem": {"population":
    100}}``). Writes ``results.csv``, ``results.md`` and ``gps_study.png`` (the learners'
    closed-loop cost against env steps, the planners' as lines).

    Raises:
        ValueError: an env without an analytic model, an unknown method or option, or counts
            below 1.
    """
    from mbrl import envs
    from mbrl.algorithms import gps, lqr_flm
    from mbrl.envs.systems import ENV_NAMES
    from mbrl.planners.lqr_flm import LinearGaussianController
    from mbrl.runs import Run, load_checkpoint_file

    if env not in ENV_NAMES:
        raise ValueError(
            f"the GPS study runs on an analytic env (its true model for iLQR and CEM); got "
            f"{env!r}, valid: {', '.join(ENV_NAMES)}"
        )
    bad = [m for m in methods if m not in GPS_METHODS]
    if bad:
        raise ValueError(f"unknown methods {bad}; valid: {', '.join(GPS_METHODS)}")
    for name, value in (("conditions", conditions), ("iterations", iterations)):
        if value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")
    options = planner_options or {}
    for method, opts in options.items():
        if method not in ("ilqr", "cem") or method not in methods:
            raise ValueError(
                f"planner options are for the planners run (ilqr, cem among {list(methods)}), "
                f"not {method!r}"
            )
        check_planner_options({method: opts}, methods)
    spec = envs.make(env)
    system: AnalyticSystem = spec.dynamics
    steps = episode_steps or spec.max_episode_steps
    horizon = min(horizon, steps)
    train_seeds = [lqr_flm.condition_seed(seed, m) for m in range(conditions)]
    test_seeds = [lqr_flm.condition_seed(seed, conditions + j) for j in range(held_out)]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    sampler = lqr_flm.Sampler(spec, steps)
    task = lqr_flm.TaskCost(spec)

    def costs(seeds: Sequence[int], act: lqr_flm.ActFn) -> np.ndarray:
        if not seeds:
            return np.full(1, math.nan)
        with torch.no_grad():
            return task.totals(sampler.conditions(seeds, 1, act))[:, 0].numpy()

    rows, curves = [], {}
    common = {"env": env, "seed": seed, "iterations": iterations, "conditions": conditions}
    common |= {"samples": samples, "horizon": steps}
    for method in methods:
        if method in ("lqr-flm", "gps"):
            module = lqr_flm if method == "lqr-flm" else gps
            extra = {"held_out": held_out} if method == "gps" else {}
            cfg = module.Config(**common, **extra)
            folder = out / method
            run = Run(folder, cfg, {"algo": method, "device": "cpu"}, create="overwrite")
            try:
                module.train(cfg, run)
            finally:
                run.close()
            state = load_checkpoint_file(folder / "checkpoint.pt")["state"]
            local = lqr_flm.LocalControllers(
                LinearGaussianController.initial(
                    steps, spec.obs_dim, spec.act_dim, batch_shape=(conditions,)
                )
            )
            local.load_state_dict(state["parts"]["local"])
            if method == "gps":
                policy = gps.make_policy(
                    cfg.policy, spec.obs_dim, spec.act_dim, 1.0, seed, torch.device("cpu")
                )
                policy.load_state_dict(state["parts"]["policy"])
                act = gps.policy_actions(policy, None, noise=False)
                train_cost, test_cost = costs(train_seeds, act), costs(test_seeds, act)
            else:
                act = lqr_flm.controller_actions(local.controller, None, noise=False)
                train_cost, test_cost = costs(train_seeds, act), np.full(1, math.nan)
            env_steps = state["counters"]["env_steps"]
            curves[method] = _eval_curve(folder / "metrics.csv")
        else:
            planner = _planner(method, system, horizon, _setup(system), options)
            ran = []
            for s in [*train_seeds, *test_seeds]:
                problem = _problem(system, horizon, s)
                ep = run_episode(
                    spec.make(), MPCController(planner, problem), seed=s, max_steps=steps
                )
                ran.append(_closed_loop_cost(system, ep))
            train_cost = np.asarray(ran[:conditions])
            test_cost = np.asarray(ran[conditions:]) if test_seeds else np.full(1, math.nan)
            env_steps = 0
        row = GPSStudyRow(
            method=method,
            conditions=conditions,
            cost_mean=float(train_cost.mean()),
            cost_std=float(train_cost.std()),
            held_out_cost_mean=float(test_cost.mean()),
            env_steps=int(env_steps),
            iterations=iterations if method in ("lqr-flm", "gps") else 0,
        )
        rows.append(row)
        if progress is not None:
            progress(
                f"{env} {method}: cost {row.cost_mean:.2f} +- {row.cost_std:.2f} on {conditions} "
                f"starts, held-out {row.held_out_cost_mean:.2f}, {row.env_steps} env steps"
            )
    files = [_gps_csv(rows, out / "results.csv")]
    files.append(_gps_markdown(rows, out / "results.md", env, system, steps, horizon, seed))
    files.append(_gps_plot(rows, curves, out / "gps_study.png", env))
    return GPSStudyResult(env=env, rows=tuple(rows), files=tuple(files))


def _eval_curve(metrics: Path) -> tuple[np.ndarray, np.ndarray]:
    """Env steps and the closed-loop cost of the noise-free agent after each iteration (minus
    its return plus its terminal cost) from a run's ``metrics.csv``."""
    with metrics.open(newline="") as f:
        rows = list(csv.DictReader(f))
    x = np.array([float(r["env_steps"]) for r in rows])
    y = np.array([-float(r["return"]) + float(r["eval_terminal_cost"]) for r in rows])
    return x, y


def _gps_csv(rows: Sequence[GPSStudyRow], path: Path) -> Path:
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(_GPS_COLUMNS)
        for r in rows:
            writer.writerow([getattr(r, c) for c in _GPS_COLUMNS])
    return path


def _gps_markdown(
    rows: Sequence[GPSStudyRow],
    path: Path,
    env: str,
    system: AnalyticSystem,
    steps: int,
    horizon: int,
    seed: int,
) -> Path:
    head = (
        f"# Guided policy search study: {env}\n\n"
        f"Episodes of T = {steps} steps (dt = {system.dt:g} s); training starts: env reset seeds "
        f"condition_seed({seed}, m). Cost: the system's stage cost summed over the episode plus "
        "its terminal cost, of one noise-free closed-loop episode per start. lqr-flm: the local "
        "controllers after the iterations (training starts only); gps: the MDGPS global policy "
        f"alone; ilqr, cem: MPC on the true model, horizon H = {horizon}, replanning every "
        "step. env_steps: real env steps the method learned from.\n\n"
    )
    lines = ["| " + " | ".join(_GPS_COLUMNS) + " |", "|" + "---|" * len(_GPS_COLUMNS)]
    lines += ["| " + " | ".join(_fmt(getattr(r, c)) for c in _GPS_COLUMNS) + " |" for r in rows]
    path.write_text(head + "\n".join(lines) + "\n")
    return path


def _gps_plot(
    rows: Sequence[GPSStudyRow],
    curves: dict[str, tuple[np.ndarray, np.ndarray]],
    path: Path,
    env: str,
) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    for i, (method, (x, y)) in enumerate(curves.items()):
        ax.plot(x, y, marker="o", markersize=3, color=f"C{i}", label=f"{method} (noise-free)")
    for j, r in enumerate(r for r in rows if r.method not in curves):
        ax.axhline(r.cost_mean, color=f"C{len(curves) + j}", linestyle="--", label=r.method)
    ax.set_yscale("log")
    ax.set_xlabel("env steps")
    ax.set_ylabel("closed-loop cost (mean over training starts)")
    ax.set_title(f"GPS study: {env}")
    ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
