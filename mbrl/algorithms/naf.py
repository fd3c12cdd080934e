"""NAF on real transitions only (Gu et al. 2016, Algorithm 1), the model-free baseline of MBA.

for each env step:
    act with mu(s) plus Gaussian noise (uniform random for the first start_steps), store it
    G times: regress Q(s, a) = V(s) - 1/2 (a - mu)^T P (a - mu) on r + gamma V'(s')
each epoch: evaluate the greedy policy mu, log, checkpoint
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
    """NAF. The defaults are a short Pendulum run."""

    label: ClassVar[str] = "NAF"
    learners: ClassVar[tuple[str, ...]] = ("naf",)

    learner: LearnerConfig = field(default_factory=lambda: LearnerConfig(name="naf", lr=1e-3))
    """The learner: NAF's network, discount, Polyak rate and exploration noise."""


def train(cfg: Config, run: Run, device: str = "cpu") -> Summary:
    """Run (or resume) NAF as configured, logging to ``run``."""
    return train_model_free(cfg, run, device)
