"""The guided policy search targets, measured (experiments/RESULTS.md, "Guided policy search").

    python experiments/bench_gps.py point-mass   # LQR-FLM, cbfinn/gps' point-mass example
    python experiments/bench_gps.py policy       # MDGPS: the policy alone against the local
                                                 # controllers, training and held-out starts
    python experiments/bench_gps.py reacher --sac-runs runs/   # GPS vs iLQR-MPC vs SAC
    python experiments/bench_gps.py reacher-optima  # iLQR-MPC against one full-horizon iLQR

``point-mass``: ``mbrl run lqr-flm --preset lqr_flm_point_mass`` with ``iterations=4`` on seeds
0-4 (one start at (0, 5), 5 samples of 100 steps per iteration: 2,000 env steps); the final
distance to the target (5, 20) of the iteration-4 samples and of the noise-free controller
after the fourth update, against the initial distance (15.81 m). Target: under 10% on at least
4 of 5 seeds (cbfinn/gps' documentation: the point mass reaches the target "by around the 4th
iteration").

``policy``: ``mbrl run gps --preset gps_point_mass`` on seeds 0-4: after the last iteration, the
closed-loop cost of the noise-free global policy alone and of the noise-free local controllers
on the training starts, and of the policy from 4 held-out starts.

``reacher``: ``mbrl run gps --preset gps_reacher`` (4 conditions x 5 samples x T = 50, 20
iterations: 20,000 env steps) on seeds 0-2; iLQR-MPC on the MuJoCo ground truth
(:class:`ReacherTruth`) from the same start states (each GPS condition is a reset seed: the
arm's start and the target); SAC's evaluation return at 20,000 env steps from the run folders
``<sac-runs>/sac-reacher-s<seed>`` written by ``mbrl run sac --env reacher --seed S
total_steps=20000 --name sac-reacher-sS`` (SAC's evaluations use its own reset seeds: other
targets; its mean over 5 episodes is the comparison).

``reacher-optima``: on the truth, from each of the 4 training conditions of seeds 0-2 (no
learning): iLQR-MPC's return; one iLQR solve of the whole episode (T = 50, up to 200
iterations) from iLQR's default guess, played open loop; and the same solve warm-started from the
actions iLQR-MPC played. A time-varying controller from one start (LQR-FLM's, GPS's) is a local
method over the whole episode, like the second: the bench says how far that one's optimum is from
the receding-horizon one's.

Prints one JSON object per measurement; runs on one thread (``OMP_NUM_THREADS=1``).
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from mbrl import envs
from mbrl.algorithms import gps, lqr_flm
from mbrl.config import load_config
from mbrl.control import MPCController, run_episode
from mbrl.envs.truth import ReacherTruth
from mbrl.planners import ILQR, PlanningProblem, WarmStart
from mbrl.presets import get as preset
from mbrl.runs import Run

torch.set_num_threads(1)
START = math.hypot(5.0 - 0.0, 20.0 - 5.0)  # the point mass's initial distance [m]


def _train(module, cfg, folder: Path) -> list[dict[str, str]]:
    run = Run(folder, cfg, {"algo": module.__name__.rsplit(".", 1)[-1]}, create="overwrite")
    try:
        module.train(cfg, run)
    finally:
        run.close()
    with (folder / "metrics.csv").open(newline="") as f:
        return list(csv.DictReader(f))


def point_mass(seeds: list[int], root: Path) -> None:
    """LQR-FLM on cbfinn/gps' point mass: distance after 4 iterations."""
    hits = 0
    for seed in seeds:
        cfg = load_config(
            lqr_flm.Config, preset("lqr_flm_point_mass").path, ["iterations=4", f"seed={seed}"]
        )
        t0 = time.process_time()
        rows = _train(lqr_flm, cfg, root / f"lqr-flm-pm-{seed}")
        last = rows[-1]
        sample = math.sqrt(2 * float(last["sample_terminal_cost"]))
        controller = math.sqrt(2 * float(last["eval_terminal_cost"]))
        hits += sample < 0.1 * START
        print(
            json.dumps(
                {
                    "bench": "point-mass",
                    "seed": seed,
                    "env_steps": int(last["env_steps"]),
                    "sample_distance": round(sample, 4),
                    "sample_fraction": round(sample / START, 4),
                    "controller_distance": round(controller, 4),
                    "per_iteration_sample_distance": [
                        round(math.sqrt(2 * float(r["sample_terminal_cost"])), 3) for r in rows
                    ],
                    "cpu_seconds": round(time.process_time() - t0, 1),
                }
            ),
            flush=True,
        )
    print(json.dumps({"bench": "point-mass", "seeds_under_10pct": hits, "of": len(seeds)}))


