"""Time to solve cart-pole balance: this project's PETS against mbrl-lib's, back to back.

For each seed, one after the other and with one thread each (``OMP_NUM_THREADS=1``):

* **ours**: ``mbrl run pets --env cartpole-balance [overrides]`` (the quick demo's defaults,
  or a preset with ``--ours-args --preset pets_cartpole_fast``), which stops after its first
  solved trial (``stop_when_solved=1`` is passed too);
* **mbrl-lib** (PyPI ``mbrl`` 0.2.0 in its own virtualenv, ``/work/peers/mbrl-lib``; the
  install recipe is in the project's notes on peers): its PETS with the settings of its
  ``notebooks/pets_example.ipynb`` at tag v0.2.0, driven through its Python API by this very
  file (``--peer-run SEED`` under the peer's interpreter): ``GaussianMLP`` ensemble of 5 with
  3 x 200 LeakyReLU(0.01) layers, TS-inf (``fixed_model``) with 20 particles, CEM with
  population 500, 10% elites, 5 iterations, alpha 0.1, horizon 15, mean of the elites
  returned, 200 random steps first, retrained before every trial for 50 epochs (patience 50)
  in batches of 32 with 5% held out, Adam lr 1e-3 and weight decay 5e-5; at most 10 trials.

Time to solve is measured from the start of the subprocess (interpreter start and imports
included) to the end of the first episode with return >= 200, where both stop: wall seconds
and the CPU seconds of the subprocess (``RUSAGE_CHILDREN``), since the machine may be shared.
Both runs also report their own clock from their first line of work. Prints one JSON object;
``--out FILE`` also writes it, and the per-run results as they arrive to ``FILE.jsonl``.

    python experiments/bench_time_to_solve.py [--seeds 0 1 2] [--sides ours peer]
        [--ours-args --preset pets_cartpole_fast] [--peer-python PATH]
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PEER_PYTHON = "/work/peers/mbrl-lib/bin/python"
SOLVED = 200.0
PEER_TRIALS = 10


def _child_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def _timed(
    cmd: list[str], cwd: Path, show_stderr: bool = False
) -> tuple[subprocess.CompletedProcess, float, float]:
    """Run ``cmd`` with one thread; returns the process, its wall and its CPU seconds."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    cpu0, wall0 = _child_cpu(), time.perf_counter()
    err = None if show_stderr else subprocess.PIPE
    proc = subprocess.run(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=err, text=True)
    wall, cpu = time.perf_counter() - wall0, _child_cpu() - cpu0
    if proc.returncode != 0:
        raise RuntimeError(
            f"{' '.join(cmd)} failed ({proc.returncode}):\n{(proc.stderr or '')[-3000:]}"
        )
    return proc, wall, cpu


def run_ours(seed: int, ours_args: list[str]) -> dict:
    """``mbrl run pets`` until the first solved trial; returns its times and returns."""
    with tempfile.TemporaryDirectory() as runs:
        cmd = [str(Path(sys.executable).parent / "mbrl"), "run", "pets"]
        if "--preset" not in ours_args and "--config" not in ours_args:
            cmd += ["--env", "cartpole-balance"]
        cmd += [*ours_args, "--seed", str(seed), "--runs-dir", runs, "--name", "solve"]
        cmd += ["stop_when_solved=1"]
        proc, wall, cpu = _timed(cmd, REPO)
        with open(Path(runs) / "solve" / "metrics.csv") as f:
            rows = [r for r in csv.DictReader(f) if r["trial"] not in ("", "0")]
    returns = [float(r["return"]) for r in rows]
    solved_at = next((i + 1 for i, r in enumerate(returns) if r >= SOLVED), None)
    header = [
        line for line in proc.stdout.splitlines() + proc.stderr.splitlines() if "dtype" in line
    ]
    return {
        "side": "ours",
        "seed": seed,
        "command": " ".join(["mbrl", *cmd[1:]]),
        "returns": returns,
        "solved_trial": solved_at,
        "wall_seconds": wall,
        "cpu_seconds": cpu,
        "run_wall_seconds": float(rows[-1]["wall_seconds"]) if rows else None,
        "plan_seconds_per_step": [float(r["plan_seconds_per_step"]) for r in rows],
        "fit_seconds": [float(r["fit_seconds"]) for r in rows],
        "planning_dtype_line": header[0] if header else None,
    }


