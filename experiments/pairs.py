"""Which planner plans on which model: every pair through the public API, one MPC step each.

Models: the probabilistic ensemble and the Gaussian process (both fitted briefly on random
transitions of the analytic pendulum), the MuJoCo ground truth of the ``cartpole-swingup`` task,
the analytic pendulum's own model, and a small RSSM (PlaNet's latent model, untrained) planned
from a 16 x 16 frame of pixel Pendulum through its filter's belief (iLQR on the belief's
features with the learned reward as its cost, as ``mbrl run planet planner.name=ilqr``).
Planners: random shooting, CEM, iCEM, MPPI, LQR, iLQR, casadi/IPOPT NMPC and MCTS (on the box:
sampled actions, since these problems are not discrete). A pair either plans (one
``MPCController.act`` from a fixed start, the same action for the same seed, inside the bounds)
or is refused with a message when it is built or asked to plan; this script prints the table,
and ``--readme README.md`` rewrites the table in the README between its ``pairs`` markers.
``tests/test_pairs.py`` runs every pair and checks the README's table against what it observed.

    python experiments/pairs.py [--readme README.md]
"""

from __future__ import annotations

import argparse
import re
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import numpy as np
import torch

from mbrl.control import MPCController
from mbrl.data import Transitions
from mbrl.dynamics import ProbabilisticEnsemble, SystemModel
from mbrl.envs import make
from mbrl.envs.systems import SYSTEMS
from mbrl.planners import CEM, ILQR, LQR, MPPI, PlanningProblem, RandomShooting
from mbrl.planners.mcts import MCTS

HORIZON = 5
MODELS = ("ensemble", "gp", "mujoco", "analytic", "latent")
PLANNERS = ("random", "cem", "icem", "mppi", "lqr", "ilqr", "nmpc", "mcts")
README_START, README_END = "<!-- pairs:start -->", "<!-- pairs:end -->"


@dataclass(frozen=True)
class Task:
    """A model with the reward, bounds, start and goal it is planned with."""

    problem: Callable[[int], PlanningProblem]  # seed -> a fresh problem
    x0: torch.Tensor  # [X] (a frame [C, H, W] for the latent model)
    goal: np.ndarray  # [X] LQR's set point
    latent: bool = False  # planned from a filter's belief


@dataclass(frozen=True)
class PairResult:
    model: str
    planner: str
    plans: bool
    action: torch.Tensor | None  # [U] the first MPC action
    message: str  # why the pair was refused ("" when it plans)


def _pendulum_data(n: int = 200) -> Transitions:
    """Random transitions of the analytic pendulum around its upright goal."""
    system = SYSTEMS["pendulum"]()
    g = torch.Generator().manual_seed(0)
    obs = (torch.rand(n, 2, generator=g) * 2 - 1) * torch.tensor([1.0, 2.0])
    act = (torch.rand(n, 1, generator=g) * 2 - 1) * 2.0
    nxt = system.step(obs.double(), act.double()).float()
    return Transitions(obs, act, nxt, torch.zeros(n), torch.zeros(n, dtype=torch.bool))


@cache
def task(name: str) -> Task:
    """The model ``name`` of :data:`MODELS` with its planning problem (fitted once)."""
    if name == "mujoco":
        from mbrl.dynamics.mujoco_model import MujocoModel

        spec = make("cartpole-swingup")
        model = MujocoModel.from_spec(spec, nthread=0)
        low, high = spec.action_bounds()

        def mujoco_problem(seed: int) -> PlanningProblem:
            gen = torch.Generator().manual_seed(seed)
            return PlanningProblem(model, spec.reward_fn, None, HORIZON, low, high, 1, gen)

        x0 = torch.tensor([0.0, 0.3, 0.0, 0.0], dtype=torch.float64)
        return Task(mujoco_problem, x0, np.zeros(4))
    if name == "latent":
        return _latent_task()
    system = SYSTEMS["pendulum"]()
    if name == "analytic":
        model, particles = SystemModel(system), 1
    elif name == "ensemble":
        model = ProbabilisticEnsemble(2, 1, ensemble_size=2, hidden_size=32, num_layers=2, seed=0)
        model.max_epochs = 5
        model.fit(_pendulum_data(), torch.Generator().manual_seed(0))
        particles = 2
    elif name == "gp":
        from mbrl.dynamics.gp import GaussianProcessModel

        model = GaussianProcessModel(2, 1, iterations=20, seed=0)
        model.fit(_pendulum_data(100))
        particles = 2
    else:
        raise KeyError(f"unknown model {name!r}; valid: {', '.join(MODELS)}")
    low, high = (
        torch.as_tensor(b, dtype=torch.float32) for b in (system.action_low, system.action_high)
    )

    def pendulum_problem(seed: int) -> PlanningProblem:
        gen = torch.Generator().manual_seed(seed)
        return PlanningProblem(
            model,
            system.reward_fn(),
            None,
            HORIZON,
            low,
            high,
            particles,
            gen,
            value_fn=system.value_fn(),
        )

    x0 = torch.tensor([0.4, -0.3], dtype=torch.float32)
    return Task(pendulum_problem, x0, np.asarray(system.goal, dtype=np.float64))