def policy(seeds: list[int], root: Path) -> None:
    """MDGPS on the spread point mass: the policy alone against the local controllers."""
    for seed in seeds:
        cfg = load_config(gps.Config, preset("gps_point_mass").path, [f"seed={seed}"])
        t0 = time.process_time()
        rows = _train(gps, cfg, root / f"gps-pm-{seed}")
        last = rows[-1]
        pol, loc = -float(last["return"]), -float(last["local_return"])
        print(
            json.dumps(
                {
                    "bench": "policy",
                    "seed": seed,
                    "env_steps": int(last["env_steps"]),
                    "policy_cost": round(pol, 2),
                    "local_cost": round(loc, 2),
                    "policy_over_local_cost": round(pol / loc, 4),
                    "held_out_policy_cost": round(-float(last["held_out_return"]), 2),
                    "policy_final_distance": round(
                        math.sqrt(2 * float(last["eval_terminal_cost"])), 3
                    ),
                    "held_out_final_distance": round(
                        math.sqrt(2 * float(last["held_out_terminal_cost"])), 3
                    ),
                    "cpu_seconds": round(time.process_time() - t0, 1),
                }
            ),
            flush=True,
        )


# ---------------------------------------------------------------- Reacher


def ilqr_mpc_returns(seeds: list[int], horizon: int, iterations: int) -> tuple[list[float], float]:
    """iLQR-MPC on the MuJoCo ground truth from the reset seeds: returns and CPU seconds."""
    spec = envs.make("reacher")
    model = ReacherTruth(spec.make())
    low, high = spec.action_bounds("cpu")
    returns, t0 = [], time.process_time()
    for s in seeds:
        problem = PlanningProblem(
            model, spec.reward_fn, spec.termination_fn, horizon, low, high, 1,
            torch.Generator().manual_seed(s),
        )  # fmt: skip
        controller = MPCController(ILQR(max_iterations=iterations), problem)
        returns.append(run_episode(spec.make(), controller, seed=s).ret)
    return returns, time.process_time() - t0


def _played_return(spec, seed: int, actions: np.ndarray) -> float:
    env = spec.make()
    env.reset(seed=seed)
    return float(sum(env.step(np.asarray(a, dtype=np.float64))[1] for a in actions))


def reacher_optima(seeds: list[int], horizon: int, iterations: int) -> None:
    """iLQR-MPC against one whole-episode iLQR solve on the truth, from the GPS conditions."""
    spec = envs.make("reacher")
    model = ReacherTruth(spec.make())
    low, high = spec.action_bounds("cpu")
    steps = spec.max_episode_steps
    conditions = load_config(gps.Config, preset("gps_reacher").path, []).conditions
    for seed in seeds:
        rows = []
        for m in range(conditions):
            s = lqr_flm.condition_seed(seed, m)

            def problem(h: int, s: int = s) -> PlanningProblem:
                return PlanningProblem(
                    model, spec.reward_fn, spec.termination_fn, h, low, high, 1,
                    torch.Generator().manual_seed(s),
                )  # fmt: skip

            controller = MPCController(ILQR(max_iterations=iterations), problem(horizon))
            controller.reset()
            env = spec.make()
            obs, _ = env.reset(seed=s)
            x0, mpc_actions = torch.as_tensor(obs, dtype=torch.float64), []
            for _ in range(steps):
                mpc_actions.append(np.asarray(controller.act(obs), dtype=np.float64))
                obs = env.step(mpc_actions[-1])[0]
            whole = ILQR(max_iterations=200)
            cold = whole.plan(problem(steps), x0)
            warm = whole.plan(problem(steps), x0, WarmStart(torch.as_tensor(np.stack(mpc_actions))))
            rows.append(
                {
                    "mpc": _played_return(spec, s, mpc_actions),
                    "whole_cold": _played_return(spec, s, cold.actions.numpy()),
                    "whole_from_mpc": _played_return(spec, s, warm.actions.numpy()),
                }
            )
        print(
            json.dumps(
                {
                    "bench": "reacher-optima",
                    "seed": seed,
                    "conditions": [{k: round(v, 3) for k, v in r.items()} for r in rows],
                    **{k: round(float(np.mean([r[k] for r in rows])), 3) for k in rows[0]},
                }
            ),
            flush=True,
        )


