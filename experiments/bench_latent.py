"""Latent-model speed against mbrl-lib's PlaNet: one RSSM update and one latent CEM plan.

Both sides build PlaNet's model at the same sizes (Hafner et al. 2019, App. A; mbrl-lib's
``planet.yaml``): 3 x 64 x 64 frames, encoder 4 convolutions of depth 32 (kernel 4, stride 2,
1024 features), decoder from 1024 features at 1 x 1 through transposed convolutions of kernels
5, 5, 6, 6, GRU 200, stochastic state 30, dense layers of 200, a reward head of two hidden
layers of 200, one action dimension.

Tasks, each timed after one warm-up call:

- ``update``: one Adam step (lr 1e-3, eps 1e-4, gradient norm clipped at 1000) on a batch of
  ``B`` chunks of ``T`` frames of uint8 images (random pixels: the same arithmetic as real
  frames), preprocessing included. Ours: :meth:`mbrl.dynamics.rssm.RSSM.update` on
  :class:`~mbrl.data.Sequences` with ``L = T - 1`` steps (``T`` frames); mbrl-lib:
  ``PlaNetModel.update`` on a ``TransitionBatch`` of sequences of ``T + 1`` (its loss uses
  frames ``1..T``). Sizes: ``full`` is PlaNet's 50 chunks x 50 frames, ``reduced`` 16 x 25.
- ``plan``: one CEM plan from a filtered belief, 1000 candidates x horizon 12 x 10 iterations,
  top 100, no smoothing, one particle (PlaNet's planner); ``reduced`` is 300 x 12 x 5. Ours:
  :class:`mbrl.planners.CEM` on a :class:`~mbrl.planners.PlanningProblem` over the RSSM
  (``plan(problem, belief)``); mbrl-lib: ``TrajectoryOptimizerAgent(CEMOptimizer(...,
  alpha=0, return_mean_elites=True, clipped_normal=True), replan_freq=1,
  keep_last_solution=False).act(obs)`` over ``ModelEnv.evaluate_action_sequences`` after
  ``update_posterior`` (its planning path in ``mbrl.algorithms.planet``). ``ours_bf16`` is
  ours with ``planning_dtype=torch.bfloat16`` (the rollouts' cells in bfloat16, native on
  CPUs with AVX512-BF16; ``ours`` is float32 like the peer).

The two packages are both imported as ``mbrl``, so each side runs in its own subprocess (its
own venv); rounds are interleaved (ours, peer, then peer, ours, ...), each subprocess warms up
and then times ``--reps`` calls with ``time.process_time`` (CPU time) and ``perf_counter``
(wall), one thread each. The figure of a side is the median over all its timed calls; the
ratios (peer / ours) are medians of the per-round ratios, CPU time beside wall time. Achieved
GFLOP/s counts the multiply-adds of one forward pass with hooks on our model (both models
have the same layers; a training step counts three forward passes), divided by CPU seconds,
next to the matmul peak per CPU second measured in the same run (float32, and bfloat16 for
``ours_bf16``; the best of a measurement before the first task and after each).

    OMP_NUM_THREADS=1 .venv/bin/python experiments/bench_latent.py [--rounds 3] [--reps 2]
        [--tasks update,plan] [--sizes full,reduced] [--peer /work/peers/mbrl-lib/bin/python]

With ``--compare-planners runs/<name>`` it plays ``--episodes`` episodes on the latest model of
a ``planet`` or ``latent-mpc`` run with the run's planner and with iLQR (on the mean latent
dynamics, the learned reward as its cost; ``--ilqr-iterations``), the same env seeds, and
prints the returns and planning seconds per step of each.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

SIZES = {
    ("update", "full"): {"batch": 50, "frames": 50},
    ("update", "reduced"): {"batch": 16, "frames": 25},
    ("plan", "full"): {"population": 1000, "horizon": 12, "iterations": 10},
    ("plan", "reduced"): {"population": 300, "horizon": 12, "iterations": 5},
}
SIDES = {"ours": torch.float32, "ours_bf16": torch.bfloat16}
"""Our variants by name: the planning dtype (bfloat16 rollouts; training stays float32)."""
IMAGE = (3, 64, 64)
D, Z, HIDDEN, DEPTH, ACT = 200, 30, 200, 32, 1


# ---------------------------------------------------------------- the workers


def _time(call, reps: int) -> list[tuple[float, float]]:
    call()  # warm-up
    out = []
    for _ in range(reps):
        c, w = time.process_time(), time.perf_counter()
        call()
        out.append((time.process_time() - c, time.perf_counter() - w))
    return out


def _frames(batch: int, frames: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (batch, frames, *IMAGE), dtype=torch.uint8, generator=g)


def ours(task: str, size: str, reps: int, dtype: torch.dtype = torch.float32) -> dict:
    from mbrl.data import Sequences
    from mbrl.dynamics.rssm import RSSM
    from mbrl.planners import CEM, PlanningProblem

    model = RSSM(IMAGE, ACT, D, Z, HIDDEN, DEPTH, planning_dtype=dtype)
    s = SIZES[task, size]
    gen = torch.Generator().manual_seed(0)
    if task == "update":
        b, t = s["batch"], s["frames"]
        obs = _frames(b, t)
        act = torch.rand(b, t - 1, ACT, generator=gen) * 2 - 1
        chunks = Sequences(
            obs, act, torch.rand(b, t - 1), torch.zeros(b, t - 1, dtype=torch.bool),
            torch.arange(t - 1).expand(b, -1),
        )  # fmt: skip
        times = _time(lambda: model.update(chunks, gen), reps)
        return {"times": times, "flops": 3 * forward_flops(model, chunks)}
    belief = model.observe(model.reset_belief(1), _frames(1, 1)[:, 0], None)

    def refuse(*_):
        raise AssertionError("the RSSM learns the reward")

    problem = PlanningProblem(
        model, refuse, None, s["horizon"], -torch.ones(ACT), torch.ones(ACT), 1, gen
    )
    cem = CEM(population=s["population"], elite_fraction=0.1, iterations=s["iterations"], alpha=0)
    times = _time(lambda: cem.plan(problem, belief), reps)
    rows = s["population"] * s["horizon"] * s["iterations"]
    return {"times": times, "flops": rows * step_flops()}


def peer(task: str, size: str, reps: int) -> dict:
    import gymnasium as gym
    import numpy as np
    import omegaconf

    from mbrl.env.termination_fns import no_termination
    from mbrl.models import ModelEnv, PlaNetModel
    from mbrl.planning import TrajectoryOptimizerAgent
    from mbrl.types import TransitionBatch

    gen = torch.Generator().manual_seed(0)
    model = PlaNetModel(
        obs_shape=IMAGE,
        obs_encoding_size=1024,
        encoder_config=((3, 32, 4, 2), (32, 64, 4, 2), (64, 128, 4, 2), (128, 256, 4, 2)),
        decoder_config=(
            (1024, 1, 1),
            ((1024, 128, 5, 2), (128, 64, 5, 2), (64, 32, 6, 2), (32, 3, 6, 2)),
        ),
        latent_state_size=Z,
        action_size=ACT,
        belief_size=D,
        hidden_size_fcs=HIDDEN,
        device="cpu",
        min_std=0.1,
        free_nats=3.0,
        kl_scale=1.0,
        grad_clip_norm=1000.0,
        rng=gen,
    )
    s = SIZES[task, size]
    if task == "update":
        b, t = s["batch"], s["frames"]
        obs = _frames(b, t + 1)
        act = torch.rand(b, t + 1, ACT, generator=gen) * 2 - 1
        rew = torch.rand(b, t + 1, generator=gen)
        done = torch.zeros(b, t + 1, dtype=torch.bool)
        batch = TransitionBatch(obs, act, None, rew, done, done)
        opt = torch.optim.Adam(model.parameters(), lr=1e-3, eps=1e-4)
        return {"times": _time(lambda: model.update(batch, opt), reps)}
    box = gym.spaces.Box(-1.0, 1.0, (ACT,), np.float32)
    env = gym.Env()
    env.observation_space = gym.spaces.Box(0, 255, IMAGE, np.uint8)
    env.action_space = box
    model_env = ModelEnv(env, model, no_termination, generator=gen)
    optimizer_cfg = omegaconf.OmegaConf.create(
        {
            "_target_": "mbrl.planning.CEMOptimizer",
            "num_iterations": s["iterations"],
            "elite_ratio": 0.1,
            "population_size": s["population"],
            "alpha": 0.0,
            "lower_bound": "???",
            "upper_bound": "???",
            "return_mean_elites": True,
            "device": "cpu",
            "clipped_normal": True,
        }
    )
    agent = TrajectoryOptimizerAgent(
        optimizer_cfg, [-1.0], [1.0], planning_horizon=s["horizon"], replan_freq=1,
        keep_last_solution=False,
    )  # fmt: skip
    agent.set_trajectory_eval_fn(
        lambda o, seqs: model_env.evaluate_action_sequences(seqs, initial_state=o, num_particles=1)
    )
    obs = _frames(1, 1)[0, 0].numpy()
    model.reset_posterior()
    model.update_posterior(obs, rng=gen)
    return {"times": _time(lambda: agent.act(obs), reps)}


def forward_flops(model: torch.nn.Module, chunks) -> int:
    """2 x the multiply-adds of the dense, convolution and GRU layers in one forward pass of
    ``model.update``'s loss on ``chunks`` (counted by hooks during one more update)."""
    from torch import nn

    from mbrl.dynamics.latent import ConvDecoder

    macs = [0]

    def hook(module, inputs, output):
        if isinstance(module, ConvDecoder):  # its first layer (from 1 x 1) runs as a matmul
            macs[0] += inputs[0].shape[0] * module.first.weight.numel()
        elif isinstance(module, nn.Linear):
            macs[0] += output.numel() * module.in_features
        elif isinstance(module, nn.Conv2d):
            k = module.kernel_size[0] * module.kernel_size[1]
            macs[0] += output.numel() * module.in_channels * k
        elif isinstance(module, nn.ConvTranspose2d):
            k = module.kernel_size[0] * module.kernel_size[1]
            macs[0] += inputs[0].numel() * module.out_channels * k
        elif isinstance(module, nn.GRUCell):
            rows = inputs[0].shape[0]
            macs[0] += rows * 3 * module.hidden_size * (module.input_size + module.hidden_size)

    handles = [m.register_forward_hook(hook) for m in model.modules()]
    model.update(chunks, torch.Generator().manual_seed(1))
    for h in handles:
        h.remove()
    return 2 * macs[0]


