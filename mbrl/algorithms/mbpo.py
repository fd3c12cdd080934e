"""MBPO: model-based policy optimization (Janner et al. 2019, Algorithm 2).

The per-env settings of the paper's Appendix C are in ``experiments/mbpo_*.yaml``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from mbrl.algorithms.common import Summary
from mbrl.algorithms.dyna import BranchConfig, BranchingConfig, train_branching
from mbrl.algorithms.factory import LearnerConfig
from mbrl.config import Count, Natural
from mbrl.runs import Run


@dataclass
class Config(BranchingConfig):
    """MBPO. The defaults are the InvertedPendulum settings (epochs of 250 steps, k = 1,
    G = 10), run for 5,000 env steps."""

    label: ClassVar[str] = "MBPO"

    env: str = "inverted-pendulum"
    """Registry name of the env (``mbrl envs`` lists them)."""
    total_steps: Count = 5_000
    """Env steps of the whole run."""
    epoch_length: Count = 250
    """Env steps per epoch: one evaluation, metrics row and checkpoint per epoch."""
    start_steps: Natural = 500
    """Uniform random actions before the learner acts (and before any update); fewer than
    total_steps."""
    updates_per_step: Count = 10
    """G, SAC updates per env step."""
    learner: LearnerConfig = field(default_factory=lambda: LearnerConfig(name="sac"))
    """SAC (256 x 2 units, lr 3e-4, batch 256, gamma 0.99, tau 5e-3)."""
    branch: BranchConfig = field(default_factory=BranchConfig)
    """Branched rollouts: 100k starts per model fit, k = 1, real_ratio 0.05."""


def train(cfg: Config, run: Run, device: str = "cpu") -> Summary:
    """Run (or resume) MBPO as configured, logging to ``run``::

        collect start_steps transitions with uniform random actions into D_env
        for each env step:
            take an action in the env with pi; add the transition to D_env
            every model.train_every steps: train the ensemble p_theta on D_env
            every branch.rollout_every steps (default: after each fit), for rollout_batch_size
                states s_t sampled from D_env: perform a k-step model rollout from s_t with pi
                and add it to D_model (k from the epoch schedule; D_model keeps retain_epochs
                epochs of rollouts)
            G times: update pi on a batch of real_ratio D_env and 1 - real_ratio D_model
        each epoch: evaluate the deterministic policy, log, checkpoint

    With ``branch.stop_after`` set, nothing is fitted, branched or mixed in after that step.
    """
    return train_branching(cfg, run, device)
