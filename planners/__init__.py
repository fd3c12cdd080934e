"""Planners on the shared planning problem."""

from mbrl.planners.base import (
    OK_STATUSES,
    Plan,
    Planner,
    PlanningProblem,
    Prior,
    StageCost,
    Step,
    ValueFn,
    WarmStart,
    shift_actions,
    shift_warm,
)
from mbrl.planners.noise import colored_noise
from mbrl.planners.sampling import CEM, MPPI, RandomShooting

__all__ = [
    "OK_STATUSES",
    "CEM",
    "MPPI",
    "Plan",
    "Planner",
    "PlanningProblem",
    "Prior",
    "RandomShooting",
    "StageCost",
    "Step",
    "ValueFn",
    "WarmStart",
    "colored_noise",
    "shift_actions",
    "shift_warm",
]

# gradient planners: LQR, iLQR / box-DDP (see mbrl.planners.lqr, mbrl.planners.ilqr)
from mbrl.planners.ilqr import ILQR, box_qp  # noqa: E402
from mbrl.planners.lqr import (  # noqa: E402
    LQR,
    TimeVaryingLQR,
    lqr_backward,
    lqr_gain,
    solve_dare,
)

__all__ += ["ILQR", "LQR", "TimeVaryingLQR", "box_qp", "lqr_backward", "lqr_gain", "solve_dare"]

# the KL-constrained LQR step of LQR-FLM / guided policy search (see mbrl.planners.lqr_flm)
from mbrl.planners.lqr_flm import (  # noqa: E402
    LQRFLM,
    LinearGaussianController,
    LQRFLMResult,
    QuadraticCost,
    TrajectoryDistribution,
    adapt_step,
    expected_cost,
    final_state,
    kl_divergence,
    quadratic_cost,
    trajectory_distribution,
)

__all__ += [
    "LQRFLM",
    "LQRFLMResult",
    "LinearGaussianController",
    "QuadraticCost",
    "TrajectoryDistribution",
    "adapt_step",
    "expected_cost",
    "final_state",
    "kl_divergence",
    "quadratic_cost",
    "trajectory_distribution",
]

# tree search (see mbrl.planners.mcts)
from mbrl.planners.mcts import MCTS, SearchResult, Tree  # noqa: E402

__all__ += ["MCTS", "SearchResult", "Tree"]