def step_flops() -> int:
    """2 x the multiply-adds of one prior step of one planning row: the transition's dense
    layer and GRU, the prior's two layers, the reward head's three."""
    macs = (Z + ACT) * HIDDEN + 3 * HIDDEN * (HIDDEN + D)
    macs += D * HIDDEN + HIDDEN * 2 * Z
    macs += (D + Z) * HIDDEN + HIDDEN * HIDDEN + HIDDEN
    return 2 * macs


# ---------------------------------------------------------------- planners on a trained model


def compare_planners(run_dir: str, episodes: int, max_iterations: int) -> dict:
    """Play ``episodes`` episodes with the run's planner and with iLQR on the latest model of
    the run folder ``run_dir`` (a ``planet`` or ``latent-mpc`` run), the same env seeds, no
    exploration noise; returns, mean, and planning seconds per step of each."""
    from dataclasses import replace

    from mbrl import algorithms, envs
    from mbrl.algorithms.factory import PlannerConfig
    from mbrl.algorithms.planet import latent_problem
    from mbrl.control import MPCController, run_episode
    from mbrl.evaluate import load_run

    loaded = load_run(run_dir)
    module = algorithms.get(loaded.algo)
    dev = torch.device("cpu")
    model, _, _ = module.make_model(loaded.cfg, dev)
    model.load_state_dict(loaded.parts["model"])
    spec = envs.make(loaded.cfg.env)
    env = spec.make()
    ilqr = PlannerConfig(name="ilqr", max_iterations=max_iterations)
    out: dict = {"run": str(run_dir), "env": spec.name, "episodes": episodes}
    for name, planner_cfg in (("run_planner", loaded.cfg.planner), ("ilqr", ilqr)):
        cfg = replace(loaded.cfg, planner=planner_cfg)
        gen = torch.Generator().manual_seed(0)
        planner, problem = latent_problem(model, spec, cfg, gen, dev)
        controller = MPCController(planner, problem, cfg.replan_every, dev)
        returns, seconds, plans, not_ok = [], 0.0, 0, 0
        for e in range(episodes):
            ep = run_episode(env, controller, seed=10_000 + e)
            returns.append(round(ep.ret, 2))
            seconds += controller.stats.plan_seconds
            plans += controller.stats.plans
            not_ok += controller.stats.not_ok
            controller.reset_stats()
        out[name] = {
            "planner": planner_cfg.name,
            "returns": returns,
            "mean": round(statistics.mean(returns), 2),
            "plan_seconds_per_step": round(seconds / max(plans, 1), 4),
            "plans_not_ok": not_ok,
        }
    return out