def run_peer(seed: int, python: str) -> dict:
    """mbrl-lib's notebook PETS under its own interpreter, until the first solved trial."""
    cmd = [python, str(Path(__file__).resolve()), "--peer-run", str(seed)]
    proc, wall, cpu = _timed(cmd, REPO, show_stderr=True)
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    return {"side": "mbrl-lib", "seed": seed, **result, "wall_seconds": wall, "cpu_seconds": cpu}


def peer_run(seed: int) -> None:
    """The body of ``--peer-run``: runs under mbrl-lib's virtualenv, where ``mbrl`` is mbrl-lib.
    Prints one JSON line: per-trial returns and clocks, the solved trial (None if not)."""
    wall0, cpu0 = time.perf_counter(), time.process_time()
    import numpy as np
    import omegaconf
    import torch

    import mbrl.env.cartpole_continuous as cartpole_env
    import mbrl.env.reward_fns as reward_fns
    import mbrl.env.termination_fns as termination_fns
    import mbrl.models as models
    import mbrl.planning as planning
    import mbrl.util.common as common_util

    torch.set_num_threads(1)
    env = cartpole_env.CartPoleEnv()
    env.reset(seed=seed)
    rng = np.random.default_rng(seed=seed)
    generator = torch.Generator().manual_seed(seed)
    obs_shape, act_shape = env.observation_space.shape, env.action_space.shape
    trial_length, ensemble_size = 200, 5
    cfg = omegaconf.OmegaConf.create(
        {
            "dynamics_model": {
                "_target_": "mbrl.models.GaussianMLP",
                "device": "cpu",
                "num_layers": 3,
                "ensemble_size": ensemble_size,
                "hid_size": 200,
                "in_size": "???",
                "out_size": "???",
                "deterministic": False,
                "propagation_method": "fixed_model",
                "activation_fn_cfg": {"_target_": "torch.nn.LeakyReLU", "negative_slope": 0.01},
            },
            "algorithm": {"learned_rewards": False, "target_is_delta": True, "normalize": True},
            "overrides": {
                "trial_length": trial_length,
                "num_steps": PEER_TRIALS * trial_length,
                "model_batch_size": 32,
                "validation_ratio": 0.05,
            },
        }
    )
    dynamics_model = common_util.create_one_dim_tr_model(cfg, obs_shape, act_shape)
    model_env = models.ModelEnv(
        env, dynamics_model, termination_fns.cartpole, reward_fns.cartpole, generator=generator
    )
    replay_buffer = common_util.create_replay_buffer(cfg, obs_shape, act_shape, rng=rng)
    common_util.rollout_agent_trajectories(
        env,
        trial_length,
        planning.RandomAgent(env),
        {},
        replay_buffer=replay_buffer,
        trial_length=trial_length,
    )
    agent_cfg = omegaconf.OmegaConf.create(
        {
            "_target_": "mbrl.planning.TrajectoryOptimizerAgent",
            "planning_horizon": 15,
            "replan_freq": 1,
            "verbose": False,
            "action_lb": "???",
            "action_ub": "???",
            "optimizer_cfg": {
                "_target_": "mbrl.planning.CEMOptimizer",
                "num_iterations": 5,
                "elite_ratio": 0.1,
                "population_size": 500,
                "alpha": 0.1,
                "device": "cpu",
                "lower_bound": "???",
                "upper_bound": "???",
                "return_mean_elites": True,
                "clipped_normal": False,
            },
        }
    )
    agent = planning.create_trajectory_optim_agent_for_model(model_env, agent_cfg, num_particles=20)
    trainer = models.ModelTrainer(dynamics_model, optim_lr=1e-3, weight_decay=5e-5)
    work_wall0, work_cpu0 = time.perf_counter(), time.process_time()
    returns, fit_seconds, trial_wall, trial_cpu, solved = [], [], [], [], None
    for trial in range(PEER_TRIALS):
        obs, _ = env.reset()
        agent.reset()
        t_fit = time.perf_counter()
        dynamics_model.update_normalizer(replay_buffer.get_all())
        train, val = common_util.get_basic_buffer_iterators(
            replay_buffer,
            batch_size=32,
            val_ratio=0.05,
            ensemble_size=ensemble_size,
            shuffle_each_epoch=True,
            bootstrap_permutes=False,
        )
        trainer.train(train, dataset_val=val, num_epochs=50, patience=50, silent=True)
        fit_seconds.append(time.perf_counter() - t_fit)
        total, steps, terminated = 0.0, 0, False
        while not terminated and steps < trial_length:
            obs, reward, terminated, _, _ = common_util.step_env_and_add_to_buffer(
                env, obs, agent, {}, replay_buffer
            )
            total += reward
            steps += 1
        returns.append(total)
        trial_wall.append(time.perf_counter() - wall0)
        trial_cpu.append(time.process_time() - cpu0)
        print(f"trial {trial + 1}: return {total:.1f}", file=sys.stderr, flush=True)
        if total >= SOLVED:
            solved = trial + 1
            break
    print(
        json.dumps(
            {
                "returns": returns,
                "solved_trial": solved,
                "fit_seconds": fit_seconds,
                "run_wall_seconds": trial_wall[-1] - (work_wall0 - wall0),
                "wall_at_trial_end": trial_wall,
                "cpu_at_trial_end": trial_cpu,
                "run_cpu_seconds": trial_cpu[-1] - (work_cpu0 - cpu0),
            }
        )
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--sides", nargs="+", default=["ours", "peer"], choices=["ours", "peer"])
    parser.add_argument(
        "--ours-args",
        nargs=argparse.REMAINDER,
        default=[],
        help="arguments for `mbrl run pets` (the rest of the command line)",
    )
    parser.add_argument("--peer-python", default=PEER_PYTHON)
    parser.add_argument("--out", type=Path, help="also write the JSON here")
    parser.add_argument("--peer-run", type=int, metavar="SEED", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.peer_run is not None:
        peer_run(args.peer_run)
        return
    if "peer" in args.sides and not Path(args.peer_python).exists():
        parser.error(
            f"--peer-python {args.peer_python} does not exist; install mbrl-lib in its own "
            "virtualenv (see the notes on peers) or run --sides ours"
        )
    import torch  # only for the CPU capability line

    result = {
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "cores": os.cpu_count(),
        "runs": [],
    }
    log = args.out.with_suffix(".jsonl").open("a") if args.out else None
    for seed in args.seeds:
        for side in args.sides:
            r = (
                run_ours(seed, args.ours_args)
                if side == "ours"
                else run_peer(seed, args.peer_python)
            )
            result["runs"].append(r)
            print(
                f"seed {seed} {r['side']}: solved at trial {r['solved_trial']}, "
                f"{r['wall_seconds']:.0f} s wall, {r['cpu_seconds']:.0f} s CPU, "
                f"returns {[round(x) for x in r['returns']]}",
                file=sys.stderr,
                flush=True,
            )
            if log:
                log.write(json.dumps(r) + "\n")
                log.flush()
    by = {(r["side"], r["seed"]): r for r in result["runs"]}
    ratios = {}
    for seed in args.seeds:
        ours, peer = by.get(("ours", seed)), by.get(("mbrl-lib", seed))
        if ours and peer and ours["solved_trial"] and peer["solved_trial"]:
            ratios[seed] = {
                "wall": peer["wall_seconds"] / ours["wall_seconds"],
                "cpu": peer["cpu_seconds"] / ours["cpu_seconds"],
            }
    result["peer_over_ours"] = ratios
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text)


if __name__ == "__main__":
    main()
