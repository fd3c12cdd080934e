"""Typed configs at the edges: dataclasses filled from YAML files and ``key=value`` overrides.

Library classes never see a config object; only the CLI, the algorithms' run functions and
``experiments/`` read configs and pass plain values on. A config is a (possibly nested)
dataclass whose field docstrings are the documentation. Everything is checked while the config
loads, before a run folder exists:

- an unknown key is an error that names the valid ones;
- a choice field (``Literal[...]``) refuses a value outside its choices and lists them;
- a numeric field declares its range in its type (``lr: Positive``, ``seed: Seed``, or
  ``Annotated[float, Range(...)]``); a float is always required finite, a bool is never a
  number, and a value outside the range is refused with the dotted key, the value and the range;
- a config's ``__post_init__`` checks what its fields must satisfy together (raising
  :class:`ConfigError`), and :func:`check_ranges` checks the ranges of a config built in code;
- a YAML file or override that does not parse (bad syntax, bytes that are not UTF-8, a tag such
  as ``!!python/object``, a key given twice, a top level that is not a mapping) is refused with
  the file, the line and column where known, and the fix.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
import types
import typing
from pathlib import Path
from typing import Annotated, Any, TypeVar

import yaml

C = TypeVar("C")


class ConfigError(ValueError):
    """A config file or override that does not fit the config dataclass."""


# ----------------------------------------------------------------------------- ranges


@dataclasses.dataclass(frozen=True)
class Range:
    """The values a numeric config field allows: from ``lo`` to ``hi``, each end included
    unless it is open. Floats must also be finite (``inf`` is never a value, only a bound).

    ``fix``, when given, replaces the standard message after ``key=value:`` with advice of the
    field's own; it must state the range.
    """

    lo: float = -math.inf
    hi: float = math.inf
    lo_open: bool = False
    hi_open: bool = False
    fix: str = ""

    def __contains__(self, value: float) -> bool:
        if isinstance(value, float) and not math.isfinite(value):
            return False
        above = value > self.lo if self.lo_open else value >= self.lo
        below = value < self.hi if self.hi_open else value <= self.hi
        return above and below

    def describe(self, integer: bool) -> str:
        """``"an integer >= 1"``, ``"> 0 and finite"``, ``"in (0, 1]"``, ``"a finite number"``."""
        lo, hi = math.isfinite(self.lo), math.isfinite(self.hi)
        kind = "an integer" if integer else "a finite number"
        if lo and hi:
            left, right = "(" if self.lo_open else "[", ")" if self.hi_open else "]"
            span = f"in {left}{_num(self.lo)}, {_num(self.hi)}{right}"
            return f"an integer {span}" if integer else span
        if lo or hi:
            if lo:
                bound = f"{'>' if self.lo_open else '>='} {_num(self.lo)}"
            else:
                bound = f"{'<' if self.hi_open else '<='} {_num(self.hi)}"
            return f"an integer {bound}" if integer else f"{bound} and finite"
        return kind

    def check(self, value: int | float, key: str) -> None:
        """Raise :class:`ConfigError` naming ``key``, ``value`` and the range unless
        ``value`` is in it."""
        if value not in self:
            if self.fix:
                raise ConfigError(f"{key}={value!r}: {self.fix}")
            integer = isinstance(value, int)
            raise ConfigError(f"{key} must be {self.describe(integer)}, got {value!r}")


Positive = Annotated[float, Range(0.0, lo_open=True)]
"""A finite float > 0 (rates, scales, limits)."""
NonNegative = Annotated[float, Range(0.0)]
"""A finite float >= 0 (noise levels, penalties; 0 turns them off)."""
UnitInterval = Annotated[float, Range(0.0, 1.0, lo_open=True)]
"""A float in (0, 1] (shares that cannot be empty, Polyak rates)."""
Fraction = Annotated[float, Range(0.0, 1.0)]
"""A float in [0, 1] (discounts, shares)."""
ProperFraction = Annotated[float, Range(0.0, 1.0, hi_open=True)]
"""A float in [0, 1) (held-out shares, smoothing weights)."""
Finite = Annotated[float, Range()]
"""Any finite float."""
Count = Annotated[int, Range(1)]
"""An integer >= 1 (sizes, steps, episodes)."""
Natural = Annotated[int, Range(0)]
"""An integer >= 0 (0 means none)."""
Seed = Annotated[int, Range(0, 2**32, hi_open=True)]
"""A seed: an integer in [0, 2**32)."""


def check_ranges(cfg: Any, prefix: str = "") -> None:
    """Raise :class:`ConfigError` for the first numeric field of dataclass ``cfg`` (nested
    sections, optional values and list items included) outside the range its type declares;
    the message names the dotted key. :func:`from_dict` checks the same while a config loads;
    this checks a config built in code (call it from ``__post_init__``)."""
    hints = _hints(type(cfg))
    for f in dataclasses.fields(cfg):
        value, key = getattr(cfg, f.name), prefix + f.name
        if dataclasses.is_dataclass(value):
            check_ranges(value, key + ".")
        else:
            _check_value(hints[f.name], value, key)


def _check_value(hint: Any, value: Any, key: str) -> None:
    origin = typing.get_origin(hint)
    if origin is Annotated:
        base, *meta = typing.get_args(hint)
        ranges = [m for m in meta if isinstance(m, Range)]
        if ranges and (isinstance(value, bool) or not isinstance(value, int | float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        for r in ranges:
            r.check(value, key)
        _check_value(base, value, key)
    elif origin in (typing.Union, types.UnionType):
        if value is not None:
            args = [a for a in typing.get_args(hint) if a is not type(None)]
            if len(args) == 1:
                _check_value(args[0], value, key)
    elif origin in (list, tuple) and isinstance(value, list | tuple):
        (arg, *_) = typing.get_args(hint) or (Any,)
        for i, v in enumerate(value):
            _check_value(arg, v, f"{key}[{i}]")
    elif hint is float and isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"{key} must be a finite number, got {value!r}")


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() and abs(x) < 1e16 else f"{x:g}"


# ----------------------------------------------------------------------------- loading


def load_config(cls: type[C], path: str | Path | None = None, overrides: list[str] = ()) -> C:
    """Build ``cls`` from its defaults, then the YAML file at ``path``, then ``overrides``.

    Overrides are ``key=value`` strings; nested fields use dotted keys (``model.hidden_size=200``);
    values are parsed as YAML scalars (``1e-3``, ``true``, ``[1, 2]``). An empty file sets no
    values.

    Raises:
        ConfigError: a file that is missing, a directory, not UTF-8, not valid YAML, tagged,
            with a key twice or not a mapping at the top; a malformed override; a value that
            does not fit its field (see the module docstring).
    """
    values: dict[str, Any] = {} if path is None else _read_yaml(Path(path))
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r} is not of the form key=value")
        value = _parse_yaml(raw, f"override {item!r}", file=False) if raw.strip() else ""
        _set_dotted(values, key.strip(), value)
    return from_dict(cls, values)


def from_dict(cls: type[C], values: dict[str, Any], prefix: str = "", base: C | None = None) -> C:
    """Build dataclass ``cls`` from a nested dict, checking keys, types and ranges.

    Keys not in ``values`` keep their value in ``base`` (default: ``cls()``), so a nested
    config keeps its parent's defaults for the keys a file or override leaves out.
    """
    if not isinstance(values, dict):
        where = f"{prefix.rstrip('.')}: " if prefix else ""
        raise ConfigError(f"{where}expected a mapping of config keys, got {values!r}")
    base = cls() if base is None else base
    hints = _hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(str(k) for k in values if k not in fields)
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


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls, include_extras=True)


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


# ----------------------------------------------------------------------------- YAML


class _Loader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses a mapping key given twice (safe_load keeps the last)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: set = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            if not isinstance(key, typing.Hashable):
                continue  # SafeLoader refuses it with its own message
            if key in seen:
                raise _DuplicateKey(None, None, f"key {key!r} is given twice", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep)


class _DuplicateKey(yaml.MarkedYAMLError):
    pass


def _read_yaml(path: Path) -> dict[str, Any]:
    if path.is_dir():
        raise ConfigError(f"config file {str(path)!r} is a directory; pass a YAML file")
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} does not exist")
    try:
        data = path.read_bytes()
    except OSError as e:
        raise ConfigError(f"config file {str(path)!r} cannot be read: {e.strerror}") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(
            f"{path}: not UTF-8 text (byte 0x{data[e.start]:02x} at offset {e.start}); "
            "save the file as UTF-8"
        ) from None
    loaded = _parse_yaml(text, str(path))
    if loaded is None:
        return {}
    if not isinstance(loaded, dict):
        raise ConfigError(
            f"{path}: the top level must be a mapping of config keys (key: value lines), got "
            + ("a list" if isinstance(loaded, list) else f"the value {loaded!r}")
        )
    return loaded


def _parse_yaml(text: str, where: str, file: bool = True) -> Any:
    """``text`` parsed as safe YAML; a parse error names ``where`` (and, for a ``file``, the
    line and column)."""
    try:
        return yaml.load(text, Loader=_Loader)  # noqa: S506 (a SafeLoader)
    except yaml.YAMLError as e:
        raise ConfigError(_yaml_message(e, where, file)) from None


def _yaml_message(e: yaml.YAMLError, where: str, file: bool) -> str:
    problem, context = str(e), ""
    if isinstance(e, yaml.MarkedYAMLError):
        problem, context = e.problem or str(e), e.context or ""
        if e.problem_mark is not None and file:
            where = f"{where}:{e.problem_mark.line + 1}:{e.problem_mark.column + 1}"
    problem, context = " ".join(problem.split()), " ".join(context.split())
    if isinstance(e, _DuplicateKey):
        return f"{where}: {problem}; keep one of them"
    tag = re.search(r"the tag '([^']*)'", problem)
    if isinstance(e, yaml.constructor.ConstructorError) and tag:
        return (
            f"{where}: the YAML tag {tag.group(1)!r} is not allowed (configs hold plain "
            "mappings, lists and scalars); remove the tag"
        )
    detail = f"{problem} ({context})" if context else problem
    if not file:
        return f"{where}: the value is malformed YAML: {detail}; fix it, or quote a string"
    return (
        f"{where}: malformed YAML: {detail}; fix the syntax there (quote a value that holds "
        "': ' or ' #')"
    )


# ----------------------------------------------------------------------------- conversion


def _convert(hint: Any, value: Any, key: str) -> Any:
    origin = typing.get_origin(hint)
    if origin is Annotated:
        base, *meta = typing.get_args(hint)
        ranges = [m for m in meta if isinstance(m, Range)]
        out = _to_float(value, key) if base is float and ranges else _convert(base, value, key)
        for r in ranges:
            r.check(out, key)
        return out
    if dataclasses.is_dataclass(hint):
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping of {hint.__name__} fields, got {value!r}")
        return from_dict(hint, value, prefix=key + ".")
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if value is None and len(args) < len(typing.get_args(hint)):
            return None
        errors = []
        for arg in args:
            try:
                return _convert(arg, value, key)
            except ConfigError as e:
                errors.append(str(e))
        if len(errors) == 1:
            raise ConfigError(errors[0])
        raise ConfigError(f"{key}: {value!r} fits none of: {'; '.join(errors)}")
    if origin is typing.Literal:
        choices = typing.get_args(hint)
        if isinstance(value, bool) or value not in choices:
            valid = ", ".join(map(str, choices))
            raise ConfigError(f"unknown {key} {value!r}; valid: {valid}")
        return value
    if origin in (list, tuple):
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        (arg, *_) = typing.get_args(hint) or (Any,)
        items = [_convert(arg, v, f"{key}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if hint is Any:
        return value
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true or false, got {value!r}")
        return value
    if hint is int:
        return _to_int(value, key)
    if hint is float:
        out = _to_float(value, key)
        if not math.isfinite(out):
            raise ConfigError(f"{key} must be a finite number, got {out!r}")
        return out
    if hint is str:
        if isinstance(value, bool) or not isinstance(value, str | int | float):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return str(value)
    return value


def _to_int(value: Any, key: str) -> int:
    """An int from an int, an integral float (``1e5``) or a string of one (YAML 1.1 reads
    ``1e5`` as a string); never from a bool."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    number = value
    if isinstance(value, str):
        try:
            number = float(value)
        except ValueError:
            number = None
    if isinstance(number, float) and number.is_integer():
        return int(number)
    raise ConfigError(f"{key}: expected an integer, got {value!r}")


def _to_float(value: Any, key: str) -> float:
    """A float from a number or a numeric string (YAML 1.1 reads ``1e-3`` as a string); never
    from a bool. Not checked for finiteness here."""
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            raise ConfigError(f"{key}: expected a number, got {value!r}") from None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ConfigError(f"{key}: expected a number, got {value!r}")
    try:
        return float(value)
    except OverflowError:  # an int beyond the float range
        return math.copysign(math.inf, value)