# ---------------------------------------------------------------- the driver


def _worker(python: str, side: str, task: str, size: str, reps: int) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    cmd = [python, str(Path(__file__).resolve()), "--worker", side, task, size, str(reps)]
    # the peer's venv: run from a folder without this project, whose package is also `mbrl`
    cwd = "/tmp" if side == "peer" else str(Path(__file__).resolve().parents[1])
    out = subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"{side} {task} {size} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def cpu_peak_gflops(size: int = 1024, seconds: float = 1.0) -> dict[str, float]:
    """Best GFLOP/s per CPU second of a square ``size`` matmul, float32 and bfloat16, one
    thread (CPU time, like the tasks: on a shared machine wall time undercounts the peak)."""
    out = {}
    for name, dtype in (("float32", torch.float32), ("bfloat16", torch.bfloat16)):
        a, b = torch.randn(size, size).to(dtype), torch.randn(size, size).to(dtype)
        c = torch.empty(size, size, dtype=dtype)
        for _ in range(3):
            torch.matmul(a, b, out=c)
        best, end = 0.0, time.perf_counter() + seconds
        while time.perf_counter() < end:
            t0 = time.process_time()
            for _ in range(5):
                torch.matmul(a, b, out=c)
            best = max(best, 5 * 2 * size**3 / max(time.process_time() - t0, 1e-9) / 1e9)
        out[name] = best
    return out


