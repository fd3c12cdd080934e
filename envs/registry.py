"""The environment registry: ``make(name) -> EnvSpec`` and ``names()``."""

from __future__ import annotations

from collections.abc import Callable

from mbrl.envs.spec import EnvSpec

_REGISTRY: dict[str, Callable[[], EnvSpec]] = {}


def register(name: str, factory: Callable[[], EnvSpec]) -> None:
    """Register ``factory`` (called lazily by :func:`make`) under ``name``."""
    if name in _REGISTRY:
        raise ValueError(f"env {name!r} is already registered")
    _REGISTRY[name] = factory


def names() -> list[str]:
    """Registered env names, sorted."""
    return sorted(_REGISTRY)


def make(name: str) -> EnvSpec:
    """The :class:`EnvSpec` registered under ``name``.

    Raises:
        KeyError: for an unknown name; the message lists the valid ones.
    """
    try:
        factory = _REGISTRY[name]
    except KeyError:
        raise KeyError(f"unknown env {name!r}; valid names: {', '.join(names())}") from None
    return factory()
