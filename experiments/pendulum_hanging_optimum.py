"""The known-model ceiling of ``pendulum-hanging``: finite-horizon dynamic programming for
Pendulum-v1 from the hanging start.

``pendulum-hanging`` is Pendulum-v1 (its step, reward and 200-step limit) reset to
``[theta, theta_dot] = [pi, 0]``. This script computes how well any controller can do there
with the exact dynamics, the ceiling its ``solved_return`` is set from (experiments/RESULTS.md,
"GP-MPC from the hanging pendulum"):

1. Grid: ``--angles`` angles evenly over [-pi, pi) (periodic), ``--speeds`` speeds evenly over
   [-8, 8] rad/s (Pendulum-v1's speed clip), ``--torques`` torques evenly over [-2, 2] N m.
2. Model: Pendulum-v1's step, ``w' = clip(w + (3 g / (2 l) sin th + 3 u / (m l^2)) dt, -8, 8)``,
   ``th' = th + w' dt`` (g = 10, m = l = 1, dt = 0.05 s); reward
   :func:`mbrl.envs.tasks.pendulum_reward`, ``-(th^2 + 0.1 w^2 + 0.001 u^2)`` of the state
   before the step, th wrapped to [-pi, pi).
3. Backward recursion over the T = 200 steps: ``V_T = 0``, ``Q_t(s, u) = r(s, u) +
   V_{t+1}(f(s, u))`` with ``V_{t+1}`` interpolated bilinearly between grid points (angles
   wrapped, speeds clipped), ``V_t(s) = max_u Q_t(s, u)``. ``V_0(pi, 0)`` estimates the optimal
   return (up to the interpolation error, either sign).
4. Greedy play in the real env: from its reset, at step t the torque among ``--play-torques``
   evenly spaced ones in [-2, 2] that maximises ``r + V_{t+1}(f(s, u))`` (interpolated). Its
   return is achieved in the env, so it is a lower bound of the optimum; ``model_error`` is the
   largest difference between the model's next state and the env's along the way.

Measured on the shared 2-core machine, one torch thread (the recursion's seconds; the play
takes 0.1 s)::

    grid (angles x speeds, torques)                          V_0(pi, 0)   greedy   seconds
    720 x 481, 41 (--angles 720 --speeds 481 --torques 41)   -299.02      -298.43  458
    256 x 201, 21 (the default)                              -304.96      -303.63  25

The finer grid's -298.4 is the best return found with the exact dynamics; CEM on the exact
model reaches -310.6 at best (RESULTS.md). Run::

    OMP_NUM_THREADS=1 python experiments/pendulum_hanging_optimum.py
    OMP_NUM_THREADS=1 python experiments/pendulum_hanging_optimum.py --angles 720 --speeds 481 \\
        --torques 41

It prints one JSON object: the grid, ``dp_value_at_start``, ``greedy_return``,
``model_error`` and the seconds of the recursion and of the play.
"""

from __future__ import annotations

import argparse
import json
import math
import time

import numpy as np
import torch

from mbrl import envs
from mbrl.envs.tasks import PENDULUM_MAX_TORQUE, pendulum_reward

G, DT, MAX_SPEED, STEPS = 10.0, 0.05, 8.0, 200
"""Pendulum-v1's gravity, time step, speed clip and episode length (m = l = 1)."""