def sac_returns_from(folder: Path, seeds: list[int]) -> list[float] | None:
    """The deterministic policy of SAC's last checkpoint played once from each reset seed
    (the GPS run's start states), as ``mbrl eval`` plays it; ``None`` without a checkpoint."""
    from mbrl.evaluate import build_policy, load_run

    if not (folder / "checkpoint.pt").is_file():
        return None
    loaded = load_run(folder)
    spec = envs.make(loaded.cfg.env)
    agent = build_policy(loaded, spec, torch.device("cpu"), 0)
    with torch.inference_mode():
        return [run_episode(spec.make(), agent, seed=s).ret for s in seeds]


def sac_return_at(folder: Path, steps: int) -> float | None:
    """SAC's last evaluation return (its own 5 episodes) at or before ``steps`` env steps."""
    path = folder / "metrics.csv"
    if not path.is_file():
        return None
    with path.open(newline="") as f:
        rows = [r for r in csv.DictReader(f) if r.get("return") not in (None, "", "nan")]
    rows = [r for r in rows if int(r["env_steps"]) <= steps]
    return float(rows[-1]["return"]) if rows else None


def reacher(seeds: list[int], root: Path, sac_runs: Path | None, horizon: int, iters: int) -> None:
    """GPS on Reacher-v5 against iLQR-MPC on the truth and SAC at the same env steps."""
    for seed in seeds:
        cfg = load_config(gps.Config, preset("gps_reacher").path, [f"seed={seed}"])
        t0 = time.process_time()
        rows = _train(gps, cfg, root / f"gps-reacher-{seed}")
        gps_cpu = time.process_time() - t0
        last = rows[-1]
        conditions = [lqr_flm.condition_seed(seed, m) for m in range(cfg.conditions)]
        held = [lqr_flm.condition_seed(seed, cfg.conditions + j) for j in range(cfg.held_out)]
        ilqr, ilqr_cpu = ilqr_mpc_returns(conditions + held, horizon, iters)
        train_ilqr = float(np.mean(ilqr[: cfg.conditions]))
        sac_folder = sac_runs / f"sac-reacher-s{seed}" if sac_runs else None
        sac = sac_return_at(sac_folder, int(last["env_steps"])) if sac_folder else None
        sac_same = sac_returns_from(sac_folder, conditions + held) if sac_folder else None
        print(
            json.dumps(
                {
                    "bench": "reacher",
                    "seed": seed,
                    "env_steps": int(last["env_steps"]),
                    "gps_policy_return": round(float(last["return"]), 3),
                    "gps_local_return": round(float(last["local_return"]), 3),
                    "gps_held_out_return": round(float(last["held_out_return"]), 3),
                    "ilqr_mpc_return": round(train_ilqr, 3),
                    "ilqr_mpc_held_out_return": round(float(np.mean(ilqr[cfg.conditions :])), 3),
                    "gps_over_ilqr_return": round(float(last["return"]) / train_ilqr, 3),
                    "gps_returns_per_iteration": [round(float(r["return"]), 2) for r in rows],
                    "sac_eval_return": sac,
                    "sac_return_same_starts": (
                        round(float(np.mean(sac_same[: cfg.conditions])), 3) if sac_same else None
                    ),
                    "sac_held_out_return_same_starts": (
                        round(float(np.mean(sac_same[cfg.conditions :])), 3) if sac_same else None
                    ),
                    "gps_cpu_seconds": round(gps_cpu, 1),
                    "ilqr_cpu_seconds": round(ilqr_cpu, 1),
                }
            ),
            flush=True,
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("bench", choices=["point-mass", "policy", "reacher", "reacher-optima"])
    parser.add_argument("--seeds", type=int, nargs="+")
    parser.add_argument("--runs-dir", type=Path, help="where the runs go (default: a temp dir)")
    parser.add_argument("--sac-runs", type=Path, help="reacher: folder of the SAC run folders")
    parser.add_argument("--ilqr-horizon", type=int, default=25, help="reacher: iLQR-MPC's H")
    parser.add_argument("--ilqr-iterations", type=int, default=20, help="reacher: per plan")
    args = parser.parse_args()
    print(json.dumps({"cpu": torch.backends.cpu.get_cpu_capability(), "threads": 1}))
    with tempfile.TemporaryDirectory() as tmp:
        root = args.runs_dir or Path(tmp)
        if args.bench == "point-mass":
            point_mass(args.seeds or [0, 1, 2, 3, 4], root)
        elif args.bench == "policy":
            policy(args.seeds or [0, 1, 2, 3, 4], root)
        elif args.bench == "reacher-optima":
            reacher_optima(args.seeds or [0, 1, 2], args.ilqr_horizon, args.ilqr_iterations)
        else:
            reacher(
                args.seeds or [0, 1, 2],
                root,
                args.sac_runs,
                args.ilqr_horizon,
                args.ilqr_iterations,
            )


if __name__ == "__main__":
    main()
