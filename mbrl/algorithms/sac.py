"""SAC on real transitions only (Haarnoja et al. 2018), the model-free baseline of MBPO.

for each env step:
    act with a policy sample (uniform random for the first start_steps), store it
    G times: update critics, actor and temperature on a real batch
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
    """SAC. The defaults are a short Pendulum run."""

    label: ClassVar[str] = "SAC"
    learners: ClassVar[tuple[str, ...]] = ("sac",)

    learner: LearnerConfig = field(default_factory=lambda: LearnerConfig(name="sac"))
    """The learner: SAC's networks, discount, Polyak rate, temperature."""


def train(cfg: Config, run: Run, device: str = "cpu") -> Summary:
    """Run (or resume) SAC as configured, logging to ``run``."""
    return train_model_free(cfg, run, device)