def step(th: torch.Tensor, w: torch.Tensor, u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Pendulum-v1's step of angle ``th``, speed ``w`` under torque ``u`` (broadcast shapes)."""
    w_next = (w + (1.5 * G * torch.sin(th) + 3.0 * u) * DT).clamp(-MAX_SPEED, MAX_SPEED)
    return th + w_next * DT, w_next


def reward(th: torch.Tensor, w: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """The env's reward of the state ``(th, w)`` before a step under ``u`` (broadcast shapes)."""
    th, w, u = torch.broadcast_tensors(th, w, u)
    obs = torch.stack([torch.cos(th), torch.sin(th), w], dim=-1)
    return pendulum_reward(obs, u.unsqueeze(-1), obs)


class Grid:
    """The angle-speed grid and bilinear interpolation of values ``V [NT, NW]`` on it."""

    def __init__(self, angles: int, speeds: int) -> None:
        self.nt, self.nw = angles, speeds
        self.dth, self.dw = 2 * math.pi / angles, 2 * MAX_SPEED / (speeds - 1)
        self.th = torch.arange(angles, dtype=torch.float64) * self.dth - math.pi  # [NT]
        self.w = torch.linspace(-MAX_SPEED, MAX_SPEED, speeds, dtype=torch.float64)  # [NW]

    def weights(self, th: torch.Tensor, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Flat indices ``[..., 4]`` into ``V.reshape(-1)`` and their weights ``[..., 4]`` of the
        points ``(th, w)`` (angles wrapped, speeds clipped to the grid)."""
        ti = torch.remainder(th + math.pi, 2 * math.pi) / self.dth
        t0 = ti.floor()
        ft = ti - t0
        t0 = t0.long() % self.nt
        t1 = (t0 + 1) % self.nt
        wi = ((w + MAX_SPEED) / self.dw).clamp(0, self.nw - 1)
        w0 = wi.floor().long().clamp(max=self.nw - 2)
        fw = wi - w0
        index = torch.stack([t0 * self.nw + w0, t1 * self.nw + w0, t0 * self.nw + w0 + 1,
                             t1 * self.nw + w0 + 1], dim=-1)  # fmt: skip
        weight = torch.stack([(1 - ft) * (1 - fw), ft * (1 - fw), (1 - ft) * fw, ft * fw], -1)
        return index, weight


def interpolate(values: torch.Tensor, index: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``V`` at the points of :meth:`Grid.weights`: ``[...]``."""
    return (values.reshape(-1)[index] * weight).sum(-1)


def solve(grid: Grid, torques: int) -> list[torch.Tensor]:
    """The values ``V_t [NT, NW]`` for t = 0 .. T of the backward recursion (``V_T = 0``)."""
    u = torch.linspace(-PENDULUM_MAX_TORQUE, PENDULUM_MAX_TORQUE, torques, dtype=torch.float64)
    th, w, u = torch.meshgrid(grid.th, grid.w, u, indexing="ij")  # [NT, NW, NA]
    r = reward(th, w, u)
    index, weight = grid.weights(*step(th, w, u))  # the same for every t
    values = [torch.zeros(grid.nt, grid.nw, dtype=torch.float64)]
    for _ in range(STEPS):
        q = r + interpolate(values[-1], index, weight)  # [NT, NW, NA]
        values.append(q.max(dim=-1).values)
    return values[::-1]


def play(grid: Grid, values: list[torch.Tensor], torques: int, seed: int) -> tuple[float, float]:
    """Greedy play of ``values`` in ``pendulum-hanging``: the env's return and the largest
    difference between the model's next state and the env's."""
    u = torch.linspace(-PENDULUM_MAX_TORQUE, PENDULUM_MAX_TORQUE, torques, dtype=torch.float64)
    env = envs.make("pendulum-hanging").make()
    env.reset(seed=seed)
    ret, error = 0.0, 0.0
    for t in range(STEPS):
        th, w = (torch.tensor(float(v), dtype=torch.float64) for v in env.unwrapped.state)
        q = reward(th, w, u) + interpolate(values[t + 1], *grid.weights(*step(th, w, u)))
        best = u[int(q.argmax())]
        predicted = torch.stack(step(th, w, best))
        _, r, terminated, truncated, _ = env.step(np.array([float(best)], dtype=np.float32))
        actual = torch.as_tensor(np.asarray(env.unwrapped.state, dtype=np.float64))
        error = max(error, float((predicted - actual).abs().max()))
        ret += float(r)
        if terminated or truncated:
            break
    env.close()
    return ret, error


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--angles", type=int, default=256, help="angle grid points (256)")
    parser.add_argument("--speeds", type=int, default=201, help="speed grid points (201)")
    parser.add_argument("--torques", type=int, default=21, help="torques of the recursion (21)")
    parser.add_argument(
        "--play-torques", type=int, default=401, help="torques of the greedy play (401)"
    )
    parser.add_argument("--seed", type=int, default=0, help="the env's reset seed")
    args = parser.parse_args()
    for name in ("angles", "speeds", "torques", "play_torques"):
        if getattr(args, name) < 2:
            flag = "--" + name.replace("_", "-")
            parser.error(f"{flag} must be >= 2, got {getattr(args, name)}")
    torch.set_num_threads(1)
    grid = Grid(args.angles, args.speeds)
    t0 = time.perf_counter()
    values = solve(grid, args.torques)
    solve_seconds = time.perf_counter() - t0
    hanging = (0, (args.speeds - 1) // 2) if args.speeds % 2 else None  # (-pi = pi, 0 rad/s)
    start = values[0][hanging] if hanging else interpolate(
        values[0], *grid.weights(torch.tensor(math.pi), torch.tensor(0.0))
    )  # fmt: skip
    t0 = time.perf_counter()
    ret, error = play(grid, values, args.play_torques, args.seed)
    out = {
        "env": "pendulum-hanging",
        "grid": {"angles": args.angles, "speeds": args.speeds, "torques": args.torques},
        "play_torques": args.play_torques,
        "horizon": STEPS,
        "dp_value_at_start": round(float(start), 2),
        "greedy_return": round(ret, 2),
        "model_error": error,
        "solve_seconds": round(solve_seconds, 1),
        "play_seconds": round(time.perf_counter() - t0, 1),
    }
    print(json.dumps(out))


if __name__ == "__main__":
    main()
