"""MBPO: model-based policy optimization (Janner et al. 2019, Algorithm 2).

    collect start_steps transitions with uniform random actions into the env buffer D_env
    for each env step:
        every model.train_every steps: train the ensemble on D_env (7 members, 5 elites),
            then branch rollout_batch_size k-step rollouts from real states of D_env under the
            current policy into the model buffer D_model (k from the linear epoch schedule;
            D_model keeps the rollouts of the last retain_epochs epochs)
        act with the SAC policy in the env, add the transition to D_env
        G times: update SAC on a batch of real_ratio real and 1 - real_ratio model transitions
    each epoch: evaluate the deterministic policy, log, checkpoint

The per-env settings of the paper's Appendix C are in ``experiments/mbpo_*.yaml``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from mbrl import dyna
from mbrl.algorithms.common import Summary
from mbrl.dyna import BranchConfig, LearnerConfig, ModelBasedConfig
from mbrl.runs import Run


@dataclass
class Config(ModelBasedConfig):
    """MBPO. The defaults are the InvertedPendulum settings (epochs of 250 steps, k = 1,
    G = 10), run for 5,000 env steps."""

    env: str = "inverted-pendulum"
    """Registry name of the env (``mbrl envs`` lists them)."""
    total_steps: int = 5_000
    """Env steps of the whole run."""
    epoch_length: int = 250
    """Env steps per epoch: one evaluation, metrics row and checkpoint per epoch."""
    start_steps: int = 500
    """Uniform random actions before the learner acts (and before any update)."""
    updates_per_step: int = 10
    """G, SAC updates per env step."""
    learner: LearnerConfig = field(default_factory=lambda: LearnerConfig(name="sac"))
    """SAC (256 x 2 units, lr 3e-4, batch 256, gamma 0.99, tau 5e-3)."""
    branch: BranchConfig = field(default_factory=BranchConfig)
    """Branched rollouts: 100k starts per model fit, k = 1, real_ratio 0.05."""


def train(cfg: Config, run: Run, device: str = "cpu") -> Summary:
    """Run (or resume) MBPO as configured, logging to ``run``."""
    return dyna.train(cfg, run, device, use="branch", label="MBPO")
