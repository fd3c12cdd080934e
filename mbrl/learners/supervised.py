"""The global policy of guided policy search, trained by supervised learning on the local
controllers' actions (Levine et al. 2016, section 4; Montgomery and Levine 2016, section 3).

The seam is :class:`SupervisedPolicy`: a Gaussian policy ``pi(u | x) = N(mu(x), Sigma)`` that
acts, linearizes its mean about states (the MDGPS C-step constrains the local controllers to
that linearization) and is fitted to targets ``(x_i, m_i, P_i)``: states, target mean actions
and their precisions (the inverse action covariances of the local controllers), optionally
weighted. The fit minimises

    L = sum_i w_i (mu(x_i) - m_i)' P_i (mu(x_i) - m_i) / (2 sum_i w_i)

over the mean network and sets the covariance in closed form, ``Sigma = (sum_i w_i P_i /
sum_i w_i)^-1``: together they minimise the weighted average of ``KL(pi(. | x_i) || N(m_i,
P_i^-1))``, the supervised step of mirror-descent GPS (the covariance part of that KL is
minimised by the inverse mean precision; cbfinn/gps' ``PolicyOpt`` keeps that matrix's diagonal).

:class:`GaussianMLPPolicy` is the one implementation: an MLP mean on standardized
observations (the mean and standard deviation of the first fit's states, kept fixed after it,
as cbfinn/gps' ``policy.scale`` and ``policy.bias``), a state-independent covariance, Adam.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import torch

from mbrl.dynamics.base import FitError
from mbrl.learners.networks import EnsembleMLP


@dataclass(frozen=True)
class PolicyFitReport:
    """How one supervised fit went."""

    initial_loss: float  # L on all targets before the first step
    final_loss: float  # L on all targets after the last step
    iterations: int  # gradient steps taken
    seconds: float


@runtime_checkable
class SupervisedPolicy(Protocol):
    """A Gaussian policy fitted by supervised learning (GPS's global policy)."""

    obs_dim: int  # X
    act_dim: int  # U

    def act(
        self,
        obs: torch.Tensor,
        deterministic: bool = False,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Actions ``[B, U]`` for ``obs [B, X]``: the mean, or a sample drawn with
        ``generator``."""
        ...

    def mean(self, obs: torch.Tensor) -> torch.Tensor:
        """The mean action ``mu(x) [B, U]`` of ``obs [B, X]``."""
        ...

    @property
    def covariance(self) -> torch.Tensor:
        """The action covariance ``Sigma [U, U]`` (the same in every state)."""
        ...

    def linearize(self, obs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The mean's tangent at each row of ``obs [B, X]``: ``K [B, U, X]`` and ``k [B, U]``
        with ``mu(x + d) ~ K (x + d) + k``."""
        ...

    def fit(
        self,
        obs: torch.Tensor,
        target_mean: torch.Tensor,
        precision: torch.Tensor,
        weight: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> PolicyFitReport:
        """Fit to ``obs [N, X]``, ``target_mean [N, U]``, ``precision [N, U, U]`` and optional
        ``weight [N]`` (see the module docstring); minibatches drawn with ``generator``."""
        ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


class GaussianMLPPolicy:
    """``pi(u | x) = N(mu(x), Sigma)`` with ``mu`` an MLP of standardized observations.

    Args:
        obs_dim, act_dim: ``X`` and ``U``.
        hidden_size, num_layers: the MLP (ReLU hidden layers).
        lr: Adam learning rate.
        weight_decay: Adam's L2 penalty on the weights (cbfinn/gps uses 0.005).
        iterations: gradient steps per :meth:`fit`.
        batch_size: rows per step (all rows when there are fewer).
        init_variance: ``Sigma`` before the first fit, ``init_variance * I``.
        seed: seeds the initial weights.
        device: where the network lives.

    The covariance is recomputed at every fit; the observation scaling is set at the first fit
    and kept. :meth:`state_dict` holds the weights, the scaling, the covariance, the optimizer
    and the number of fits.
    """

    def __init__(
        self,
        obs_dim: int,
        act_dim: int,
        hidden_size: int = 64,
        num_layers: int = 2,
        lr: float = 1e-3,
        weight_decay: float = 0.0,
        iterations: int = 2000,
        batch_size: int = 128,
        init_variance: float = 1.0,
        seed: int = 0,
        device: torch.device | str = "cpu",
    ) -> None:
        for name, value in (("iterations", iterations), ("batch_size", batch_size)):
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        if not (lr > 0 and math.isfinite(lr)) or not (init_variance > 0):
            raise ValueError(
                f"lr and init_variance must be > 0 and finite; got lr={lr}, "
                f"init_variance={init_variance}"
            )
        self.obs_dim, self.act_dim = obs_dim, act_dim
        self.device = torch.device(device)
        self.iterations, self.batch_size = iterations, batch_size
        self.lr, self.weight_decay = lr, weight_decay
        gen = torch.Generator().manual_seed(seed)
        self.net = EnsembleMLP(1, obs_dim, act_dim, hidden_size, num_layers, gen).to(self.device)
        self.optimizer = torch.optim.Adam(self.net.parameters(), lr=lr, weight_decay=weight_decay)
        self.obs_mean = torch.zeros(obs_dim, device=self.device)  # [X]
        self.obs_std = torch.ones(obs_dim, device=self.device)  # [X]
        self._covariance = init_variance * torch.eye(act_dim, device=self.device)  # [U, U]
        self._chol = torch.linalg.cholesky(self._covariance)  # [U, U]
        self.fits = 0

    # ---- acting

    def mean(self, obs: torch.Tensor) -> torch.Tensor:
        x = self._rows(obs, "obs")
        return self.net((x - self.obs_mean) / self.obs_std)[0]  # [B, U]

    @property
    def covariance(self) -> torch.Tensor:
        return self._covariance

    def act(
        self,
        obs: torch.Tensor,
        deterministic: bool = False,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        with torch.no_grad():
            mu = self.mean(obs)  # [B, U]
            if deterministic:
                return mu
            eps = torch.randn(mu.shape, generator=generator, device=mu.device, dtype=mu.dtype)
            return mu + eps @ self._chol.T

    def linearize(self, obs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self._rows(obs, "obs").detach()
        b = x.shape[0]
        with torch.inference_mode(False), torch.enable_grad():
            xr = x.clone().repeat(self.act_dim, 1).requires_grad_(True)  # [U * B, X]
            y = self.mean(xr).view(self.act_dim, b, self.act_dim)  # [U, B, U]
            picked = y.diagonal(dim1=0, dim2=2)  # [B, U]: copy j, output j
            (g,) = torch.autograd.grad(picked.sum(), xr)
        K = g.view(self.act_dim, b, self.obs_dim).transpose(0, 1).contiguous()  # [B, U, X]
        with torch.no_grad():
            k = self.mean(x) - (K @ x.unsqueeze(-1)).squeeze(-1)  # [B, U]
        return K, k

    # ---- fitting

    def loss(
        self,
        obs: torch.Tensor,
        target_mean: torch.Tensor,
        precision: torch.Tensor,
        weight: torch.Tensor,
    ) -> torch.Tensor:
        """``L`` of the module docstring on the given rows (differentiable in the weights)."""
        d = self.mean(obs) - target_mean  # [B, U]
        quad = (d.unsqueeze(-2) @ precision @ d.unsqueeze(-1)).squeeze(-1).squeeze(-1)  # [B]
        return 0.5 * (weight * quad).sum() / weight.sum()

    def fit(
        self,
        obs: torch.Tensor,
        target_mean: torch.Tensor,
        precision: torch.Tensor,
        weight: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> PolicyFitReport:
        """Fit the mean by ``iterations`` Adam steps on minibatches of the targets and set the
        covariance to the inverse weighted mean precision.

        Raises:
            ValueError: shapes that disagree, non-finite targets, a precision that is not
                symmetric positive definite, or weights that are negative or all zero.
            FitError: the loss became NaN or inf (names lr).
        """
        start = time.perf_counter()
        x, m, p, w = self._check_targets(obs, target_mean, precision, weight)
        n = x.shape[0]
        if self.fits == 0:
            self.obs_mean = x.mean(0)
            self.obs_std = x.std(0, correction=0).clamp_min(1e-3)
        with torch.no_grad():
            initial = float(self.loss(x, m, p, w))
        batch = min(self.batch_size, n)
        for i in range(self.iterations):
            idx = torch.randint(n, (batch,), generator=generator, device=self.device)
            loss = self.loss(x[idx], m[idx], p[idx], w[idx])
            if not torch.isfinite(loss):
                raise FitError(
                    f"policy fit diverged at iteration {i}: loss {float(loss)}; lower lr "
                    f"(lr={self.lr})"
                )
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()
        with torch.no_grad():
            final = float(self.loss(x, m, p, w))
            mean_precision = (w[:, None, None] * p).sum(0) / w.sum()  # [U, U]
            cov = torch.linalg.inv(mean_precision)
            self._covariance = 0.5 * (cov + cov.T)
            self._chol = torch.linalg.cholesky(self._covariance)
        if not math.isfinite(final):
            raise FitError(f"policy fit diverged: final loss {final}; lower lr (lr={self.lr})")
        self.fits += 1
        return PolicyFitReport(initial, final, self.iterations, time.perf_counter() - start)

    def _rows(self, obs: torch.Tensor, name: str) -> torch.Tensor:
        x = torch.as_tensor(obs, dtype=torch.float32, device=self.device)
        if x.dim() != 2 or x.shape[-1] != self.obs_dim:
            raise ValueError(f"{name}: expected [B, X={self.obs_dim}], got {list(x.shape)}")
        return x

    def _check_targets(
        self,
        obs: torch.Tensor,
        target_mean: torch.Tensor,
        precision: torch.Tensor,
        weight: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        x = self._rows(obs, "obs")
        n, u = x.shape[0], self.act_dim
        f32 = {"dtype": torch.float32, "device": self.device}
        m = torch.as_tensor(target_mean, **f32)
        p = torch.as_tensor(precision, **f32)
        w = torch.ones(n, **f32) if weight is None else torch.as_tensor(weight, **f32)
        if n < 1 or m.shape != (n, u) or p.shape != (n, u, u) or w.shape != (n,):
            raise ValueError(
                f"policy targets: expected obs [N, X={self.obs_dim}], target_mean [N, U={u}], "
                f"precision [N, U, U], weight [N] with N >= 1; got obs {list(x.shape)}, "
                f"target_mean {list(m.shape)}, precision {list(p.shape)}, weight {list(w.shape)}"
            )
        finite = [bool(torch.isfinite(t).all()) for t in (x, m, p, w)]
        if not all(finite):
            bad = [
                name
                for name, ok in zip(
                    ("obs", "target_mean", "precision", "weight"), finite, strict=True
                )
                if not ok
            ]
            raise ValueError(f"policy targets hold NaN or inf in {', '.join(bad)}")
        if bool((w < 0).any()) or float(w.sum()) <= 0:
            raise ValueError("policy target weights must be >= 0 and not all zero")
        if not torch.allclose(p, p.transpose(-1, -2), rtol=1e-4, atol=1e-6):
            raise ValueError("policy target precisions must be symmetric [N, U, U] matrices")
        if torch.linalg.cholesky_ex(p.double()).info.any():
            raise ValueError(
                "policy target precisions must be positive definite (the inverse covariances of "
                "the local controllers)"
            )
        return x, m, p, w

    # ---- checkpoints

    def state_dict(self) -> dict[str, Any]:
        return {
            "net": self.net.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "obs_mean": self.obs_mean.clone(),
            "obs_std": self.obs_std.clone(),
            "covariance": self._covariance.clone(),
            "fits": self.fits,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.net.load_state_dict(state["net"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.obs_mean = state["obs_mean"].to(self.device)
        self.obs_std = state["obs_std"].to(self.device)
        self._covariance = state["covariance"].to(self.device)
        self._chol = torch.linalg.cholesky(self._covariance)
        self.fits = int(state["fits"])