def _latent_task() -> Task:
    from mbrl.dynamics.rssm import RSSM
    from mbrl.envs.pixels import PendulumRenderer, pixel_spec

    spec = pixel_spec(
        make("pendulum"), "pendulum-pixels-16", size=(16, 16), renderer=PendulumRenderer
    )
    model = RSSM(spec.obs_shape, spec.act_dim, deterministic=8, stochastic=3, hidden=8, depth=2,
                 conv_layers=2, seed=0)  # fmt: skip
    low, high = spec.action_bounds()
    env = spec.make()
    frame, _ = env.reset(seed=0)
    env.close()

    def latent_problem(seed: int) -> PlanningProblem:
        gen = torch.Generator().manual_seed(seed)
        model.generator.manual_seed(seed)  # the filter's posterior draws
        return PlanningProblem(
            model, spec.reward_fn, None, HORIZON, low, high, 1, gen, stage_cost=model.stage_cost()
        )

    return Task(latent_problem, torch.as_tensor(frame), np.zeros(2), latent=True)


def planner(name: str, goal: np.ndarray):
    """The planner ``name`` of :data:`PLANNERS`, small settings."""
    if name == "random":
        return RandomShooting(population=64)
    if name == "cem":
        return CEM(population=64, iterations=2)
    if name == "icem":
        return CEM(
            population=64,
            iterations=2,
            noise_beta=2.0,
            keep_elites_fraction=0.3,
            shift_elites=True,
            population_decay=1.25,
        )
    if name == "mppi":
        return MPPI(population=64, iterations=2)
    if name == "lqr":
        x = len(goal)
        return LQR(goal=goal, Q=np.eye(x), R=0.1 * np.eye(1))
    if name == "ilqr":
        return ILQR(max_iterations=3)
    if name == "nmpc":
        from mbrl.control.nmpc import NMPC

        return NMPC(HORIZON, max_iter=30)
    if name == "mcts":
        return MCTS(simulations=16, actions="sampled", num_sampled=4)
    raise KeyError(f"unknown planner {name!r}; valid: {', '.join(PLANNERS)}")


def run_pair(model: str, planner_name: str, seed: int = 0) -> PairResult:
    """One MPC step of ``planner_name`` on ``model``, or the message it was refused with."""
    t = task(model)
    try:
        problem = t.problem(seed)
        chosen = planner(planner_name, t.goal)
        if t.latent and isinstance(chosen, ILQR):
            from mbrl.algorithms.planet import BeliefFeatures

            chosen = BeliefFeatures(chosen)
        controller = MPCController(chosen, problem)
        action = torch.as_tensor(controller.act(t.x0.numpy()))
    except (TypeError, ValueError) as err:
        return PairResult(model, planner_name, False, None, str(err))
    return PairResult(model, planner_name, True, action, "")


def table(results: dict[tuple[str, str], PairResult]) -> str:
    """Markdown table: a row per model, a column per planner."""
    lines = [
        "| model | " + " | ".join(PLANNERS) + " |",
        "| --- |" + " --- |" * len(PLANNERS),
    ]
    for m in MODELS:
        cells = ["plans" if results[m, p].plans else "refused" for p in PLANNERS]
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def all_pairs() -> dict[tuple[str, str], PairResult]:
    return {(m, p): run_pair(m, p) for m in MODELS for p in PLANNERS}


def readme_table(text: str) -> str:
    """The table between the README's pairs markers."""
    return _block(text).group(1).strip()


def _block(text: str) -> re.Match:
    match = re.search(re.escape(README_START) + r"(.*?)" + re.escape(README_END), text, re.S)
    if match is None:
        raise ValueError(f"README has no {README_START} ... {README_END} block")
    return match


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--readme", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(1)
    results = all_pairs()
    text = table(results)
    print(text)
    for r in results.values():
        if not r.plans:
            print(f"- {r.model} + {r.planner}: {r.message}")
    if args.readme is not None:
        readme = args.readme.read_text()
        block = _block(readme)
        new = f"{README_START}\n{text}\n{README_END}"
        args.readme.write_text(readme[: block.start()] + new + readme[block.end() :])


if __name__ == "__main__":
    main()
