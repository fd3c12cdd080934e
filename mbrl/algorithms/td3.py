"""TD3 on real transitions only (Fujimoto et al. 2018), the model-free baseline of MVE.

for each env step:
    act with pi(s) plus Gaussian noise (uniform random for the first start_steps), store it
    G times: update the twin critics on a real batch; every policy_delay-th time also the
    actor and the target networks
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
    """TD3. The defaults are a short Pendulum run."""

    label: ClassVar[str] = "TD3"
    learners: ClassVar[tuple[str, ...]] = ("td3",)

    learner: LearnerConfig = field(default_factory=lambda: LearnerConfig(name="td3"))
    """The learner: TD3's networks, delay, smoothing and exploration noise."""


def train(cfg: Config, run: Run, device: str = "cpu") -> Summary:
    """Run (or resume) TD3 as configured, logging to ``run``."""
    return train_model_free(cfg, run, device)
