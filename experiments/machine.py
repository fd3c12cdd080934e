"""This machine's measured matmul peak, the yardstick of every speed benchmark."""

from __future__ import annotations

import time

import torch


def matmul_peak_gflops(
    dtype: torch.dtype = torch.float32, size: int = 1024, seconds: float = 1.0, device: str = "cpu"
) -> float:
    """Best achieved GFLOP/s of a square ``size`` matmul in ``dtype`` over ``seconds``."""
    a = torch.randn(size, size, device=device).to(dtype)
    b = torch.randn(size, size, device=device).to(dtype)
    out = torch.empty(size, size, device=device, dtype=dtype)
    for _ in range(3):
        torch.matmul(a, b, out=out)
    best = 0.0
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        start = time.perf_counter()
        for _ in range(5):
            torch.matmul(a, b, out=out)
        if device != "cpu":
            torch.cuda.synchronize()
        best = max(best, 5 * 2 * size**3 / (time.perf_counter() - start) / 1e9)
    return best
