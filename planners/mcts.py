"""Monte-Carlo tree search on any model: UCT and PUCT over discrete, sampled or progressively
widened actions, batched over roots.

The search is the MuZero form of MCTS (Schrittwieser et al. 2020, "Mastering Atari, Go, Chess
and Shogi by Planning with a Learned Model", Appendix B) on the planning step
(:meth:`~mbrl.planners.base.PlanningProblem.step`): every simulation descends from the root by
the selection rule until it picks an action that has no child yet, expands that one child with
one model step, evaluates the new leaf and backs the discounted return up the path. The tree
lives in tensors for ``B`` roots; every simulation descends for all roots at once (a loop over
depth), calls ``problem.step`` once for all ``B`` leaves (``B * P`` rows) and backs the
returns up the whole path at once (a discounted sum along the path: one product with a
triangular matrix of powers of ``gamma``). Python loops run over simulations and depth only.

Node statistics follow mctx (``mctx._src.search``, read for the conventions): node ``i`` is
created by simulation ``i`` (the root is node 0; a simulation that expands nothing leaves its
slot free); a new node counts one visit whose value is its
leaf value ``v`` (the root's is its own leaf value), its value is the mean of every return backed
up through it, and the value of action ``a`` at node ``s`` is ``Q(s, a) = mean of
(r + gamma * G)`` over the simulations that took it (``r`` the step's reward, ``G`` the return
from the child). ``N(s)`` counts the node's own first visit plus every visit of its actions.

Selection (``argmax`` over the allowed, unpruned actions of a node; ties go to the lowest
index, where mctx adds ``1e-7`` uniform noise):

- ``rule="uct"`` (Kocsis & Szepesvari 2006): ``Q'(s, a) + c * sqrt(ln N(s) / N(s, a))``;
  actions never tried are taken first, in index order.
- ``rule="puct"`` (MuZero, Appendix B, with mctx's ``muzero_action_selection``):
  ``Q'(s, a) + P(s, a) * sqrt(N(s)) / (1 + N(s, a)) * (c1 + log((N(s) + c2 + 1) / c2))``
  with ``c1 = exploration`` (1.25) and the ``c2`` term kept (``puct_base = 19652``; pass
  ``math.inf`` to drop it); ``Q'`` of an action never tried is 0 (the normalized minimum).

``Q'`` is ``Q`` min-max normalized when ``normalize_values`` (mctx's
``qtransform_by_parent_and_siblings``: over the node's own value and the ``Q`` of its tried
actions, denominator at least ``1e-8``, untried actions at the minimum), else ``Q`` itself
(untried: 0, as MuZero's pseudocode).

Actions (``A`` slots per node):

- ``"discrete"``: the ``A`` rows of ``problem.action_values [A, U]`` (a discrete problem, e.g.
  :func:`mbrl.envs.discretize`). PUCT's prior is ``problem.prior`` (a distribution over ``[R]``
  indices, averaged over a node's particles) or uniform.
- ``"sampled"``: ``A = num_sampled`` actions drawn per node from ``problem.prior`` (a
  distribution over ``[R, U]``; one particle's draw per slot, cycling over particles) or
  uniformly within the bounds, clipped to the bounds; PUCT's prior over them is uniform,
  ``1 / K`` (Sampled MuZero, Hubert et al. 2021, Sec. 4, with the proposal equal to the prior,
  whose weights ``beta_hat / beta * pi`` reduce to the empirical ``1 / K``).
- ``"widening"``: the same ``K`` draws, of which only the first ``ceil(widening_k *
  N(s)^widening_alpha)`` are allowed (progressive widening, Coulom 2007; Couetoux et al. 2011).
  With ``double_widening`` every action also keeps up to ``K`` sampled next states: a new one
  is drawn from the model while ``ceil(widening_k * N(s, a)^widening_alpha)`` exceeds those it
  has, else the descent follows the least-visited of them (so visits follow the empirical
  distribution of the drawn states).

Leaf value: ``problem.value_fn`` of the leaf; else the discounted return of ``rollout_depth``
steps of a default policy through ``problem.step`` (cut short once every particle has
terminated); else 0. The default policy (``rollout_policy``) is uniformly random actions, or
``"repeat"``: the action into the leaf, held for the whole rollout (the root's own rollout is
random). A terminated node (every particle dead) is a leaf that is never expanded; its value
is 0 and revisiting it backs up 0.
A node at ``max_depth`` is never expanded either; revisiting it backs up its leaf value again.

Waves (``leaves_per_wave = K > 1``): ``K`` descents are made one after another before any of
their leaves is evaluated, then one model step expands all ``K * B`` leaves, their leaf values
(and rollouts) run as one batch, and all ``K`` returns are backed up; a wave never holds more
descents than a tree of its nodes has actions without a child, ``(A - 1) * nodes + 1``. Between
the descents of a wave the paths are pending, as virtual loss in tree-parallel MCTS (Chaslot
et al. 2008, "Parallel Monte-Carlo Tree Search"), in the form of WU-UCT (Liu et al. 2020,
"Watch the Unobserved"): every pending descent counts one more visit of each node and edge it
passed, at the current mean (``Q`` unchanged, ``N`` larger), and takes ``virtual_loss * n_p /
(N(s, a) + n_p)`` off the edge's ``Q'`` (``n_p`` pending descents through it; ``Q'`` is in
``[0, 1]`` when ``normalize_values``). The edge a descent will expand is blocked for the rest
of the wave; a descent that reaches a node whose every action is blocked blocks the edge into
it (and into each ancestor blocked everywhere then) and descends again, and one whose root is
blocked everywhere is a collision: it backs up nothing (:attr:`SearchResult.collisions`). With
``K = 1`` the search is the sequential one above.

Particles: each node holds the ``P`` particle rows of its state (start-major); a step's reward
is the mean over particles with the rewards of particles that terminated earlier counted 0, and
a leaf value is the particle mean the same way, as in
:meth:`~mbrl.planners.base.PlanningProblem.evaluate`.

Non-finite steps: an action whose step (or leaf value) is NaN or inf for a particle still alive
is pruned: it scores minus infinity at that node from then on, its simulation backs up nothing,
and it is counted in :attr:`SearchResult.nonfinite` (and the problem's ``nonfinite``). A node
whose every action is pruned is itself pruned when a simulation next reaches it. NaN never looks
good.

Randomness (prior draws, Dirichlet noise, rollouts and the model's own sampling) comes from
``problem.generator`` only: same generator state, same tree. A ``torch.distributions`` prior or
Dirichlet draw (which take no generator) is drawn under torch's global generator seeded from
``problem.generator`` and restored afterwards.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Literal

import torch

from mbrl.dynamics.base import Belief, RolloutState
from mbrl.planners.base import Plan, PlanningProblem, WarmStart
from mbrl.planners.noise import uniform_noise
from mbrl.shapes import ShapeError

Rule = Literal["uct", "puct"]
ActionMode = Literal["discrete", "widening", "sampled"]
RolloutPolicy = Literal["random", "repeat"]

_RULES = ("uct", "puct")
_ACTION_MODES = ("discrete", "widening", "sampled")
_ROLLOUT_POLICIES = ("random", "repeat")
_NORM_EPS = 1e-8  # the smallest min-max denominator (mctx's epsilon)
_BLOCKED = 1e30  # the penalty of an edge claimed in the current wave
_CARRY_PREFIX = "mcts."


@dataclass(frozen=True)
class Tree:
    """The search tree of ``B`` roots in tensors: ``M`` node slots, ``A`` action slots per node,
    ``W`` sampled next states per action (1 without double widening), ``P`` particles.

    Node 0 is the root; a slot other than the root whose parent is -1 is free (slots
    ``[used, M)``, and those of simulations that expanded nothing). ``children[b, i, a, w] =
    -1`` where action ``a`` of node ``i`` has no ``w``-th child. Edge statistics are per
    action: ``Q(i, a) = edge_sums / edge_visits``.
    """

    visits: torch.Tensor  # [B, M] float32 N(s): the node's first visit + its actions' visits
    value_sums: torch.Tensor  # [B, M] sum of the returns backed up through the node
    raw_values: torch.Tensor  # [B, M] leaf value of the node when it was created
    rewards: torch.Tensor  # [B, M] particle-mean reward of the step into the node
    terminal: torch.Tensor  # [B, M] bool: every particle terminated
    parents: torch.Tensor  # [B, M] long, -1 for the root (and free slots)
    actions_from_parent: torch.Tensor  # [B, M] long action slot that led here
    depths: torch.Tensor  # [B, M] long edges from the root
    children: torch.Tensor  # [B, M, A, W] long node index or -1
    edge_visits: torch.Tensor  # [B, M, A] float32 N(s, a)
    edge_sums: torch.Tensor  # [B, M, A] sum of r + gamma * G over N(s, a)
    pruned: torch.Tensor  # [B, M, A] bool: a step or value went non-finite
    priors: torch.Tensor  # [B, M, A] PUCT prior P(s, a) (uniform when there is none)
    node_actions: torch.Tensor | None  # [B, M, A, U] sampled actions (None: action_values)
    alive: torch.Tensor  # [B, M, P] bool per particle
    states: RolloutState  # [B * M * P] rows: particle p of node i of root b at (b*M + i)*P + p
    used: int  # node slots in use

    @property
    def values(self) -> torch.Tensor:
        """``[B, M]`` node values (mean backed-up return; 0 for free slots)."""
        return self.value_sums / self.visits.clamp(min=1.0)

    @property
    def q_values(self) -> torch.Tensor:
        """``[B, M, A]`` ``Q(s, a)``: NaN for actions never tried, minus infinity if pruned."""
        q = self.edge_sums / self.edge_visits.clamp(min=1.0)
        q = torch.where(self.edge_visits > 0, q, float("nan"))
        return q.masked_fill(self.pruned, float("-inf"))


@dataclass(frozen=True)
class SearchResult:
    """What :meth:`MCTS.search` returns for ``B`` roots."""

    visit_counts: torch.Tensor  # [B, A] root action visits N(root, a)
    q_values: torch.Tensor  # [B, A] root Q (NaN never tried, -inf pruned)
    root_values: torch.Tensor  # [B] root value (mean backed-up return, the root's own first)
    root_actions: torch.Tensor  # [B, A, U] action vector of each root action slot
    actions: torch.Tensor  # [B, H, U] most-visited path, padded with its last action
    path_length: torch.Tensor  # [B] long actions on the most-visited path before padding
    tree: Tree
    nonfinite: int  # actions pruned because a step or value went non-finite
    simulations: int  # S simulations run
    collisions: int = 0  # descents of a wave whose root was blocked everywhere (nothing backed)

    @property
    def action_weights(self) -> torch.Tensor:
        """``[B, A]`` root visit counts normalized to sum to one (mctx's ``action_weights``;
        uniform for a root no simulation could back up through)."""
        total = self.visit_counts.sum(dim=-1, keepdim=True)
        a = self.visit_counts.shape[-1]
        return torch.where(total > 0, self.visit_counts / total.clamp(min=1.0), 1.0 / a)


class MCTS:
    """Monte-Carlo tree search planner (see the module docstring for the rules).

    Args:
        simulations: ``S >= 1`` simulations per plan (one node expanded per root each).
        rule: ``"uct"`` or ``"puct"``.
        exploration: ``c`` of UCT, ``c1`` of PUCT (>= 0).
        max_depth: deepest node (edges from the root); default ``problem.horizon``.
        actions: ``"discrete"`` (``problem.action_values``), ``"sampled"`` or ``"widening"``.
        num_sampled: ``K`` actions per node for ``"sampled"`` / ``"widening"``, and the most
            next states per action with ``double_widening``.
        widening_k, widening_alpha: ``ceil(k * N^alpha)`` children allowed (``k > 0``,
            ``alpha`` in ``(0, 1]``).
        double_widening: also widen over sampled next states (``"widening"`` only).
        dirichlet_alpha: root prior noise ``Dir(alpha)`` (PUCT only); ``None`` for none.
        dirichlet_fraction: weight of the noise in ``[0, 1]``.
        rollout_depth: default-policy steps for the leaf value when ``problem.value_fn`` is
            ``None`` (0: leaf value 0).
        rollout_policy: ``"random"`` (uniformly random actions) or ``"repeat"`` (the action
            into the leaf, held).
        normalize_values: min-max normalize ``Q`` over parent and siblings (MuZero / mctx).
        reuse_tree: keep the tree in ``Plan.warm`` and continue from the subtree whose root
            state equals the next ``x0`` (deterministic models; a fresh tree otherwise).
        puct_base: ``c2`` of PUCT (``math.inf`` drops the term).
        leaves_per_wave: ``K >= 1`` descents per wave that share one model step and one
            leaf evaluation (1: one leaf per model call, the plain sequential search).
        virtual_loss: with ``K > 1``, what a pending descent takes off the ``Q'`` of each
            edge it passed (>= 0; see the module docstring).

    Raises:
        ValueError: an argument out of range, naming it and its value.
    """

    def __init__(
        self,
        simulations: int = 64,
        rule: Rule = "uct",
        exploration: float = 1.25,
        max_depth: int | None = None,
        actions: ActionMode = "discrete",
        num_sampled: int = 8,
        widening_k: float = 1.0,
        widening_alpha: float = 0.5,
        double_widening: bool = False,
        dirichlet_alpha: float | None = None,
        dirichlet_fraction: float = 0.25,
        rollout_depth: int = 0,
        rollout_policy: RolloutPolicy = "random",
        normalize_values: bool = True,
        reuse_tree: bool = False,
        puct_base: float = 19652.0,
        leaves_per_wave: int = 1,
        virtual_loss: float = 1.0,
    ) -> None:
        _check_int("simulations", simulations, 1)
        if rule not in _RULES:
            raise ValueError(f"rule must be one of {list(_RULES)}, got {rule!r}")
        _check_float("exploration", exploration, low=0.0)
        if max_depth is not None:
            _check_int("max_depth", max_depth, 1)
        if actions not in _ACTION_MODES:
            raise ValueError(f"actions must be one of {list(_ACTION_MODES)}, got {actions!r}")
        _check_int("num_sampled", num_sampled, 1)
        _check_float("widening_k", widening_k, low=0.0, open_low=True)
        _check_float("widening_alpha", widening_alpha, low=0.0, high=1.0, open_low=True)
        if double_widening and actions != "widening":
            raise ValueError(
                f"double_widening=True needs actions='widening', got actions={actions!r}"
            )
        if dirichlet_alpha is not None:
            _check_float("dirichlet_alpha", dirichlet_alpha, low=0.0, open_low=True)
            if rule != "puct":
                raise ValueError(
                    f"dirichlet_alpha={dirichlet_alpha!r} perturbs the PUCT prior, but "
                    f"rule={rule!r}; set rule='puct' or dirichlet_alpha=None"
                )
        _check_float("dirichlet_fraction", dirichlet_fraction, low=0.0, high=1.0)
        _check_int("rollout_depth", rollout_depth, 0)
        if rollout_policy not in _ROLLOUT_POLICIES:
            raise ValueError(
                f"rollout_policy must be one of {list(_ROLLOUT_POLICIES)}, got {rollout_policy!r}"
            )
        _check_float("puct_base", puct_base, low=0.0, open_low=True, finite=False)
        _check_int("leaves_per_wave", leaves_per_wave, 1)
        _check_float("virtual_loss", virtual_loss, low=0.0)
        self.simulations = simulations
        self.rule = rule
        self.exploration = float(exploration)
        self.max_depth = max_depth
        self.actions = actions
        self.num_sampled = num_sampled
        self.widening_k = float(widening_k)
        self.widening_alpha = float(widening_alpha)
        self.double_widening = bool(double_widening)
        self.dirichlet_alpha = None if dirichlet_alpha is None else float(dirichlet_alpha)
        self.dirichlet_fraction = float(dirichlet_fraction)
        self.rollout_depth = rollout_depth
        self.rollout_policy = rollout_policy
        self.normalize_values = bool(normalize_values)
        self.reuse_tree = bool(reuse_tree)
        self.puct_base = float(puct_base)
        self.leaves_per_wave = leaves_per_wave
        self.virtual_loss = float(virtual_loss)

    # ------------------------------------------------------------------ planner

    @torch.inference_mode()
    def plan(
        self, problem: PlanningProblem, x0: torch.Tensor | Belief, warm: WarmStart | None = None
    ) -> Plan:
        """Search from one start ``x0 [X]`` (or a one-row belief) and return the most-visited
        path ``[H, U]``.

        ``expected_return`` is the root value; ``extras`` holds the root's ``visit_counts
        [A]``, ``q_values [A]`` (NaN never tried, minus infinity pruned) and ``root_actions
        [A, U]``. ``status`` is ``"all_nonfinite"`` when every root action was pruned. With
        ``reuse_tree`` the tree travels in ``Plan.warm.carry``; ``warm.actions`` are not read.
        """
        if torch.is_tensor(x0) and x0.ndim == 2 and x0.shape[0] != 1:
            raise ShapeError(
                f"x0: MCTS.plan plans from one start [X], got {list(x0.shape)}; search "
                "several roots at once with MCTS.search(problem, x0 [B, X])"
            )
        if isinstance(x0, Belief) and x0.batch != 1:
            raise ShapeError(
                f"x0: MCTS.plan plans from a one-row belief, got {x0.batch} rows; search "
                "several roots at once with MCTS.search"
            )
        previous = None
        if self.reuse_tree and warm is not None:
            previous = _tree_from_carry(warm.carry)
        before = problem.nonfinite
        res = self.search(problem, x0, previous=previous)
        nonfinite = problem.nonfinite - before
        all_pruned = bool(res.tree.pruned[0, 0].all())
        carry_warm = None
        if self.reuse_tree:
            carry_warm = WarmStart(res.actions[0].clone(), carry=_tree_to_carry(res.tree))
        return Plan(
            res.actions[0].clone(),
            float(res.root_values[0]),
            status="all_nonfinite" if all_pruned else "ok",
            iterations=self.simulations,
            nonfinite=nonfinite,
            diagnostics={
                "nodes": float(res.tree.used),
                "path_length": float(res.path_length[0]),
                "max_depth": float(res.tree.depths[0, : res.tree.used].max()),
                "collisions": float(res.collisions),
            },
            extras={
                "visit_counts": res.visit_counts[0].clone(),
                "q_values": res.q_values[0].clone(),
                "root_actions": res.root_actions[0].clone(),
            },
            warm=carry_warm,
        )

    # ------------------------------------------------------------------ the search

    @torch.inference_mode()
    def search(
        self,
        problem: PlanningProblem,
        x0: torch.Tensor | Belief | RolloutState,
        previous: Tree | None = None,
    ) -> SearchResult:
        """Run ``S`` simulations from ``B`` roots at once: ``x0 [X]``, ``[B, X]``, a belief of
        ``B`` rows, or the started :class:`RolloutState` of ``B * P`` rows.

        ``previous`` (one root) is a finished tree to continue from when one of its nodes holds
        exactly the state ``x0`` (``reuse_tree``); otherwise the search starts afresh.

        Raises:
            ValueError: the action mode does not fit the problem (a continuous box with
                ``actions="discrete"``; a discrete problem with sampled actions).
            ShapeError: ``problem.prior`` returns a distribution of the wrong shape, or
                ``problem.value_fn`` values of the wrong shape.
        """
        self._check_problem(problem)
        root = problem.start(x0)
        p = problem.particles
        b = root.obs.shape[0] // p
        tree = None
        if previous is not None and b == 1:
            tree = _reroot(previous, root, self.simulations, self.actions != "discrete")
        s = _Search(self, problem, b, p, root.obs.device)
        if tree is not None and tuple(tree.children.shape[2:]) != (s.a, s.w):
            tree = None  # made under other settings
        if tree is None:
            tree = s.new_tree(root)
        return s.run(tree)

    def _check_problem(self, problem: PlanningProblem) -> None:
        if self.actions == "discrete" and not problem.discrete:
            raise ValueError(
                "MCTS on a continuous box needs actions='widening' or 'sampled', or a "
                "discretized problem (mbrl.envs.discretize); got actions='discrete' and "
                "problem.action_values=None"
            )
        if self.actions != "discrete" and problem.discrete:
            raise ValueError(
                f"actions={self.actions!r} samples action vectors from a box, but the problem "
                f"is discrete (A={problem.action_values.shape[0]}); use actions='discrete'"
            )


@dataclass
class _Selection:
    """What a descent reads, per flat node index ``[B * M]``: the action the selection rule
    picks now, the node it leads to (flat; the root's sink when that child does not exist yet
    or may not be passed through) and whether a descent may pass through the node; and per
    flat edge ``[B * M * A]`` (one next state per action) the node a descent passes to through
    it (the root's sink where there is none)."""

    best: torch.Tensor  # [B * M] long
    next: torch.Tensor  # [B * M] long
    open: torch.Tensor  # [B * M] bool
    through: torch.Tensor | None  # [B * M * A] long; None with double widening


@dataclass(frozen=True)
class _Flat:
    """Flat views of one tree's tensors (the same storage), made once per search: node fields
    ``[B * M]`` (``alive [B * M, P]``), edge fields ``[B * M * A]``, the same per node ``[B * M,
    A]`` (``node_*``) and the child slots ``[B * M * A * W]``."""

    visits: torch.Tensor
    value_sums: torch.Tensor
    raw_values: torch.Tensor
    rewards: torch.Tensor
    terminal: torch.Tensor
    parents: torch.Tensor
    actions_from_parent: torch.Tensor
    depths: torch.Tensor
    alive: torch.Tensor
    edge_visits: torch.Tensor
    edge_sums: torch.Tensor
    pruned: torch.Tensor
    node_edge_visits: torch.Tensor
    node_edge_sums: torch.Tensor
    node_pruned: torch.Tensor
    node_priors: torch.Tensor
    children: torch.Tensor


def _flat(tree: Tree) -> _Flat:
    a, p = tree.priors.shape[2], tree.alive.shape[2]
    nodes = ("visits", "value_sums", "raw_values", "rewards", "terminal", "parents")
    nodes += ("actions_from_parent", "depths")
    return _Flat(
        **{f: getattr(tree, f).view(-1) for f in nodes},
        alive=tree.alive.view(-1, p),
        edge_visits=tree.edge_visits.view(-1),
        edge_sums=tree.edge_sums.view(-1),
        pruned=tree.pruned.view(-1),
        node_edge_visits=tree.edge_visits.view(-1, a),
        node_edge_sums=tree.edge_sums.view(-1, a),
        node_pruned=tree.pruned.view(-1, a),
        node_priors=tree.priors.view(-1, a),
        children=tree.children.view(-1),
    )


@dataclass(frozen=True)
class _Descent:
    """One descent per root: flat node indices, ``[B]`` each (``[K * B]`` for a wave of
    ``K``, descent-major)."""

    path: torch.Tensor  # [B, L] P_0 .. P_level, then the sink
    level: torch.Tensor  # [B] long depth of the last node P_level
    node: torch.Tensor  # [B] P_level
    choice: torch.Tensor  # [B] the action slot it takes
    edge: torch.Tensor  # [B] flat edge (P_level, choice)
    slot: torch.Tensor  # [B] flat child slot of that edge a new child goes to
    child: torch.Tensor  # [B] local index of the child it leads to, -1 for none yet
    dead: torch.Tensor  # [B] bool: every action of P_level is pruned
    new: torch.Tensor  # [B] flat node slot a new child is written to


_DESCENT = ("level", "node", "choice", "edge", "slot", "child", "dead", "new")


def _merge(old: _Descent, new: _Descent, take: torch.Tensor, sinks: torch.Tensor) -> _Descent:
    """``new``'s rows where ``take [B]``, else ``old``'s (paths padded with ``sinks [B]``)."""
    steps = max(old.path.shape[1], new.path.shape[1])

    def pad(path: torch.Tensor) -> torch.Tensor:
        return torch.cat([path, sinks[:, None].expand(-1, steps - path.shape[1])], dim=1)

    path = torch.where(take[:, None], pad(new.path), pad(old.path))
    fields = {f: torch.where(take, getattr(new, f), getattr(old, f)) for f in _DESCENT}
    return _Descent(path, **fields)


class _Search:
    """One search: the settings resolved against a problem, the loops over simulations and
    depth.

    Internally the tree has one more node slot per root, the sink (slot ``M``): a closed node
    without children where a finished descent waits for the others. The action every node
    would select and the child it leads to are kept (:class:`_Selection`) and recomputed only
    for the nodes whose statistics change (the backup path), so that a step down the tree is
    one gather for all roots.
    """

    def __init__(self, cfg: MCTS, problem: PlanningProblem, b: int, p: int, device) -> None:
        self.cfg = cfg
        self.repeat = cfg.rollout_policy == "repeat"
        self.problem = problem
        self.b, self.p, self.device = b, p, device
        self.discrete = cfg.actions == "discrete"
        self.a = _num_actions(cfg, problem)
        self.w = cfg.num_sampled if cfg.double_widening else 1
        self.depth = cfg.max_depth if cfg.max_depth is not None else problem.horizon
        self.gamma = problem.discount
        self.widening = cfg.actions == "widening"
        self.uct = cfg.rule == "uct"
        self.use_prior = cfg.rule == "puct" and self.discrete and problem.prior is not None
        self.pruning = False  # whether any action of the tree is pruned
        self.none_dead = torch.zeros(b, dtype=torch.bool, device=device)  # [B] all False
        self.waves = cfg.leaves_per_wave > 1
        self.touched: list[torch.Tensor] | None = None  # nodes refreshed in the current wave
        self.slots = torch.arange(self.a, device=device)  # [A]
        self.particle_idx = torch.arange(p, device=device)  # [P]
        self.bidx = torch.arange(b, device=device)  # [B]
        if self.discrete:
            self.action_values = problem.action_values.to(device)  # [A, U]
        # discount weights of the backup: T[j, d] = gamma^(j - d) for j >= d
        n = self.depth + 1
        k = torch.arange(n, dtype=torch.float64)
        power = k[:, None] - k[None, :]  # [j, d]
        returns = torch.where(power >= 0, self.gamma ** power.clamp(min=0), 0.0)
        self.returns = returns.float().to(device)  # [D + 1, D + 1]
        self.positions = torch.arange(n, device=device)  # [D + 1]
        self.zero_col = torch.zeros(b * cfg.leaves_per_wave, 1, device=device)

    # ---------------------------------------------------------------- set-up

    def new_tree(self, root: RolloutState) -> Tree:
        """A tree of ``S + 1`` nodes (and the sink) holding the root."""
        b, dev = self.b, self.device
        m = self.cfg.simulations + 1
        tree = _empty_tree(
            root, b, m + 1, self.a, self.w, self.p, self.problem.act_dim, not self.discrete, dev
        )
        self.f = _flat(tree)
        alive = torch.ones(b, self.p, dtype=torch.bool, device=dev)
        value, bad = self.leaf_value(root, alive)
        if bool(bad.any()):
            self.problem.nonfinite += int(bad.sum())
        zeros = torch.zeros(b, dtype=torch.long, device=dev)
        none = torch.full((b,), -1, dtype=torch.long, device=dev)
        reward = torch.zeros(b, dtype=torch.float32, device=dev)
        self.write_node(tree, self.bidx * (m + 1), root, alive, value, reward, none, zeros, zeros)
        tree.visits[:, 0] = 1.0
        tree.value_sums[:, 0] = value
        return tree

    def write_node(
        self,
        tree: Tree,
        flat: torch.Tensor,
        state: RolloutState,
        alive: torch.Tensor,
        value: torch.Tensor,
        reward: torch.Tensor,
        parent: torch.Tensor,
        action: torch.Tensor,
        depth: torch.Tensor,
    ) -> torch.Tensor:
        """Write the nodes of flat indices ``flat [R]`` (free slots): their state rows, leaf
        value, parent (local index, -1 for none), action from the parent, depth, prior and
        sampled actions, and return ``[R]`` whether each is terminal. Statistics start at zero
        (the backup counts the first visit)."""
        p = self.p
        rows = flat if p == 1 else ((flat * p)[:, None] + self.particle_idx).reshape(-1)
        for name in _STATE_FIELDS:
            src = getattr(state, name)
            dst = getattr(tree.states, name)
            if dst is not None and src is not None:
                dst.index_copy_(0, rows, src if src.dtype == dst.dtype else src.to(dst.dtype))
        terminal = ~alive.any(dim=1)
        f = self.f
        f.alive.index_copy_(0, flat, alive)
        f.raw_values.index_copy_(0, flat, value)
        f.rewards.index_copy_(0, flat, reward)
        f.terminal.index_copy_(0, flat, terminal)
        f.parents.index_copy_(0, flat, parent)
        f.actions_from_parent.index_copy_(0, flat, action)
        f.depths.index_copy_(0, flat, depth)
        if self.use_prior:
            f.node_priors.index_copy_(0, flat, self.prior_probs(state))
        if tree.node_actions is not None:
            u = tree.node_actions.shape[-1]
            actions = self.sample_actions(state)  # [R, A, U]
            tree.node_actions.view(-1, self.a, u).index_copy_(0, flat, actions)
        return terminal

    # ---------------------------------------------------------------- model calls

    def leaf_value(
        self, state: RolloutState, alive: torch.Tensor, action: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Particle-mean leaf value ``[R]`` of ``state`` (``R * P`` rows: ``R`` nodes) with
        ``alive [R, P]``, and ``[R]`` whether a live particle's value went non-finite;
        ``action [R * P, U]`` is the action into each row, which ``rollout_policy="repeat"``
        holds (``None``: random, the root's)."""
        problem, p = self.problem, self.p
        b = alive.shape[0]
        if problem.value_fn is not None:
            value = problem.value_fn(state)
            if tuple(value.shape) != (b * p,):
                raise ShapeError(
                    f"problem.value_fn: expected values [R={b * p}] (one per particle row), "
                    f"got {list(value.shape)}"
                )
            value = (value if value.dtype == torch.float32 else value.float()).view(b, p)
            ok = torch.isfinite(value)
            bad = (alive & ~ok).any(dim=1)
            return _particle_mean(torch.where(alive & ok, value, 0.0)), bad
        total = torch.zeros(b, p, dtype=torch.float32, device=self.device)
        bad = torch.zeros(b, dtype=torch.bool, device=self.device)
        live = alive.clone()
        held = action if self.repeat else None
        for t in range(self.cfg.rollout_depth):
            act = self.random_actions(b * p) if held is None else held
            step = problem.step(state, act)
            finite = step.finite.view(b, p)
            bad |= (live & ~finite).any(dim=1)
            total += torch.where(live & finite, step.reward.view(b, p), 0.0) * self.gamma**t
            live &= step.alive.view(b, p)
            state = step.state
            if t + 1 < self.cfg.rollout_depth and not bool(live.any()):
                break  # every rollout ended: the remaining steps add 0
        return _particle_mean(total), bad

    def random_actions(self, rows: int) -> torch.Tensor:
        """``[rows, U]`` uniformly random actions: an index of ``action_values`` (discrete) or
        a point of the box."""
        problem = self.problem
        if self.discrete:
            u = uniform_noise((rows,), problem.generator, self.device)
            idx = (u * self.a).long().clamp(max=self.a - 1)
            return self.action_values[idx]
        low, high = problem.action_low.to(self.device), problem.action_high.to(self.device)
        return low + (high - low) * uniform_noise(
            (rows, problem.act_dim), problem.generator, self.device
        )

    def prior_probs(self, state: RolloutState) -> torch.Tensor:
        """``[R, A]`` prior probabilities of the ``A`` discrete actions (particle mean) of the
        ``R`` nodes of ``state`` (``R * P`` rows)."""
        problem, p, a = self.problem, self.p, self.a
        b = state.obs.shape[0] // p
        r = b * p
        dist = problem.prior(state)
        batch = tuple(getattr(dist, "batch_shape", ()))
        event = tuple(getattr(dist, "event_shape", ()))
        if not isinstance(dist, torch.distributions.Distribution) or batch != (r,) or event:
            raise ShapeError(
                f"problem.prior: a discrete problem needs a distribution over [R={r}] action "
                f"indices in [0, {a}) (batch_shape [{r}], event_shape []), got "
                f"{type(dist).__name__} with batch_shape {list(batch)}, event_shape "
                f"{list(event)}; e.g. torch.distributions.Categorical(logits=[R, A])"
            )
        if isinstance(dist, torch.distributions.Categorical) and dist.probs.shape[-1] == a:
            probs = dist.probs.float()  # [R, A]
        else:
            idx = self.slots[:, None].expand(a, r)  # [A, R]
            probs = dist.log_prob(idx).exp().T.float()  # [R, A]
        probs = torch.nan_to_num(probs, nan=0.0, posinf=0.0, neginf=0.0)
        if p > 1:
            probs = probs.view(b, p, a).mean(dim=1)
        total = probs.sum(dim=1, keepdim=True)
        return torch.where(total > 0, probs / total.clamp(min=1e-30), 1.0 / a)

    def sample_actions(self, state: RolloutState) -> torch.Tensor:
        """``[R, K, U]`` actions per node of the ``R`` nodes of ``state`` (``R * P`` rows):
        ``K`` draws of ``problem.prior`` (slot ``k`` from particle ``k mod P``) or uniform in
        the box, clipped to the bounds."""
        problem, p, k = self.problem, self.p, self.a
        b = state.obs.shape[0] // p
        u = problem.act_dim
        low, high = problem.action_low.to(self.device), problem.action_high.to(self.device)
        if problem.prior is None:
            return low + (high - low) * uniform_noise((b, k, u), problem.generator, self.device)
        dist = problem.prior(state)
        r = b * p
        with _forked_rng(problem.generator, self.device):
            draws = dist.sample((k,))
        if tuple(draws.shape) != (k, r, u):
            raise ShapeError(
                f"problem.prior: sampled actions need a distribution over [R={r}, U={u}] "
                f"action vectors; {k} draws gave {list(draws.shape)}, expected [{k}, {r}, {u}]"
            )
        draws = draws.to(torch.float32).view(k, b, p, u)
        pick = draws[self.slots, :, self.slots % p]  # [K, B, U]
        return torch.minimum(torch.maximum(pick.transpose(0, 1), low), high)

    # ---------------------------------------------------------------- selection scores

    def scores(
        self,
        n: torch.Tensor,
        vsum: torch.Tensor,
        ev: torch.Tensor,
        es: torch.Tensor,
        pruned: torch.Tensor | None,
        prior: torch.Tensor | None,
        penalty: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Selection scores ``[R, A]`` of nodes with visits ``n [R]``, value sums ``vsum [R]``
        and action statistics ``ev, es, pruned, prior [R, A]`` (minus infinity: not allowed;
        ``pruned`` is read with pruning or widening, ``prior`` by PUCT, else they may be
        ``None``); ``penalty [R, A]`` (virtual loss) is taken off ``Q'``."""
        cfg = self.cfg
        tried = ev > 0
        q = es / ev.clamp(min=1.0)
        masked = self.widening or self.pruning  # else every action is allowed
        if masked:
            valid = ~pruned
            if self.widening:
                # pruned slots do not count against the widening
                allowed = torch.ceil(cfg.widening_k * n**cfg.widening_alpha) + pruned.sum(dim=1)
                valid = valid & (self.slots < allowed[:, None])
        if cfg.normalize_values:
            v = (vsum / n.clamp(min=1.0)).unsqueeze(1)  # [R, 1]
            safe = torch.where(tried & valid if masked else tried, q, v)
            lo, hi = torch.aminmax(torch.cat([safe, v], dim=1), dim=1, keepdim=True)
            qn = (safe - lo).mul_(tried).div_((hi - lo).clamp_(min=_NORM_EPS))  # untried: 0
        else:
            qn = q * tried
        if penalty is not None:
            qn = qn - penalty
        if self.uct:
            bonus = torch.sqrt(torch.log(n.clamp(min=1.0)).unsqueeze(1) / ev.clamp(min=1.0))
            score = torch.where(tried, qn + cfg.exploration * bonus, math.inf)
        else:
            # c(N) sqrt(N) = (c1 + log((N + c2 + 1) / c2)) sqrt(N), log1p keeps c2 = inf exact
            coef = (n + 1.0).div_(cfg.puct_base).log1p_().add_(cfg.exploration).mul_(n.sqrt())
            score = torch.addcmul(qn, coef.unsqueeze(1), prior / (ev + 1.0))
        return torch.where(valid, score, -math.inf) if masked else score

    def refresh(self, tree: Tree, sel: _Selection, rows: torch.Tensor) -> None:
        """Recompute the chosen action and next node of flat node indices ``rows [R]`` (after
        their statistics, children or pruning changed)."""
        a, w = self.a, self.w
        if self.touched is not None:
            self.touched.append(rows)
        f = self.f
        n = f.visits.index_select(0, rows)
        vsum = f.value_sums.index_select(0, rows)
        ev = f.node_edge_visits.index_select(0, rows)
        es = f.node_edge_sums.index_select(0, rows)
        pruned = f.node_pruned.index_select(0, rows) if self.pruning or self.widening else None
        prior = f.node_priors.index_select(0, rows) if not self.uct else None
        penalty = None
        if self.waves:
            # pending descents of the wave: each is one more visit at the current mean (Q
            # unchanged; an untried edge at the node's value), and a virtual loss on Q'
            pn = self.pending_n.index_select(0, rows)
            pe = self.pending_e.view(-1, a).index_select(0, rows)
            v = vsum / n.clamp(min=1.0)
            q = torch.where(ev > 0, es / ev.clamp(min=1.0), v[:, None])
            n, vsum = n + pn, vsum + pn * v
            ev, es = ev + pe, es + pe * q
            penalty = self.cfg.virtual_loss * pe / ev.clamp(min=1.0)
            # an edge blocked in this wave scores below every other but a pruned one
            blocked = self.blocked.view(-1, a).index_select(0, rows)
            penalty = penalty.masked_fill(blocked, _BLOCKED)
            top, best = self.scores(n, vsum, ev, es, pruned, prior, penalty).max(dim=1)
            self.full.index_copy_(0, rows, top <= -0.5 * _BLOCKED)
        else:
            best = self.scores(n, vsum, ev, es, pruned, prior).argmax(dim=1)  # [R]
        sel.best.index_copy_(0, rows, best)
        if w == 1:
            sel.next.index_copy_(0, rows, sel.through.index_select(0, rows * a + best))

    def add_root_noise(self, tree: Tree) -> None:
        """Mix ``Dir(alpha)`` noise into the root priors (MuZero, Appendix C)."""
        cfg, b, a = self.cfg, self.b, self.a
        conc = torch.full((b, a), cfg.dirichlet_alpha, device=self.device)
        with _forked_rng(self.problem.generator, self.device):
            noise = torch.distributions.Dirichlet(conc).sample()  # [B, A]
        f = cfg.dirichlet_fraction
        tree.priors[:, 0] = (1.0 - f) * tree.priors[:, 0] + f * noise

    # ---------------------------------------------------------------- simulations

    def run(self, tree: Tree) -> SearchResult:
        """``S`` simulations on ``tree`` (``M + 1`` slots, the last the sink; nodes
        ``[0, used)`` in use), in waves of ``K = leaves_per_wave`` descents that share one
        model step, one leaf evaluation and one backup."""
        cfg = self.cfg
        b, a = self.b, self.a
        dev = self.device
        m = tree.visits.shape[1]
        self.f = _flat(tree)
        clean_prior = tree.priors[:, 0].clone()  # the tree keeps the prior without the noise
        if cfg.dirichlet_alpha is not None and cfg.dirichlet_fraction > 0:
            self.add_root_noise(tree)
        self.boff = self.bidx * m  # [B] flat index of each root
        self.sinks = self.boff + (m - 1)  # [B]
        self.node_root = self.boff.repeat_interleave(m)  # [B * M] flat index of the root
        # a node a descent may pass through: alive, above max_depth, not the sink
        opened = (~tree.terminal & (tree.depths < self.depth)).view(-1)
        opened[self.sinks] = False
        through = None
        if self.w == 1:
            kids = tree.children.view(b, m * a)
            flat = self.boff[:, None] + kids.clamp(min=0)
            go = (kids >= 0) & opened[flat]
            through = torch.where(go, flat, self.sinks[:, None]).view(-1)
        self.sel = sel = _Selection(
            best=torch.zeros(b * m, dtype=torch.long, device=dev),
            next=self.sinks.repeat_interleave(m),
            open=opened,
            through=through,
        )
        if self.waves:
            self.pending_n = torch.zeros(b * m, device=dev)  # [B * M] descents in flight
            self.pending_e = torch.zeros(b * m * a, device=dev)  # [B * M * A]
            self.blocked = torch.zeros(b * m * a, dtype=torch.bool, device=dev)  # claimed
            self.full = torch.zeros(b * m, dtype=torch.bool, device=dev)  # all blocked
        self.pruning = bool(tree.pruned.any())
        used = torch.arange(tree.used, device=dev)
        self.refresh(tree, sel, (self.boff[:, None] + used).view(-1))
        self.nonfinite = 0
        self.collisions = 0
        start = tree.used
        height = int(tree.depths[:, : tree.used].max())  # depth of the deepest node
        first = 0
        while first < cfg.simulations:
            # a wave holds at most as many descents as a tree of that many nodes has actions
            # without a child: (A - 1) * nodes + 1
            count = min(cfg.leaves_per_wave, cfg.simulations - first, (a - 1) * (start + first) + 1)
            # simulation i fills node slot start + i when it expands
            slot = start + first
            if self.waves:
                self.touched = []  # the nodes refreshed during the wave
            descents = [self.descend(tree, slot + j, height, slot) for j in range(count)]
            ok, length = self.expand_and_backup(tree, descents, slot)
            height = max(height, int((length * ok).max()))
            first += count
        tree.priors[:, 0] = clean_prior
        tree = dataclasses.replace(tree, used=start + cfg.simulations)
        return self.summarize(tree)

    def descend(self, tree: Tree, new: int, height: int, first: int) -> _Descent:
        """One descent from every root by the selection rule to the first action without a
        child (or a node that may not be passed), for the simulation whose new node goes to
        slot ``new``; ``first`` is the slot of the wave's first simulation.

        In a wave the chosen edge is claimed for slot ``new`` at once (blocked for the rest of
        the wave) and the path counts as pending, so that the next descent sees both. A
        descent that ends at a node whose every action is blocked blocks the edge into that
        node (and into each ancestor that is then blocked everywhere) and descends again; one
        that cannot (its root is blocked everywhere) is a collision and backs up nothing."""
        d = self.walk(tree, new, height)
        if not self.waves:
            return d
        sel, full = self.sel, self.full
        for _ in range(tree.visits.shape[1] * self.a):  # every retry blocks one more edge
            retry = ~d.dead & full.index_select(0, d.node) & ~full.index_select(0, self.boff)
            if not bool(retry.any()):
                break
            self.block_into(tree, d.node[retry])
            d = _merge(d, self.walk(tree, new, height), retry, self.sinks)
        # claim the edge for the new slot (closed until it is written) and count the path as
        # pending
        children_f = self.f.children
        child, dead = d.child, d.dead
        claim = ~dead & (child < 0)
        kept = children_f.index_select(0, d.slot)
        children_f.index_copy_(0, d.slot, torch.where(claim, new, kept))
        blocked = claim | self.blocked.index_select(0, d.edge)
        self.blocked.index_copy_(0, d.edge, blocked)
        self.f.actions_from_parent.index_copy_(0, d.new, d.choice)
        sel.open.index_fill_(0, d.new, False)
        going = ~dead & (child < first)  # not a collision
        leaf = torch.where(claim, d.new, self.boff + child.clamp(min=0))
        _, _, below, edges = self.path_below(tree, d.path, d.level, leaf, self.sinks, going)
        ones = torch.ones_like(below, dtype=torch.float32)
        self.pending_n.index_add_(0, self.boff, going.float())
        self.pending_n.index_add_(0, below, ones)
        self.pending_e.index_add_(0, edges, ones)
        self.refresh(tree, sel, torch.cat([self.boff, below]))
        return d

    def walk(self, tree: Tree, new: int, height: int) -> _Descent:
        """The descent of :meth:`descend` before any claim: down the chosen children to the
        first node whose chosen action has no child that may be passed; a node whose every
        action is pruned has the edge into it pruned."""
        a, w, sel, f = self.a, self.w, self.sel, self.f
        boff, sinks = self.boff, self.sinks
        depth_limit = self.depth
        # the chosen child of every node is precomputed (sel.next, the sink where the descent
        # ends), so a step down is one gather for all roots
        node = boff  # [B] flat index of the current node
        nodes, outs = [node], []
        if w == 1:
            # no descent goes below the deepest node: no check for the end per level
            for _ in range(min(height, depth_limit - 1)):
                node = sel.next.index_select(0, node)
                nodes.append(node)
        else:
            children = f.children.view(-1, w)
            ev_f, visits = f.edge_visits, f.visits
            for _ in range(depth_limit):
                edge = node * a + sel.best.index_select(0, node)
                child, outcome = self.pick_outcome(children, edge, ev_f, visits, boff)
                outs.append(outcome)
                nxt = boff + child.clamp(min=0)
                go = (child >= 0) & sel.open.index_select(0, nxt)
                if not bool(go.any()):
                    break
                node = torch.where(go, nxt, sinks)
                nodes.append(node)
        # the last real level of every root: its node, action and child
        path = torch.stack(nodes, dim=1)  # [B, L] flat
        level = (path != sinks[:, None]).sum(dim=1) - 1  # [B] depth of that node
        last = level[:, None]
        pnode = path.gather(1, last)[:, 0]  # flat
        choice = sel.best.index_select(0, pnode)
        edge = pnode * a + choice
        if w == 1:
            slot = edge
            child = f.children.index_select(0, edge)
        else:
            outcome = torch.stack(outs, dim=1).gather(1, last)[:, 0]
            child, _ = self.pick_outcome(children, edge, ev_f, visits, boff)
            slot = edge * w + outcome
        if self.pruning:
            dead = f.pruned.index_select(0, edge)  # every action is pruned
            if bool(dead.any()):
                self.prune_into(tree, sel, pnode, dead, boff)
        else:
            dead = self.none_dead  # nothing is pruned yet
        return _Descent(path, level, pnode, choice, edge, slot, child, dead, boff + new)

    def block_into(self, tree: Tree, nodes: torch.Tensor) -> None:
        """Block the edge into each flat node of ``nodes [R]`` (blocked everywhere; roots
        have none) for the rest of the wave, then into each parent that is blocked everywhere
        now, up to the roots."""
        parents, af = self.f.parents, self.f.actions_from_parent
        for _ in range(self.depth):
            parent = parents.index_select(0, nodes)
            has = parent >= 0
            up = (self.node_root.index_select(0, nodes) + parent.clamp(min=0))[has]
            if up.numel() == 0:
                break
            self.blocked[up * self.a + af.index_select(0, nodes)[has]] = True
            self.refresh(tree, self.sel, up)
            nodes = up[self.full.index_select(0, up)]

    def path_below(
        self,
        tree: Tree,
        path: torch.Tensor,
        level: torch.Tensor,
        leaf: torch.Tensor,
        sinks: torch.Tensor,
        keep: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """For paths ``path [R, L]`` (flat nodes ``P_0 .. P_level``, then sinks) and their
        leaves ``leaf [R]``: ``full [R, L + 1]`` (the leaf at position ``level + 1``, sinks
        after it), and for the nodes ``P_1 .. P_(level + 1)`` of the paths kept (``keep
        [R]``), ``C`` in all: their positions ``[C]`` in ``full[:, 1:]`` flattened, the nodes
        ``[C]`` (flat) and the flat edges ``[C]`` (``P_d``, ``a_d``) into them."""
        steps = path.shape[1]
        length = (level + 1)[:, None]
        full = torch.cat([path, sinks[:, None]], dim=1)  # [R, L + 1]
        full.scatter_(1, length, leaf[:, None])
        below = (self.positions[1 : steps + 1] <= length) & keep[:, None]  # [R, L]
        pos = below.view(-1).nonzero().squeeze(1)  # [C]
        nodes = full[:, 1:].reshape(-1).index_select(0, pos)
        parents = path.view(-1).index_select(0, pos)
        af = self.f.actions_from_parent.index_select(0, nodes)
        return full, pos, nodes, parents * self.a + af

    def expand_and_backup(
        self, tree: Tree, descents: list[_Descent], first: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Expand the leaves of a wave of descents with one model step for all of them
        (``K * B * P`` rows; rows that expand nothing are stepped and ignored, so the call
        keeps its shape), evaluate the new leaves, and back every descent's return up its
        path. ``first`` is the node slot of the wave's first simulation. Returns ``[K * B]``
        whether each expanded and its path length."""
        problem, p, sel = self.problem, self.p, self.sel
        k = len(descents)
        if k == 1:
            d = descents[0]
            path, sinks, boff = d.path, self.sinks, self.boff
        else:
            steps = max(x.path.shape[1] for x in descents)  # differ with double widening
            pads = [
                torch.cat([x.path, self.sinks[:, None].expand(-1, steps - x.path.shape[1])], 1)
                for x in descents
            ]
            path = torch.cat(pads, dim=0)  # [K * B, L]
            d = _Descent(
                path, **{f: torch.cat([getattr(x, f) for x in descents]) for f in _DESCENT}
            )
            sinks, boff = self.sinks.repeat(k), self.boff.repeat(k)
        rows = path.shape[0]  # K * B
        pnode, edge, child, dead = d.node, d.edge, d.child, d.dead
        has = child >= 0
        expand = ~has & ~dead
        prow = pnode if p == 1 else ((pnode * p)[:, None] + self.particle_idx).reshape(-1)
        pstate = _rows(tree.states, prow)  # [K * B * P]
        if self.discrete:
            act_vec = self.action_values.index_select(0, d.choice)  # [K * B, U]
        else:
            act_vec = tree.node_actions.view(-1, tree.node_actions.shape[-1]).index_select(0, edge)
        act_rows = act_vec.repeat_interleave(p, dim=0) if p > 1 else act_vec
        if act_rows.dtype != pstate.obs.dtype:
            act_rows = act_rows.to(pstate.obs.dtype)
        step = problem.step(pstate, act_rows)
        f = self.f
        palive = f.alive.index_select(0, pnode)  # [K * B, P]
        finite = step.finite.view(rows, p)
        reward = _particle_mean(torch.where(palive & finite, step.reward.view(rows, p), 0.0))
        nalive = palive & step.alive.view(rows, p)
        value, vbad = self.leaf_value(step.state, nalive, act_rows)
        bad = expand & ((palive & ~finite).any(dim=1) | vbad)
        ok = expand & ~bad
        level = d.level
        linked = torch.where(ok, pnode - boff, -1)  # an unused slot keeps parent -1
        depth = torch.where(ok, level + 1, 0)
        terminal = self.write_node(
            tree, d.new, step.state, nalive, value, reward, linked, d.choice, depth
        )
        # the new node is at depth level + 1: open unless terminal or at max_depth
        opened = ok & ~terminal & (level + 1 < self.depth)
        sel.open.index_copy_(0, d.new, opened)
        children_f, pruned_f = f.children, f.pruned
        if not self.waves:  # a wave claimed its edges in the descents
            kept = children_f.index_select(0, d.slot)
            children_f.index_copy_(0, d.slot, torch.where(ok, d.new - boff, kept))
            if sel.through is not None:
                kept = sel.through.index_select(0, d.slot)
                sel.through.index_copy_(0, d.slot, torch.where(opened, d.new, kept))
        elif sel.through is not None:  # the claimed edges of a wave are distinct
            sel.through[d.slot[opened]] = d.new[opened]
        any_bad = bool(bad.any())
        if any_bad:
            self.pruning = True
            pruned_f[edge[bad]] = True
            if self.waves:
                children_f[d.slot[bad]] = -1
            count = int(bad.sum())
            self.nonfinite += count
            problem.nonfinite += count
        # a revisit backs the child's leaf value up again; a collision (a descent that ended
        # at an edge an earlier descent of the wave claimed: its root is blocked everywhere)
        # backs up nothing
        revisit = has & ~dead
        if self.waves:
            collided = revisit & (child >= first)
            self.collisions += int(collided.sum())
            revisit = revisit & ~collided
        # backup along the path P_0 .. P_l (l = level + 1 edges): node P_d and edge
        # (P_d, a_d) both receive G_d = sum_{j >= d} gamma^(j - d) z_j, with z_j the
        # reward into P_(j + 1) for j < l and z_l the leaf value
        back = ok | revisit
        leaf = torch.where(has, boff + child.clamp(min=0), d.new)
        leaf = torch.where(back, leaf, sinks)  # the sink: nothing is backed up
        full, pos, below, edges = self.path_below(tree, path, level, leaf, sinks, back)
        steps = path.shape[1]
        length = level + 1
        roots = path[:, 0]
        rewards, raw = f.rewards, f.raw_values
        # z_d for d < l is the reward into P_(d + 1) (a sink's is 0), z_l the leaf value
        into = full[:, 1:].reshape(-1)  # [K * B * L] P_1 .. P_L
        z = torch.cat([rewards.index_select(0, into).view(rows, steps), self.zero_col[:rows]], 1)
        z = z * back[:, None]  # [K * B, L + 1]
        z.scatter_(1, length[:, None], raw.index_select(0, leaf)[:, None])
        ret = z @ self.returns[: steps + 1, : steps + 1]  # [K * B, L + 1] G_d
        visits, value_sums = f.visits, f.value_sums
        visits.index_add_(0, roots, back.float())
        value_sums.index_add_(0, roots, ret[:, 0])
        visits.index_add_(0, below, torch.ones_like(below, dtype=torch.float32))
        value_sums.index_add_(0, below, ret[:, 1:].reshape(-1).index_select(0, pos))
        # edge (P_d, a_d) into P_(d + 1) gets G_d
        f.edge_visits.index_add_(0, edges, torch.ones_like(edges, dtype=torch.float32))
        f.edge_sums.index_add_(0, edges, ret[:, :steps].reshape(-1).index_select(0, pos))
        # every node a descent reached may select differently now
        if self.waves:
            # and every node whose choice was made with pending descents or blocked edges
            self.pending_n.zero_()
            self.pending_e.zero_()
            self.blocked.zero_()
            touched, self.touched = self.touched, None
            self.refresh(tree, sel, torch.cat([*touched, roots, below]))
        else:
            self.refresh(tree, sel, torch.cat([roots, below]))
            if any_bad:  # a failed expansion: its edge is pruned now
                missed = ~dead & ~back
                within = self.positions[: steps + 1] <= length[:, None]
                self.refresh(tree, sel, full[missed][within[missed]])
        return ok, length

    def pick_outcome(
        self,
        children: torch.Tensor,
        edge: torch.Tensor,
        ev_f: torch.Tensor,
        visits: torch.Tensor,
        boff: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Double widening at edges ``edge [B]``: ``(child, slot)``, child -1 (draw a new next
        state into ``slot``) while the edge has fewer than ``ceil(k * N(s, a)^alpha)``, else
        its least-visited next state."""
        cfg, w = self.cfg, self.w
        outs = children.index_select(0, edge)  # [B, W]
        have = (outs >= 0).sum(dim=1)  # [B]
        n_edge = ev_f.index_select(0, edge).clamp(min=1.0)
        allowed = torch.ceil(cfg.widening_k * n_edge**cfg.widening_alpha).clamp(max=w)
        fresh = have < allowed.long()
        out_visits = torch.where(outs >= 0, visits[boff[:, None] + outs.clamp(min=0)], math.inf)
        child = outs.gather(1, out_visits.argmin(dim=1, keepdim=True))[:, 0]
        return torch.where(fresh, -1, child), have.clamp(max=w - 1)

    def prune_into(
        self,
        tree: Tree,
        sel: _Selection,
        node: torch.Tensor,
        dead: torch.Tensor,
        boff: torch.Tensor,
    ) -> None:
        """Prune the edge into every node ``node [B]`` (flat) flagged ``dead``: all of its
        actions are pruned. The edge loses its child, so a descent stops above it."""
        a, w = self.a, self.w
        parent = tree.parents.view(-1)[node]
        prune = dead & (parent >= 0)
        up = boff + parent.clamp(min=0)
        into = up * a + tree.actions_from_parent.view(-1)[node]
        pruned_f = tree.pruned.view(-1)
        pruned_f[into] = pruned_f[into] | prune
        kids = tree.children.view(-1, w)
        kids[into] = torch.where(prune[:, None], -1, kids[into])
        if sel.through is not None:
            sel.through[into] = torch.where(prune, self.sinks, sel.through[into])
        self.refresh(tree, sel, up)

    # ---------------------------------------------------------------- results

    def summarize(self, tree: Tree) -> SearchResult:
        tree = _drop_sink(tree)
        b, a, h = self.b, self.a, self.problem.horizon
        dev = self.device
        bidx = torch.arange(b, device=dev)
        root_actions = (
            self.action_values.expand(b, a, -1) if self.discrete else tree.node_actions[:, 0]
        )
        u = root_actions.shape[-1]
        actions = torch.zeros(b, h, u, device=dev)
        length = torch.zeros(b, dtype=torch.long, device=dev)
        node = torch.zeros(b, dtype=torch.long, device=dev)
        going = torch.ones(b, dtype=torch.bool, device=dev)
        last = torch.zeros(b, u, device=dev)
        q_all = tree.q_values
        for t in range(h):
            ev = tree.edge_visits[bidx, node]  # [B, A]
            q = q_all[bidx, node]
            usable = (ev > 0) & ~tree.pruned[bidx, node]
            going = going & usable.any(dim=1)
            if not bool(going.any()):
                break
            qf = torch.where(usable, q, 0.0)
            lo = torch.where(usable, qf, math.inf).amin(dim=1, keepdim=True)
            hi = torch.where(usable, qf, -math.inf).amax(dim=1, keepdim=True)
            tie = 0.5 * (qf - lo) / (hi - lo).clamp(min=_NORM_EPS)  # in [0, 0.5]: breaks ties
            rank = torch.where(usable, ev + tie, -math.inf)
            choice = rank.argmax(dim=1)
            if self.discrete:
                vec = self.action_values[choice]
            else:
                vec = tree.node_actions[bidx, node, choice]
            last = torch.where(going[:, None], vec, last)
            actions[:, t] = last
            length += going.long()
            outs = tree.children[bidx, node, choice]  # [B, W]
            out_visits = torch.where(outs >= 0, tree.visits[bidx[:, None], outs.clamp(min=0)], -1)
            child = outs.gather(1, out_visits.argmax(dim=1, keepdim=True))[:, 0]
            going = going & (child >= 0)
            node = torch.where(going, child, node)
        # pad: repeat the last action; a root with no usable action plays its first slot
        first = root_actions[:, 0]
        last = torch.where((length > 0)[:, None], last, first)
        steps = torch.arange(h, device=dev)
        actions = torch.where((steps[None, :] < length[:, None])[..., None], actions, last[:, None])
        return SearchResult(
            visit_counts=tree.edge_visits[:, 0].clone(),
            q_values=q_all[:, 0],
            root_values=tree.values[:, 0],
            root_actions=root_actions.clone(),
            actions=actions,
            path_length=length,
            tree=tree,
            nonfinite=self.nonfinite,
            simulations=self.cfg.simulations,
            collisions=self.collisions,
        )


# ---------------------------------------------------------------------- tree storage


def _empty_tree(
    root: RolloutState,
    b: int,
    m: int,
    a: int,
    w: int,
    p: int,
    u: int,
    sampled: bool,
    device: torch.device,
) -> Tree:
    f32 = {"dtype": torch.float32, "device": device}
    i64 = {"dtype": torch.long, "device": device}

    def store(x: torch.Tensor | None) -> torch.Tensor | None:
        if x is None:
            return None
        return torch.zeros((b * m * p, *x.shape[1:]), dtype=x.dtype, device=device)

    return Tree(
        visits=torch.zeros(b, m, **f32),
        value_sums=torch.zeros(b, m, **f32),
        raw_values=torch.zeros(b, m, **f32),
        rewards=torch.zeros(b, m, **f32),
        terminal=torch.zeros(b, m, dtype=torch.bool, device=device),
        parents=torch.full((b, m), -1, **i64),
        actions_from_parent=torch.zeros(b, m, **i64),
        depths=torch.zeros(b, m, **i64),
        children=torch.full((b, m, a, w), -1, **i64),
        edge_visits=torch.zeros(b, m, a, **f32),
        edge_sums=torch.zeros(b, m, a, **f32),
        pruned=torch.zeros(b, m, a, dtype=torch.bool, device=device),
        priors=torch.full((b, m, a), 1.0 / a, **f32),
        node_actions=torch.zeros(b, m, a, u, **f32) if sampled else None,
        alive=torch.ones(b, m, p, dtype=torch.bool, device=device),
        states=RolloutState(
            obs=store(root.obs), reward=store(root.reward), hidden=store(root.hidden)
        ),
        used=1,
    )


def _drop_sink(tree: Tree) -> Tree:
    """The tree without its last node slot (the search's sink)."""
    b, m = tree.visits.shape
    p = tree.alive.shape[2]
    fields = {f: getattr(tree, f) for f in _TREE_FIELDS}
    kept = {f: None if x is None else x[:, : m - 1] for f, x in fields.items()}

    def rows(x: torch.Tensor | None) -> torch.Tensor | None:
        if x is None:
            return None
        return x.view(b, m, p, *x.shape[1:])[:, : m - 1].reshape(b * (m - 1) * p, *x.shape[1:])

    states = RolloutState(**{f: rows(getattr(tree.states, f)) for f in _STATE_FIELDS})
    return Tree(**kept, states=states, used=tree.used)


def _particle_mean(x: torch.Tensor) -> torch.Tensor:
    """``[R]`` mean of ``x [R, P]`` over its particles (the column itself for one)."""
    return x.view(-1) if x.shape[1] == 1 else x.mean(dim=1)


def _rows(state: RolloutState, rows: torch.Tensor) -> RolloutState:
    def take(x: torch.Tensor | None) -> torch.Tensor | None:
        return None if x is None else x.index_select(0, rows)

    return RolloutState(obs=take(state.obs), reward=take(state.reward), hidden=take(state.hidden))


_STATE_FIELDS = ("obs", "reward", "hidden")
_TREE_FIELDS = (
    "visits",
    "value_sums",
    "raw_values",
    "rewards",
    "terminal",
    "parents",
    "actions_from_parent",
    "depths",
    "children",
    "edge_visits",
    "edge_sums",
    "pruned",
    "priors",
    "node_actions",
    "alive",
)


def _tree_to_carry(tree: Tree) -> dict[str, torch.Tensor]:
    """The tree as ``WarmStart.carry`` entries: every tensor flattened to one axis (so that
    :func:`~mbrl.planners.base.shift_warm` never takes one for an ``[..., H, U]`` plan) with
    its shape beside it."""
    carry: dict[str, torch.Tensor] = {}
    tensors = {f: getattr(tree, f) for f in _TREE_FIELDS}
    tensors.update({f"states.{f}": getattr(tree.states, f) for f in _STATE_FIELDS})
    for name, x in tensors.items():
        if x is None:
            continue
        carry[_CARRY_PREFIX + name] = x.reshape(-1)
        carry[_CARRY_PREFIX + name + ".shape"] = torch.tensor(x.shape, dtype=torch.long)
    carry[_CARRY_PREFIX + "used"] = torch.tensor([tree.used], dtype=torch.long)
    return carry


def _tree_from_carry(carry: Mapping[str, torch.Tensor]) -> Tree | None:
    """The tree :func:`_tree_to_carry` stored, or ``None`` when ``carry`` holds none."""
    if _CARRY_PREFIX + "used" not in carry:
        return None

    def get(name: str) -> torch.Tensor | None:
        x = carry.get(_CARRY_PREFIX + name)
        if x is None:
            return None
        return x.reshape(tuple(carry[_CARRY_PREFIX + name + ".shape"].tolist()))

    states = RolloutState(**{f: get(f"states.{f}") for f in _STATE_FIELDS})
    return Tree(
        **{f: get(f) for f in _TREE_FIELDS},
        states=states,
        used=int(carry[_CARRY_PREFIX + "used"][0]),
    )


def _reroot(tree: Tree, root: RolloutState, simulations: int, sampled: bool) -> Tree | None:
    """The subtree of ``tree`` (one root) below the node whose state equals ``root`` (``P``
    rows; obs and hidden state within ``1e-6`` relative), renumbered with that node as the
    root and room for ``simulations`` more nodes; ``None`` when no live node matches or the
    tree was made under other settings."""
    b, m, a, w = tree.children.shape
    p = tree.alive.shape[2]
    if b != 1 or root.obs.shape[0] != p or (tree.node_actions is not None) != sampled:
        return None
    if tree.states.obs.shape[1:] != root.obs.shape[1:]:
        return None
    used = tree.used
    idx = torch.arange(used, device=tree.parents.device)
    linked = (idx == 0) | (tree.parents[0, :used] >= 0)
    match = linked & ~tree.terminal[0, :used]
    for name in _STATE_FIELDS:
        stored, now = getattr(tree.states, name), getattr(root, name)
        if (stored is None) != (now is None):
            return None
        if stored is None or name == "reward":
            continue
        stored = stored.view(m, p, -1)[:used].float()
        now = now.reshape(1, p, -1).float().to(stored.device)
        close = (stored - now).abs() <= 1e-6 * (1.0 + now.abs())
        match &= close.all(dim=2).all(dim=1)
    if not bool(match.any()):
        return None
    r = int(torch.nonzero(match)[0, 0])  # the shallowest match (parents precede children)
    parents = tree.parents[0, :used]
    inside = idx == r
    for _ in range(int(tree.depths[0, :used].max())):
        inside = inside | (inside[parents.clamp(min=0)] & (parents >= 0))
    keep = torch.nonzero(inside)[:, 0]  # [K] ascending: r first
    k = keep.shape[0]
    new_m = k + simulations + 1  # and the sink
    remap = torch.full((m,), -1, dtype=torch.long, device=idx.device)
    remap[keep] = torch.arange(k, device=idx.device)

    def take(x: torch.Tensor, fill: float | bool | int) -> torch.Tensor:
        out = torch.full((1, new_m, *x.shape[2:]), fill, dtype=x.dtype, device=x.device)
        out[0, :k] = x[0, keep]
        return out

    children = tree.children[0, keep]
    children = torch.where(children >= 0, remap[children.clamp(min=0)], -1)
    new_children = torch.full((1, new_m, a, w), -1, dtype=torch.long, device=idx.device)
    new_children[0, :k] = children
    new_parents = take(tree.parents, -1)
    new_parents[0, :k] = torch.where(parents[keep] >= 0, remap[parents[keep].clamp(min=0)], -1)
    new_parents[0, 0] = -1
    depths = take(tree.depths, 0)
    depths[0, :k] -= int(tree.depths[0, r])
    rows = ((keep * p)[:, None] + torch.arange(p, device=idx.device)).reshape(-1)

    def take_rows(x: torch.Tensor | None) -> torch.Tensor | None:
        if x is None:
            return None
        out = torch.zeros((new_m * p, *x.shape[1:]), dtype=x.dtype, device=x.device)
        out[: k * p] = x[rows]
        return out

    return Tree(
        visits=take(tree.visits, 0.0),
        value_sums=take(tree.value_sums, 0.0),
        raw_values=take(tree.raw_values, 0.0),
        rewards=take(tree.rewards, 0.0),
        terminal=take(tree.terminal, False),
        parents=new_parents,
        actions_from_parent=take(tree.actions_from_parent, 0),
        depths=depths,
        children=new_children,
        edge_visits=take(tree.edge_visits, 0.0),
        edge_sums=take(tree.edge_sums, 0.0),
        pruned=take(tree.pruned, False),
        priors=take(tree.priors, 1.0 / a),
        node_actions=None if tree.node_actions is None else take(tree.node_actions, 0.0),
        alive=take(tree.alive, True),
        states=RolloutState(**{f: take_rows(getattr(tree.states, f)) for f in _STATE_FIELDS}),
        used=k,
    )


# ---------------------------------------------------------------------- helpers


def _num_actions(cfg: MCTS, problem: PlanningProblem) -> int:
    return problem.action_values.shape[0] if cfg.actions == "discrete" else cfg.num_sampled


@contextmanager
def _forked_rng(generator: torch.Generator | None, device: torch.device):
    """Run a ``torch.distributions`` draw under torch's global generator seeded from
    ``generator`` (the global state is restored afterwards); no-op without a generator."""
    if generator is None:
        yield
        return
    seed = int(torch.randint(0, 2**62, (1,), generator=generator, device=generator.device))
    devices = [device] if torch.device(device).type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


def _check_int(name: str, value: object, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name} must be an int >= {low}, got {value!r}")


def _check_float(
    name: str,
    value: object,
    low: float | None = None,
    high: float | None = None,
    open_low: bool = False,
    finite: bool = True,
) -> None:
    ok = isinstance(value, int | float) and not isinstance(value, bool)
    if ok:
        v = float(value)
        ok = not math.isnan(v) and (not finite or math.isfinite(v))
        ok = ok and (low is None or (v > low if open_low else v >= low))
        ok = ok and (high is None or v <= high)
    if not ok:
        lo = "" if low is None else (f"> {low}" if open_low else f">= {low}")
        hi = "" if high is None else f"<= {high}"
        rng = " and ".join(s for s in (lo, hi) if s)
        raise ValueError(
            f"{name} must be a {'finite ' if finite else ''}number {rng}, got {value!r}"
        )
