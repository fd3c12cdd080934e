"""MCTS speed: simulations per second of :class:`mbrl.planners.MCTS` against mctx on one toy MLP.

Setting: ``B = 256`` roots, ``S = 128`` simulations, ``A = 2`` actions, a toy MLP model with
state ``X = 8``: dynamics ``[x, onehot(a)] -> 64 -> 64 -> [x', r]`` (tanh), a linear value
head ``x -> v`` and a linear prior head ``x -> logits [A]``, discount 0.99, no terminations.
The same weights (drawn in torch from seed 0) are exported to jax. MCTS runs
``MCTS(rule="puct", normalize_values=True, max_depth=S).search`` (the step is the learned
model through ``PlanningProblem.step``, the value head is ``value_fn``, the prior head is
``prior``, a ``Categorical`` of its logits without argument validation, as mctx takes its
logits); mctx runs ``jax.jit(mctx.muzero_policy)`` with ``dirichlet_fraction=0`` and its
default ``max_depth`` (``S``), and, for reference, ``jax.jit(mctx.gumbel_muzero_policy)``
(``max_num_considered_actions=2``).

jax and mctx live in their own environment (not dependencies of the project): the script
starts ``--jax-python`` (default ``/tmp/jaxvenv/bin/python``) on itself with ``--worker`` and
talks to it over a pipe. Rounds are interleaved (torch, mctx, gumbel, torch, mctx, ...), each
side on one thread (``torch.set_num_threads(1)``; XLA with
``--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1``), and only one side
runs at a time. Per round it reports wall time and process CPU time; the summary is the median
round, beside the best round (speedups: mctx's time over MCTS's, median wall, median CPU and
best wall; on a shared machine the CPU time and the best round are the steadier). Also
reported: the fraction of roots whose root visit counts agree between MCTS and mctx (the same
search on the same model, up to float rounding and mctx's 1e-7 tie noise), and this machine's
single-thread float32 matmul peak.

    python experiments/bench_mcts.py [--rounds 5] [--batch 256] [--simulations 128]
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

X, HIDDEN, A, GAMMA = 8, 64, 2, 0.99
XLA_ONE_THREAD = "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"


def make_weights(seed: int = 0) -> dict[str, list]:
    """The toy model's weights (float32 lists), drawn in torch."""
    import torch

    g = torch.Generator().manual_seed(seed)

    def lin(n_in: int, n_out: int) -> tuple[list, list]:
        w = torch.randn(n_in, n_out, generator=g) / n_in**0.5
        b = 0.1 * torch.randn(n_out, generator=g)
        return w.tolist(), b.tolist()

    w1, b1 = lin(X + A, HIDDEN)
    w2, b2 = lin(HIDDEN, HIDDEN)
    w3, b3 = lin(HIDDEN, X + 1)
    wv, bv = lin(X, 1)
    wp, bp = lin(X, A)
    return dict(w1=w1, b1=b1, w2=w2, b2=b2, w3=w3, b3=b3, wv=wv, bv=bv, wp=wp, bp=bp)


def make_roots(batch: int, seed: int = 1) -> list:
    import torch

    return torch.randn(batch, X, generator=torch.Generator().manual_seed(seed)).tolist()


# ---------------------------------------------------------------------- torch side


