"""Planning overhead on a cheap model: this project's MPPI and CEM against pytorch-mppi and the
bare dynamics-plus-cost loop, on the analytic pendulum.

Setting: the project's pendulum (:func:`mbrl.envs.systems.pendulum`, Gymnasium's Pendulum-v1
physics, state ``[theta, theta_dot]``, torque in ``[-2, 2]``), K = 1000 candidates, horizon
H = 30, float32, one thread. Every contender gets the SAME two torch callables, the system's
torch forms: ``dynamics(x [K, 2], u [K, 1]) -> [K, 2]`` (:meth:`AnalyticSystem.step`) and
``running_cost(x, u) -> [K]`` (:meth:`AnalyticSystem.cost`), the cost taken on the state after
the step, as pytorch-mppi does.

Contenders, one command each = one receding-horizon action from a given state:

- ``mppi``: ``MPCController(MPPI(population=K, temperature=lambda, noise_std=sigma,
  iterations=1), problem).act(obs)`` on ``PlanningProblem(KnownModel(dynamics), reward =
  -running_cost(next_obs, act))``: one update per command, warm-started by the controller
  (the shifted previous plan is one more candidate), ``score_mean="auto"`` (no re-score of the
  final mean at one iteration).
- ``mppi_scored``: the same with ``score_mean=True`` (the final mean scored once more, as every
  MPPI plan did before ``score_mean``).
- ``cem``: ``CEM(population=K, elite_fraction=0.1, iterations=1)`` (the best candidate; the same
  model budget per command as MPPI: K rollouts).
- ``pytorch_mppi``: ``pytorch_mppi.MPPI(dynamics, running_cost, nx=2,
  noise_sigma=[[sigma^2]], num_samples=K, horizon=H, lambda_=lambda, u_min=-2, u_max=2)
  .command(state)`` (its defaults otherwise: ``u_init = 0``, ``u_per_command = 1``, one
  rollout sample, no terminal cost; it never re-scores its mean), run under
  ``torch.inference_mode()`` as ours is.
- ``floor``: the bare loop written plainly in torch, on actions ``[K, H, 1]`` drawn once:
  ``for t: x = dynamics(x, u[:, t]); c = c + running_cost(x, u[:, t])`` (no sampling, no
  weighting, no checks).
- ``mppi_compiled`` (with ``--compile``): ``mppi`` with ``compile=True``; the compilation
  (both row counts: the first plan has no warm start) happens in the warm-up and is reported
  as ``compile_s``.

Rounds are interleaved (mppi, mppi_scored, cem, pytorch_mppi, floor, [mppi_compiled], then
again), each round ``--commands`` commands per contender, cycling through the same
``--states`` states of a free swing of the pendulum. Per round it records process CPU time
(``time.process_time``) and wall time; a contender's figure is the median over rounds, and
every ratio is the median of the per-round ratios (same round, back to back), CPU time beside
wall time; on a shared machine the CPU-time ratios are the steadier.

pytorch-mppi lives in its own environment with the project installed editable beside it::

    python3 -m venv /work/peers/pytorch-mppi
    /work/peers/pytorch-mppi/bin/pip install torch==2.13.0 pytorch-mppi
    /work/peers/pytorch-mppi/bin/pip install torch==2.13.0 -e .
    OMP_NUM_THREADS=1 /work/peers/pytorch-mppi/bin/python experiments/bench_overhead.py

Without pytorch-mppi importable the script measures the other contenders and says so.

    python experiments/bench_overhead.py [--rounds 9] [--commands 40] [--compile]
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from machine import matmul_peak_gflops  # noqa: E402

from mbrl.control import MPCController  # noqa: E402
from mbrl.dynamics import KnownModel  # noqa: E402
from mbrl.envs.systems import pendulum  # noqa: E402
from mbrl.planners import CEM, MPPI, PlanningProblem  # noqa: E402

Command = Callable[[int], None]
"""``command(k)``: one receding-horizon command from state ``k`` of the state list."""


def swing_states(count: int) -> np.ndarray:
    """``[count, 2]`` float32 states of a free swing (zero torque) from ``[pi - 0.3, 0]``."""
    system = pendulum()
    x = torch.tensor([[math.pi - 0.3, 0.0]], dtype=torch.float64)
    out = []
    for _ in range(count):
        out.append(x[0].float().numpy())
        x = system.step(x, torch.zeros(1, 1, dtype=torch.float64))
    return np.stack(out)


def ours(planner, dynamics, running_cost, horizon: int, seed: int) -> MPCController:
    """The project's MPC controller with ``planner`` on the given callables."""

    def reward(obs: torch.Tensor, act: torch.Tensor, next_obs: torch.Tensor) -> torch.Tensor:
        return -running_cost(next_obs, act)

    problem = PlanningProblem(
        KnownModel(dynamics, 2, 1),
        reward,
        None,
        horizon,
        torch.tensor([-2.0]),
        torch.tensor([2.0]),
        generator=torch.Generator().manual_seed(seed),
    )
    return MPCController(planner, problem, replan_every=1)


