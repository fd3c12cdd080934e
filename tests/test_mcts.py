"""MCTS: known answers (a Bernoulli bandit, a depth-3 tree, trees recorded from mctx), bad
input, non-finite steps, determinism, batched roots, sampled and widened actions, tree reuse.

``fixtures/mctx_trees.json`` holds search trees of ``mctx.muzero_policy`` (mctx 0.0.71, jax
0.10.2) on a fixed table model, recorded by ``experiments/record_mctx.py``; the tests replay the
same table through :class:`MCTS` with ``rule="puct"``.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from mbrl.control.mpc import MPCController
from mbrl.dynamics.base import RolloutState
from mbrl.dynamics.known import KnownModel
from mbrl.planners import MCTS, PlanningProblem, WarmStart
from mbrl.shapes import ShapeError

FIXTURE = Path(__file__).parent / "fixtures" / "mctx_trees.json"


# ---------------------------------------------------------------- table models


def table_problem(
    next_state: torch.Tensor,
    reward: torch.Tensor,
    horizon: int,
    discount: float = 1.0,
    value: torch.Tensor | None = None,
    prior_logits: torch.Tensor | None = None,
    terminal: torch.Tensor | None = None,
    seed: int = 0,
) -> PlanningProblem:
    """A deterministic table model: the state is an index ``[R, 1]``, action ``a`` of state
    ``s`` leads to ``next_state[s, a]`` with reward ``reward[s, a]``."""
    a = next_state.shape[1]

    def step(x: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        return next_state[x[:, 0].long(), u[:, 0].long()].float()[:, None]

    def reward_fn(obs: torch.Tensor, act: torch.Tensor, nxt: torch.Tensor) -> torch.Tensor:
        return reward[obs[:, 0].long(), act[:, 0].long()]

    def value_fn(state: RolloutState) -> torch.Tensor:
        return value[state.obs[:, 0].long()]

    def prior(state: RolloutState) -> torch.distributions.Distribution:
        return torch.distributions.Categorical(logits=prior_logits[state.obs[:, 0].long()])

    def termination(nxt: torch.Tensor) -> torch.Tensor:
        return terminal[nxt[:, 0].long()]

    return PlanningProblem(
        KnownModel(step, 1, 1),
        reward_fn,
        None if terminal is None else termination,
        horizon,
        torch.zeros(1),
        torch.full((1,), a - 1.0),
        discount=discount,
        value_fn=None if value is None else value_fn,
        prior=None if prior_logits is None else prior,
        action_values=torch.arange(a, dtype=torch.float32)[:, None],
        generator=torch.Generator().manual_seed(seed),
    )


def binary_tree(depth: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    """A complete binary tree of ``depth`` levels (node ``i`` has children ``2i+1, 2i+2``;
    leaves loop to themselves with reward 0). The greedy first action is a trap: action 0 pays
    1 and at most 0.5 after; the optimal path 1, 0, 1 pays 0.5, 0.5, then 2."""
    n = 2 ** (depth + 1) - 1
    idx = torch.arange(n)
    nxt = torch.stack([2 * idx + 1, 2 * idx + 2], dim=1)
    leaves = idx >= 2**depth - 1
    nxt[leaves] = idx[leaves, None]
    rew = torch.zeros(n, 2)
    rew[0] = torch.tensor([1.0, 0.5])
    rew[1] = torch.tensor([0.2, 0.1])
    rew[3] = torch.tensor([0.3, 0.1])
    rew[4] = torch.tensor([0.2, 0.4])
    rew[2] = torch.tensor([0.5, 0.0])
    rew[5] = torch.tensor([0.0, 2.0])  # path 1, 0, 1 -> return 3.0
    rew[6] = torch.tensor([0.1, 0.2])
    return nxt, rew


OPTIMAL_PATH = [1.0, 0.0, 1.0]
OPTIMAL_RETURN = 3.0


# ---------------------------------------------------------------- known answers


def max_diff(a: torch.Tensor, b: object) -> float:
    return float((a - torch.as_tensor(b, dtype=a.dtype)).abs().max())


def test_mctx_trees_replayed_exactly():
    fx = json.loads(FIXTURE.read_text())
    t = fx["table"]
    nxt = torch.tensor(t["next_state"])
    rew = torch.tensor(t["reward"])
    val = torch.tensor(t["value"])
    logits = torch.tensor(t["prior_logits"])
    for name, case in fx["cases"].items():
        sims, depth = case["simulations"], case["max_depth"]
        depth = sims if depth is None else depth  # mctx's default max_depth
        problem = table_problem(nxt, rew, depth, case["discount"], val, logits)
        planner = MCTS(simulations=sims, rule="puct", max_depth=depth, normalize_values=True)
        x0 = torch.tensor(case["roots"], dtype=torch.float32)[:, None]
        res = planner.search(problem, x0)
        tree, m = res.tree, sims + 1
        assert res.visit_counts.long().tolist() == case["visit_counts"], name
        assert tree.visits.long().tolist() == case["node_visits"], name
        assert tree.parents.tolist() == case["parents"], name
        assert tree.children[..., 0].tolist() == case["children_index"], name
        used = tree.visits > 0  # the states of the nodes in the tree (slots left free differ)
        states = tree.states.obs.view(-1, m).long()
        assert torch.equal(states[used], torch.tensor(case["embeddings"])[used]), name
        assert max_diff(tree.values, case["node_values"]) <= 1e-3, name
        assert max_diff(res.root_values, case["root_value"]) <= 1e-3, name
        tried = res.visit_counts > 0  # mctx reports 0 for untried actions, MCTS NaN
        q_ref = torch.tensor(case["q_values"])
        assert max_diff(res.q_values[tried], q_ref[tried]) <= 1e-3, name
        assert bool(res.q_values[~tried].isnan().all())
        assert max_diff(res.action_weights, case["action_weights"]) <= 1e-6, name


def bandit_problem(particles: int, seed: int = 0) -> PlanningProblem:
    """Two arms paying 1 with probability 0.3 (arm 0) and 0.7 (arm 1), else 0: the model draws
    the payout into the next state, the reward reads it."""
    probs = torch.tensor([0.3, 0.7])

    class Bandit(KnownModel):
        def rollout_step(self, state, act, generator=None):
            u = torch.rand(act.shape[0], generator=generator)
            return RolloutState(obs=(u < probs[act[:, 0].long()]).float()[:, None])

    return PlanningProblem(
        Bandit(lambda x, u: x, 1, 1),
        lambda obs, act, nxt: nxt[:, 0],
        None,
        1,
        torch.zeros(1),
        torch.ones(1),
        particles=particles,
        action_values=torch.tensor([[0.0], [1.0]]),
        generator=torch.Generator().manual_seed(seed),
    )


def test_bernoulli_bandit_visits_go_to_the_better_arm():
    shares = []
    for sims in (8, 64, 512):
        problem = bandit_problem(particles=32)
        plan = MCTS(simulations=sims, rule="uct", exploration=1.0).plan(problem, torch.zeros(1))
        visits = plan.extras["visit_counts"]
        assert float(visits.sum()) == sims
        shares.append(float(visits[1] / visits.sum()))
        assert plan.actions.tolist() == [[1.0]]
    assert shares[0] < shares[1] < shares[2]
    assert shares[2] > 0.95
    # the arm values are the particle means of the payouts
    q = plan.extras["q_values"]
    assert abs(float(q[0]) - 0.3) < 0.2 and abs(float(q[1]) - 0.7) < 0.2


@pytest.mark.parametrize(
    ("rule", "normalize", "c"), [("uct", True, 2.0), ("puct", True, 2.0), ("uct", False, 1.0)]
)
def test_depth3_tree_finds_the_optimal_path(rule, normalize, c):
    nxt, rew = binary_tree()
    problem = table_problem(nxt, rew, horizon=3)
    planner = MCTS(simulations=300, rule=rule, exploration=c, normalize_values=normalize)
    plan = planner.plan(problem, torch.zeros(1))
    assert plan.actions[:, 0].tolist() == OPTIMAL_PATH
    assert plan.ok and plan.iterations == 300
    # the optimal first action has the highest value; values are means of returns seen
    q = plan.extras["q_values"]
    assert int(q.argmax()) == 1
    assert float(q[0]) <= 1.5 + 1e-6 and 1.5 < float(q[1]) <= OPTIMAL_RETURN + 1e-6
    assert plan.extras["root_actions"].tolist() == [[0.0], [1.0]]


def test_path_is_padded_to_the_horizon_and_max_depth_limits_the_tree():
    nxt, rew = binary_tree()
    problem = table_problem(nxt, rew, horizon=5)
    plan = MCTS(simulations=40, max_depth=2).plan(problem, torch.zeros(1))
    assert plan.actions.shape == (5, 1)
    assert plan.diagnostics["max_depth"] == 2
    assert plan.diagnostics["path_length"] == 2
    assert plan.actions[2:].eq(plan.actions[1]).all()


def test_terminated_nodes_are_leaves_of_value_zero():
    # state 1 terminates (reward 2 on the way in); state 2 goes on paying 1 per step
    nxt = torch.tensor([[1, 2], [1, 1], [2, 2]])
    rew = torch.tensor([[2.0, 1.0], [5.0, 5.0], [1.0, 1.0]])
    value = torch.tensor([0.0, 100.0, 0.0])  # a terminated state's own value must not count
    terminal = torch.tensor([False, True, False])
    problem = table_problem(nxt, rew, horizon=4, value=value, terminal=terminal)
    res = MCTS(simulations=200).search(problem, torch.zeros(1))
    tree = res.tree
    term_nodes = tree.terminal[0, : tree.used] & (tree.parents[0, : tree.used] >= 0)
    assert bool(term_nodes.any())
    assert bool((tree.children[0, : tree.used][term_nodes] < 0).all())  # never expanded
    assert float(res.q_values[0, 0]) == pytest.approx(2.0)
    assert int(res.visit_counts[0].argmax()) == 1  # 1 + 1 + 1 + 1 > 2


# ---------------------------------------------------------------- bad input


def box_problem(prior=None, seed: int = 0, horizon: int = 2) -> PlanningProblem:
    """x' = x + u on a box [-1, 1]^2, reward -|x' - (0.5, -0.3)|^2."""
    target = torch.tensor([0.5, -0.3])
    return PlanningProblem(
        KnownModel(lambda x, u: x + u, 2, 2),
        lambda obs, act, nxt: -((nxt - target) ** 2).sum(-1),
        None,
        horizon,
        -torch.ones(2),
        torch.ones(2),
        prior=prior,
        generator=torch.Generator().manual_seed(seed),
    )


def test_bad_input_is_refused_with_the_fix():
    with pytest.raises(ValueError, match="simulations must be an int >= 1, got 0"):
        MCTS(simulations=0)
    with pytest.raises(ValueError, match="rule must be one of"):
        MCTS(rule="ucb")
    with pytest.raises(ValueError, match="actions must be one of"):
        MCTS(actions="grid")
    with pytest.raises(ValueError, match="exploration"):
        MCTS(exploration=float("nan"))
    with pytest.raises(ValueError, match="widening_alpha"):
        MCTS(actions="widening", widening_alpha=0.0)
    with pytest.raises(ValueError, match="double_widening=True needs actions='widening'"):
        MCTS(double_widening=True)
    with pytest.raises(ValueError, match="set rule='puct' or dirichlet_alpha=None"):
        MCTS(dirichlet_alpha=0.3)
    with pytest.raises(ValueError, match="leaves_per_wave must be an int >= 1, got 0"):
        MCTS(leaves_per_wave=0)
    with pytest.raises(ValueError, match="virtual_loss must be a finite number >= 0.0"):
        MCTS(virtual_loss=-1.0)
    with pytest.raises(ValueError, match="needs actions='widening' or 'sampled'.*discretize"):
        MCTS().plan(box_problem(), torch.zeros(2))
    nxt, rew = binary_tree()
    with pytest.raises(ValueError, match="the problem is discrete.*use actions='discrete'"):
        MCTS(actions="sampled").plan(table_problem(nxt, rew, 3), torch.zeros(1))
    with pytest.raises(ShapeError, match=r"MCTS.plan plans from one start \[X\], got \[2, 1\]"):
        MCTS().plan(table_problem(nxt, rew, 3), torch.zeros(2, 1))


def test_prior_of_the_wrong_shape_is_refused():
    nxt, rew = binary_tree()
    problem = table_problem(nxt, rew, 3, prior_logits=torch.zeros(15, 2))
    problem.prior = lambda s: torch.distributions.Normal(torch.zeros(s.obs.shape[0], 2), 1.0)
    with pytest.raises(ShapeError, match=r"problem.prior: a discrete problem needs .*\[R=1\]"):
        MCTS(rule="puct").plan(problem, torch.zeros(1))
    box = box_problem(prior=lambda s: torch.distributions.Normal(torch.zeros(3), 1.0))
    with pytest.raises(ShapeError, match=r"problem.prior: sampled actions need .*\[R=1, U=2\]"):
        MCTS(actions="sampled").plan(box, torch.zeros(2))
    problem = table_problem(nxt, rew, 3, value=torch.zeros(15))
    problem.value_fn = lambda s: torch.zeros(s.obs.shape[0], 1)
    with pytest.raises(ShapeError, match=r"problem.value_fn: expected values \[R=1\]"):
        MCTS().plan(problem, torch.zeros(1))


def test_nonfinite_steps_are_pruned_and_never_chosen():
    # action 1 of the root leads to a NaN state: it looks great (reward 10) but is pruned
    nan = float("nan")

    def step(x, u):
        nxt = x + 1.0
        return torch.where((u[:, :1] > 0.5) & (x[:, :1] == 0), torch.full_like(nxt, nan), nxt)

    problem = PlanningProblem(
        KnownModel(step, 1, 1),
        lambda obs, act, nxt: 10.0 * act[:, 0],
        None,
        3,
        torch.zeros(1),
        torch.ones(1),
        action_values=torch.tensor([[0.0], [1.0]]),
        generator=torch.Generator().manual_seed(0),
    )
    plan = MCTS(simulations=20).plan(problem, torch.zeros(1))
    assert plan.ok
    assert plan.actions[0].tolist() == [0.0]
    assert plan.nonfinite == 1 and problem.nonfinite == 1
    assert plan.extras["q_values"][1] == float("-inf")
    assert plan.extras["visit_counts"].tolist() == [19.0, 0.0]  # one simulation found the NaN
    assert math.isfinite(plan.expected_return)

    # state 1 only leads to NaN: both its actions are pruned, then the root's action into it
    def step_dead_end(x, u):
        nxt = 2 * x + 1 + u
        return torch.where(x == 1, torch.full_like(nxt, nan), nxt)

    dead_end = PlanningProblem(
        KnownModel(step_dead_end, 1, 1),
        lambda obs, act, nxt: torch.ones(obs.shape[0]),
        None,
        3,
        torch.zeros(1),
        torch.ones(1),
        action_values=torch.tensor([[0.0], [1.0]]),
    )
    res = MCTS(simulations=20).search(dead_end, torch.zeros(1))
    assert res.nonfinite == 2
    assert res.tree.pruned[0, 1].all() and res.tree.pruned[0, 0].tolist() == [True, False]
    assert res.q_values[0, 0] == float("-inf") and res.actions[0, 0].item() == 1.0

    everything_nan = PlanningProblem(
        KnownModel(lambda x, u: x * nan, 1, 1),
        lambda obs, act, nxt: act[:, 0],
        None,
        3,
        torch.zeros(1),
        torch.ones(1),
        action_values=torch.tensor([[0.0], [1.0]]),
    )
    plan = MCTS(simulations=5).plan(everything_nan, torch.zeros(1))
    assert plan.status == "all_nonfinite" and not plan.ok
    assert plan.nonfinite == 2
    assert plan.extras["visit_counts"].tolist() == [0.0, 0.0]


# ---------------------------------------------------------------- determinism and batching


def test_same_generator_same_tree_and_other_seeds_differ():
    def run(seed):
        problem = bandit_problem(particles=4, seed=seed)
        problem.prior = lambda s: torch.distributions.Categorical(logits=torch.zeros(4, 2))
        planner = MCTS(simulations=30, rule="puct", dirichlet_alpha=0.3, rollout_depth=0)
        return planner.search(problem, torch.zeros(1))

    a, b, c = run(0), run(0), run(1)
    assert torch.equal(a.visit_counts, b.visit_counts)
    assert torch.equal(a.tree.priors, b.tree.priors)
    assert torch.equal(a.tree.values, b.tree.values)
    assert not torch.equal(a.tree.values, c.tree.values)
    # the root noise changes the search (here: every sample of the Dirichlet skews the root
    # prior far from uniform) and the tree keeps the prior without it
    nxt, rew = binary_tree()
    plain = MCTS(simulations=30, rule="puct").search(table_problem(nxt, rew, 3), torch.zeros(1))
    noisy = MCTS(simulations=30, rule="puct", dirichlet_alpha=0.05, dirichlet_fraction=1.0)
    noisy = noisy.search(table_problem(nxt, rew, 3), torch.zeros(1))
    assert not torch.equal(plain.visit_counts, noisy.visit_counts)
    assert torch.equal(noisy.tree.priors[0, 0], torch.full((2,), 0.5))

    def run_box(seed):
        return MCTS(simulations=30, actions="sampled", rollout_depth=2).search(
            box_problem(seed=seed), torch.zeros(2)
        )

    assert torch.equal(run_box(3).tree.node_actions, run_box(3).tree.node_actions)
    assert torch.equal(run_box(3).tree.values, run_box(3).tree.values)


@pytest.mark.parametrize("rule", ["uct", "puct"])
def test_a_batch_of_roots_equals_each_root_alone(rule):
    fx = json.loads(FIXTURE.read_text())["table"]
    args = [torch.tensor(fx[k]) for k in ("next_state", "reward")]
    val, logits = torch.tensor(fx["value"]), torch.tensor(fx["prior_logits"])
    roots = [0, 2, 5, 3]
    planner = MCTS(simulations=25, rule=rule)
    batch = planner.search(
        table_problem(*args, 4, 0.9, val, logits), torch.tensor(roots, dtype=torch.float32)[:, None]
    )
    for i, r in enumerate(roots):
        alone = planner.search(table_problem(*args, 4, 0.9, val, logits), torch.tensor([float(r)]))
        assert torch.equal(batch.visit_counts[i], alone.visit_counts[0])
        assert torch.equal(batch.actions[i], alone.actions[0])
        assert max_diff(batch.tree.values[i], alone.tree.values[0]) <= 1e-6
        tried = alone.visit_counts[0] > 0
        assert torch.equal(batch.q_values[i].isnan(), ~tried)
        assert max_diff(batch.q_values[i][tried], alone.q_values[0][tried]) <= 1e-6


# ---------------------------------------------------------------- continuous actions


def test_sampled_and_widened_actions_on_a_box():
    x0 = torch.zeros(2)
    target = torch.tensor([0.5, -0.3])
    for mode in ("sampled", "widening"):
        planner = MCTS(simulations=300, actions=mode, num_sampled=16, exploration=0.5)
        plan = planner.plan(box_problem(horizon=1), x0)
        assert plan.actions.shape == (1, 2)
        assert bool((plan.actions.abs() <= 1).all())
        # the most visited root action is the best of the sampled ones
        tried = plan.extras["visit_counts"] > 0
        reward = -((plan.extras["root_actions"][tried] - target) ** 2).sum(-1)
        assert float(((plan.actions[0] - target) ** 2).sum()) == pytest.approx(-float(reward.max()))
    # widening: the root has at most ceil(k * N^alpha) children, N = 1 + simulations
    res = MCTS(simulations=24, actions="widening", num_sampled=16, widening_k=1.0).search(
        box_problem(horizon=1), x0
    )
    assert int((res.visit_counts > 0).sum()) == math.ceil(25**0.5)


def test_policy_prior_proposes_the_sampled_actions():
    # a prior concentrated at the target: every sampled action lies close to it
    target = torch.tensor([0.5, -0.3])

    def prior(state):
        return torch.distributions.Normal(target.expand(state.obs.shape[0], 2), 0.01)

    res = MCTS(simulations=8, actions="sampled", num_sampled=4).search(
        box_problem(prior=prior, horizon=1), torch.zeros(2)
    )
    assert float((res.root_actions[0] - target).abs().max()) < 0.05


def test_double_widening_samples_several_next_states():
    # a noisy box model: x' = x + u + noise, with up to K sampled next states per action
    class Noisy(KnownModel):
        def rollout_step(self, state, act, generator=None):
            noise = 0.1 * torch.randn(state.obs.shape, generator=generator)
            return RolloutState(obs=state.obs + act + noise)

    problem = box_problem(horizon=2)
    problem.model = Noisy(lambda x, u: x + u, 2, 2)
    planner = MCTS(simulations=100, actions="widening", num_sampled=4, double_widening=True)
    res = planner.search(problem, torch.zeros(2))
    outcomes = (res.tree.children[0, 0] >= 0).sum(dim=1)  # next states per root action
    assert int(outcomes.max()) > 1
    assert int(outcomes.max()) <= 4
    assert float(res.visit_counts.sum()) == 100


# ---------------------------------------------------------------- tree reuse


def test_tree_reuse_continues_from_the_played_child():
    nxt, rew = binary_tree()
    planner = MCTS(simulations=50, reuse_tree=True)
    problem = table_problem(nxt, rew, horizon=3)
    first = planner.plan(problem, torch.zeros(1))
    assert first.warm is not None and first.warm.carry
    # action 1 was played (state 2): the search continues below that child
    child_visits = float(first.extras["visit_counts"][1])
    second = planner.plan(problem, torch.tensor([2.0]), first.warm)
    assert float(second.extras["visit_counts"].sum()) == child_visits - 1 + 50
    assert second.actions[:2, 0].tolist() == OPTIMAL_PATH[1:]
    # a state the tree does not hold starts afresh (state 1 is not below state 2)
    fresh = planner.plan(problem, torch.tensor([1.0]), second.warm)
    assert float(fresh.extras["visit_counts"].sum()) == 50
    # without reuse the carry is ignored
    plain = MCTS(simulations=50).plan(problem, torch.tensor([2.0]), first.warm)
    assert float(plain.extras["visit_counts"].sum()) == 50


def test_controller_carries_the_tree_through_shift_warm():
    nxt, rew = binary_tree()
    problem = table_problem(nxt, rew, horizon=3)
    planner = MCTS(simulations=300, exploration=2.0, reuse_tree=True)
    controller = MPCController(planner, problem)
    controller.reset()
    first = controller.act(torch.zeros(1).numpy())
    assert first.tolist() == [1.0]
    warm = controller.warm_start()
    assert isinstance(warm, WarmStart) and warm.carry
    second = controller.act(torch.tensor([2.0]).numpy())
    assert second.tolist() == [0.0]
    assert float(controller.plan.extras["visit_counts"].sum()) > 300


def test_rollouts_stop_once_every_particle_has_terminated():
    """A chain that ends after two steps: a 10-step rollout from a leaf costs at most the two
    steps to the end, and the leaf values are the rewards of those steps."""
    calls = []

    class Counting(KnownModel):
        def rollout_step(self, state, act, generator=None):
            calls.append(state.obs.shape[0])
            return super().rollout_step(state, act, generator)

    problem = PlanningProblem(
        Counting(lambda x, u: x + 1.0, 1, 1),
        lambda obs, act, nxt: torch.ones(obs.shape[0]),
        lambda nxt: nxt[:, 0] >= 2.0,
        5,
        torch.zeros(1),
        torch.ones(1),
        action_values=torch.tensor([[0.0], [1.0]]),
        generator=torch.Generator().manual_seed(0),
    )
    res = MCTS(simulations=4, rule="uct", rollout_depth=10).search(problem, torch.zeros(1))
    # the root's rollout: 2 steps; the two depth-1 nodes: 1 step each; then terminal nodes
    assert len(calls) <= 1 + 2 + 4 * 2
    assert res.tree.raw_values[0, 0].item() == 2.0
    used = res.tree.depths[0, : res.tree.used] == 1
    assert res.tree.raw_values[0, : res.tree.used][used].tolist() == [1.0, 1.0]


# ---------------------------------------------------------------- waves of leaves


def test_waves_solve_the_bandit_and_the_depth3_tree():
    problem = bandit_problem(particles=32)
    plan = MCTS(simulations=512, rule="uct", exploration=1.0, leaves_per_wave=8).plan(
        problem, torch.zeros(1)
    )
    visits = plan.extras["visit_counts"]
    assert float(visits.sum()) == 512 - plan.diagnostics["collisions"]
    assert float(visits[1] / visits.sum()) > 0.95
    for k in (4, 8):
        for rule in ("uct", "puct"):
            nxt, rew = binary_tree()
            planner = MCTS(simulations=300, rule=rule, exploration=2.0, leaves_per_wave=k)
            plan = planner.plan(table_problem(nxt, rew, horizon=3), torch.zeros(1))
            assert plan.actions[:, 0].tolist() == OPTIMAL_PATH, (k, rule)
            assert int(plan.extras["q_values"].argmax()) == 1


def test_a_wave_expands_its_leaves_with_one_model_call():
    """64 simulations with 10-step rollouts: one step per simulation and per rollout step
    alone; in waves of 8, one call of up to 8 rows per wave and rollout step. The tree stays
    consistent: every node's visits are its first visit and its actions' visits."""
    calls = []

    class Counting(KnownModel):
        def rollout_step(self, state, act, generator=None):
            calls.append(state.obs.shape[0])
            return super().rollout_step(state, act, generator)

    def search(k: int):
        calls.clear()
        problem = PlanningProblem(
            Counting(lambda x, u: 0.9 * x + u, 1, 1),
            lambda obs, act, nxt: -nxt[:, 0].abs(),
            None,
            6,
            torch.zeros(1),
            torch.ones(1),
            action_values=torch.tensor([[-1.0], [0.0], [1.0]]),
            generator=torch.Generator().manual_seed(0),
        )
        res = MCTS(simulations=64, rollout_depth=10, leaves_per_wave=k).search(
            problem, torch.tensor([3.0])
        )
        return res, list(calls)

    alone, one = search(1)
    assert len(one) == 10 + 11 * 64 and set(one) == {1}  # the root's rollout, 64 simulations
    res, waves = search(8)
    # waves of 3 (the root's actions), then 8 (7 times), then the last 5
    assert len(waves) == 10 + 11 * 9 and max(waves) == 8
    assert res.collisions == 0
    tree = res.tree
    assert float(res.visit_counts.sum()) == 64
    linked = (tree.parents >= 0) | (torch.arange(tree.visits.shape[1]) == 0)
    edge_total = tree.edge_visits.sum(dim=2)
    assert torch.equal(tree.visits[linked], 1.0 + edge_total[linked])
    # the most-visited first action is the sequential search's (toward 0)
    assert res.actions[0, 0].item() == alone.actions[0, 0].item() == -1.0


@pytest.mark.parametrize("rule", ["uct", "puct"])
def test_waves_on_a_batch_of_roots_equal_each_root_alone(rule):
    fx = json.loads(FIXTURE.read_text())["table"]
    args = [torch.tensor(fx[k]) for k in ("next_state", "reward")]
    val, logits = torch.tensor(fx["value"]), torch.tensor(fx["prior_logits"])
    roots = [0, 2, 5, 3]
    planner = MCTS(simulations=40, rule=rule, leaves_per_wave=4)
    x0 = torch.tensor(roots, dtype=torch.float32)[:, None]
    batch = planner.search(table_problem(*args, 4, 0.9, val, logits), x0)
    for i, r in enumerate(roots):
        alone = planner.search(table_problem(*args, 4, 0.9, val, logits), torch.tensor([float(r)]))
        assert torch.equal(batch.visit_counts[i], alone.visit_counts[0])
        assert torch.equal(batch.tree.children[i], alone.tree.children[0])
        assert max_diff(batch.tree.values[i], alone.tree.values[0]) <= 1e-6


def test_repeat_rollouts_hold_the_action_into_the_leaf():
    """Line world x' = x + u, reward -|x' - 5|, 3-step rollouts: a child reached by u from 0
    holds u (x = 2u, 3u, 4u); the root's own rollout is random."""
    problem = PlanningProblem(
        KnownModel(lambda x, u: x + u, 1, 1),
        lambda obs, act, nxt: -(nxt[:, 0] - 5.0).abs(),
        None,
        4,
        -torch.ones(1),
        torch.ones(1),
        action_values=torch.tensor([[-1.0], [0.0], [1.0]]),
        generator=torch.Generator().manual_seed(0),
    )
    for k in (1, 3):
        planner = MCTS(simulations=3, rollout_depth=3, rollout_policy="repeat", leaves_per_wave=k)
        tree = planner.search(problem, torch.zeros(1)).tree
        u = tree.states.obs[1:4, 0]  # the root's three children: x = u
        expected = -sum((j * u - 5).abs() for j in (2, 3, 4))
        assert torch.equal(tree.raw_values[0, 1:4], expected)
    with pytest.raises(ValueError, match="rollout_policy must be one of"):
        MCTS(rollout_policy="greedy")


