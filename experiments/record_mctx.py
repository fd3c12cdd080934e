"""Record search trees of mctx's ``muzero_policy`` on a fixed table model, as a test fixture.

The table model has a few states, ``A = 3`` actions, a fixed next state and reward for every
(state, action), a value and prior logits for every state and a constant discount (no state
terminates). ``tests/test_mcts.py`` replays the same table through
``mbrl.planners.MCTS(rule="puct")`` and checks the visit counts exactly and the values to
``1e-3``.

mctx settings: ``dirichlet_fraction=0`` (no root noise), ``pb_c_init=1.25``,
``pb_c_base=19652``, the default ``qtransform_by_parent_and_siblings``; ``temperature`` only
affects the sampled ``action`` (not recorded), ``action_weights`` are the root visit counts
normalized. mctx breaks ties with ``1e-7`` uniform noise from its key: every case is searched
under three keys and recorded only when the three trees agree, so the fixture does not depend
on the tie noise.

Run in a separate environment with jax and mctx (they are not dependencies of the project):

    python3 -m venv /tmp/jaxvenv && /tmp/jaxvenv/bin/pip install jax mctx numpy
    /tmp/jaxvenv/bin/python experiments/record_mctx.py [--out tests/fixtures/mctx_trees.json]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import mctx
import numpy as np

STATES, ACTIONS = 6, 3
CASES = {
    # name: (simulations, max_depth, discount, roots)
    "deep": (48, None, 0.9, [0, 3]),
    "depth3": (40, 3, 0.95, [1, 4, 5]),
    "undiscounted": (24, None, 1.0, [2]),
}


def table(seed: int = 0) -> dict[str, np.ndarray]:
    """The fixed table model: next state [S, A], reward [S, A], value [S], prior logits [S, A]."""
    rng = np.random.default_rng(seed)
    return {
        "next_state": rng.integers(0, STATES, size=(STATES, ACTIONS)),
        "reward": rng.uniform(-1.0, 1.0, size=(STATES, ACTIONS)).astype(np.float32),
        "value": rng.uniform(-2.0, 2.0, size=STATES).astype(np.float32),
        "prior_logits": rng.normal(0.0, 1.0, size=(STATES, ACTIONS)).astype(np.float32),
    }


def search(t: dict[str, np.ndarray], sims: int, depth: int | None, gamma: float, roots, key):
    nxt = jnp.asarray(t["next_state"], dtype=jnp.int32)
    rew = jnp.asarray(t["reward"])
    val = jnp.asarray(t["value"])
    logits = jnp.asarray(t["prior_logits"])

    def recurrent_fn(params, rng_key, action, state):
        s2 = nxt[state, action]
        out = mctx.RecurrentFnOutput(
            reward=rew[state, action],
            discount=jnp.full(state.shape, gamma, dtype=jnp.float32),
            prior_logits=logits[s2],
            value=val[s2],
        )
        return out, s2

    s0 = jnp.asarray(roots, dtype=jnp.int32)
    root = mctx.RootFnOutput(prior_logits=logits[s0], value=val[s0], embedding=s0)
    out = mctx.muzero_policy(
        params=(),
        rng_key=key,
        root=root,
        recurrent_fn=recurrent_fn,
        num_simulations=sims,
        max_depth=depth,
        dirichlet_fraction=0.0,
        pb_c_init=1.25,
        pb_c_base=19652.0,
        temperature=1.0,
    )
    tree = out.search_tree
    summary = tree.summary()
    return {
        "visit_counts": np.asarray(summary.visit_counts).astype(int).tolist(),
        "q_values": np.asarray(summary.qvalues).tolist(),
        "root_value": np.asarray(summary.value).tolist(),
        "action_weights": np.asarray(out.action_weights).tolist(),
        "node_visits": np.asarray(tree.node_visits).astype(int).tolist(),
        "node_values": np.asarray(tree.node_values).tolist(),
        "parents": np.asarray(tree.parents).astype(int).tolist(),
        "children_index": np.asarray(tree.children_index).astype(int).tolist(),
        "embeddings": np.asarray(tree.embeddings).astype(int).tolist(),
    }


def _dump(obj: object, indent: str = "") -> str:
    """JSON with one line per leaf field (dicts spread over lines, lists kept on one line)."""
    if not isinstance(obj, dict):
        return json.dumps(obj)
    inner = indent + " "
    items = [f"{inner}{json.dumps(k)}: {_dump(v, inner)}" for k, v in obj.items()]
    return "{\n" + ",\n".join(items) + "\n" + indent + "}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="tests/fixtures/mctx_trees.json")
    args = parser.parse_args()
    t = table()
    cases = {}
    for name, (sims, depth, gamma, roots) in CASES.items():
        runs = [search(t, sims, depth, gamma, roots, jax.random.PRNGKey(k)) for k in (0, 1, 2)]
        structural = ("visit_counts", "node_visits", "parents", "children_index")
        for other in runs[1:]:
            for field in structural:
                if other[field] != runs[0][field]:
                    raise SystemExit(
                        f"case {name}: the tie noise changes {field}; change the table"
                    )
        cases[name] = {
            "simulations": sims,
            "max_depth": depth,
            "discount": gamma,
            "roots": roots,
            **runs[0],
        }
    fixture = {
        "source": (
            f"mctx {getattr(mctx, '__version__', '?')} muzero_policy, jax {jax.__version__}, "
            "recorded by experiments/record_mctx.py"
        ),
        "settings": {
            "pb_c_init": 1.25,
            "pb_c_base": 19652.0,
            "dirichlet_fraction": 0.0,
            "qtransform": "qtransform_by_parent_and_siblings",
        },
        "table": {k: v.tolist() for k, v in t.items()},
        "cases": cases,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(_dump(fixture) + "\n")
    counts = ", ".join(f"{k} {v['visit_counts']}" for k, v in cases.items())
    print(f"wrote {out}: {counts}")


if __name__ == "__main__":
    main()
