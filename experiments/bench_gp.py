"""Gaussian-process dynamics at scale: fit time and planning-query throughput.

Data are pendulum-like transitions (X = 3: cos, sin, angular velocity; U = 1) from the
Pendulum-v1 equations with uniformly random states and torques. For each training size
``N`` (default 500, 1000, 2000, 10000) and each GP kind (``exact`` while N <= the exact limit,
``sparse`` = SGPR with M inducing points, forced with ``max_exact_points=0``):

- ``fit_s``: wall time of :meth:`GaussianProcessModel.fit` (``--iterations`` Adam steps, the
  caches included);
- ``step_ms``: median wall time of one :meth:`rollout_step` with ``N * P = 10,000`` query rows
  (sampled next states, so predictive variances are computed), under ``torch.inference_mode``;
  ``mean_step_ms`` the same for ``propagation="expectation"`` (no variance);
- ``gflops``: achieved GFLOP/s of the sampled step (kernel distances, kernel-vector products and
  the LOVE / SGPR variance root), next to the machine's float32 matmul peak;
- ``rmse``, ``nll``, ``coverage95``: one-step RMSE, Gaussian NLL and 95%-interval coverage
  (:mod:`mbrl.dynamics.diagnostics`) on 2,000 held-out transitions.

With ``--compare N`` it also fits the GP and a probabilistic ensemble on the same ``N``
transitions and prints their diagnostics table (one-step NLL, coverage, RMSE, 10-step
mean-rollout RMSE along 5 real Pendulum-v1 episodes of random actions) as markdown.

Wall times depend on what else runs on the cores (the 1-minute load average is printed); the
``*_cpu_*`` fields are this process's CPU time (``time.process_time``, summed over its threads),
which excludes time spent waiting for a core. The default is one thread.

    python experiments/bench_gp.py [--sizes 500 1000 2000 10000] [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import matmul_peak_gflops  # noqa: E402

from mbrl.dynamics import Transitions  # noqa: E402
from mbrl.dynamics.diagnostics import compare_models, one_step_scores, to_markdown  # noqa: E402
from mbrl.dynamics.gp import GaussianProcessModel  # noqa: E402

QUERIES = 10_000


def pendulum_data(n: int, seed: int) -> Transitions:
    """Pendulum-v1 steps (g = 10, m = l = 1, dt = 0.05, speed clipped to 8) from random
    states and torques, observed as ``[cos th, sin th, thdot]``."""
    g = torch.Generator().manual_seed(seed)
    th = (torch.rand(n, generator=g) * 2 - 1) * torch.pi
    thdot = (torch.rand(n, generator=g) * 2 - 1) * 8
    u = (torch.rand(n, generator=g) * 2 - 1) * 2
    new_thdot = (thdot + (3 * 10.0 / 2 * torch.sin(th) + 3.0 * u) * 0.05).clamp(-8, 8)
    new_th = th + new_thdot * 0.05
    obs = torch.stack([th.cos(), th.sin(), thdot], 1)
    nxt = torch.stack([new_th.cos(), new_th.sin(), new_thdot], 1)
    return Transitions(obs, u[:, None], nxt, torch.zeros(n), torch.zeros(n, dtype=torch.bool))


def step_flops(model: GaussianProcessModel) -> float:
    """Multiply-adds (x2) of one sampled step of QUERIES rows."""
    cache = model._cache
    x, c, d = cache["centers"].shape
    r = cache["root"].shape[-1]
    return 2.0 * x * QUERIES * c * (d + 1 + r)


def time_step(
    model: GaussianProcessModel, obs: torch.Tensor, act: torch.Tensor, reps: int
) -> tuple[float, float]:
    """Median wall and process-CPU seconds of one ``rollout_step`` on ``obs [Q, X]``."""
    gen = torch.Generator().manual_seed(0)
    wall, cpu = [], []
    with torch.inference_mode():
        state = model.rollout_start(obs, 1, gen)
        model.rollout_step(state, act, gen)  # warm-up
        for _ in range(reps):
            start, start_cpu = time.perf_counter(), time.process_time()
            model.rollout_step(state, act, gen)
            wall.append(time.perf_counter() - start)
            cpu.append(time.process_time() - start_cpu)
    return statistics.median(wall), statistics.median(cpu)


def compare(n: int) -> None:
    """GP vs probabilistic ensemble on the same pendulum data: the diagnostics table."""
    import numpy as np

    from mbrl import envs
    from mbrl.control import RandomPolicy, run_episode
    from mbrl.dynamics.ensemble import ProbabilisticEnsemble

    spec = envs.make("pendulum")
    env = spec.make()
    policy = RandomPolicy(spec.action_low, spec.action_high, np.random.default_rng(0))
    trajectories = []
    for seed in range(5):
        ep = run_episode(env, policy, seed=1000 + seed)
        trajectories.append((torch.as_tensor(ep.obs), torch.as_tensor(ep.act)))
    models = {
        "gp": GaussianProcessModel(3, 1),
        "ensemble": ProbabilisticEnsemble(3, 1, ensemble_size=5, hidden_size=200, seed=0),
    }
    rows = compare_models(
        models, pendulum_data(2000, 1), trajectories, steps=10, train=pendulum_data(n, 0)
    )
    print(json.dumps({"benchmark": "gp_vs_ensemble", "n": n, "rows": rows}, indent=2))
    print(to_markdown(rows))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[500, 1000, 2000, 10000])
    parser.add_argument("--exact-limit", type=int, default=2000)
    parser.add_argument("--inducing", type=int, default=128)
    parser.add_argument("--iterations", type=int, default=100)
    parser.add_argument("--reps", type=int, default=10)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--compare", type=int, default=0, help="GP vs ensemble on N points")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    if args.compare:
        compare(args.compare)
        return
    test = pendulum_data(2000, seed=1)
    queries = pendulum_data(QUERIES, seed=2)
    results = []
    for n in args.sizes:
        data = pendulum_data(n, seed=0)
        kinds = (["exact"] if n <= args.exact_limit else []) + ["sparse"]
        for kind in kinds:
            common = dict(
                inducing_points=args.inducing,
                iterations=args.iterations,
                max_exact_points=args.exact_limit if kind == "exact" else 0,
            )
            model = GaussianProcessModel(3, 1, **common)
            start, start_cpu = time.perf_counter(), time.process_time()
            model.fit(data)
            fit_s, fit_cpu = time.perf_counter() - start, time.process_time() - start_cpu
            step, step_cpu = time_step(model, queries.obs, queries.act, args.reps)
            mean_model = GaussianProcessModel(3, 1, propagation="expectation", **common)
            mean_model.load_state_dict(model.state_dict())
            mean_step, mean_cpu = time_step(mean_model, queries.obs, queries.act, args.reps)
            scores = one_step_scores(model, test)
            results.append(
                {
                    "n": n,
                    "kind": kind,
                    "centers": model.diagnostics.num_centers,
                    "variance_rank": model._cache["root"].shape[-1],
                    "fit_s": round(fit_s, 2),
                    "fit_cpu_s": round(fit_cpu, 2),
                    "step_ms": round(step * 1e3, 2),
                    "step_cpu_ms": round(step_cpu * 1e3, 2),
                    "mean_step_ms": round(mean_step * 1e3, 2),
                    "mean_step_cpu_ms": round(mean_cpu * 1e3, 2),
                    "gflops": round(step_flops(model) / step / 1e9, 2),
                    "rmse": round(scores.rmse, 5),
                    "nll": round(scores.nll, 3),
                    "coverage95": round(scores.coverage95, 3),
                    "jitter": model.diagnostics.jitter,
                }
            )
            print(json.dumps(results[-1]), file=sys.stderr, flush=True)
    out = {
        "benchmark": "gp",
        "queries_per_step": QUERIES,
        "iterations": args.iterations,
        "threads": args.threads,
        "cpu": platform.processor() or platform.machine(),
        "load_average_1min": os.getloadavg()[0],
        "matmul_peak_gflops": round(matmul_peak_gflops(), 1),
        "results": results,
    }
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
