"""CEM planning speed on the probabilistic ensemble, against this machine's matmul peak.

Prints one JSON object: for each thread count, setting and dtype, seconds per planned action
(CPU and wall), the MLP's achieved GFLOP/s and the fraction of the matmul peak. Settings
(mbrl-lib's, for a side-by-side run):

* ``cartpole``: PETS on continuous cartpole as in mbrl-lib's notebook: ensemble 5 of 3 x 200,
  TS-inf, 20 particles, horizon 15, CEM population 500, 10% elites, 5 iterations.
* ``halfcheetah``: PETS's HalfCheetah: ensemble 5 of 4 x 200, X=18, U=6, 20 particles,
  horizon 30, population 500, 5 iterations.

Each plan is cold (no warm start) and starts the model once
(:meth:`~mbrl.planners.base.PlanningProblem.start`), then scores every CEM population from that
start.

The peak is measured in the same process, in the same dtype and with the same threads, as a
burst of square ``1024`` matmuls right before and right after every timed plan (rounds
interleave the dtypes too: peak, plan, peak for float32, then for bfloat16, and again), so a
machine that is loaded by others slows both alike. The fraction of peak of a plan is its
achieved GFLOP/s over the mean of its two bursts', computed twice: from CPU time
(``time.process_time``, all threads of this process) and from wall time; the JSON has the
median over rounds of each, and the plan's median CPU and wall seconds. The bfloat16 speedup is
the ratio of the median plan CPU seconds of the two dtypes in the same run. ``--profile`` also
prints where one plan's time goes (``torch.profiler``: matmuls, activation, noise, the rest);
``--kernels`` times one hidden layer alone at the plan's shape: its ``bmm`` against the same-run
peak and the SiLU on its output, and the fraction of peak a plan made of nothing else would reach.

    python experiments/bench_planning.py [--threads 1 2] [--dtypes float32 auto] [--rounds 5]
        [--settings cartpole halfcheetah] [--profile] [--kernels] [--device cuda]

``--dtypes auto`` is the dtype :func:`~mbrl.dynamics.ensemble.auto_planning_dtype` picks here
(bfloat16 on CPUs with AVX512-BF16 or AMX and on GPUs, else float32); the choice and its
reason are printed once at the start and stored in the JSON.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable

import torch

from mbrl.dynamics import ProbabilisticEnsemble, RolloutState, Transitions
from mbrl.dynamics.ensemble import auto_planning_dtype
from mbrl.envs import never_terminates
from mbrl.envs.spec import RewardFn
from mbrl.planners import CEM, PlanningProblem

SETTINGS = {
    "cartpole": dict(obs_dim=4, act_dim=1, layers=3, hidden=200, horizon=15, population=500),
    "halfcheetah": dict(obs_dim=18, act_dim=6, layers=4, hidden=200, horizon=30, population=500),
}
ENSEMBLE, PARTICLES, ITERATIONS = 5, 20, 5
PEAK_SIZE = 1024


def mlp_flops_per_row(obs_dim: int, act_dim: int, layers: int, hidden: int) -> int:
    """Multiply-adds x 2 of one member's forward pass for one row (mean and log-variance)."""
    dims = [obs_dim + act_dim] + [hidden] * layers + [2 * obs_dim]
    return 2 * sum(a * b for a, b in zip(dims[:-1], dims[1:], strict=False))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn: Callable[[], object], device: torch.device) -> tuple[float, float]:
    """CPU and wall seconds of ``fn()``."""
    _sync(device)
    cpu, wall = time.process_time(), time.perf_counter()
    fn()
    _sync(device)
    return time.process_time() - cpu, time.perf_counter() - wall