def _medians(times: list[tuple[float, float]]) -> tuple[float, float]:
    """Median CPU and wall seconds of ``(cpu, wall)`` pairs."""
    return statistics.median(t[0] for t in times), statistics.median(t[1] for t in times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--reps", type=int, default=2)
    p.add_argument("--tasks", default="update,plan")
    p.add_argument("--sizes", default="full,reduced")
    p.add_argument("--peer", default="/work/peers/mbrl-lib/bin/python")
    p.add_argument("--worker", nargs=4, metavar=("SIDE", "TASK", "SIZE", "REPS"))
    p.add_argument(
        "--compare-planners", metavar="RUN", help="the run's planner against iLQR on its model"
    )
    p.add_argument("--episodes", type=int, default=3)
    p.add_argument("--ilqr-iterations", type=int, default=10)
    args = p.parse_args()
    torch.set_num_threads(1)
    if args.compare_planners:
        result = compare_planners(args.compare_planners, args.episodes, args.ilqr_iterations)
        print(json.dumps(result, indent=1))
        return
    if args.worker:
        side, task, size, reps = args.worker
        if side == "peer":
            result = peer(task, size, int(reps))
        else:
            result = ours(task, size, int(reps), SIDES[side])
        print(json.dumps(result))
        return
    peak = [cpu_peak_gflops()]
    report: dict = {
        "cpu": torch.backends.cpu.get_cpu_capability(),
        "threads": 1,
        "rounds": args.rounds,
        "reps_per_round": args.reps,
    }
    for task in args.tasks.split(","):
        for size in args.sizes.split(","):
            names = ["ours", "ours_bf16", "peer"] if task == "plan" else ["ours", "peer"]
            sides: dict[str, list] = {k: [] for k in names}
            ratios: dict[str, list] = {k: [] for k in names if k != "peer"}
            flops = 0
            for r in range(args.rounds):
                order = names if r % 2 == 0 else names[::-1]
                got = {}
                for side in order:
                    python = args.peer if side == "peer" else sys.executable
                    got[side] = _worker(python, side, task, size, args.reps)
                    sides[side] += got[side]["times"]
                flops = got["ours"]["flops"]
                med = {k: _medians(v["times"]) for k, v in got.items()}
                for k in ratios:  # peer / ours, CPU and wall, this round
                    ratios[k].append((med["peer"][0] / med[k][0], med["peer"][1] / med[k][1]))
            peak.append(cpu_peak_gflops())
            entry: dict = {"setting": SIZES[task, size], "gflop": round(flops / 1e9, 3)}
            for side, times in sides.items():
                cpu, wall = _medians(times)
                entry[side] = {
                    "cpu_s": round(cpu, 4),
                    "wall_s": round(wall, 4),
                    "gflops_per_cpu_s": round(flops / cpu / 1e9, 2),
                }
            for k, rs in ratios.items():
                entry[f"peer_over_{k}_cpu"] = round(statistics.median(x[0] for x in rs), 3)
                entry[f"peer_over_{k}_wall"] = round(statistics.median(x[1] for x in rs), 3)
                entry[f"peer_over_{k}_cpu_per_round"] = [round(x[0], 3) for x in rs]
            report[f"{task}_{size}"] = entry
            print(json.dumps({f"{task}_{size}": entry}), file=sys.stderr, flush=True)
    top = {k: max(p[k] for p in peak) for k in peak[0]}
    report["matmul_peak_gflops_per_cpu_s"] = {k: round(v, 2) for k, v in top.items()}
    for entry in report.values():
        if isinstance(entry, dict) and "ours" in entry:
            for side in ("ours", "ours_bf16", "peer"):
                if side in entry:
                    dtype = "bfloat16" if side == "ours_bf16" else "float32"
                    entry[side]["fraction_of_peak"] = round(
                        entry[side]["gflops_per_cpu_s"] / top[dtype], 3
                    )
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