def test_a_wave_of_one_is_the_sequential_search_pinned():
    """Golden numbers of the sequential search (recorded before waves existed) on the line
    world with random rollouts: the generator's draws, the tree and the plan are unchanged with
    leaves_per_wave=1."""
    problem = PlanningProblem(
        KnownModel(lambda x, u: x + u, 1, 1),
        lambda obs, act, nxt: -(nxt[:, 0] - 5.0).abs(),
        None,
        6,
        -torch.ones(1),
        torch.ones(1),
        action_values=torch.tensor([[-1.0], [0.0], [1.0]]),
        generator=torch.Generator().manual_seed(0),
    )
    planner = MCTS(simulations=48, exploration=1.0, rollout_depth=4, leaves_per_wave=1)
    res = planner.search(problem, torch.zeros(1))
    tree = res.tree
    assert res.visit_counts[0].tolist() == [3.0, 6.0, 39.0]
    assert tree.parents[0].tolist() == [
        -1, 0, 0, 0, 2, 3, 3, 3, 5, 2, 2, 9, 6, 7, 1, 7, 7, 16, 15, 16, 15, 6, 16, 22, 22,
        22, 17, 13, 15, 6, 18, 29, 10, 19, 24, 25, 23, 25, 24, 1, 24, -1, -1, 19, 19, 43, 25,
        -1, 5,
    ]  # fmt: skip
    linked = tree.parents[0] >= 0
    linked[0] = True
    assert float(tree.raw_values[0][linked].sum()) == -672.0  # integer rewards: exact
    assert res.actions[0, :, 0].tolist() == [1.0, 1.0, 1.0, 1.0, 0.0, 0.0]
