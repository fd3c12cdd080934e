"""Exact comparison of checkpoint states, shared by the resume, continue and sweep tests."""

from __future__ import annotations

import math

import torch


def assert_same(a, b, where="state"):
    """``a`` equals ``b`` exactly: nested dicts, lists, tensors (``torch.equal``) and numbers,
    NaN equal to NaN; the assertion names the path of the first difference."""
    if isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for key in a:
            assert_same(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, list | tuple):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_same(x, y, f"{where}[{i}]")
    elif isinstance(a, torch.Tensor):
        assert torch.equal(a, b), where
    elif isinstance(a, float) and math.isnan(a):
        assert isinstance(b, float) and math.isnan(b), where
    else:
        assert a == b, where
