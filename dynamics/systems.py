"""Analytic systems behind the model seam: :class:`SystemModel`.

A system (:class:`mbrl.envs.systems.AnalyticSystem`, or anything with the same step functions:
:class:`AnalyticDynamics`) writes its discrete step once in torch and casadi; the model wraps
those functions and declares what it can do, each a capability of :mod:`mbrl.dynamics.base`:

- :class:`~mbrl.dynamics.base.DifferentiableModel`: ``mean_dynamics`` is the torch step when a
  gradient may be needed, else the compiled casadi twin (same discretization, float64
  evaluation, returned in the input's dtype), which costs a fraction of the torch op-by-op
  overhead in sequential rollouts;
- :class:`~mbrl.dynamics.base.Linearizable`: exact Jacobians by casadi AD (time-invariant: the
  time index is ignored);
- :class:`~mbrl.dynamics.base.CasadiModel`: the symbolic step and ODE for NMPC.

This module imports nothing from ``mbrl.envs``: the system is passed in.
"""

from __future__ import annotations

from typing import Any, Protocol

import torch

from mbrl.dynamics.base import check_rows
from mbrl.dynamics.known import KnownModel


class AnalyticDynamics(Protocol):
    """The step functions a :class:`SystemModel` is built from (an ``AnalyticSystem``)."""

    obs_dim: int  # X
    act_dim: int  # U
    dt: float  # seconds per step

    def step(self, x: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        """Torch step ``x [B, X], u [B, U] -> [B, X]``, autograd-able."""
        ...

    def step_numeric(self, x: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        """The same step without autograd (compiled), in ``x``'s dtype."""
        ...

    def linearize(self, x: torch.Tensor, u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``A [B, X, X]``, ``B [B, X, U]`` of the step."""
        ...

    def step_casadi(self, x: Any, u: Any) -> Any: ...

    def ode_casadi(self, x: Any, u: Any) -> Any: ...


class SystemModel(KnownModel):
    """:class:`~mbrl.dynamics.known.KnownModel` of an analytic system, with fast paths and
    exact Jacobians; a ``DifferentiableModel``, ``Linearizable`` and ``CasadiModel``.

    The step is the system's torch step whenever a gradient may be needed (autograd enabled
    and an input requires grad) or the tensors are not on the CPU; otherwise the compiled
    casadi twin.
    """

    def __init__(self, system: AnalyticDynamics) -> None:
        super().__init__(self._step, system.obs_dim, system.act_dim)
        self.system = system
        self.dt = float(system.dt)

    def _step(self, x: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        if x.device.type != "cpu" or (
            torch.is_grad_enabled() and (x.requires_grad or u.requires_grad)
        ):
            return self.system.step(x, u)
        return self.system.step_numeric(x, u)

    def linearize(
        self, x: torch.Tensor, u: torch.Tensor, t: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``A [B, X, X]``, ``B [B, X, U]`` at rows ``x [B, X]``, ``u [B, U]`` by casadi AD
        (``x``'s dtype and device); ``t`` is ignored (time-invariant)."""
        check_rows(x, u, self.obs_dim, self.act_dim, "x", "u")
        return self.system.linearize(x, u)

    def step_casadi(self, x: Any, u: Any) -> Any:
        """Symbolic next state ``[X, 1]`` of columns ``x [X, 1]``, ``u [U, 1]``."""
        return self.system.step_casadi(x, u)

    def ode_casadi(self, x: Any, u: Any) -> Any:
        """Symbolic ``x_dot [X, 1]`` (raises for discrete-time systems, naming the fix)."""
        return self.system.ode_casadi(x, u)