class Peak:
    """Bursts of square matmuls in one dtype: the machine's peak, measured between plans."""

    def __init__(self, dtype: torch.dtype, device: torch.device, seconds: float) -> None:
        g = torch.Generator().manual_seed(0)
        n = PEAK_SIZE
        self.a = torch.randn(n, n, generator=g).to(device, dtype)
        self.b = torch.randn(n, n, generator=g).to(device, dtype)
        self.out = torch.empty(n, n, device=device, dtype=dtype)
        self.device = device
        self.reps = 1
        for _ in range(3):  # warm up, then size a burst to about ``seconds`` of CPU time
            cpu, wall = _timed(self._burst, device)  # (of wall time on a GPU)
            spent = wall if device.type == "cuda" else cpu
            self.reps = max(1, min(1000, round(self.reps * seconds / max(spent, 1e-6))))

    def _burst(self) -> None:
        for _ in range(self.reps):
            torch.matmul(self.a, self.b, out=self.out)

    def measure(self) -> tuple[float, float]:
        """GFLOP/s of one burst from its CPU time and from its wall time."""
        cpu, wall = _timed(self._burst, self.device)
        flops = 2 * PEAK_SIZE**3 * self.reps
        return flops / max(cpu, 1e-9) / 1e9, flops / wall / 1e9


def _reward(obs: torch.Tensor, act: torch.Tensor, next_obs: torch.Tensor) -> torch.Tensor:
    """Stay at the origin: ``-|next_obs|^2``, ``[R]``."""
    return -(next_obs**2).sum(-1)


def build(
    name: str, dtype: torch.dtype, device: torch.device, reward: RewardFn = _reward
) -> tuple[CEM, PlanningProblem]:
    """CEM and its planning problem on an ensemble fitted briefly on random data."""
    s = SETTINGS[name]
    x, u = s["obs_dim"], s["act_dim"]
    model = ProbabilisticEnsemble(
        x,
        u,
        ensemble_size=ENSEMBLE,
        hidden_size=s["hidden"],
        num_layers=s["layers"],
        planning_dtype=dtype,
        max_epochs=1,
        device=device,
        seed=0,
    )
    g = torch.Generator().manual_seed(0)
    n = 512
    obs, act = torch.randn(n, x, generator=g), torch.rand(n, u, generator=g) * 2 - 1
    model.fit(
        Transitions(
            obs,
            act,
            obs + 0.1 * torch.randn(n, x, generator=g),
            torch.zeros(n),
            torch.zeros(n, dtype=torch.bool),
        )
    )
    problem = PlanningProblem(
        model,
        reward,
        never_terminates,
        s["horizon"],
        -torch.ones(u, device=device),
        torch.ones(u, device=device),
        PARTICLES,
        torch.Generator(device=device).manual_seed(1),
    )
    return CEM(population=s["population"], elite_fraction=0.1, iterations=ITERATIONS), problem


def plan_flops(name: str) -> int:
    s = SETTINGS[name]
    rows = s["population"] * PARTICLES
    per_row = mlp_flops_per_row(s["obs_dim"], s["act_dim"], s["layers"], s["hidden"])
    return per_row * rows * s["horizon"] * ITERATIONS


def bench(
    name: str, dtypes: dict[str, torch.dtype], rounds: int, device: torch.device, burst: float
) -> dict:
    """Interleaved rounds over ``dtypes``: peak burst, one cold plan, peak burst."""
    x0 = torch.zeros(SETTINGS[name]["obs_dim"], device=device)
    cases = {d: build(name, dt, device) for d, dt in dtypes.items()}
    peaks = {d: Peak(dt, device, burst) for d, dt in dtypes.items()}
    for cem, problem in cases.values():
        cem.plan(problem, x0, None)  # warm-up: workspaces, planning weights
    flops = plan_flops(name)
    rec: dict[str, dict[str, list[float]]] = {
        d: {k: [] for k in ("cpu", "wall", "frac_cpu", "frac_wall", "peak_cpu", "peak_wall")}
        for d in dtypes
    }
    for _ in range(rounds):
        for d, (cem, problem) in cases.items():
            before = peaks[d].measure()
            cpu, wall = _timed(lambda cem=cem, problem=problem: cem.plan(problem, x0, None), device)
            after = peaks[d].measure()
            peak_cpu, peak_wall = (before[0] + after[0]) / 2, (before[1] + after[1]) / 2
            r = rec[d]
            r["cpu"].append(cpu)
            r["wall"].append(wall)
            r["peak_cpu"].append(peak_cpu)
            r["peak_wall"].append(peak_wall)
            r["frac_cpu"].append(flops / max(cpu, 1e-9) / 1e9 / peak_cpu)
            r["frac_wall"].append(flops / wall / 1e9 / peak_wall)
    out: dict = {}
    for d, r in rec.items():
        med = {k: statistics.median(v) for k, v in r.items()}
        out[d] = {
            "cpu_seconds_per_action": med["cpu"],
            "wall_seconds_per_action": med["wall"],
            "gflops_cpu": flops / med["cpu"] / 1e9,
            "gflops_wall": flops / med["wall"] / 1e9,
            "peak_gflops_cpu": med["peak_cpu"],
            "peak_gflops_wall": med["peak_wall"],
            "fraction_of_peak_cpu": med["frac_cpu"],
            "fraction_of_peak_wall": med["frac_wall"],
            "fraction_of_peak_cpu_rounds": [round(f, 4) for f in r["frac_cpu"]],
            "gflop_per_action": flops / 1e9,
        }
    if "float32" in out and "bfloat16" in out:
        out["bfloat16_speedup_cpu"] = (
            out["float32"]["cpu_seconds_per_action"] / out["bfloat16"]["cpu_seconds_per_action"]
        )
        out["bfloat16_speedup_wall"] = (
            out["float32"]["wall_seconds_per_action"] / out["bfloat16"]["wall_seconds_per_action"]
        )
    return out


