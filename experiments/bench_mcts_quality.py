"""Planning quality at equal model steps: MCTS over a torque grid against CEM, closed loop.

Both plan Pendulum-v1 (``pendulum``: random starts, 200 steps) on its known model
(:func:`mbrl.algorithms.mcts_mpc.pendulum_v1_step`, equal to the env to float rounding) with
the env's own reward, replanning every step from the same env seeds. MCTS searches
``--torques`` evenly spaced torques in ``[-2, 2]``; CEM searches the box. Model steps are
counted, not estimated: every row a planner pushes through the model's ``rollout_step`` is
one model step. CEM's population is set so that ``population x iterations x horizon`` equals
the model steps per plan that MCTS took in a first measurement (its own count is then measured
too), so both get the same model budget per env step.

    python experiments/bench_mcts_quality.py [--episodes 10] [--simulations 64] ...

``--episode-ids 3,4,9`` runs those episodes only (one planner generator through them, in that
order). With ``--no-cem`` only MCTS runs, which is how a discrete env is measured (CEM plans
boxes):

    python experiments/bench_mcts_quality.py --env CartPole-v1 --horizon 25 \
        --rollout-depth 25 --reuse-tree --no-cem

Prints one JSON object: per planner the returns of every episode, their mean and standard
deviation, model steps and wall seconds per plan, CPU seconds per env step (the plan and the
env step, one thread); and CEM's mean over MCTS's.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch

from mbrl import envs
from mbrl.algorithms.mcts_mpc import known_model
from mbrl.algorithms.mpc_loop import episode_seed
from mbrl.control import MPCController, run_episode
from mbrl.dynamics.base import RolloutState
from mbrl.dynamics.known import KnownModel
from mbrl.planners import CEM, PlanningProblem
from mbrl.planners.mcts import MCTS


class CountingModel(KnownModel):
    """A known model that counts the rows it steps (``rows``)."""

    def __init__(self, model: KnownModel) -> None:
        super().__init__(model.step_fn, model.obs_dim, model.act_dim)
        self.rows = 0

    def rollout_step(
        self, state: RolloutState, act: torch.Tensor, generator: torch.Generator | None = None
    ) -> RolloutState:
        self.rows += state.obs.shape[0]
        return super().rollout_step(state, act, generator)


def closed_loop(env_name: str, planner, horizon: int, torques: int | None, args) -> dict:
    """``args.episodes`` MPC episodes of ``planner`` on ``env_name``'s known model."""
    base = envs.make(env_name)
    spec = envs.discretize(base, torques) if torques and not base.discrete else base
    known, value_fn = known_model(env_name)
    model = CountingModel(known)
    low, high = spec.action_bounds()
    gen = torch.Generator().manual_seed(args.seed)
    values = spec.discrete_actions() if spec.discrete else None
    problem = PlanningProblem(
        model, spec.reward_fn, spec.termination_fn, horizon, low, high, args.particles, gen,
        value_fn=value_fn, action_values=values, discount=args.discount,
    )  # fmt: skip
    controller = MPCController(planner, problem)
    env = spec.make()
    returns, plans, seconds = [], 0, 0.0
    cpu = time.process_time()
    for i in episode_ids(args):
        controller.reset_stats()
        ep = run_episode(
            env,
            controller,
            seed=episode_seed(args.seed, i),
            env_action=spec.env_action if spec.discrete else None,
        )
        returns.append(float(ep.ret))
        plans += controller.stats.plans
        seconds += controller.stats.plan_seconds
        print(f"  episode {i}: return {ep.ret:.1f}", flush=True)
    return {
        "returns": returns,
        "mean": float(np.mean(returns)),
        "std": float(np.std(returns)),
        "model_steps_per_plan": model.rows / plans,
        "seconds_per_plan": seconds / plans,
        "cpu_seconds_per_step": (time.process_time() - cpu) / plans,  # planning and the env
    }


def episode_ids(args: argparse.Namespace) -> list[int]:
    """The episode indices to run: ``--episode-ids`` in their order, else ``0 .. N - 1``."""
    if args.episode_ids is None:
        return list(range(args.episodes))
    return [int(i) for i in args.episode_ids.split(",")]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--env", default="pendulum")
    parser.add_argument("--episodes", type=int, default=10)
    parser.add_argument(
        "--episode-ids", default=None, help="comma-separated episode indices (instead of 0..N-1)"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--horizon", type=int, default=30, help="H of both planners")
    parser.add_argument("--torques", type=int, default=11, help="MCTS's torque grid")
    parser.add_argument("--simulations", type=int, default=64)
    parser.add_argument("--rollout-depth", type=int, default=0)
    parser.add_argument("--rollout-policy", choices=("random", "repeat"), default="random")
    parser.add_argument("--exploration", type=float, default=1.25)
    parser.add_argument("--max-depth", type=int, default=None, help="None: the horizon")
    parser.add_argument("--discount", type=float, default=1.0, help="gamma of both planners")
    parser.add_argument(
        "--particles", type=int, default=1, help="P copies of each state (P rollouts per leaf)"
    )
    parser.add_argument("--reuse-tree", action="store_true")
    parser.add_argument("--leaves-per-wave", type=int, default=1, help="K leaves per model call")
    parser.add_argument("--virtual-loss", type=float, default=1.0)
    parser.add_argument("--no-cem", action="store_true", help="MCTS only (discrete envs)")
    parser.add_argument("--cem-iterations", type=int, default=3)
    parser.add_argument("--cem-population", type=int, default=0, help="0: equal model steps")
    args = parser.parse_args()
    torch.set_num_threads(1)
    start = time.perf_counter()
    mcts = MCTS(
        simulations=args.simulations,
        exploration=args.exploration,
        rollout_depth=args.rollout_depth,
        rollout_policy=args.rollout_policy,
        max_depth=args.max_depth,
        reuse_tree=args.reuse_tree,
        leaves_per_wave=args.leaves_per_wave,
        virtual_loss=args.virtual_loss,
    )
    print("mcts", flush=True)
    out = {"env": args.env, "episodes": episode_ids(args), "seed": args.seed}
    out["horizon"] = args.horizon
    out["mcts"] = closed_loop(args.env, mcts, args.horizon, args.torques, args)
    out["mcts"].update(
        simulations=args.simulations,
        rollout_depth=args.rollout_depth,
        rollout_policy=args.rollout_policy,
        leaves_per_wave=args.leaves_per_wave,
        virtual_loss=args.virtual_loss,
    )
    if args.no_cem:
        out["wall_seconds"] = time.perf_counter() - start
        print(json.dumps(out, indent=1))
        return
    steps = out["mcts"]["model_steps_per_plan"]
    population = args.cem_population or max(2, round(steps / (args.cem_iterations * args.horizon)))
    cem = CEM(population=population, iterations=args.cem_iterations)
    print(f"cem population {population}", flush=True)
    out["cem"] = closed_loop(args.env, cem, args.horizon, None, args)
    out["cem"].update(population=population, iterations=args.cem_iterations)
    out["mcts_over_cem"] = out["mcts"]["mean"] / out["cem"]["mean"]
    out["wall_seconds"] = time.perf_counter() - start
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
