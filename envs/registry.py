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


def known(name: str) -> bool:
    """Whether :func:`make` takes ``name``: a registered name, or a well-formed ``gym:ID``
    name (whether gymnasium has that id, and the functions it names import, shows at
    :func:`make`)."""
    if name.startswith("gym:"):
        from mbrl.envs.gym_env import GymEnvName

        try:
            GymEnvName.parse(name)
        except ValueError:
            return False
        return True
    return name in _REGISTRY


def make(name: str) -> EnvSpec:
    """The :class:`EnvSpec` registered under ``name``, or of any gymnasium env named
    ``gym:ID[?reward=module:fn&...]`` (:mod:`mbrl.envs.gym_env`).

    Raises:
        KeyError: for an unknown name; the message lists the valid ones.
        ValueError: a ``gym:`` name that does not resolve (the message says why).
    """
    if name.startswith("gym:"):
        from mbrl.envs.gym_env import make_spec  # on first use of a gym: name

        return make_spec(name)
    try:
        factory = _REGISTRY[name]
    except KeyError:
        raise KeyError(
            f"unknown env {name!r}; valid names: {', '.join(names())}, or gym:ID for any "
            "gymnasium env"
        ) from None
    return factory()