# profiler op names -> where the time of a plan goes
_CATEGORIES = {
    "matmul": ("aten::bmm", "aten::mm", "aten::addmm", "aten::baddbmm", "aten::matmul"),
    "activation": ("aten::silu_", "aten::silu", "aten::relu_", "aten::tanh_", "aten::elu_"),
    "noise": ("aten::normal_", "aten::randn", "aten::randperm", "aten::uniform_"),
    "elite selection": ("aten::topk", "aten::sort", "aten::argmax", "aten::index"),
}


def profile(name: str, dtype: torch.dtype, device: torch.device) -> dict:
    """Where one cold plan's time goes (``torch.profiler``, CPU time of the operators).

    ``scopes``: the model steps (the network, its sampling noise and the TS bookkeeping), the
    reward function, and the rest (the planner: candidate sampling, elite selection and the
    planning problem's bookkeeping), each a share of the plan. ``shares``: the operators'
    self time grouped into :data:`_CATEGORIES`. ``top_ops``: the 15 largest operators.
    """
    from torch.profiler import ProfilerActivity, record_function
    from torch.profiler import profile as torch_profile

    def scoped_reward(obs: torch.Tensor, act: torch.Tensor, nxt: torch.Tensor) -> torch.Tensor:
        with record_function("reward"):
            return _reward(obs, act, nxt)

    cem, problem = build(name, dtype, device, scoped_reward)
    step = problem.model.rollout_step

    def scoped_step(
        state: RolloutState, act: torch.Tensor, generator: torch.Generator | None = None
    ) -> RolloutState:
        with record_function("model step"):
            return step(state, act, generator)

    problem.model.rollout_step = scoped_step
    x0 = torch.zeros(SETTINGS[name]["obs_dim"], device=device)
    cem.plan(problem, x0, None)
    with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
        cem.plan(problem, x0, None)
    events = prof.key_averages()
    ops = {e.key: e.self_cpu_time_total for e in events}
    inclusive = {e.key: e.cpu_time_total for e in events}
    total = sum(ops.values())
    model, reward = inclusive.get("model step", 0.0), inclusive.get("reward", 0.0)
    shares = {c: 0.0 for c in (*_CATEGORIES, "rest")}
    for op, t in ops.items():
        cat = next((c for c, names in _CATEGORIES.items() if op in names), "rest")
        shares[cat] += t / total
    top = sorted(ops.items(), key=lambda kv: -kv[1])[:15]
    return {
        "self_cpu_seconds": total / 1e6,
        "scopes": {
            "model step": round(model / total, 4),
            "reward": round(reward / total, 4),
            "planner and problem": round((total - model - reward) / total, 4),
        },
        "shares": {k: round(v, 4) for k, v in shares.items()},
        "top_ops": {k: round(v / total, 4) for k, v in top},
    }


