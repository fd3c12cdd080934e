"""NAF on real transitions only (Gu et al. 2016, Algorithm 1), the model-free baseline of MBA.

for each env step:
    act with mu(s) plus Gaussian noise (uniform random for the first start_steps), store it
    G times: regress Q(s, a) = V(s) - 1/2 (a - mu)^T P (a - mu) on r + gamma V'(s')
each epoch: evaluate the greedy policy mu, log, checkpoint
"""

from __future__ import annotations

from dataclasses import dataclass, field

from mbrl import dyna
from mbrl.algorithms.common import Summary
from mbrl.dyna import DynaConfig, LearnerConfig
from mbrl.runs import Run


@dataclass
class Config(DynaConfig):
    """NAF. The defaults are a short Pendulum run."""

    learner: LearnerConfig = field(default_factory=lambda: LearnerConfig(name="naf", lr=1e-3))
    """The learner: NAF's network, discount, Polyak rate and exploration noise."""


def train(cfg: Config, run: Run, device: str = "cpu") -> Summary:
    """Run (or resume) NAF as configured, logging to ``run``."""
    return dyna.train(cfg, run, device, use="none", label="NAF", learners=("naf",))
