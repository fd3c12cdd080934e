"""The documentation of a config, read from the config itself: every (dotted, nested) key with
its type, default, choices, range markers and the field docstring written under it.

A field docstring is the string literal right under a dataclass field; it is read from the
class's source with :mod:`ast`, walking the class's bases so that a subclass that only changes
a default keeps its parent's text. Choices come from ``Literal`` types; anything else in a
field's ``typing.Annotated[...]`` metadata (a range marker, say) is shown as ``str(marker)``.
This is what ``mbrl run ALGO --help`` prints.
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import inspect
import re
import textwrap
import types
import typing
from dataclasses import dataclass
from typing import Any

import yaml

from mbrl.config import Range


@dataclass(frozen=True)
class ConfigKey:
    """One settable key of a config."""

    key: str  # dotted path, "model.hidden_size"
    type: str  # "int", "float or null", "one of ts1, ts_inf, expectation"
    default: Any  # the value in the config's defaults (nested defaults included)
    choices: tuple[Any, ...] = ()  # a Literal's values
    markers: tuple[str, ...] = ()  # str() of the field's Annotated metadata (ranges)
    doc: str = ""  # the field docstring ("" when the field has none)


@dataclass(frozen=True)
class ConfigSection:
    """A nested config field (``model``, ``planner``): its dotted prefix and docstring."""

    key: str
    doc: str


def field_docs(cls: type) -> dict[str, str]:
    """Field name -> docstring of dataclass ``cls``, a base's text where ``cls`` has none."""
    docs: dict[str, str] = {}
    for base in reversed(cls.__mro__):
        if dataclasses.is_dataclass(base):
            docs.update(_own_field_docs(base))
    return docs


def config_keys(cls: type) -> list[ConfigKey | ConfigSection]:
    """Every key of config dataclass ``cls`` in declaration order, nested sections flattened
    (each preceded by its :class:`ConfigSection`)."""
    return _walk(cls, cls(), "")


def help_text(cls: type, width: int = 100) -> str:
    """The key listing of ``cls`` as ``mbrl run ALGO --help`` prints it."""
    lines = []
    for item in config_keys(cls):
        if isinstance(item, ConfigSection):
            lines.append(f"\n  {item.key}.*")
            if item.doc:
                lines += _wrap(item.doc, width, "      ")
            continue
        head = f"  {item.key}: {item.type} = {_scalar(item.default)}"
        if item.markers:
            head += f"  ({'; '.join(item.markers)})"
        lines.append(head)
        if item.doc:
            lines += _wrap(item.doc, width, "      ")
    return "\n".join(lines).lstrip("\n")


def _walk(cls: type, value: Any, prefix: str) -> list[ConfigKey | ConfigSection]:
    hints = typing.get_type_hints(cls, include_extras=True)
    docs = field_docs(cls)
    out: list[ConfigKey | ConfigSection] = []
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        current = getattr(value, f.name)
        key = prefix + f.name
        if dataclasses.is_dataclass(current):
            out.append(ConfigSection(key, docs.get(f.name, "") or _class_doc(type(current))))
            out += _walk(type(current), current, key + ".")
            continue
        hint, markers = _strip_annotated(hints[f.name])
        choices = _choices(hint)
        out.append(
            ConfigKey(
                key=key,
                type=_type_name(hint),
                default=current,
                choices=choices,
                markers=tuple(_marker_text(m, hint) for m in markers),
                doc=docs.get(f.name, ""),
            )
        )
    return out


@functools.cache
def _own_field_docs(cls: type) -> dict[str, str]:
    """The docstrings under the fields declared in ``cls``'s own body."""
    try:
        source = textwrap.dedent(inspect.getsource(cls))
    except (OSError, TypeError):  # no source (a class made at run time)
        return {}
    node = next(n for n in ast.parse(source).body if isinstance(n, ast.ClassDef))
    docs: dict[str, str] = {}
    body = node.body
    for stmt, after in zip(body, body[1:], strict=False):
        if (
            isinstance(stmt, ast.AnnAssign)
            and isinstance(stmt.target, ast.Name)
            and isinstance(after, ast.Expr)
            and isinstance(after.value, ast.Constant)
            and isinstance(after.value.value, str)
        ):
            docs[stmt.target.id] = inspect.cleandoc(after.value.value)
    return docs


def _class_doc(cls: type) -> str:
    doc = inspect.getdoc(cls) or ""
    return doc.split("\n\n")[0]


def _strip_annotated(hint: Any) -> tuple[Any, tuple[Any, ...]]:
    """``hint`` without ``Annotated`` (also inside a union) and the metadata it carried."""
    markers: tuple[Any, ...] = ()
    while typing.get_origin(hint) is typing.Annotated:
        markers += tuple(hint.__metadata__)
        hint = typing.get_args(hint)[0]
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        args = []
        for arg in typing.get_args(hint):
            arg, inner = _strip_annotated(arg)
            args.append(arg)
            markers += inner
        hint = typing.Union[tuple(args)]  # noqa: UP007 (built from a runtime tuple)
    return hint, markers


def _marker_text(marker: Any, hint: Any) -> str:
    """A range as its own words (``an integer >= 1``, ``in (0, 1]``); other metadata as
    ``str()``."""
    if isinstance(marker, Range):
        integer = hint is int or int in typing.get_args(hint)
        return marker.describe(integer)
    return str(marker)


def _choices(hint: Any) -> tuple[Any, ...]:
    if typing.get_origin(hint) is typing.Literal:
        return typing.get_args(hint)
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return tuple(c for a in typing.get_args(hint) for c in _choices(a))
    return ()


def _type_name(hint: Any) -> str:
    origin = typing.get_origin(hint)
    if origin is typing.Literal:
        return "one of " + ", ".join(_scalar(c) for c in typing.get_args(hint))
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        names = " or ".join(_type_name(_strip_annotated(a)[0]) for a in args)
        return names + (" or null" if len(args) < len(typing.get_args(hint)) else "")
    if origin in (list, tuple):
        (arg, *_) = typing.get_args(hint) or (Any,)
        return f"list of {_type_name(arg)}"
    if hint is Any:
        return "any"
    return getattr(hint, "__name__", str(hint))


def _scalar(value: Any) -> str:
    """``value`` as it would be written in an override (YAML): null, true, 0.001, [1, 2]."""
    if isinstance(value, tuple):
        value = list(value)
    text = yaml.safe_dump(value, default_flow_style=True, width=10_000).strip()
    return text.removesuffix("...").strip()


def _wrap(text: str, width: int, indent: str) -> list[str]:
    """Paragraphs of ``text`` wrapped for a terminal, reST roles and literals made plain."""
    text = re.sub(r":\w+:`~?([^`]+)`", r"`\1`", text).replace("``", "`")
    out = []
    for para in text.split("\n\n"):
        flat = " ".join(para.split())
        out += textwrap.wrap(flat, width, initial_indent=indent, subsequent_indent=indent)
    return out