def kernels(name: str, dtype: torch.dtype, device: torch.device, rounds: int, burst: float) -> dict:
    """One hidden layer of a plan at its real shape: the ``bmm`` ``[E, H, H + 1] x [E, H + 1, M]``
    (``M`` rows per member) against the same-run peak, and the in-place SiLU on its output, in
    CPU seconds per call (medians over interleaved rounds: peak, bmm, SiLU, peak)."""
    s = SETTINGS[name]
    h, m = s["hidden"], s["population"] * PARTICLES // ENSEMBLE
    g = torch.Generator().manual_seed(0)
    w = torch.randn(ENSEMBLE, h, h + 1, generator=g).to(device, dtype)
    a = torch.randn(ENSEMBLE, h + 1, m, generator=g).to(device, dtype)
    out = torch.empty(ENSEMBLE, h, m, device=device, dtype=dtype)
    peak = Peak(dtype, device, burst)
    reps = 20
    flops = 2 * ENSEMBLE * h * (h + 1) * m

    def layer() -> None:
        for _ in range(reps):
            torch.bmm(w, a, out=out)

    def silu() -> None:
        for _ in range(reps):
            torch.nn.functional.silu(out, inplace=True)

    peaks, mm, act = [], [], []
    for _ in range(rounds):
        peaks.append(peak.measure()[0])
        mm.append(_timed(layer, device)[0] / reps)
        act.append(_timed(silu, device)[0] / reps)
        peaks.append(peak.measure()[0])
    p, t_mm, t_act = statistics.median(peaks), statistics.median(mm), statistics.median(act)
    return {
        "layer_shape": f"[{ENSEMBLE}, {h}, {h + 1}] x [{ENSEMBLE}, {h + 1}, {m}]",
        "bmm_fraction_of_peak_cpu": round(flops / t_mm / 1e9 / p, 4),
        "silu_ns_per_element_cpu": round(t_act / out.numel() * 1e9, 4),
        "silu_over_bmm": round(t_act / t_mm, 4),
        "bound_bmm_and_silu_only": round(flops / (t_mm + t_act) / 1e9 / p, 4),
        "peak_gflops_cpu": round(p, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds per setting")
    parser.add_argument("--threads", type=int, nargs="+", default=[torch.get_num_threads()])
    parser.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    parser.add_argument(
        "--dtypes", nargs="+", default=["float32", "auto"], choices=["float32", "bfloat16", "auto"]
    )
    parser.add_argument("--burst", type=float, default=0.5, help="CPU seconds of each peak burst")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--profile", action="store_true", help="also profile one plan per dtype")
    parser.add_argument(
        "--kernels", action="store_true", help="also time one hidden layer's bmm and SiLU alone"
    )
    args = parser.parse_args()
    device = torch.device(args.device)
    auto, why = auto_planning_dtype(device)
    auto_name = str(auto).removeprefix("torch.")
    print(f"planning dtype auto: {auto_name} ({why})", file=sys.stderr, flush=True)
    names = dict.fromkeys(auto_name if d == "auto" else d for d in args.dtypes)
    dtypes = {d: getattr(torch, d) for d in names}
    result: dict = {
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "device": str(device),
        "auto_dtype": {"dtype": auto_name, "reason": why},
        "rounds": args.rounds,
        "peak": f"square {PEAK_SIZE} matmul bursts of {args.burst} CPU s around every plan",
        "threads": {},
    }
    for threads in args.threads:
        torch.set_num_threads(threads)
        by_setting: dict = {}
        for name in args.settings:
            r = bench(name, dtypes, args.rounds, device, args.burst)
            by_setting[name] = r
            for d in dtypes:
                v = r[d]
                print(
                    f"{threads} thread(s) {name} {d}: {v['cpu_seconds_per_action']:.3f} s CPU "
                    f"({v['wall_seconds_per_action']:.3f} s wall) per action, "
                    f"{v['gflops_cpu']:.1f} GFLOP/s per CPU second, "
                    f"{100 * v['fraction_of_peak_cpu']:.1f}% of peak by CPU time, "
                    f"{100 * v['fraction_of_peak_wall']:.1f}% by wall time "
                    f"(peak {v['peak_gflops_cpu']:.1f} GFLOP/s per CPU second)",
                    file=sys.stderr,
                    flush=True,
                )
            if args.profile:
                r["profile"] = {d: profile(name, dt, device) for d, dt in dtypes.items()}
            if args.kernels:
                r["kernels"] = {
                    d: kernels(name, dt, device, args.rounds, args.burst)
                    for d, dt in dtypes.items()
                }
        result["threads"][str(threads)] = by_setting
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
