"""Noise for sampling planners: white and power-law ("colored") Gaussian noise over the horizon.

Colored noise follows Pinneri et al. 2020, "Sample-efficient Cross-Entropy Method for Real-time
Planning" (iCEM), Sec. 3.1: action sequences are perturbed with noise whose power spectral
density falls as ``1 / f^beta`` along the horizon axis (``beta = 0`` white, ``beta = 2`` red /
Brownian-like; iCEM uses ``beta`` between 2 and 2.5), which gives smoother, more temporally
correlated actions than white noise.

Construction (Timmer & Koenig 1995 spectral synthesis): for every candidate and action
dimension, the ``H // 2 + 1`` one-sided Fourier coefficients are independent zero-mean Gaussians
whose variance is proportional to ``f^-beta`` at ``f = k / H`` (the ``f = 0`` term uses
``f = 1 / H``, the lowest resolvable frequency, as a cut-off); interior coefficients are complex
with independent real and imaginary parts, the ``f = 0`` and (even ``H``) Nyquist terms are
real. The inverse real FFT (``torch.fft.irfft``) then gives a stationary Gaussian sequence, and
the amplitudes are normalised so that every sample has variance exactly 1 in expectation:
``Var y_t = (1 / H) * sum_{k=0}^{H-1} a_|k|^2 = 1`` over the two-sided spectrum.

All randomness comes from an explicit ``torch.Generator``; the numbers are drawn on the
generator's device and then moved to ``device``, so a CPU generator also serves a GPU planner
(same seed, same numbers on every device).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import torch


def white_noise(
    shape: Sequence[int],
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Standard normal float32 samples of ``shape``, drawn from ``generator`` (its device), then
    moved to ``device``. ``generator=None`` uses torch's default generator on ``device``."""
    if generator is None:
        return torch.randn(tuple(shape), dtype=torch.float32, device=device)
    out = torch.randn(
        tuple(shape), generator=generator, dtype=torch.float32, device=generator.device
    )
    return out.to(device) if device is not None else out


def uniform_noise(
    shape: Sequence[int],
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Uniform float32 samples on ``[0, 1)`` of ``shape``; generator and device as in
    :func:`white_noise`."""
    if generator is None:
        return torch.rand(tuple(shape), dtype=torch.float32, device=device)
    out = torch.rand(
        tuple(shape), generator=generator, dtype=torch.float32, device=generator.device
    )
    return out.to(device) if device is not None else out


def power_law_amplitudes(horizon: int, beta: float) -> torch.Tensor:
    """Standard deviations ``[H // 2 + 1]`` of the one-sided Fourier coefficients of unit-variance
    ``1 / f^beta`` noise of length ``horizon`` (in the convention of ``torch.fft.irfft``).

    ``a_k ∝ f_k^(-beta / 2)`` with ``f_k = k / H`` and ``f_0 := 1 / H``; the scale is chosen so
    that ``(1 / H) * sum_{k=0}^{H-1} a_|k|^2 = 1``; multiplied by ``sqrt(H)`` (the size of a unit
    white-noise coefficient) this makes the irfft output have unit variance at every step.
    """
    _check_noise_args(horizon, beta)
    freqs = torch.arange(horizon // 2 + 1, dtype=torch.float64) / horizon  # [F]
    freqs[0] = 1.0 / horizon
    amp = freqs ** (-beta / 2.0)  # [F]
    # Each one-sided interior term stands for two two-sided terms (k and H - k).
    weight = torch.full_like(amp, 2.0)  # [F]
    weight[0] = 1.0
    if horizon % 2 == 0:
        weight[-1] = 1.0
    power = (weight * amp**2).sum() / horizon
    return (amp / power.sqrt()).float()


def colored_noise(
    shape: Sequence[int],
    beta: float,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Gaussian ``1 / f^beta`` noise of ``shape = (N, H, U)``, correlated along the horizon axis.

    Every ``[:, t, u]`` entry is marginally standard normal (variance 1 in expectation for each
    step and action dimension); the expected periodogram along ``H`` is ``∝ f^-beta`` for
    ``f = k / H``, ``k >= 1``. ``beta = 0`` is white noise (drawn through the FFT as well).

    Args:
        shape: ``(N, H, U)``: candidates, horizon, action dimensions.
        beta: spectral exponent ``>= 0``.
        generator: source of all randomness (``None``: torch's default generator).
        device: where the result lives (default: the generator's device, or CPU).

    Returns:
        ``[N, H, U]`` float32.
    """
    if len(shape) != 3:
        raise ValueError(f"colored_noise: shape must be (N, H, U), got {tuple(shape)}")
    n, horizon, act_dim = (int(s) for s in shape)
    _check_noise_args(horizon, beta)
    n_freq = horizon // 2 + 1
    parts = white_noise((n, act_dim, n_freq, 2), generator, device)  # [N, U, F, 2]
    size, imag_on = _spectrum(horizon, float(beta), parts.device)  # [F], [F]
    coef = torch.complex(parts[..., 0], parts[..., 1] * imag_on) * size  # [N, U, F]
    seq = torch.fft.irfft(coef, n=horizon, dim=-1)  # [N, U, H]
    return seq.transpose(1, 2).contiguous()  # [N, H, U]


@functools.lru_cache(maxsize=64)
def _spectrum(horizon: int, beta: float, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The size of every one-sided coefficient ``[F]`` (its power-law amplitude times the size
    of a unit white-noise coefficient) and ``[F]`` 1 where it has an imaginary part, 0 at DC and
    (even ``H``) Nyquist; made once per horizon, exponent and device (planners draw the same
    shape every iteration). Read-only."""
    with torch.inference_mode(False):  # usable in and out of inference mode
        amp = power_law_amplitudes(horizon, beta).to(device)  # [F]
        n_freq = amp.shape[0]
        # Interior coefficients: complex with variance H (H / 2 per part); DC, Nyquist: real.
        scale = torch.full((n_freq,), math.sqrt(horizon / 2.0), device=device)  # [F]
        imag_on = torch.ones(n_freq, device=device)  # [F]
        scale[0] = math.sqrt(horizon)
        imag_on[0] = 0.0
        if horizon % 2 == 0:
            scale[-1] = math.sqrt(horizon)
            imag_on[-1] = 0.0
        return amp * scale, imag_on


def _check_noise_args(horizon: int, beta: float) -> None:
    if horizon < 1:
        raise ValueError(f"colored noise needs a horizon >= 1, got {horizon}")
    if not (math.isfinite(beta) and beta >= 0.0):
        raise ValueError(f"colored noise exponent beta must be finite and >= 0, got {beta}")
