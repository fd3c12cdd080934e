"""iCEM's sample reduction against CEM on the true model: the same return for fewer samples.

Pinneri et al. 2020 ("Sample-efficient Cross-Entropy Method for Real-time Planning") plan with
the simulator itself and report that iCEM needs 2.7 to 22 times fewer samples than CEM for the
same return. This script plans the same way on a MuJoCo task of the registry (``--env``, default
``cartpole-swingup``, PETS's cart-pole; also ``reacher`` and ``pusher``): the ground-truth model
(:func:`mbrl.envs.truth.ground_truth`, batched MuJoCo rollouts of the env's own model; on
``pusher`` the planner also sees the object's velocity, which Pusher-v5's observation omits)
under one MPC controller with the shifted warm start, for CEM and for iCEM (colored noise, kept
and shifted elites, population decay: ``--planner icem``'s defaults of ``mbrl run``) at each
population of ``--populations``, the same horizon, iterations, elite share and smoothing, on
the same episodes (reset seeds ``episode_seed(seed, i)``).

A plan's samples are counted, not derived: every candidate row the planner passes to
``PlanningProblem.evaluate`` (iCEM's shrinking populations, its kept elites and the final
mean's scoring included), averaged over the plans of the episodes.

The sample reduction at a CEM population is CEM's samples per plan over those of the cheapest
iCEM population whose mean return reaches CEM's mean return there (none: iCEM never reaches
it at the populations tried); ``lower_bound`` marks a reduction whose match is the smallest
iCEM population tried, which a smaller population might also reach. Prints one line per
setting and one JSON object.

    OMP_NUM_THREADS=1 python experiments/bench_icem.py [--env cartpole-swingup] [--episodes 3]
        [--populations 10 20 40 80 160 320] [--horizon 25] [--iterations 3]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from mbrl import envs
from mbrl.algorithms.factory import PlannerConfig, make_planner
from mbrl.algorithms.mpc_loop import episode_seed
from mbrl.control import MPCController, run_episode
from mbrl.envs.truth import ground_truth
from mbrl.planners import PlanningProblem


class CountingProblem(PlanningProblem):
    """A planning problem that counts the candidate rows it scores."""

    rows = 0

    def evaluate(self, x0, actions, *args, **kwargs):  # type: ignore[override]
        self.rows += int(actions.shape[0])
        return super().evaluate(x0, actions, *args, **kwargs)


def run_setting(args: argparse.Namespace, name: str, population: int) -> dict:
    """Episodes of MPC with planner ``name`` at ``population`` on the true model."""
    spec = envs.make(args.env)
    make_env, model = ground_truth(args.env, nthread=1)
    gen = torch.Generator().manual_seed(args.seed)
    low, high = spec.action_bounds()
    problem = CountingProblem(
        model, spec.reward_fn, spec.termination_fn, args.horizon, low, high, 1, gen
    )
    cfg = PlannerConfig(
        name=name,
        population=population,
        iterations=args.iterations,
        elite_fraction=args.elite_fraction,
        alpha=args.alpha,
    )
    planner = make_planner(cfg)
    controller = MPCController(planner, problem)
    returns, plans = [], 0
    w0, c0 = time.perf_counter(), time.process_time()
    for i in range(args.episodes):
        env = make_env()
        try:
            with torch.inference_mode():
                ep = run_episode(env, controller, seed=episode_seed(args.seed, i))
        finally:
            env.close()
        returns.append(ep.ret)
        plans += len(ep)
    wall, cpu = time.perf_counter() - w0, time.process_time() - c0
    row = {
        "planner": name,
        "population": population,
        "samples_per_plan": round(problem.rows / plans, 1),
        "returns": [round(r, 2) for r in returns],
        "mean_return": round(statistics.fmean(returns), 2),
        "wall_s": round(wall, 1),
        "cpu_s": round(cpu, 1),
    }
    print(
        f"{name} population {population}: {row['samples_per_plan']} samples a plan, return "
        f"{row['mean_return']} {row['returns']}, {wall:.0f} s wall, {cpu:.0f} s CPU",
        flush=True,
    )
    return row


def reductions(rows: list[dict]) -> list[dict]:
    """At each CEM population: CEM's samples over the cheapest iCEM setting reaching its return."""
    icem = sorted((r for r in rows if r["planner"] == "icem"), key=lambda r: r["samples_per_plan"])
    out = []
    for c in (r for r in rows if r["planner"] == "cem"):
        match = next((r for r in icem if r["mean_return"] >= c["mean_return"]), None)
        out.append(
            {
                "cem_population": c["population"],
                "cem_return": c["mean_return"],
                "icem_population": match["population"] if match else None,
                "icem_return": match["mean_return"] if match else None,
                "sample_reduction": round(c["samples_per_plan"] / match["samples_per_plan"], 2)
                if match
                else None,
                # the cheapest iCEM setting tried already reaches CEM's return: a smaller one
                # might too, so the reduction is a lower bound
                "lower_bound": match is icem[0] if match else None,
            }
        )
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--env", default="cartpole-swingup")
    p.add_argument("--episodes", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--populations", type=int, nargs="+", default=[10, 20, 40, 80, 160, 320])
    p.add_argument("--planners", nargs="+", default=["cem", "icem"], choices=["cem", "icem"])
    p.add_argument("--horizon", type=int, default=25)
    p.add_argument("--iterations", type=int, default=3)
    p.add_argument("--elite-fraction", type=float, default=0.1)
    p.add_argument("--alpha", type=float, default=0.1)
    p.add_argument("--out", help="also write the JSON object to this file")
    args = p.parse_args()
    torch.set_num_threads(1)
    rows = [run_setting(args, name, n) for n in args.populations for name in args.planners]
    result = {
        "env": args.env,
        "episodes": args.episodes,
        "seed": args.seed,
        "horizon": args.horizon,
        "iterations": args.iterations,
        "elite_fraction": args.elite_fraction,
        "alpha": args.alpha,
        "settings": rows,
        "reductions": reductions(rows),
        "cpu": torch.backends.cpu.get_cpu_capability(),
    }
    text = json.dumps(result)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
