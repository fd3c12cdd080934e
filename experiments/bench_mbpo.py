"""MBPO env steps per hour with the Hopper settings, measured part by part. Prints JSON.

One MBPO env step costs an env step with a policy action, ``G`` SAC updates, and a share
``1 / train_every`` of a model fit plus ``rollout_batch_size`` branched rollouts of length k.
Each part is timed on its own (best of ``--repeats``), on real Hopper data collected with
random actions, and the parts are combined into env steps per hour for k = 1 (epochs < 20)
and k = 15 (epochs >= 100, every rollout alive for all 15 steps: a lower bound on speed).
The fit is timed on ``--real-steps`` transitions; MBPO refits on the whole buffer, so fits get
slower as the run goes on (reported per 1,000 rows and epoch). GFLOP/s are next to this
machine's measured fp32 matmul peak.

    python experiments/bench_mbpo.py [--config experiments/mbpo_hopper.yaml] [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import matmul_peak_gflops  # noqa: E402

from mbrl import envs  # noqa: E402
from mbrl.algorithms import mbpo  # noqa: E402
from mbrl.algorithms.factory import make_ensemble, make_learner  # noqa: E402
from mbrl.buffer import ReplayBuffer  # noqa: E402
from mbrl.config import load_config  # noqa: E402
from mbrl.imagination import branched_rollout  # noqa: E402
from mbrl.planners import PlanningProblem  # noqa: E402


def _best(fn, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def _mlp_flops(sizes: list[int]) -> int:
    """Forward multiply-adds x 2 of an MLP with these layer sizes, per row."""
    return 2 * sum(a * b for a, b in zip(sizes[:-1], sizes[1:], strict=True))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default=str(Path(__file__).parent / "mbpo_hopper.yaml"))
    p.add_argument("--real-steps", type=int, default=2000, help="random transitions to fit on")
    p.add_argument("--rollout-batch", type=int, default=None, help="default: the config's")
    p.add_argument("--updates", type=int, default=20, help="timed SAC updates")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--device", default="cpu")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    cfg = load_config(mbpo.Config, args.config, [])
    dev = torch.device(args.device)
    spec = envs.make(cfg.env)
    env = spec.make()
    rng = np.random.default_rng(0)
    gen = torch.Generator(dev).manual_seed(0)

    # real data with random actions
    buffer = ReplayBuffer(spec.obs_dim, spec.act_dim, args.real_steps, dev)
    obs, _ = env.reset(seed=0)
    start = time.perf_counter()
    for _ in range(args.real_steps):
        act = rng.uniform(spec.action_low, spec.action_high).astype(np.float32)
        nxt, r, term, trunc, _ = env.step(act)
        buffer.add(obs, act, r, nxt, term)
        obs = nxt if not (term or trunc) else env.reset()[0]
    env_step_s = (time.perf_counter() - start) / args.real_steps

    hidden = spec.position_obs if cfg.ignore_positions else ()
    learner = make_learner(cfg.learner, spec, dev, 0, hidden)
    x = torch.as_tensor(obs, dtype=torch.float32, device=dev)
    act_s = _best(lambda: [learner.act(x, generator=gen) for _ in range(100)], args.repeats) / 100

    batches = [buffer.sample(cfg.learner.batch_size, gen) for _ in range(args.updates)]
    learner.update(batches[0])  # warm-up
    update_s = _best(lambda: [learner.update(b) for b in batches], args.repeats) / args.updates

    model = make_ensemble(cfg.model, spec, dev, 0, hidden)
    data = buffer.all()
    start = time.perf_counter()
    report = model.fit(data)
    fit_s = time.perf_counter() - start
    fit_s_per_krow_epoch = fit_s / max(report.epochs, 1) / (len(data) / 1000)

    n = args.rollout_batch or cfg.branch.rollout_batch_size
    starts = buffer.sample(n, gen).obs

    low, high = spec.action_bounds(dev)
    all_alive = lambda o: torch.zeros(o.shape[0], dtype=torch.bool, device=o.device)  # noqa: E731
    problem = PlanningProblem(model, spec.reward_fn, all_alive, 2, low, high, 1, gen)

    def rollout(k: int):
        return branched_rollout(problem, lambda o: learner.act(o, generator=gen), starts, k)

    rollout_step_s = (
        _best(lambda: rollout(2), args.repeats) / 2 * (cfg.branch.rollout_batch_size / n)
    )

    g, every = cfg.updates_per_step, cfg.model.train_every

    def steps_per_hour(k: int) -> float:
        per_step = env_step_s + act_s + g * update_s + (fit_s + k * rollout_step_s) / every
        return 3600.0 / per_step

    # FLOPs: SAC update ~ 3x forward (fwd + bwd) of actor and 2 critics on the batch, plus the
    # target critics and an extra actor/critic pass for the actor loss
    h, layers = cfg.learner.hidden_size, cfg.learner.num_layers
    xd, ud = spec.obs_dim, spec.act_dim
    actor = _mlp_flops([xd] + [h] * layers + [2 * ud])
    critic = _mlp_flops([xd + ud] + [h] * layers + [1])
    bs = cfg.learner.batch_size
    update_flops = bs * (3 * (2 * critic) + 2 * critic + actor + 3 * (actor + 2 * critic))
    mh, ml = cfg.model.hidden_size, cfg.model.num_layers
    member = _mlp_flops([xd + ud] + [mh] * ml + [2 * (xd + 1)])
    rollout_flops = cfg.branch.rollout_batch_size * (member + actor)
    peak = matmul_peak_gflops()
    print(
        json.dumps(
            {
                "bench": "mbpo_hopper_parts",
                "config": args.config,
                "device": str(dev),
                "threads": args.threads,
                "cpu": platform.processor() or platform.machine(),
                "matmul_peak_gflops": round(peak, 1),
                "env_step_ms": round(env_step_s * 1e3, 3),
                "policy_act_ms": round(act_s * 1e3, 3),
                "sac_update_ms": round(update_s * 1e3, 2),
                "sac_update_gflops": round(update_flops / update_s / 1e9, 2),
                "updates_per_step": g,
                "fit_rows": len(data),
                "fit_epochs": report.epochs,
                "fit_s": round(fit_s, 2),
                "fit_s_per_1k_rows_epoch": round(fit_s_per_krow_epoch, 3),
                "rollout_batch": cfg.branch.rollout_batch_size,
                "rollout_batch_timed": n,
                "rollout_step_s": round(rollout_step_s, 3),
                "rollout_gflops": round(rollout_flops / rollout_step_s / 1e9, 2),
                "env_steps_per_hour_k1": round(steps_per_hour(1)),
                "env_steps_per_hour_k15": round(steps_per_hour(15)),
                "share_of_step_in_sac_updates_k1": round(
                    g * update_s / (3600.0 / steps_per_hour(1)), 3
                ),
            }
        )
    )


if __name__ == "__main__":
    main()
