"""iLQR speed: warm-started MPC steps, and a cold swing-up solve against casadi/IPOPT.

- ``mpc``: closed-loop episodes of ``MPCController(ILQR(...))`` on ``pendulum-swingup``
  (H = 50) and ``cartpole-swingup-analytic`` (H = 50), float32 observations as the MPC loop
  passes them; the time of every plan after the first (cold) one is recorded: median and p95
  in ms of wall time and of this process's CPU time (``time.process_time``, which excludes
  time spent waiting for a core when other work shares the machine), the mean number of
  iLQR iterations per step, the statuses, and whether the episode ends in the swing-up
  success region.
- ``cold``: the pendulum swing-up from hanging down, the same horizon, cost, bounds and
  initial guess (constant torque) for iLQR (float64, until converged) and for multiple
  shooting with casadi Opti + IPOPT (exact Hessian, tol 1e-10): final costs and wall times.

Prints JSON. Per-step timings depend on what else runs on the cores: the 1-minute load
average is printed next to them.

    python experiments/bench_ilqr.py [--steps 150] [--max-iterations 10]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import matmul_peak_gflops  # noqa: E402

from mbrl.control import MPCController, run_episode  # noqa: E402
from mbrl.control.nmpc import ipopt_reference  # noqa: E402
from mbrl.dynamics.systems import SystemModel  # noqa: E402
from mbrl.envs import make  # noqa: E402
from mbrl.envs.systems import AnalyticSystem  # noqa: E402
from mbrl.planners.base import Plan, PlanningProblem, WarmStart  # noqa: E402
from mbrl.planners.ilqr import ILQR  # noqa: E402


def problem_for(system: AnalyticSystem, horizon: int) -> PlanningProblem:
    return PlanningProblem(
        SystemModel(system),
        system.reward_fn(),
        None,
        horizon,
        system.action_low,
        system.action_high,
        value_fn=system.value_fn(),
    )


class Timed:
    """Records each plan's wall time, iterations and status."""

    def __init__(self, planner: ILQR) -> None:
        self.planner = planner
        self.seconds: list[float] = []
        self.cpu_seconds: list[float] = []  # this process's CPU time: less sensitive to load
        self.iterations: list[int] = []
        self.statuses: list[str] = []

    def plan(
        self, problem: PlanningProblem, x0: torch.Tensor, warm: WarmStart | None = None
    ) -> Plan:
        start, cpu = time.perf_counter(), time.process_time()
        plan = self.planner.plan(problem, x0, warm)
        self.seconds.append(time.perf_counter() - start)
        self.cpu_seconds.append(time.process_time() - cpu)
        self.iterations.append(plan.iterations)
        self.statuses.append(plan.status)
        return plan


def mpc_bench(env_name: str, horizon: int, steps: int, max_iterations: int) -> dict:
    spec = make(env_name)
    timed = Timed(ILQR(max_iterations=max_iterations))
    ctrl = MPCController(timed, problem_for(spec.dynamics, horizon))
    ep = run_episode(spec.make(), ctrl, seed=0, max_steps=steps)
    warm_ms = 1e3 * np.asarray(timed.seconds[1:])
    warm_cpu_ms = 1e3 * np.asarray(timed.cpu_seconds[1:])
    statuses = {s: timed.statuses[1:].count(s) for s in sorted(set(timed.statuses[1:]))}
    return {
        "env": env_name,
        "horizon": horizon,
        "max_iterations": max_iterations,
        "steps": steps,
        "cold_first_plan_ms": 1e3 * timed.seconds[0],
        "warm_step_ms_median": float(np.median(warm_ms)),
        "warm_step_ms_p95": float(np.percentile(warm_ms, 95)),
        "warm_step_cpu_ms_median": float(np.median(warm_cpu_ms)),
        "warm_step_cpu_ms_p95": float(np.percentile(warm_cpu_ms, 95)),
        "warm_iterations_mean": float(np.mean(timed.iterations[1:])),
        "statuses": statuses,
        "episode_return": ep.ret,
        "success_at_end": bool(spec.dynamics.success(ep.obs[-1])),
    }


def cold_bench(horizon: int, guess: float) -> dict:
    spec = make("pendulum-swingup")
    system = spec.dynamics
    x0 = np.array([np.pi, 0.0])
    u_init = np.full((horizon, 1), guess)
    problem = problem_for(system, horizon)
    planner = ILQR(max_iterations=500, tol_rel_cost=1e-9)
    warm = WarmStart(torch.tensor(u_init))
    planner.plan(problem, torch.tensor(x0), warm)  # compile the casadi twins
    start = time.perf_counter()
    plan = planner.plan(problem, torch.tensor(x0), warm)
    seconds = time.perf_counter() - start
    ref = ipopt_reference(system, x0, u_init)
    return {
        "system": "pendulum",
        "horizon": horizon,
        "initial_guess": f"constant torque {guess}",
        "ilqr": {
            "cost": plan.diagnostics["cost"],
            "seconds": seconds,
            "iterations": plan.iterations,
            "status": plan.status,
            "success": bool(system.success(plan.x_ref[-1].numpy())),
        },
        "ipopt_multiple_shooting": {
            "cost": ref.cost,
            "seconds": ref.seconds,
            "iterations": ref.iterations,
            "status": ref.status,
        },
        "cost_ratio_ilqr_over_ipopt": plan.diagnostics["cost"] / ref.cost,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--max-iterations", type=int, default=10)
    args = parser.parse_args()
    torch.set_num_threads(1)
    load_before = os.getloadavg()[0]
    mpc = [
        mpc_bench("pendulum-swingup", 50, args.steps, args.max_iterations),
        mpc_bench("cartpole-swingup-analytic", 50, args.steps, args.max_iterations),
    ]
    cold = [cold_bench(50, 1.0), cold_bench(80, 1.0)]
    print(
        json.dumps(
            {
                "bench": "ilqr",
                "machine": platform.processor() or platform.machine(),
                "torch_threads": torch.get_num_threads(),
                "load_average_1min": [load_before, os.getloadavg()[0]],
                "matmul_peak_gflops_fp64": matmul_peak_gflops(torch.float64, 512, 0.5),
                "note": "iLQR's matrices are [X + U + 1]^2; its time is per-call overhead, "
                "not FLOPs (well under 0.1% of the matmul peak)",
                "mpc": mpc,
                "cold": cold,
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