def torch_side(weights: dict[str, list], roots: list, simulations: int):
    """A closure running one MCTS search on all roots, returning root visit counts [B, A]."""
    import torch

    from mbrl.dynamics.base import FitReport, Prediction, RolloutState
    from mbrl.planners import MCTS, PlanningProblem

    torch.set_num_threads(1)
    w = {k: torch.tensor(v) for k, v in weights.items()}

    class ToyModel:
        """Deterministic MLP dynamics that also predict the reward."""

        obs_dim, act_dim, learns_reward = X, 1, True

        def fit(self, data, generator=None) -> FitReport:
            raise NotImplementedError("a fixed benchmark model")

        def predict(self, obs, act) -> Prediction:
            raise NotImplementedError("a fixed benchmark model")

        def rollout_start(self, obs, particles, generator=None) -> RolloutState:
            return RolloutState(obs=obs.repeat_interleave(particles, dim=0))

        def rollout_step(self, state, act, generator=None) -> RolloutState:
            onehot = torch.nn.functional.one_hot(act[:, 0].long(), A).float()
            h = torch.tanh(torch.cat([state.obs, onehot], dim=1) @ w["w1"] + w["b1"])
            h = torch.tanh(h @ w["w2"] + w["b2"])
            out = h @ w["w3"] + w["b3"]
            return RolloutState(obs=out[:, :X], reward=out[:, X])

    def value_fn(state: RolloutState) -> torch.Tensor:
        return (state.obs @ w["wv"] + w["bv"])[:, 0]

    def prior(state: RolloutState) -> torch.distributions.Distribution:
        # no argument validation: the logits are the model's own (mctx takes them as they are)
        logits = state.obs @ w["wp"] + w["bp"]
        return torch.distributions.Categorical(logits=logits, validate_args=False)

    problem = PlanningProblem(
        ToyModel(),
        lambda o, a, n: torch.zeros(o.shape[0]),
        None,
        simulations,
        torch.zeros(1),
        torch.ones(1),
        discount=GAMMA,
        value_fn=value_fn,
        prior=prior,
        action_values=torch.arange(A, dtype=torch.float32)[:, None],
        generator=torch.Generator().manual_seed(0),
    )
    planner = MCTS(simulations=simulations, rule="puct", max_depth=simulations)
    x0 = torch.tensor(roots)

    def run() -> list:
        return planner.search(problem, x0).visit_counts.long().tolist()

    return run


# ---------------------------------------------------------------------- jax side (worker)


def worker() -> None:
    """Serve timed mctx searches: read one JSON command per line, answer one JSON line."""
    import functools

    import jax
    import jax.numpy as jnp
    import mctx

    jax.config.update("jax_platforms", "cpu")
    setup = json.loads(sys.stdin.readline())
    w = {k: jnp.asarray(v, dtype=jnp.float32) for k, v in setup["weights"].items()}
    roots = jnp.asarray(setup["roots"], dtype=jnp.float32)
    sims = setup["simulations"]

    def heads(x):
        return (x @ w["wv"] + w["bv"])[:, 0], x @ w["wp"] + w["bp"]

    def recurrent_fn(params, rng_key, action, x):
        onehot = jax.nn.one_hot(action, A, dtype=jnp.float32)
        h = jnp.tanh(jnp.concatenate([x, onehot], axis=1) @ w["w1"] + w["b1"])
        h = jnp.tanh(h @ w["w2"] + w["b2"])
        out = h @ w["w3"] + w["b3"]
        nxt = out[:, :X]
        value, logits = heads(nxt)
        discount = jnp.full(value.shape, GAMMA, dtype=jnp.float32)
        step = mctx.RecurrentFnOutput(
            reward=out[:, X], discount=discount, prior_logits=logits, value=value
        )
        return step, nxt

    def root_of(x):
        value, logits = heads(x)
        return mctx.RootFnOutput(prior_logits=logits, value=value, embedding=x)

    @functools.partial(jax.jit, static_argnames="policy")
    def search(key, x, policy):
        if policy == "muzero":
            out = mctx.muzero_policy(
                (), key, root_of(x), recurrent_fn, sims, dirichlet_fraction=0.0
            )
        else:
            out = mctx.gumbel_muzero_policy(
                (), key, root_of(x), recurrent_fn, sims, max_num_considered_actions=A
            )
        return out.search_tree.summary().visit_counts

    key = jax.random.PRNGKey(0)
    for policy in ("muzero", "gumbel"):  # compile outside the timed rounds
        search(key, roots, policy).block_until_ready()
    print(json.dumps({"ready": True, "jax": jax.__version__}), flush=True)
    for line in sys.stdin:
        cmd = json.loads(line)
        wall, cpu = time.perf_counter(), time.process_time()
        counts = search(key, roots, cmd["policy"]).block_until_ready()
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        reply = {"wall": wall, "cpu": cpu}
        if cmd.get("counts"):
            reply["visit_counts"] = jnp.asarray(counts).astype(jnp.int32).tolist()
        print(json.dumps(reply), flush=True)


