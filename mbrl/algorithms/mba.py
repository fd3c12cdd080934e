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
from mbrl.algorithms.dyna import BranchConfig, BranchingConfig, DynaRun
from mbrl.algorithms.factory import LearnerConfig, make_ensemble
from mbrl.imagination import (
    ModelBuffer,
    branched_rollout,
    mixed_batch,
    model_buffer_capacity,
    schedule,
)
from mbrl.runs import Run


@dataclass
class Config(BranchingConfig):
    """MBA. The defaults are a short Pendulum run with one-step imagination rollouts."""

    label: ClassVar[str] = "MBA"

    updates_per_step: int = 5
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
    d = DynaRun(cfg, run, device)
    b, x_dim, u_dim = cfg.branch, d.spec.obs_dim, d.spec.act_dim
    model = make_ensemble(cfg.model, d.spec, d.device, cfg.seed + 1, d.hidden)
    imagination = ModelBuffer(x_dim, u_dim, 1, d.device)  # R_f
    problem = d.problem(model, b.max_length)
    policy = d.imagined_actions(b.policy)
    d.resume(model=model, model_buffer=imagination)
    with d.running():
        while d.env_steps < cfg.total_steps:
            d.act_in_env()
            s = schedule(
                d.env_steps, cfg.start_steps, cfg.epoch_length, cfg.model.train_every,
                cfg.rollout_every, b.lengths, b.stop_after,
            )  # fmt: skip
            if s.fit:
                d.fit(model)
            if s.branch:
                with d.watch("rollout"):
                    size = model_buffer_capacity(
                        b.rollout_batch_size, s.k, cfg.epoch_length, cfg.rollout_every,
                        b.retain_epochs,
                    )  # fmt: skip
                    imagination.resize(size)
                    starts = d.buffer.sample(b.rollout_batch_size, d.gen).obs  # [B, X]
                    imagination.add(branched_rollout(problem, policy, starts, s.k).transitions)
                d.rollout_length = s.k
            if not s.imagining:
                d.rollout_length = 0
            if s.update:
                imagined = imagination if s.imagining else None
                with d.watch("update"):
                    for _ in range(cfg.updates_per_step):
                        batch = mixed_batch(
                            d.buffer, imagined, cfg.learner.batch_size, b.real_ratio, d.gen
                        )
                        d.record(d.learner.update(batch))
            if d.epoch_done:
                d.end_epoch(model_buffer=len(imagination))
    return d.summary()
