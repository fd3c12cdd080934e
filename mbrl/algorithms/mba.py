"""MBA: model-based acceleration of NAF with imagination rollouts (Gu et al. 2016, Section 5,
Algorithm 2), with the probabilistic ensemble as the learned model.

Differences from the paper: the model is the probabilistic ensemble rather than per-episode
time-varying linear fits, and imagination rollouts start from states of the whole buffer.

Why a uniform imagination policy is offered: NAF's mu(s) and P(s) learn only from the
advantage term ``-(a - mu)^T P (a - mu) / 2`` of transitions whose action differs from mu(s).
Imagined steps under the exploration policy sit within its small noise of mu(s), so they train
V(s) but carry little signal for mu or P. On Pendulum, seeds 0-9, uniform imagined actions
scored the same as the exploration policy over the curve (experiments/RESULTS.md).
Longer rollouts under the exploration policy earn their keep differently: they carry the
current policy into states the real data has not visited. The measured settings use them: 20
steps on Pendulum, 5 on InvertedPendulum (experiments/mba_*.yaml).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from mbrl.algorithms.common import Summary
from mbrl.algorithms.dyna import BranchConfig, BranchingConfig, train_branching
from mbrl.algorithms.factory import LearnerConfig
from mbrl.config import Count
from mbrl.runs import Run


@dataclass
class Config(BranchingConfig):
    """MBA. The defaults are a short Pendulum run with one-step imagination rollouts."""

    label: ClassVar[str] = "MBA"

    updates_per_step: Count = 5
    """G, NAF updates per env step (the paper's I)."""
    learner: LearnerConfig = field(default_factory=lambda: LearnerConfig(name="naf", lr=1e-3))
    """NAF; MBA's learner (td3, ddpg or sac also work here)."""
    branch: BranchConfig = field(
        default_factory=lambda: BranchConfig(
            rollout_batch_size=5_000, min_length=1, max_length=1, real_ratio=0.5
        )
    )
    """Imagination rollouts: 5,000 starts per model fit, k = 1, half real data per batch. The
    measured Pendulum settings (250 random steps, 20-step rollouts under the exploration policy)
    are in experiments/mba_pendulum.yaml."""


def train(cfg: Config, run: Run, device: str = "cpu") -> Summary:
    """Run (or resume) MBA as configured, logging to ``run``::

    collect start_steps transitions with uniform random actions into the replay buffer R
    for each env step:
        act with mu(s) plus noise in the env, store the transition in R
        every model.train_every steps: fit the model on R, then start rollout_batch_size
            imagination rollouts of k steps from states of R into the imagination buffer
            R_f, under the current exploration policy (mu plus noise) or, with
            branch.policy=uniform, with actions uniform in the action box
        I times: update NAF on a batch mixing real_ratio of R and the rest of R_f
            (all of R after branch.stop_after env steps, when that is set)
    each epoch: evaluate the greedy policy, log, checkpoint
    """
    return train_branching(cfg, run, device)
