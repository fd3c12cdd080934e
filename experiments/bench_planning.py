"""CEM planning speed on the probabilistic ensemble, against this machine's matmul peak.

Prints one JSON object: for each setting and dtype, seconds per planned action, the MLP's
achieved GFLOP/s during planning, and the fraction of the matmul peak (measured in the same
run, same dtype). Settings:

* ``cartpole``: PETS on continuous cartpole as in mbrl-lib's notebook: ensemble 5 of 3 x 200,
  TS-inf, 20 particles, horizon 15, CEM population 500, 10% elites, 5 iterations.
* ``halfcheetah``: PETS's HalfCheetah: ensemble 5 of 4 x 200, X=18, U=6, 20 particles,
  horizon 30, population 500, 5 iterations.

Each plan is cold (no warm start) and starts the model once
(:meth:`~mbrl.planners.base.PlanningProblem.start`), then scores every CEM population from that
start: the same MLP work per plan as before the planning step existed, so the numbers compare
with earlier runs.

    python experiments/bench_planning.py [--plans 5] [--threads N] [--settings cartpole]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from machine import matmul_peak_gflops  # noqa: E402

from mbrl.dynamics import ProbabilisticEnsemble, Transitions  # noqa: E402
from mbrl.envs import never_terminates  # noqa: E402
from mbrl.planners import CEM, PlanningProblem  # noqa: E402

SETTINGS = {
    "cartpole": dict(obs_dim=4, act_dim=1, layers=3, hidden=200, horizon=15, population=500),
    "halfcheetah": dict(obs_dim=18, act_dim=6, layers=4, hidden=200, horizon=30, population=500),
}
ENSEMBLE, PARTICLES, ITERATIONS = 5, 20, 5


def mlp_flops_per_row(obs_dim: int, act_dim: int, layers: int, hidden: int) -> int:
    """Multiply-adds x 2 of one member's forward pass for one row (mean and log-variance)."""
    dims = [obs_dim + act_dim] + [hidden] * layers + [2 * obs_dim]
    return 2 * sum(a * b for a, b in zip(dims[:-1], dims[1:], strict=False))


def bench(name: str, dtype: torch.dtype, plans: int) -> dict:
    s = SETTINGS[name]
    x, u = s["obs_dim"], s["act_dim"]
    model = ProbabilisticEnsemble(
        x,
        u,
        ensemble_size=ENSEMBLE,
        hidden_size=s["hidden"],
        num_layers=s["layers"],
        planning_dtype=dtype,
        max_epochs=1,
        seed=0,
    )
    g = torch.Generator().manual_seed(0)
    n = 512
    obs, act = torch.randn(n, x, generator=g), torch.rand(n, u, generator=g) * 2 - 1
    model.fit(
        Transitions(
            obs,
            act,
            obs + 0.1 * torch.randn(n, x, generator=g),
            torch.zeros(n),
            torch.zeros(n, dtype=torch.bool),
        )
    )
    problem = PlanningProblem(
        model,
        lambda o, a, nx: -(nx**2).sum(-1),
        never_terminates,
        s["horizon"],
        -torch.ones(u),
        torch.ones(u),
        PARTICLES,
        torch.Generator().manual_seed(1),
    )
    cem = CEM(population=s["population"], elite_fraction=0.1, iterations=ITERATIONS)
    x0 = torch.zeros(x)
    cem.plan(problem, x0, None)  # warm-up
    times = []
    for _ in range(plans):
        start = time.perf_counter()
        cem.plan(problem, x0, None)  # a cold plan (warm=None), as in every earlier run
        times.append(time.perf_counter() - start)
    seconds = sorted(times)[len(times) // 2]
    rows = s["population"] * PARTICLES
    flops = mlp_flops_per_row(x, u, s["layers"], s["hidden"]) * rows * s["horizon"] * ITERATIONS
    return {
        "seconds_per_action": seconds,
        "gflops": flops / seconds / 1e9,
        "gflop_per_action": flops / 1e9,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--plans", type=int, default=5)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    result = {
        "threads": args.threads,
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "peak_gflops": {},
        "settings": {},
    }
    for dname in args.dtypes:
        dtype = getattr(torch, dname)
        result["peak_gflops"][dname] = matmul_peak_gflops(dtype)
        for name in args.settings:
            r = bench(name, dtype, args.plans)
            r["fraction_of_peak"] = r["gflops"] / result["peak_gflops"][dname]
            result["settings"].setdefault(name, {})[dname] = r
            print(
                f"{name} {dname}: {r['seconds_per_action']:.3f} s/action, "
                f"{r['gflops']:.1f} GFLOP/s ({100 * r['fraction_of_peak']:.0f}% of peak)",
                file=sys.stderr,
                flush=True,
            )
    for by_dtype in result["settings"].values():
        if "float32" in by_dtype and "bfloat16" in by_dtype:
            by_dtype["bfloat16_speedup"] = (
                by_dtype["float32"]["seconds_per_action"]
                / by_dtype["bfloat16"]["seconds_per_action"]
            )
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
