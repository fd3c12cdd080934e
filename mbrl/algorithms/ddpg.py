"""DDPG on real transitions only (Lillicrap et al. 2016): TD3 with one critic, no policy delay
and no target policy smoothing.

    for each env step:
        act with pi(s) plus Gaussian noise (uniform random for the first start_steps), store it
        G times: update critic, actor and target networks on a real batch
    each epoch: evaluate the deterministic policy, log, checkpoint
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from mbrl.algorithms.common import Summary
from mbrl.algorithms.dyna import DynaConfig, train_model_free
from mbrl.algorithms.factory import LearnerConfig
from mbrl.runs import Run


@dataclass
class Config(DynaConfig):
    """DDPG. The defaults are a short Pendulum run."""

    label: ClassVar[str] = "DDPG"
    learners: ClassVar[tuple[str, ...]] = ("ddpg",)

    learner: LearnerConfig = field(default_factory=lambda: LearnerConfig(name="ddpg"))
    """The learner: DDPG's networks and exploration noise."""


def train(cfg: Config, run: Run, device: str = "cpu") -> Summary:
    """Run (or resume) DDPG as configured, logging to ``run``."""
    return train_model_free(cfg, run, device)
