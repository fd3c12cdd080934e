"""Every YAML in ``experiments/`` loads into its algorithm's config and names a known env."""

from __future__ import annotations

from pathlib import Path

import pytest

from mbrl import algorithms, envs
from mbrl.config import load_config

EXPERIMENTS = Path(__file__).resolve().parents[1] / "experiments"
YAMLS = sorted(EXPERIMENTS.glob("*.yaml"))


def algorithm_of(path: Path) -> str:
    """``mve_pendulum.yaml`` -> ``mve``; ``gp_mpc_pendulum.yaml`` -> ``gp-mpc``."""
    stem = path.stem.replace("_", "-")
    names = [n for n in algorithms.ALGORITHMS if stem.startswith(n + "-")]
    assert names, f"{path.name} does not start with an algorithm name"
    return max(names, key=len)


def test_there_are_experiment_files():
    assert len(YAMLS) >= 10


@pytest.mark.parametrize("path", YAMLS, ids=[p.name for p in YAMLS])
def test_experiment_yaml_loads(path):
    cfg = load_config(algorithms.get(algorithm_of(path)).Config, path)
    assert cfg.env in envs.names(), f"{path.name}: unknown env {cfg.env!r}"
