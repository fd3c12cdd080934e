"""Shape checks at the seams.

Shape letters used across the project (see DESIGN.md):
``B`` batch, ``E`` ensemble members, ``P`` particles, ``N`` candidates, ``H`` horizon,
``X`` state/observation dim, ``U`` action dim, ``T`` episode length.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


class ShapeError(ValueError):
    """A tensor crossing a seam has the wrong shape."""


def check_shape(name: str, tensor: torch.Tensor, expected: Sequence[int | str | None]) -> None:
    """Raise :class:`ShapeError` unless ``tensor`` has ``len(expected)`` axes matching ``expected``.

    An entry of ``expected`` is an int (that size exactly), or a letter / ``None`` (any size).
    The message names the tensor and gives the expected and the actual shape, e.g.
    ``actions: expected [N, H=15, U=1], got [500, 10, 1]``.
    """
    shape = tuple(tensor.shape)
    ok = len(shape) == len(expected) and all(
        not isinstance(e, int) or s == e for s, e in zip(shape, expected, strict=False)
    )
    if not ok:
        want = ", ".join(_fmt(e) for e in expected)
        raise ShapeError(f"{name}: expected [{want}], got {list(shape)}")


def feature_indices(name: str, indices: Sequence[int], size: int) -> tuple[int, ...]:
    """``indices`` of features along an axis of ``size``, sorted and without repeats.

    Raises:
        ValueError: an index outside ``[0, size)``, naming ``name``.
    """
    out = tuple(sorted(set(indices)))
    if not all(0 <= i < size for i in out):
        raise ValueError(f"{name} must be indices in [0, {size}), got {list(indices)}")
    return out


def _fmt(e: int | str | None) -> str:
    if e is None:
        return "*"
    return str(e)
