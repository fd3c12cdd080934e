"""The algorithm registry used by the CLI: name -> module with ``Config`` and ``train``.

Each module defines a ``Config`` dataclass (its defaults are a quick run) and
``train(cfg, run, device) -> Summary``, which resumes from the run's last checkpoint.
"""

from __future__ import annotations

import importlib
from types import ModuleType

ALGORITHMS: dict[str, str] = {
    "pets": "mbrl.algorithms.pets",
    "sac": "mbrl.algorithms.sac",
    "td3": "mbrl.algorithms.td3",
    "ddpg": "mbrl.algorithms.ddpg",
    "naf": "mbrl.algorithms.naf",
    "mbpo": "mbrl.algorithms.mbpo",
    "mve": "mbrl.algorithms.mve",
    "mba": "mbrl.algorithms.mba",
    "gp-mpc": "mbrl.algorithms.gp_mpc",
    "mcts-mpc": "mbrl.algorithms.mcts_mpc",
    "lqr-flm": "mbrl.algorithms.lqr_flm",
    "gps": "mbrl.algorithms.gps",
    "planet": "mbrl.algorithms.planet",
    "latent-mpc": "mbrl.algorithms.latent_mpc",
}


def get(name: str) -> ModuleType:
    """The module of algorithm ``name``; an unknown name lists the valid ones."""
    try:
        module = ALGORITHMS[name]
    except KeyError:
        valid = ", ".join(sorted(ALGORITHMS))
        raise KeyError(f"unknown algorithm {name!r}; valid names: {valid}") from None
    return importlib.import_module(module)
