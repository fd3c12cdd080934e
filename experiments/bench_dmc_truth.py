"""CEM on the MuJoCo ground truth of a DeepMind Control task: the env and planner are right
before anything is learned.

PlaNet (Hafner et al. 2019, Table 1, "CEM + true simulator") plans with the simulator itself
and scores 850 on cartpole swingup. This script plans the same way: the state task
``dmc-cartpole-swingup`` (or ``--env``) with PlaNet's action repeat (8 for cartpole), the
ground-truth model :func:`mbrl.envs.dmc.truth_model` (batched MuJoCo rollouts of the env's own
model, ``R`` control steps per step with the task's torch reward summed over them), and
PlaNet's planner: CEM with horizon 12, 1000 candidates, 10 iterations, the top 100 refitted,
mean 0 and std 1 at the start of every plan (no warm start; ``--warm`` starts from the shifted
previous plan instead), no smoothing, the final mean's first action played, a plan every step.
The return of an episode is the env's own (1000 control steps, 125 steps of 8).

    OMP_NUM_THREADS=1 python experiments/bench_dmc_truth.py [--episodes 5] [--seed 0]

``--max-steps N`` stops each episode after N steps (a speed check). Prints one line per
episode and one JSON object: every episode's return, their mean and standard deviation, wall
and CPU seconds per plan, simulator control steps per second, the CPU.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import numpy as np
import torch

from mbrl import envs
from mbrl.algorithms.mpc_loop import episode_seed
from mbrl.control import MPCController, run_episode
from mbrl.envs import dmc
from mbrl.envs.pixels import ActionRepeat
from mbrl.planners import CEM, PlanningProblem
from mbrl.planners.base import Planner


class ColdStart:
    """PlaNet's MPC: a new plan every step from the planner's initial distribution (no warm
    start), the plan's first action played."""

    def __init__(self, planner: Planner, problem: PlanningProblem) -> None:
        self.planner, self.problem = planner, problem

    def reset(self) -> None:
        pass

    def act(self, obs: np.ndarray) -> np.ndarray:
        x = torch.as_tensor(obs, dtype=torch.float32)
        return self.planner.plan(self.problem, x, None).actions[0].numpy()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--env", default="dmc-cartpole-swingup", choices=sorted(dmc.TASKS))
    p.add_argument("--episodes", type=int, default=5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--action-repeat", type=int, default=None, help="default: PlaNet's")
    p.add_argument("--horizon", type=int, default=12)
    p.add_argument("--population", type=int, default=1000)
    p.add_argument("--elites", type=int, default=100)
    p.add_argument("--iterations", type=int, default=10)
    p.add_argument("--warm", action="store_true", help="start from the shifted previous plan")
    p.add_argument("--threads", type=int, default=1, help="MuJoCo rollout threads")
    p.add_argument("--max-steps", type=int, default=None)
    args = p.parse_args()
    torch.set_num_threads(1)

    spec = envs.make(args.env)
    repeat = args.action_repeat or dmc.TASKS[args.env].action_repeat
    env = ActionRepeat(spec.make(), repeat)
    model = dmc.truth_model(env, repeat, nthread=args.threads)
    gen = torch.Generator().manual_seed(args.seed)
    low, high = spec.action_bounds()
    problem = PlanningProblem(
        model, spec.reward_fn, spec.termination_fn, args.horizon, low, high, 1, gen
    )
    planner = CEM(
        population=args.population,
        elite_fraction=args.elites / args.population,
        iterations=args.iterations,
        alpha=0.0,
        init_std=1.0,
        return_mean_or_best="mean",
    )
    steps_per_plan = args.population * args.iterations * args.horizon * repeat

    policy = MPCController(planner, problem) if args.warm else ColdStart(planner, problem)

    returns, plans, wall, cpu = [], 0, 0.0, 0.0
    for episode in range(args.episodes):
        w0, c0 = time.perf_counter(), time.process_time()
        with torch.inference_mode():
            ep = run_episode(
                env, policy, seed=episode_seed(args.seed, episode), max_steps=args.max_steps
            )
        w, c = time.perf_counter() - w0, time.process_time() - c0
        ret, t = ep.ret, len(ep)
        returns.append(ret)
        plans, wall, cpu = plans + t, wall + w, cpu + c
        print(
            f"episode {episode}: return {ret:.1f} in {t} steps, {w / t:.2f} s/plan "
            f"({c / t:.2f} s CPU)",
            flush=True,
        )
    print(
        json.dumps(
            {
                "env": args.env,
                "action_repeat": repeat,
                "planner": {
                    "name": "cem",
                    "horizon": args.horizon,
                    "population": args.population,
                    "elites": args.elites,
                    "iterations": args.iterations,
                    "warm_start": args.warm,
                },
                "seed": args.seed,
                "returns": [round(r, 2) for r in returns],
                "mean_return": round(statistics.fmean(returns), 2),
                "std_return": round(statistics.pstdev(returns), 2),
                "plans": plans,
                "wall_s_per_plan": round(wall / plans, 3),
                "cpu_s_per_plan": round(cpu / plans, 3),
                "control_steps_per_s": round(steps_per_plan * plans / wall),
                "mujoco_threads": args.threads,
                "cpu": torch.backends.cpu.get_cpu_capability(),
                "numpy": np.__version__,
            }
        )
    )


if __name__ == "__main__":
    main()