# ---------------------------------------------------------------------- driver


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--simulations", type=int, default=128)
    parser.add_argument("--jax-python", default="/tmp/jaxvenv/bin/python")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker()
        return

    sys.path.insert(0, str(Path(__file__).parent))
    import torch
    from machine import matmul_peak_gflops

    torch.set_num_threads(1)
    weights, roots = make_weights(), make_roots(args.batch)
    run_torch = torch_side(weights, roots, args.simulations)
    total = args.batch * args.simulations

    env = {**os.environ, "XLA_FLAGS": XLA_ONE_THREAD, "OMP_NUM_THREADS": "1"}
    peer = subprocess.Popen(
        [args.jax_python, __file__, "--worker"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env=env,
    )

    def ask(msg: dict) -> dict:
        peer.stdin.write(json.dumps(msg) + "\n")
        peer.stdin.flush()
        line = peer.stdout.readline()
        if not line:
            raise SystemExit(f"the mctx worker ({args.jax_python}) exited; see its stderr")
        return json.loads(line)

    peer.stdin.write(
        json.dumps({"weights": weights, "roots": roots, "simulations": args.simulations}) + "\n"
    )
    peer.stdin.flush()
    ready = json.loads(peer.stdout.readline())

    ours = run_torch()  # warm-up (and the agreement check)
    theirs = ask({"policy": "muzero", "counts": True})["visit_counts"]
    agree = sum(a == b for a, b in zip(ours, theirs, strict=True)) / len(ours)

    rounds: dict[str, list[tuple[float, float]]] = {"mcts": [], "mctx": [], "mctx_gumbel": []}
    for _ in range(args.rounds):
        wall, cpu = time.perf_counter(), time.process_time()
        run_torch()
        rounds["mcts"].append((time.perf_counter() - wall, time.process_time() - cpu))
        r = ask({"policy": "muzero"})
        rounds["mctx"].append((r["wall"], r["cpu"]))
        r = ask({"policy": "gumbel"})
        rounds["mctx_gumbel"].append((r["wall"], r["cpu"]))
    peer.stdin.close()
    peer.wait()

    def summary(name: str) -> dict:
        walls = [w for w, _ in rounds[name]]
        cpus = [c for _, c in rounds[name]]
        wall = statistics.median(walls)
        return {
            "wall_s": wall,
            "cpu_s": statistics.median(cpus),
            "simulations_per_s": total / wall,
            "best_wall_s": min(walls),
            "best_simulations_per_s": total / min(walls),
            "rounds_wall_s": walls,
            "rounds_cpu_s": cpus,
        }

    result = {
        "setting": {
            "roots": args.batch,
            "simulations": args.simulations,
            "actions": A,
            "state_dim": X,
            "hidden": HIDDEN,
            "threads": 1,
            "rounds": args.rounds,
        },
        "mcts": summary("mcts"),
        "mctx_muzero": summary("mctx"),
        "mctx_gumbel_muzero": summary("mctx_gumbel"),
        "speedup_vs_mctx_muzero": summary("mctx")["wall_s"] / summary("mcts")["wall_s"],
        "speedup_vs_mctx_gumbel": summary("mctx_gumbel")["wall_s"] / summary("mcts")["wall_s"],
        "cpu_speedup_vs_mctx_muzero": summary("mctx")["cpu_s"] / summary("mcts")["cpu_s"],
        "cpu_speedup_vs_mctx_gumbel": summary("mctx_gumbel")["cpu_s"] / summary("mcts")["cpu_s"],
        "best_speedup_vs_mctx_muzero": min(w for w, _ in rounds["mctx"])
        / min(w for w, _ in rounds["mcts"]),
        "root_visit_counts_agree_with_mctx": agree,
        "versions": {"torch": torch.__version__, "jax": ready["jax"]},
        "matmul_peak_gflops_1thread": matmul_peak_gflops(),
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
