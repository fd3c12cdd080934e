"""Env steps per second: MujocoModel's native rollouts against stepping gymnasium envs.

For each env (half-cheetah, cartpole-swingup) and batch size N, with horizon H:
- ``gym_loop``: N gymnasium envs stepped one by one in Python (``set_state`` then H ``step``s),
  the way one would score N candidates without a batched simulator;
- ``rollout_step``: the model seam alone, H calls of ``MujocoModel.rollout_step`` on N rows;
- ``planning_step``: what the planners run, ``PlanningProblem.evaluate`` of the N candidates
  from one start: one start, then H planning steps (model step, the env's torch reward and
  termination, the non-finite policy);
- ``rollout_actions``: the fast path, one native rollout of N x H control steps.
Each number is control steps (N * H) per second, the best of ``repeats`` runs. Prints JSON.

    python experiments/bench_mujoco_rollout.py [--nthread 2] [--horizon 30] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from functools import partial

import numpy as np
import torch

from mbrl.dynamics.mujoco_model import MujocoModel
from mbrl.envs import make
from mbrl.planners import PlanningProblem


def _best(fn, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def _gym_loop(base, obs: np.ndarray, acts: np.ndarray) -> None:
    """Score each candidate by resetting the unwrapped env to ``obs`` and stepping it."""
    nq = base.model.nq
    for i in range(acts.shape[0]):
        base.set_state(obs[:nq].astype(np.float64), obs[nq:].astype(np.float64))
        for t in range(acts.shape[1]):
            base.step(acts[i, t])


def _seam(model: MujocoModel, x0: torch.Tensor, acts: torch.Tensor) -> None:
    """The model seam alone: one ``rollout_step`` per horizon step."""
    state = model.rollout_start(x0[None], acts.shape[0])
    for t in range(acts.shape[1]):
        state = model.rollout_step(state, acts[:, t])


def bench_env(name: str, sizes: list[int], horizon: int, nthread: int, repeats: int) -> list:
    spec = make(name)
    env = spec.make()
    model = MujocoModel.from_spec(spec, nthread=nthread)
    obs, _ = env.reset(seed=0)
    base = env.unwrapped
    rng = np.random.default_rng(0)
    rows = []
    for n in sizes:
        acts = rng.uniform(spec.action_low, spec.action_high, (n, horizon, spec.act_dim))
        acts_t = torch.as_tensor(acts, dtype=torch.float32)
        x0 = torch.as_tensor(obs, dtype=torch.float32)

        steps = n * horizon
        gym_s = _best(partial(_gym_loop, base, obs, acts), repeats if n <= 256 else 1)
        seam_s = _best(partial(_seam, model, x0, acts_t), repeats)
        problem = PlanningProblem(
            model,
            spec.reward_fn,
            spec.termination_fn,
            horizon,
            torch.as_tensor(spec.action_low),
            torch.as_tensor(spec.action_high),
        )
        step_s = _best(partial(problem.evaluate, x0, acts_t), repeats)
        fast_s = _best(partial(model.rollout_actions, x0, acts_t), repeats)
        rows.append(
            {
                "env": name,
                "N": n,
                "H": horizon,
                "gym_loop_steps_per_s": steps / gym_s,
                "rollout_step_steps_per_s": steps / seam_s,
                "planning_step_steps_per_s": steps / step_s,
                "rollout_actions_steps_per_s": steps / fast_s,
                "speedup_rollout_actions_vs_gym": gym_s / fast_s,
                "speedup_rollout_step_vs_gym": gym_s / seam_s,
            }
        )
    model.close()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    parser.add_argument("--nthread", type=int, default=cpus)
    parser.add_argument("--horizon", type=int, default=30)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--sizes", type=int, nargs="+", default=[64, 512])
    args = parser.parse_args()
    torch.set_num_threads(1)
    results = []
    for name in ("half-cheetah", "cartpole-swingup"):
        results += bench_env(name, args.sizes, args.horizon, args.nthread, args.repeats)
    print(
        json.dumps(
            {
                "benchmark": "mujoco_rollout",
                "machine": platform.processor() or platform.machine(),
                "cpus": cpus,
                "nthread": args.nthread,
                "load_average_1min": os.getloadavg()[0],  # other work sharing the cores
                "results": results,
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