def contenders(args: argparse.Namespace, states: np.ndarray) -> dict[str, Command]:
    system = pendulum()
    dynamics, running_cost = system.step, system.cost
    k, h, sigma, lam = args.samples, args.horizon, args.sigma, args.temperature
    out: dict[str, Command] = {}

    def controller_command(ctrl: MPCController) -> Command:
        return lambda i: ctrl.act(states[i])

    def mppi(**kw: object) -> MPCController:
        planner = MPPI(population=k, temperature=lam, noise_std=sigma, iterations=1, **kw)
        return ours(planner, dynamics, running_cost, h, args.seed)

    out["mppi"] = controller_command(mppi())
    out["mppi_scored"] = controller_command(mppi(score_mean=True))
    cem = CEM(population=k, elite_fraction=0.1, iterations=1)
    out["cem"] = controller_command(ours(cem, dynamics, running_cost, h, args.seed))
    try:
        from pytorch_mppi import MPPI as PeerMPPI
    except ImportError:
        print(
            "pytorch-mppi is not importable: run this script with the python of a venv that "
            "has pytorch-mppi and this project (see the module docstring); measuring the "
            "others",
            file=sys.stderr,
        )
    else:
        peer = PeerMPPI(
            dynamics,
            running_cost,
            2,
            torch.tensor([[sigma**2]]),
            num_samples=k,
            horizon=h,
            lambda_=lam,
            u_min=torch.tensor([-2.0]),
            u_max=torch.tensor([2.0]),
        )
        tensors = torch.as_tensor(states)

        def peer_command(i: int) -> None:
            with torch.inference_mode():
                peer.command(tensors[i])

        out["pytorch_mppi"] = peer_command
    actions = torch.randn(k, h, 1, generator=torch.Generator().manual_seed(args.seed)) * sigma
    actions = actions.clamp(-2.0, 2.0)
    starts = torch.as_tensor(states)

    def floor(i: int) -> None:
        with torch.inference_mode():
            x = starts[i].expand(k, 2)
            cost = torch.zeros(k)
            for t in range(h):
                u = actions[:, t]
                x = dynamics(x, u)
                cost = cost + running_cost(x, u)

    out["floor"] = floor
    if args.compile:
        out["mppi_compiled"] = controller_command(mppi(compile=True))
    return out


def run(args: argparse.Namespace) -> dict:
    torch.set_num_threads(1)
    states = swing_states(args.states)
    commands = contenders(args, states)
    compile_s = None
    for name, command in commands.items():  # warm-up: caches, allocator, compilation
        start = time.perf_counter()
        for i in range(args.warmup):
            command(i % len(states))
        if name == "mppi_compiled":
            compile_s = time.perf_counter() - start
    cpu: dict[str, list[float]] = {name: [] for name in commands}
    wall: dict[str, list[float]] = {name: [] for name in commands}
    for _ in range(args.rounds):
        for name, command in commands.items():
            c0, w0 = time.process_time(), time.perf_counter()
            for i in range(args.commands):
                command(i % len(states))
            cpu[name].append((time.process_time() - c0) / args.commands * 1e3)
            wall[name].append((time.perf_counter() - w0) / args.commands * 1e3)

    def ratio(times: dict[str, list[float]], a: str, b: str) -> float:
        """Median over rounds of ``times[a] / times[b]`` (same round)."""
        return statistics.median(x / y for x, y in zip(times[a], times[b], strict=True))

    ms = {
        name: {
            "cpu_ms": statistics.median(cpu[name]),
            "wall_ms": statistics.median(wall[name]),
            "commands_per_s_cpu": 1e3 / statistics.median(cpu[name]),
            "commands_per_s_wall": 1e3 / statistics.median(wall[name]),
        }
        for name in commands
    }
    ratios: dict[str, dict[str, float]] = {}
    for name in commands:
        if name in ("floor", "pytorch_mppi"):
            continue
        entry = {
            "time_over_floor_cpu": ratio(cpu, name, "floor"),
            "time_over_floor_wall": ratio(wall, name, "floor"),
        }
        if "pytorch_mppi" in commands:
            # commands per second over pytorch-mppi's: its time over ours
            entry["speed_over_pytorch_mppi_cpu"] = ratio(cpu, "pytorch_mppi", name)
            entry["speed_over_pytorch_mppi_wall"] = ratio(wall, "pytorch_mppi", name)
        ratios[name] = entry
    if "pytorch_mppi" in commands:
        ratios["pytorch_mppi"] = {
            "time_over_floor_cpu": ratio(cpu, "pytorch_mppi", "floor"),
            "time_over_floor_wall": ratio(wall, "pytorch_mppi", "floor"),
        }
    return {
        "setting": {
            "system": "pendulum (mbrl.envs.systems, Pendulum-v1 physics)",
            "samples_K": args.samples,
            "horizon_H": args.horizon,
            "noise_std": args.sigma,
            "temperature_lambda": args.temperature,
            "rounds": args.rounds,
            "commands_per_round": args.commands,
            "threads": torch.get_num_threads(),
        },
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "torch": torch.__version__,
        "matmul_peak_gflops_fp32_1thread": matmul_peak_gflops(),
        "compile_s": compile_s,
        "per_command": ms,
        "ratios": ratios,
        "rounds_cpu_ms": cpu,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--commands", type=int, default=40, help="commands per round")
    parser.add_argument("--warmup", type=int, default=10, help="untimed commands per contender")
    parser.add_argument("--states", type=int, default=40)
    parser.add_argument("--samples", type=int, default=1000, help="K")
    parser.add_argument("--horizon", type=int, default=30, help="H")
    parser.add_argument("--sigma", type=float, default=1.0, help="noise std (action units)")
    parser.add_argument("--temperature", type=float, default=1.0, help="lambda")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--compile", action="store_true", help="add mppi with compile=True")
    result = run(parser.parse_args())
    print(json.dumps(result, indent=2))
    print("\nper command (median round)       cpu ms   wall ms   cmd/s (cpu)", file=sys.stderr)
    for name, m in result["per_command"].items():
        print(
            f"  {name:28s} {m['cpu_ms']:8.3f} {m['wall_ms']:9.3f} {m['commands_per_s_cpu']:10.0f}",
            file=sys.stderr,
        )
    for name, r in result["ratios"].items():
        cells = ", ".join(f"{k} {v:.2f}" for k, v in r.items())
        print(f"  {name}: {cells}", file=sys.stderr)


if __name__ == "__main__":
    main()
