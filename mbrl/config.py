"""Typed configs at the edges: dataclasses filled from YAML files and ``key=value`` overrides.

Library classes never see a config object; only the CLI, the algorithms' run functions and
``experiments/`` read configs and pass plain values on. A config is a (possibly nested)
dataclass whose field docstrings are the documentation. Everything is checked while the config
loads, before a run folder exists: an unknown key is an error that names the valid ones, a
choice field (``Literal[...]``) refuses a value outside its choices and lists them, and a
config's ``__post_init__`` checks what its fields must satisfy together (raising
:class:`ConfigError`).
"""

from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

C = TypeVar("C")


class ConfigError(ValueError):
    """A config file or override that does not fit the config dataclass."""


def load_config(cls: type[C], path: str | Path | None = None, overrides: list[str] = ()) -> C:
    """Build ``cls`` from its defaults, then the YAML file at ``path``, then ``overrides``.

    Overrides are ``key=value`` strings; nested fields use dotted keys (``model.hidden_size=200``);
    values are parsed as YAML scalars (``1e-3``, ``true``, ``[1, 2]``).
    """
    values: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {str(path)!r} does not exist")
        with path.open() as f:
            loaded = yaml.safe_load(f) or {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: expected a mapping of config keys, got {type(loaded)}")
        values = loaded
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r} is not of the form key=value")
        _set_dotted(values, key.strip(), yaml.safe_load(raw) if raw.strip() else "")
    return from_dict(cls, values)


def from_dict(cls: type[C], values: dict[str, Any], prefix: str = "", base: C | None = None) -> C:
    """Build dataclass ``cls`` from a nested dict, checking keys and converting types.

    Keys not in ``values`` keep their value in ``base`` (default: ``cls()``), so a nested
    config keeps its parent's defaults for the keys a file or override leaves out.
    """
    base = cls() if base is None else base
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(values) - set(fields))
    if unknown:
        valid = ", ".join(prefix + name for name in fields)
        raise ConfigError(
            f"unknown config key(s) {', '.join(prefix + k for k in unknown)}; valid keys: {valid}"
        )
    kwargs = {}
    for name, value in values.items():
        current = getattr(base, name)
        if dataclasses.is_dataclass(current) and isinstance(value, dict):
            kwargs[name] = from_dict(type(current), value, prefix + name + ".", current)
        else:
            kwargs[name] = _convert(hints[name], value, prefix + name)
    return dataclasses.replace(base, **kwargs)


def to_dict(cfg: Any) -> dict[str, Any]:
    """A config as plain nested dicts / lists / scalars (YAML- and checkpoint-safe)."""
    return _plain(dataclasses.asdict(cfg))


def save_config(cfg: Any, path: Path) -> None:
    with Path(path).open("w") as f:
        yaml.safe_dump(to_dict(cfg), f, sort_keys=False)


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value


def _set_dotted(values: dict[str, Any], key: str, value: Any) -> None:
    *parents, last = key.split(".")
    node = values
    for part in parents:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {key!r}: {part!r} is not a nested config")
    node[last] = value


def _convert(hint: Any, value: Any, key: str) -> Any:
    origin = typing.get_origin(hint)
    if dataclasses.is_dataclass(hint):
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping of {hint.__name__} fields, got {value!r}")
        return from_dict(hint, value, prefix=key + ".")
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(hint)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(arg, value, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(f"{key}: {value!r} fits none of {hint}")
    if origin is typing.Literal:
        choices = typing.get_args(hint)
        if value not in choices:
            valid = ", ".join(map(str, choices))
            raise ConfigError(f"unknown {key} {value!r}; valid: {valid}")
        return value
    if origin in (list, tuple):
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        (arg, *_) = typing.get_args(hint) or (Any,)
        items = [_convert(arg, v, key) for v in value]
        return tuple(items) if origin is tuple else items
    if hint is Any:
        return value
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true or false, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if hint is float:
        if isinstance(value, str):  # YAML 1.1 reads 1e-3 as a string
            try:
                return float(value)
            except ValueError:
                raise ConfigError(f"{key}: expected a number, got {value!r}") from None
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if hint is str:
        if not isinstance(value, str | int | float):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return str(value)
    return value
