"""MBPO throughput at the Hopper settings, this project against mbrl-lib, part by part. Prints
JSON.

One MBPO env step costs an env step with a policy action, ``G`` SAC updates, and a share
``1 / train_every`` of a model fit plus ``rollout_batch_size`` branched rollouts of length k.
Both sides run the same loop pieces, each in its own long-lived worker process with one thread
(``OMP_NUM_THREADS=1``, ``torch.set_num_threads(1)``), on gymnasium's ``Hopper-v5``:

* **ours** (this interpreter): the loop of :func:`mbrl.algorithms.dyna.train_branching` through
  :class:`~mbrl.algorithms.dyna.DynaRun`, with ``experiments/mbpo_hopper.yaml`` (7 members,
  5 elites, 4 x 200 units; SAC 256 x 2, batch 256, G = 20; 100,000 rollouts per fit, a fit
  every 250 steps, 5% real data): ``act_in_env`` (policy action, env step, buffer add),
  ``mixed_batch`` + ``SAC.update`` + the divergence check per update, ``branched_rollout``
  into the model buffer, and ``fit`` on the whole real buffer.
* **mbrl-lib** (PyPI ``mbrl`` 0.2.0 under ``--peer-python``): the pieces of its
  ``mbrl.algorithms.mbpo.train``, driven through its Python API by this file (``--worker
  peer``): ``step_env_and_add_to_buffer``, ``SAC.update_parameters`` of its
  ``third_party.pytorch_sac_pranz24`` on its SAC buffer (its ``real_data_ratio`` 0; no
  logger), ``rollout_model_and_populate_sac_buffer`` through its ``ModelEnv`` (its hopper
  ``termination_fns.hopper``), and ``train_model_and_save_model_and_data`` (no work dir) with
  its ``ModelTrainer``. Settings: its ``mbpo_hopper.yaml`` override and ``mbpo.yaml``
  algorithm config at tag v0.2.0 (``GaussianMLP`` with SiLU, learned rewards, deltas,
  float64 normalizer, lr 1e-3, weight decay 1e-5, validation ratio 0.2, SAC lr 3e-4, gamma
  0.99, tau 5e-3, target update every 4 updates, fixed alpha 0.2, sampled rollout actions),
  with the sizes that set the work matched to ours: ensemble 7 / 5 elites of 4 x 200, SAC
  hidden 256 (its file: 512), G = 20 (its file: 40), SAC batch 256, 100,000 rollouts per fit
  (its 400 per step x 250), a fit every 250 steps.

Both fill their buffers with ``--real-rows`` uniform random steps and fit once; their model
buffers get one rollout batch. Then ``--rounds`` interleaved rounds (ours, peer; the order
alternates), each timing on both sides: ``--env-steps`` env steps, ``--updates`` SAC updates,
one rollout of k = 1 from ``rollout_batch_size`` starts, and one fit of exactly
``--fit-epochs`` epochs (early stopping off on both sides) on the real buffer. Per part it
records CPU time (``time.process_time``) and wall time; a part's figure is the median over
rounds. The combined time of an env step is ``env_step + G update + (fit + k rollout) /
train_every`` for k = 1 (epochs < 20) and k = 15 (every rollout alive for all 15 steps, an
upper bound on the rollout share); the shares of SAC updates, model rollouts and model training
are of that time. Ratios are of the medians, CPU time beside wall time (the machine may be
shared: CPU time is the steadier). The fp32 matmul peak is measured in every round by our worker
in CPU time (1024 x 1024 products) and by the parent between rounds in wall time
(``machine.matmul_peak_gflops``); the SAC update's matmul GFLOP/s (:func:`sac_update_flops` over
its CPU time) are given against the CPU-time peak.

mbrl-lib's environment (the notes on peers), plus gymnasium 1.x for ``Hopper-v5`` (its wheel
pins gymnasium 0.26.3, whose Hopper XML MuJoCo 2.3.7 no longer loads)::

    python3 -m venv /work/peers/mbrl-lib-mbpo && cd /work/peers/mbrl-lib-mbpo
    ./bin/pip install "pip<24.1"
    ./bin/pip install torch==2.13.0 mbrl==0.2.0 "numpy<2"
    ./bin/pip install torch==2.13.0 "numpy<2" mujoco==2.3.7
    sed -i -E 's/^(\\s+\\w+: (\\w+)) = \\2\\(\\)$/\\1 = field(default_factory=\\2)/' \\
        lib/python3.11/site-packages/hydra/conf/__init__.py
    ./bin/pip install gymnasium==1.4.0 "numpy<2"

    python experiments/bench_mbpo.py [--rounds 3] [--sides ours peer]
        [--peer-python /work/peers/mbrl-lib-mbpo/bin/python] [--config experiments/mbpo_hopper.yaml]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

HERE = Path(__file__).resolve().parent
PEER_PYTHON = "/work/peers/mbrl-lib-mbpo/bin/python"
PARTS = ("env_step", "update", "rollout", "fit")
LONG_K = 15  # the Hopper schedule's longest rollout


def _timed(fn: Callable[[], object]) -> tuple[float, float]:
    """CPU and wall seconds of ``fn()``."""
    cpu, wall = time.process_time(), time.perf_counter()
    fn()
    return time.process_time() - cpu, time.perf_counter() - wall


def cpu_peak_gflops(size: int = 1024, repeats: int = 5) -> float:
    """This thread's fp32 matmul rate in CPU time (best of ``repeats`` pairs of ``size``
    matmuls): the yardstick on a machine whose wall clock other processes share."""
    import torch

    a, b = torch.randn(size, size), torch.randn(size, size)
    out = torch.empty(size, size)
    torch.matmul(a, b, out=out)
    best = float("inf")
    for _ in range(repeats):
        start = time.process_time()
        torch.matmul(a, b, out=out)
        torch.matmul(a, b, out=out)
        best = min(best, time.process_time() - start)
    return 2 * 2 * size**3 / best / 1e9


def _serve(setup: dict, round_fn: Callable[[], dict[str, tuple[float, float]]]) -> None:
    """A worker's loop: print ``setup`` as one JSON line, then one line of part timings per
    ``round`` read from stdin, until ``quit``."""
    print(json.dumps(setup), flush=True)
    for line in sys.stdin:
        if line.strip() == "quit":
            return
        print(json.dumps(round_fn()), flush=True)


# ----------------------------------------------------------------------------- ours


def _mlp_macs(sizes: list[int]) -> tuple[int, int]:
    """Multiply-adds per row of an MLP with these layer sizes: all layers and the first."""
    pairs = list(zip(sizes[:-1], sizes[1:], strict=True))
    return sum(a * b for a, b in pairs), pairs[0][0] * pairs[0][1]


def sac_update_flops(obs_in: int, act_dim: int, hidden: int, layers: int, batch: int) -> int:
    """Matmul FLOPs of one SAC update: the target (actor and both target critics forward), the
    critic step (forward, backward without the input gradient of the first layer) and the actor
    step (actor and critics forward, the critics' input gradient, the actor's backward without
    its first layer's input gradient)."""
    a, a1 = _mlp_macs([obs_in] + [hidden] * layers + [2 * act_dim])
    c, c1 = (2 * m for m in _mlp_macs([obs_in + act_dim] + [hidden] * layers + [1]))
    macs = (a + c) + (c + c + c - c1) + (a + c) + (c + a + a - a1)
    return 2 * batch * macs


def ours_worker(args: argparse.Namespace) -> None:
    """This project's MBPO pieces (:func:`~mbrl.algorithms.dyna.train_branching`'s loop) on a
    :class:`~mbrl.algorithms.dyna.DynaRun` in a temporary run folder, served per round."""
    import torch

    from mbrl.algorithms import mbpo
    from mbrl.algorithms.dyna import DynaRun
    from mbrl.algorithms.factory import make_ensemble
    from mbrl.config import load_config
    from mbrl.imagination import ModelBuffer, branched_rollout, mixed_batch, model_buffer_capacity
    from mbrl.runs import Run

    torch.set_num_threads(1)
    overrides = [
        f"start_steps={args.real_rows}",
        f"total_steps={10 * args.real_rows + 10**6}",
        f"model.max_epochs={args.fit_epochs}",
        f"model.patience={args.fit_epochs}",
    ]
    cfg = load_config(mbpo.Config, args.config, overrides)
    b = cfg.branch
    folder = tempfile.TemporaryDirectory(prefix="bench-mbpo-")
    run = Run(Path(folder.name) / "run", cfg, {"algorithm": "mbpo"}, tensorboard=False)
    d = DynaRun(cfg, run, args.device)
    model = make_ensemble(cfg.model, d.spec, d.device, cfg.seed + 1, d.hidden)
    model_buffer = ModelBuffer(d.spec.obs_dim, d.spec.act_dim, 1, d.device)
    problem = d.problem(model, b.max_length)
    policy = d.imagined_actions(b.policy)

    def rollout() -> None:
        size = model_buffer_capacity(
            b.rollout_batch_size, 1, cfg.epoch_length, cfg.rollout_every, b.retain_epochs
        )
        model_buffer.resize(size)
        starts = d.buffer.sample(b.rollout_batch_size, d.gen).obs  # [B, X]
        model_buffer.add(branched_rollout(problem, policy, starts, 1).transitions)

    def updates() -> None:
        for _ in range(args.updates):
            batch = mixed_batch(d.buffer, model_buffer, cfg.learner.batch_size, b.real_ratio, d.gen)
            d.record(d.learner.update(batch))

    def env_steps() -> None:
        for _ in range(args.env_steps):
            d.act_in_env()

    sac = cfg.learner
    obs_in = d.spec.obs_dim - len(d.hidden)
    flops = sac_update_flops(
        obs_in, d.spec.act_dim, sac.hidden_size, sac.num_layers, sac.batch_size
    )
    with d.running():
        start = time.perf_counter()
        for _ in range(args.real_rows):
            d.act_in_env()  # uniform random actions up to start_steps
        d.fit(model)
        rollout()
        updates()  # warm-up
        setup = {
            "side": "ours",
            "setup_s": time.perf_counter() - start,
            "settings": {
                "env": cfg.env,
                "ensemble": cfg.model.ensemble_size,
                "elites": cfg.model.num_elites,
                "model_hidden": [cfg.model.hidden_size] * cfg.model.num_layers,
                "sac_hidden": [sac.hidden_size] * sac.num_layers,
                "sac_batch": sac.batch_size,
                "updates_per_step": cfg.updates_per_step,
                "rollout_batch": b.rollout_batch_size,
                "train_every": cfg.model.train_every,
                "epoch_length": cfg.epoch_length,
                "real_ratio": b.real_ratio,
                "learn_alpha": sac.learn_alpha,
                "target_update_every": 1,
            },
            "sac_update_flops": flops,
        }

        def one_round() -> dict[str, tuple[float, float]]:
            return {
                "env_step": _timed(env_steps),
                "update": _timed(updates),
                "rollout": _timed(rollout),
                "fit": _timed(lambda: d.fit(model)),
                "fit_rows": len(d.buffer),
                "peak_gflops_cpu": cpu_peak_gflops(),
            }

        _serve(setup, one_round)
    run.close()
    folder.cleanup()


# ----------------------------------------------------------------------------- mbrl-lib


def peer_worker(args: argparse.Namespace, settings: dict) -> None:
    """mbrl-lib's MBPO pieces with ``settings`` (the sizes of our worker's setup), served per
    round; runs under mbrl-lib's interpreter, where ``mbrl`` is mbrl-lib 0.2.0."""
    import types

    import gymnasium as gym
    import numpy as np
    import omegaconf
    import torch

    import mbrl.env.termination_fns as termination_fns
    import mbrl.models as models
    import mbrl.planning as planning
    import mbrl.third_party.pytorch_sac_pranz24 as pranz24
    import mbrl.util as util
    import mbrl.util.common as common
    from mbrl.algorithms.mbpo import rollout_model_and_populate_sac_buffer
    from mbrl.planning.sac_wrapper import SACAgent

    torch.set_num_threads(1)
    s = settings
    env = gym.make("Hopper-v5")
    env.reset(seed=0)
    env.action_space.seed(0)
    obs_shape, act_shape = env.observation_space.shape, env.action_space.shape
    rng = np.random.default_rng(0)
    generator = torch.Generator().manual_seed(0)
    cfg = omegaconf.OmegaConf.create(
        {
            "dynamics_model": {
                "_target_": "mbrl.models.GaussianMLP",
                "device": "cpu",
                "num_layers": len(s["model_hidden"]),
                "ensemble_size": s["ensemble"],
                "hid_size": s["model_hidden"][0],
                "deterministic": False,
                "propagation_method": "random_model",
                "learn_logvar_bounds": False,
                "activation_fn_cfg": {"_target_": "torch.nn.SiLU"},
            },
            "algorithm": {
                "learned_rewards": True,
                "target_is_delta": True,
                "normalize": True,
                "normalize_double_precision": True,
            },
            "overrides": {
                "num_steps": 125_000,
                "num_elites": s["elites"],
                "model_batch_size": 256,
                "validation_ratio": 0.2,
                "num_epochs_train_model": args.fit_epochs,
                "patience": args.fit_epochs + 1,  # never stops early
            },
        }
    )
    dynamics_model = common.create_one_dim_tr_model(cfg, obs_shape, act_shape)
    replay_buffer = common.create_replay_buffer(
        cfg, obs_shape, act_shape, rng=rng, obs_type=np.double, action_type=np.double,
        reward_type=np.double,
    )  # fmt: skip
    trainer = models.ModelTrainer(dynamics_model, optim_lr=1e-3, weight_decay=1e-5)
    model_env = models.ModelEnv(
        env, dynamics_model, termination_fns.hopper, None, generator=generator
    )
    sac_args = types.SimpleNamespace(
        gamma=0.99, tau=0.005, alpha=0.2, policy="Gaussian", target_update_interval=4,
        automatic_entropy_tuning=False, target_entropy=1, hidden_size=s["sac_hidden"][0],
        device="cpu", lr=3e-4,
    )  # fmt: skip
    agent = SACAgent(pranz24.SAC(obs_shape[0], env.action_space, sac_args))
    trains_per_epoch = -(-s["epoch_length"] // s["train_every"])  # its sac_buffer_capacity
    sac_buffer = util.ReplayBuffer(
        s["rollout_batch"] * trains_per_epoch, obs_shape, act_shape, rng=rng
    )
    state = {"obs": env.reset()[0], "updates": 0}

    def env_steps() -> None:
        for _ in range(args.env_steps):
            next_obs, _, terminated, truncated, _ = common.step_env_and_add_to_buffer(
                env, state["obs"], agent, {}, replay_buffer
            )
            state["obs"] = env.reset()[0] if terminated or truncated else next_obs

    def updates() -> None:
        for _ in range(args.updates):
            agent.sac_agent.update_parameters(
                sac_buffer, s["sac_batch"], state["updates"], None, reverse_mask=True
            )
            state["updates"] += 1

    def rollout() -> None:
        rollout_model_and_populate_sac_buffer(
            model_env, replay_buffer, agent, sac_buffer, True, 1, s["rollout_batch"]
        )

    def fit() -> None:
        common.train_model_and_save_model_and_data(
            dynamics_model, trainer, cfg.overrides, replay_buffer, work_dir=None
        )

    start = time.perf_counter()
    common.rollout_agent_trajectories(
        env, args.real_rows, planning.RandomAgent(env), {}, replay_buffer=replay_buffer
    )
    fit()
    rollout()
    updates()  # warm-up
    setup = {"side": "mbrl-lib", "setup_s": time.perf_counter() - start}

    def one_round() -> dict[str, tuple[float, float]]:
        return {
            "env_step": _timed(env_steps),
            "update": _timed(updates),
            "rollout": _timed(rollout),
            "fit": _timed(fit),
            "fit_rows": len(replay_buffer),
        }

    _serve(setup, one_round)


# ----------------------------------------------------------------------------- the parent


class Worker:
    """A worker process speaking the line protocol of :func:`_serve`."""

    def __init__(self, cmd: list[str]) -> None:
        env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
        self.log = tempfile.TemporaryFile("w+")  # the worker's stderr, shown if it fails
        self.proc = subprocess.Popen(
            cmd, cwd=HERE.parent, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            stderr=self.log, text=True,
        )  # fmt: skip
        self.setup = self._read()

    def _read(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            code = self.proc.wait()
            self.log.seek(0)
            tail = self.log.read()[-3000:]
            raise RuntimeError(
                f"worker {' '.join(self.proc.args[:4])} ended (exit {code}):\n{tail}"
            )
        return json.loads(line)

    def round(self) -> dict:
        self.proc.stdin.write("round\n")
        self.proc.stdin.flush()
        return self._read()

    def close(self) -> None:
        self.proc.stdin.write("quit\n")
        self.proc.stdin.flush()
        self.proc.wait()


def _per_step(parts: dict[str, float], s: dict, k: int) -> dict[str, float]:
    """Seconds of one env step and its shares, from the median part times of one side."""
    update = s["updates_per_step"] * parts["update"]
    rollout = k * parts["rollout"] / s["train_every"]
    fit = parts["fit"] / s["train_every"]
    total = parts["env_step"] + update + rollout + fit
    return {
        "env_steps_per_s": 1.0 / total,
        "share_sac_updates": update / total,
        "share_model_rollouts": rollout / total,
        "share_model_training": fit / total,
        "share_env_step_and_action": parts["env_step"] / total,
    }


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default=str(HERE / "mbpo_hopper.yaml"))
    p.add_argument("--sides", nargs="+", default=["ours", "peer"], choices=["ours", "peer"])
    p.add_argument("--peer-python", default=PEER_PYTHON)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--real-rows", type=int, default=5000, help="random steps before timing")
    p.add_argument("--env-steps", type=int, default=100, help="env steps timed per round")
    p.add_argument("--updates", type=int, default=40, help="SAC updates timed per round")
    p.add_argument("--fit-epochs", type=int, default=10, help="epochs of every timed fit")
    p.add_argument("--device", default="cpu")
    p.add_argument("--worker", choices=["ours", "peer"], help=argparse.SUPPRESS)
    p.add_argument("--settings", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker == "ours":
        return ours_worker(args)
    if args.worker == "peer":
        return peer_worker(args, json.loads(args.settings))
    if "peer" in args.sides and not Path(args.peer_python).exists():
        raise SystemExit(
            f"--peer-python {args.peer_python} does not exist; install mbrl-lib in its own "
            "virtualenv (see this script's docstring) or pass --sides ours"
        )

    import torch

    sys.path.insert(0, str(HERE))
    from machine import matmul_peak_gflops

    torch.set_num_threads(1)
    shared = [f"--{k.replace('_', '-')}={getattr(args, k)}" for k in
              ("config", "real_rows", "env_steps", "updates", "fit_epochs", "device")]  # fmt: skip
    script = str(Path(__file__).resolve())
    workers: dict[str, Worker] = {}
    ours = Worker([sys.executable, script, "--worker", "ours", *shared])
    workers["ours"] = ours
    settings = ours.setup["settings"]
    if "peer" in args.sides:
        peer_cmd = [args.peer_python, script, "--worker", "peer", *shared]
        workers["mbrl-lib"] = Worker([*peer_cmd, "--settings", json.dumps(settings)])
    if "ours" not in args.sides:
        workers.pop("ours").close()
    names = list(workers)
    times: dict[str, list[dict]] = {n: [] for n in names}
    peaks = []
    try:
        for r in range(args.rounds):
            peaks.append(matmul_peak_gflops())
            for n in names if r % 2 == 0 else names[::-1]:
                times[n].append(workers[n].round())
    finally:
        for w in workers.values():
            w.close()

    counts = {"env_step": args.env_steps, "update": args.updates, "rollout": 1, "fit": 1}
    out: dict = {
        "bench": "mbpo_hopper_throughput",
        "cpu": cpu_name(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "torch": torch.__version__,
        "threads": 1,
        "rounds": args.rounds,
        "settings": settings,
        "fit_epochs": args.fit_epochs,
        "matmul_peak_gflops_wall": [round(x, 1) for x in peaks],
        "sides": {},
    }
    for n in names:
        side: dict = {"setup_s": round(workers[n].setup["setup_s"], 1)}
        side["fit_rows"] = [t["fit_rows"] for t in times[n]]
        for clock, i in (("cpu", 0), ("wall", 1)):
            med = {
                part: statistics.median(t[part][i] for t in times[n]) / counts[part]
                for part in PARTS
            }
            side[f"{clock}_ms"] = {
                "env_step": round(med["env_step"] * 1e3, 3),
                "sac_update": round(med["update"] * 1e3, 3),
                "rollout_k1": round(med["rollout"] * 1e3, 1),
                "fit": round(med["fit"] * 1e3, 1),
            }
            for k in (1, LONG_K):
                step = _per_step(med, settings, k)
                side[f"{clock}_k{k}"] = {key: round(v, 4) for key, v in step.items()}
        if n == "ours":
            update_s = side["cpu_ms"]["sac_update"] / 1e3
            gflops = ours.setup["sac_update_flops"] / update_s / 1e9
            peak = statistics.median(t["peak_gflops_cpu"] for t in times[n])
            side["sac_update_gflops_cpu"] = round(gflops, 1)
            side["matmul_peak_gflops_cpu"] = round(peak, 1)
            side["sac_update_share_of_peak"] = round(gflops / peak, 3)
        out["sides"][n] = side
    if len(names) == 2:
        a, b = (out["sides"][n] for n in ("ours", "mbrl-lib"))
        out["ours_over_mbrl_lib"] = {
            f"{clock}_{what}": round(a[f"{clock}_{what}"]["env_steps_per_s"]
                                     / b[f"{clock}_{what}"]["env_steps_per_s"], 3)
            for clock in ("cpu", "wall") for what in ("k1", f"k{LONG_K}")
        }  # fmt: skip
        out["sac_update_speedup"] = {
            clock: round(b[f"{clock}_ms"]["sac_update"] / a[f"{clock}_ms"]["sac_update"], 3)
            for clock in ("cpu", "wall")
        }
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
