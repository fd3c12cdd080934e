"""Optional parts and their install hints.

The core install runs every registered env, PETS, the Dyna learners and the control study.
The parts below need an extra of the distribution (``pip install 'torch-mbrl[EXTRA]'``):

| extra | installs | needed for |
| --- | --- | --- |
| ``gp`` | gpytorch | GP-MPC and ``mbrl.dynamics.GaussianProcessModel`` |
| ``video`` | imageio, imageio-ffmpeg, pygame | ``mbrl eval --video`` (pygame: classic control) |
| ``ray`` | ray | sweeps on a Ray cluster |
| ``docs`` | mkdocs-material, mkdocstrings | ``make docs`` |
| ``test`` | the above but docs, pytest, ruff, hypothesis | the test suite |
"""

from __future__ import annotations

import importlib
from types import ModuleType

DISTRIBUTION = "torch-mbrl"
"""The name on PyPI (``mbrl`` there is another project); the import name stays ``mbrl``."""

EXTRA_OF_MODULE = {
    "gpytorch": "gp",
    "linear_operator": "gp",
    "imageio": "video",
    "imageio_ffmpeg": "video",
    "pygame": "video",
    "ray": "ray",
}
"""Top-level module -> the extra that installs it."""


class MissingExtraError(ImportError, RuntimeError):
    """An optional dependency is not installed; the message names the extra to install."""


def install_hint(extra: str) -> str:
    """``pip install 'torch-mbrl[EXTRA]'``."""
    return f"pip install '{DISTRIBUTION}[{extra}]'"


def require(module: str, what: str) -> ModuleType:
    """Import ``module``, or fail with what needs it and the install command.

    Raises:
        MissingExtraError: ``module`` is not installed ("GP-MPC needs gpytorch: pip install
            'torch-mbrl[gp]'").
    """
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as e:
        raise missing(e, what) from None


def missing(error: ModuleNotFoundError, what: str) -> ImportError:
    """The :class:`MissingExtraError` for ``error`` when its module belongs to an extra, else
    ``error`` itself (a missing core dependency is a broken install, not an extra)."""
    top = (error.name or "").split(".")[0]
    extra = EXTRA_OF_MODULE.get(top)
    if extra is None:
        return error
    return MissingExtraError(f"{what} needs {top}: {install_hint(extra)}", name=top)
