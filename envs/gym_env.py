"""Any gymnasium env by its id: ``gym:ID`` env names, their reward and termination functions
given as ``module:function`` references.

A name is ``gym:`` and a gymnasium id, then options in URL-query form, for example::

    gym:MountainCarContinuous-v0?reward=my_pkg.rewards:mountain_car&termination=my_pkg.rewards:at_goal
    gym:Pendulum-v1?reward=mbrl.envs.tasks:pendulum_reward&wrappers=ClipAction&max_episode_steps=100

- ``reward``: ``module:function``, the batched torch ``reward(obs [B, X], act [B, U],
  next_obs [B, X]) -> [B]`` (:data:`mbrl.envs.RewardFn`);
- ``termination``: ``module:function``, ``termination(next_obs [B, X]) -> bool [B]``
  (default: never terminates, the time limit only);
- ``wrappers``: comma-separated names of ``gymnasium.wrappers`` classes taking no argument but
  the env (``ClipAction``, ``FlattenObservation``, ...), applied in order;
- ``max_episode_steps``: replaces the registered time limit.

The name is what a run's config records (its ``env`` key), so ``mbrl resume`` and ``mbrl eval``
rebuild the same env with the same functions; the modules must be importable where they run
(an installed package, or ``PYTHONPATH``). Importing a module runs its code: name only modules
you trust. :func:`mbrl.envs.make` hands every ``gym:`` name to :func:`make_spec`.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import gymnasium as gym

from mbrl.envs.spec import EnvSpec

PREFIX = "gym:"
OPTIONS = ("reward", "termination", "wrappers", "max_episode_steps")


@dataclass(frozen=True)
class GymEnvName:
    """The parts of a ``gym:ID?...`` env name; ``str()`` gives the canonical name back."""

    env_id: str
    reward: str | None = None  # module:function
    termination: str | None = None  # module:function
    wrappers: tuple[str, ...] = ()  # gymnasium.wrappers class names
    max_episode_steps: int | None = None

    def __str__(self) -> str:
        opts = []
        if self.reward:
            opts.append(f"reward={self.reward}")
        if self.termination:
            opts.append(f"termination={self.termination}")
        if self.wrappers:
            opts.append(f"wrappers={','.join(self.wrappers)}")
        if self.max_episode_steps is not None:
            opts.append(f"max_episode_steps={self.max_episode_steps}")
        return PREFIX + self.env_id + ("?" + "&".join(opts) if opts else "")

    @property
    def folder_name(self) -> str:
        """A file-name-safe label: the id without its options (``MountainCarContinuous-v0``)."""
        return "".join(c if c.isalnum() or c in "-_." else "-" for c in self.env_id)

    @classmethod
    def parse(cls, name: str) -> GymEnvName:
        """Split ``gym:ID?key=value&...``.

        Raises:
            ValueError: not a ``gym:`` name, an empty id, an unknown or repeated option, a
                reference that is not ``module:function``, a time limit that is not >= 1.
        """
        if not name.startswith(PREFIX) or len(name) == len(PREFIX):
            raise ValueError(f"env {name!r} is not of the form gym:ID[?key=value&...]")
        env_id, _, query = name[len(PREFIX) :].partition("?")
        if not env_id:
            raise ValueError(f"env {name!r}: the gymnasium id after gym: is empty")
        opts: dict[str, str] = {}
        for item in filter(None, query.split("&")):
            key, sep, value = item.partition("=")
            if not sep or key not in OPTIONS:
                raise ValueError(
                    f"env {name!r}: {item!r} is not an option; valid: "
                    f"{', '.join(k + '=...' for k in OPTIONS)}"
                )
            if key in opts:
                raise ValueError(f"env {name!r}: option {key} is given twice")
            opts[key] = value
        for key in ("reward", "termination"):
            if key in opts:
                _split_reference(opts[key], key)
        steps = opts.get("max_episode_steps")
        if steps is not None and (not steps.isdigit() or int(steps) < 1):
            raise ValueError(
                f"env {name!r}: max_episode_steps must be an integer >= 1, got {steps}"
            )
        return cls(
            env_id=env_id,
            reward=opts.get("reward") or None,
            termination=opts.get("termination") or None,
            wrappers=tuple(w for w in opts.get("wrappers", "").split(",") if w),
            max_episode_steps=None if steps is None else int(steps),
        )


def is_gym_name(name: str) -> bool:
    """Whether ``name`` names a gymnasium env by id (``gym:ID...``) rather than a registry entry."""
    return name.startswith(PREFIX)


def folder_name(name: str) -> str:
    """``name`` as part of a file name: a ``gym:`` name's id without its options, a registry
    name unchanged."""
    return GymEnvName.parse(name).folder_name if is_gym_name(name) else name


def gym_name(
    env_id: str,
    reward: str | None = None,
    termination: str | None = None,
    wrappers: tuple[str, ...] = (),
    max_episode_steps: int | None = None,
) -> str:
    """The canonical env name of these parts (checked by parsing it back)."""
    env_id = env_id[len(PREFIX) :] if is_gym_name(env_id) else env_id
    name = str(GymEnvName(env_id, reward, termination, tuple(wrappers), max_episode_steps))
    return str(GymEnvName.parse(name))


def load_reference(ref: str, what: str) -> Callable[..., Any]:
    """The callable ``module:attribute`` names (``what`` names it in errors).

    Raises:
        ValueError: a malformed reference, a module that does not import, a missing attribute,
            or one that is not callable.
    """
    module_name, attr = _split_reference(ref, what)
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise ValueError(
            f"{what} {ref!r}: cannot import module {module_name!r} ({e}); make it importable "
            "(install its package, or put its folder on PYTHONPATH)"
        ) from None
    fn: Any = module
    for part in attr.split("."):
        if not hasattr(fn, part):
            raise ValueError(f"{what} {ref!r}: module {module_name!r} has no {attr!r}")
        fn = getattr(fn, part)
    if not callable(fn):
        raise ValueError(f"{what} {ref!r} is a {type(fn).__name__}, not a function")
    return fn


def wrapper_class(name: str) -> Callable[[gym.Env], gym.Env]:
    """The ``gymnasium.wrappers`` class called ``name``.

    Raises:
        ValueError: no such wrapper; the message lists them.
    """
    import gymnasium.wrappers as wrappers

    cls = getattr(wrappers, name, None)
    if not (isinstance(cls, type) and issubclass(cls, gym.Wrapper)):
        valid = sorted(
            n
            for n in dir(wrappers)
            if isinstance(getattr(wrappers, n), type)
            and issubclass(getattr(wrappers, n), gym.Wrapper)
        )
        raise ValueError(f"unknown wrapper {name!r}; gymnasium.wrappers has: {', '.join(valid)}")

    def wrap(env: gym.Env) -> gym.Env:
        try:
            return cls(env)
        except TypeError as e:
            raise ValueError(
                f"wrapper {name} needs arguments besides the env ({e}); only wrappers that take "
                "the env alone can be named, wrap the env in your own code for the others"
            ) from None

    return wrap


def make_spec(name: str) -> EnvSpec:
    """The :class:`EnvSpec` of a ``gym:ID?...`` name (:meth:`EnvSpec.from_gym`), named by the
    canonical form of ``name`` so that ``make(spec.name)`` makes it again.

    Raises:
        ValueError: a malformed name, an unknown id or wrapper, a function that does not
            import or returns the wrong shape.
    """
    parts = GymEnvName.parse(name)
    reward = load_reference(parts.reward, "reward") if parts.reward else None
    term = load_reference(parts.termination, "termination") if parts.termination else None
    described = f"gymnasium {parts.env_id}" + (
        f", reward {parts.reward}" if parts.reward else ", no reward function"
    )
    return EnvSpec.from_gym(
        parts.env_id,
        reward,
        term,
        name=str(parts),
        wrappers=[wrapper_class(w) for w in parts.wrappers],
        max_episode_steps=parts.max_episode_steps,
        description=described,
    )


def _split_reference(ref: str, what: str) -> tuple[str, str]:
    module, sep, attr = ref.partition(":")
    if not sep or not module or not attr:
        raise ValueError(
            f"{what} {ref!r} is not of the form module:function (my_pkg.rewards:mountain_car)"
        )
    return module, attr
