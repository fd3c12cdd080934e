"""Gaussian-process dynamics: one GP per state dimension on state deltas, fitted with gpytorch.

The model learns ``Δx = x' - x`` from ``z = [x, u]`` with one independent GP per output
dimension, all held in a single batched gpytorch model (``batch_shape = [X]``: every output has
its own mean, ARD lengthscales, output scale and noise; no Python loop over outputs). Inputs and
targets are z-scored with statistics of the training data.

Fitting (:meth:`GaussianProcessModel.fit`) maximises the exact marginal likelihood
(Rasmussen & Williams 2006, eq. 5.8) with Adam or L-BFGS for a fixed number of iterations. With
more than ``max_exact_points`` transitions the model switches to a sparse GP: SGPR, the
collapsed variational bound of Titsias (2009) with ``inducing_points`` inducing inputs
initialised by k-means and learned jointly with the hyperparameters. SGPR is chosen over SVGP
because its bound is deterministic and full-batch (same optimiser, no minibatch noise, same
numbers under a seed), it costs ``O(N M^2)`` per iteration, which fits 10,000 points in seconds,
and its predictive equations have the same ``mean = k_* a``, ``var = k_** - ||k_* R||^2`` form as
the exact GP, so one prediction path serves both.

Prediction uses caches built once at the end of ``fit`` (and restored by
:meth:`~GaussianProcessModel.load_state_dict`), reused by every planning call:

- exact GP: ``a = (K + σ²I)^{-1} (y - m)`` by Cholesky, and a root ``R [N, r]`` with
  ``R R^T ≈ (K + σ²I)^{-1}`` from LOVE (Pleiss et al. 2018, Lanczos of rank
  ``r = love_rank`` started at the targets, run by gpytorch under ``fast_pred_var``); for
  ``N <= love_rank`` the exact Cholesky root is used;
- SGPR: ``a = Σ K_uf (y - m) / σ²`` and ``R R^T = K_uu^{-1} - Σ`` (full rank ``M``) with
  ``Σ = (K_uu + K_uf K_fu / σ²)^{-1}`` (Titsias 2009, eq. 6).

A query then costs one kernel matrix ``[X, Q, C]`` (``C`` training or inducing points) and one
product with ``R``; it is plain torch, so the mean is differentiable in ``(x, u)``
(:meth:`~GaussianProcessModel.mean_dynamics`) and runs under ``torch.inference_mode``.

Rollouts sample every particle's next state from the one-step predictive distribution, an
independent Gaussian per output with the marginal variance (latent variance plus noise). This is
moment-free: each particle carries a point state and uncertainty propagates through the spread of
particles, as in PETS's trajectory sampling (Chua et al. 2018, section 4.2). PILCO's moment
matching (Deisenroth & Rasmussen 2011, section 2.2) instead propagates a single Gaussian
analytically through the GP with an RBF kernel; that is exact in the first two moments but
unimodal, tied to the RBF kernel and costs ``O(X^2 N^2)`` per step. Correlations between outputs
and the uncertainty about the GP function itself across time steps (the same function sample
along a trajectory) are not modelled. ``propagation="expectation"`` uses the mean without
sampling.
"""

from __future__ import annotations

import math
import re
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import gpytorch
import torch
from gpytorch.constraints import GreaterThan, Interval
from gpytorch.priors import GammaPrior
from linear_operator import to_dense, to_linear_operator
from linear_operator.utils.errors import NanError, NotPSDError
from linear_operator.utils.warnings import NumericalWarning

from mbrl.dynamics.base import (
    FitError,
    FitReport,
    Prediction,
    RolloutState,
    Transitions,
    check_rows,
    check_start,
    check_transitions,
)

MIN_POINTS = 8
"""Fewest transitions :meth:`GaussianProcessModel.fit` accepts (after a validation split)."""

KERNELS = ("rbf", "matern")
OPTIMIZERS = ("adam", "lbfgs")
PROPAGATIONS = ("sample", "expectation")
_MAX_JITTER = 1e-1  # largest diagonal jitter (normalised units) tried before giving up


@dataclass(frozen=True)
class GPDiagnostics:
    """What the last fit produced, for logs and model diagnostics."""

    sparse: bool  # True when SGPR was used (N > max_exact_points)
    num_points: int  # N, training transitions used
    num_centers: int  # C: N for the exact GP, M inducing points for SGPR
    jitter: float  # largest diagonal jitter needed by a Cholesky factorisation (0.0 if none)
    lengthscale: torch.Tensor  # [X, D] ARD lengthscales, normalised input units (D = X + U)
    outputscale: torch.Tensor  # [X] signal variance, normalised target units
    noise: torch.Tensor  # [X] noise variance, normalised target units


class _BatchGP(gpytorch.models.ExactGP):
    """``X`` independent GPs as one gpytorch model with ``batch_shape = [X]``."""

    def __init__(
        self,
        train_x: torch.Tensor,  # [X, N, D]
        train_y: torch.Tensor,  # [X, N]
        likelihood: gpytorch.likelihoods.GaussianLikelihood,
        kernel: str,
        inducing: torch.Tensor | None,  # [X, M, D] or None for the exact GP
    ) -> None:
        super().__init__(train_x, train_y, likelihood)
        outputs, dim = train_x.shape[0], train_x.shape[-1]
        batch = torch.Size([outputs])
        self.mean_module = gpytorch.means.ConstantMean(batch_shape=batch)
        lengthscale = dict(
            ard_num_dims=dim,
            batch_shape=batch,
            lengthscale_prior=GammaPrior(3.0, 2.0),
            lengthscale_constraint=Interval(1e-2, 1e3),
        )
        if kernel == "rbf":
            base = gpytorch.kernels.RBFKernel(**lengthscale)
        else:
            base = gpytorch.kernels.MaternKernel(nu=2.5, **lengthscale)
        base.lengthscale = torch.full_like(base.lengthscale, math.sqrt(dim))
        scaled = gpytorch.kernels.ScaleKernel(
            base,
            batch_shape=batch,
            outputscale_prior=GammaPrior(2.0, 0.5),
            outputscale_constraint=GreaterThan(1e-3),
        )
        scaled.outputscale = torch.ones_like(scaled.outputscale)
        if inducing is None:
            self.covar_module = scaled
        else:
            self.covar_module = gpytorch.kernels.InducingPointKernel(scaled, inducing, likelihood)
        self.scaled = scaled

    def forward(self, x: torch.Tensor) -> gpytorch.distributions.MultivariateNormal:
        return gpytorch.distributions.MultivariateNormal(self.mean_module(x), self.covar_module(x))


class GaussianProcessModel:
    """Independent GP per state dimension on z-scored deltas; exact up to ``max_exact_points``,
    SGPR beyond. Fulfils :class:`~mbrl.dynamics.base.DynamicsModel` and
    :class:`~mbrl.dynamics.base.DifferentiableModel`.

    Args:
        obs_dim: ``X``.
        act_dim: ``U``.
        kernel: ``"rbf"`` (ARD squared exponential) or ``"matern"`` (ARD Matérn, nu = 2.5).
        max_exact_points: largest ``N`` fitted by the exact GP; above it SGPR is used.
        inducing_points: ``M`` for SGPR (k-means initialised, then learned).
        iterations: optimiser iterations of the marginal-likelihood fit (the stopping rule: the
            fit always runs this many; with a validation split the iterate with the lowest
            held-out NLL is kept).
        optimizer: ``"adam"`` or ``"lbfgs"``.
        lr: optimiser step size.
        val_fraction: held-out fraction of the data for a per-iteration validation NLL (0: none).
        love_rank: rank ``r`` of the exact GP's LOVE variance root (exact root when N <= r); a
            query's variance costs ``O(N r)`` per output (SGPR: ``O(M^2)``).
        propagation: ``"sample"`` (one Gaussian draw per particle and step) or ``"expectation"``.
        noise_floor: lower bound of the noise variance, normalised target units.
        seed: seeds the model's own generator, used when a method receives ``generator=None``.
        device: where parameters, caches and predictions live.
    """

    learns_reward = False

    def __init__(
        self,
        obs_dim: int,
        act_dim: int,
        kernel: str = "rbf",
        max_exact_points: int = 2000,
        inducing_points: int = 128,
        iterations: int = 100,
        optimizer: str = "adam",
        lr: float = 0.1,
        val_fraction: float = 0.0,
        love_rank: int = 100,
        propagation: str = "sample",
        noise_floor: float = 1e-4,
        seed: int = 0,
        device: torch.device | str = "cpu",
    ) -> None:
        if kernel not in KERNELS:
            raise ValueError(f"kernel must be one of {KERNELS}, got {kernel!r}")
        if optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {optimizer!r}")
        if propagation not in PROPAGATIONS:
            raise ValueError(f"propagation must be one of {PROPAGATIONS}, got {propagation!r}")
        if obs_dim < 1 or act_dim < 0:
            raise ValueError(f"need obs_dim >= 1 and act_dim >= 0, got {obs_dim}, {act_dim}")
        if max_exact_points < 0 or inducing_points < 1 or iterations < 1 or love_rank < 1:
            raise ValueError(
                "max_exact_points must be >= 0 and inducing_points, iterations, love_rank >= 1"
            )
        if not 0.0 <= val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
        if noise_floor <= 0.0:
            raise ValueError(f"noise_floor must be > 0, got {noise_floor}")
        self.obs_dim, self.act_dim = obs_dim, act_dim
        self.kernel = kernel
        self.max_exact_points = max_exact_points
        self.inducing_points = inducing_points
        self.iterations = iterations
        self.optimizer = optimizer
        self.lr = lr
        self.val_fraction = val_fraction
        self.love_rank = love_rank
        self.propagation = propagation
        self.noise_floor = noise_floor
        self.device = torch.device(device)
        self.generator = torch.Generator(device=self.device).manual_seed(seed)
        self._sample = propagation == "sample"
        self._kern = _matern52 if kernel == "matern" else _rbf
        self._cache: dict[str, torch.Tensor] | None = None  # see _build_cache for shapes
        self._x_mean = torch.zeros(obs_dim + act_dim, device=self.device)  # [D] input z-score
        self._x_std = torch.ones(obs_dim + act_dim, device=self.device)  # [D]
        self._y_mean = torch.zeros(obs_dim, device=self.device)  # [X] delta z-score
        self._y_std = torch.ones(obs_dim, device=self.device)  # [X]
        self.diagnostics: GPDiagnostics | None = None  # set by fit / load_state_dict

    # ----------------------------------------------------------------- fitting
    def fit(self, data: Transitions, generator: torch.Generator | None = None) -> FitReport:
        """Fit hyperparameters by the marginal likelihood on ``data`` and rebuild the caches.

        ``train_loss[i]`` is the negative log marginal likelihood per data point (SGPR: the
        negative collapsed bound), averaged over outputs, with the log priors, at iteration
        ``i``; ``val_loss[i]`` the held-out one-step Gaussian NLL per output in normalised units.
        ``generator`` (default: the model's own) draws the validation split and the k-means
        initialisation. With a validation split the model conditions on the training part
        only (the held-out transitions are not added back after the fit).

        Raises:
            ValueError: fewer than :data:`MIN_POINTS` transitions, or non-finite values.
            ShapeError: a field of ``data`` of the wrong shape.
            FitError: the training loss (or the validation NLL) of an iteration is NaN or inf,
                e.g. from too large a learning rate; the message names the iteration, the loss
                and ``lr`` / ``optimizer``. Nothing is silently kept or restored.
            NotPSDError: a Cholesky factorisation failed even with jitter ``0.1``.
        """
        start = time.perf_counter()
        gen = self.generator if generator is None else generator
        obs, act, nxt = self._check_data(data)
        n = obs.shape[0]
        n_val = int(round(self.val_fraction * n))
        if n - n_val < MIN_POINTS or (self.val_fraction > 0 and n_val < 1):
            raise ValueError(
                f"GaussianProcessModel.fit needs at least {MIN_POINTS} training transitions "
                f"(and one validation transition when val_fraction > 0); got {n} with "
                f"val_fraction={self.val_fraction}: collect more data first"
            )
        perm = torch.randperm(n, generator=gen, device=gen.device).to(self.device)
        val_idx, train_idx = perm[:n_val], perm[n_val:]
        z = torch.cat([obs, act], dim=-1)  # [N, D]
        dy = nxt - obs  # [N, X]
        ztr, dytr = z[train_idx], dy[train_idx]
        # normalisation is committed to self only once the fit succeeded
        x_mean, x_std = ztr.mean(0), _safe_std(ztr)  # [D]
        y_mean, y_std = dytr.mean(0), _safe_std(dytr)  # [X]
        xs = (ztr - x_mean) / x_std  # [N, D]
        ys = ((dytr - y_mean) / y_std).T.contiguous()  # [X, N]
        xv = (z[val_idx] - x_mean) / x_std  # [V, D]
        yv = ((dy[val_idx] - y_mean) / y_std).T  # [X, V]

        sparse = xs.shape[0] > self.max_exact_points
        outputs = self.obs_dim
        inducing = None
        if sparse:
            m = min(self.inducing_points, xs.shape[0])
            centers = _kmeans(xs, m, iterations=10, generator=gen)  # [M, D]
            inducing = centers.expand(outputs, -1, -1).contiguous()  # [X, M, D]
        likelihood = gpytorch.likelihoods.GaussianLikelihood(
            batch_shape=torch.Size([outputs]),
            noise_prior=GammaPrior(1.1, 0.05),
            noise_constraint=GreaterThan(self.noise_floor),
        ).to(self.device)
        likelihood.noise = torch.full((outputs, 1), 0.1, device=self.device)
        train_x = xs.expand(outputs, -1, -1)  # [X, N, D]
        gp = _BatchGP(train_x, ys, likelihood, self.kernel, inducing).to(self.device)

        train_loss, val_loss, jitter, best = self._optimize(gp, likelihood, train_x, ys, xv, yv)
        if best is not None:
            gp.load_state_dict(best[1])
        cache, cache_jitter = self._build_cache(gp, likelihood, xs, ys, sparse)
        self._cache = cache
        self._x_mean, self._x_std, self._y_mean, self._y_std = x_mean, x_std, y_mean, y_std
        best_epoch = best[0] if best is not None else len(train_loss) - 1
        self.diagnostics = GPDiagnostics(
            sparse=sparse,
            num_points=xs.shape[0],
            num_centers=cache["centers"].shape[1],
            jitter=max(jitter, cache_jitter),
            lengthscale=cache["lengthscale"].clone(),
            outputscale=cache["outputscale"].clone(),
            noise=cache["noise"].clone(),
        )
        return FitReport(
            train_loss=tuple(train_loss),
            val_loss=tuple(val_loss),
            epochs=len(train_loss),
            best_epoch=best_epoch,
            elites=(0,),
            seconds=time.perf_counter() - start,
        )

    def _check_data(self, data: Transitions) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        check_transitions(data, self.obs_dim, self.act_dim, finite=("obs", "act", "next_obs"))
        return tuple(t.to(self.device, torch.float32) for t in (data.obs, data.act, data.next_obs))

    def _fit_error(self, which: str, value: float, iteration: int) -> FitError:
        fix = "lower lr" + (" or use optimizer='adam'" if self.optimizer == "lbfgs" else "")
        return FitError(
            f"GaussianProcessModel.fit: {which} {value} at iteration {iteration} with "
            f"lr={self.lr:g}, optimizer={self.optimizer!r}, noise_floor={self.noise_floor:g}; "
            f"{fix}"
        )

    def _optimize(
        self,
        gp: _BatchGP,
        likelihood: gpytorch.likelihoods.GaussianLikelihood,
        train_x: torch.Tensor,  # [X, N, D]
        ys: torch.Tensor,  # [X, N]
        xv: torch.Tensor,  # [V, D]
        yv: torch.Tensor,  # [X, V]
    ) -> tuple[list[float], list[float], float, tuple[int, dict] | None]:
        """Run the optimiser; Cholesky failures raise the jitter tenfold and retry the step."""
        gp.train()
        likelihood.train()
        mll = gpytorch.mlls.ExactMarginalLogLikelihood(likelihood, gp)
        params = list(gp.parameters())
        if self.optimizer == "adam":
            opt = torch.optim.Adam(params, lr=self.lr)
        else:
            opt = torch.optim.LBFGS(params, lr=self.lr, max_iter=1, line_search_fn="strong_wolfe")
        jitter = 1e-6
        used_jitter = 0.0
        train_loss: list[float] = []
        val_loss: list[float] = []
        best: tuple[int, dict] | None = None
        best_val = math.inf
        # Cholesky for every exact solve: deterministic, no CG/Lanczos in the training loss
        size = max(self.max_exact_points, train_x.shape[1]) + 1
        with gpytorch.settings.max_cholesky_size(size):
            for it in range(self.iterations):
                while True:
                    try:
                        with (
                            gpytorch.settings.cholesky_jitter(float_value=jitter),
                            warnings.catch_warnings(record=True) as caught,
                        ):
                            warnings.simplefilter("always", NumericalWarning)

                            def closure() -> torch.Tensor:
                                opt.zero_grad()
                                loss = -mll(gp(train_x), ys).mean()
                                loss.backward()
                                return loss

                            loss = opt.step(closure) if self.optimizer == "lbfgs" else closure()
                            if self.optimizer == "adam":
                                opt.step()
                        used_jitter = max([used_jitter] + _jitters(caught))
                        break
                    except NanError:  # the hyperparameters went NaN in an earlier step
                        raise self._fit_error("loss", math.nan, it) from None
                    except NotPSDError:
                        jitter *= 10.0
                        used_jitter = jitter
                        if jitter > _MAX_JITTER:
                            raise NotPSDError(
                                "GP fit: kernel matrix not positive definite even with jitter "
                                f"{_MAX_JITTER:g}; check for duplicated inputs or reduce lr"
                            ) from None
                value = float(loss.detach())
                if not math.isfinite(value):
                    raise self._fit_error("loss", value, it)
                train_loss.append(value)
                if xv.shape[0] > 0:
                    with torch.no_grad():
                        sparse = isinstance(gp.covar_module, gpytorch.kernels.InducingPointKernel)
                        cache, _ = self._build_cache(gp, likelihood, train_x[0], ys, sparse)
                        mean, var = _predict_normalized(cache, xv, self._kern)
                        nll = 0.5 * (torch.log(2 * math.pi * var) + (yv - mean) ** 2 / var)
                        v = float(nll.mean())
                    if not math.isfinite(v):
                        raise self._fit_error("validation NLL", v, it)
                    gp.train()
                    likelihood.train()
                    val_loss.append(v)
                    if v < best_val:
                        best_val = v
                        state = {k: t.detach().clone() for k, t in gp.state_dict().items()}
                        best = (it, state)
        return train_loss, val_loss, used_jitter, best

    @torch.no_grad()
    def _build_cache(
        self,
        gp: _BatchGP,
        likelihood: gpytorch.likelihoods.GaussianLikelihood,
        xs: torch.Tensor,  # [N, D]
        ys: torch.Tensor,  # [X, N]
        sparse: bool,
    ) -> tuple[dict[str, torch.Tensor], float]:
        """Prediction caches ``a`` and ``R`` (module docstring) and the jitter they needed."""
        scaled = gp.scaled
        lengthscale = scaled.base_kernel.lengthscale.detach().squeeze(-2)  # [X, D]
        outputscale = scaled.outputscale.detach()  # [X]
        noise = likelihood.noise.detach().squeeze(-1)  # [X]
        const = gp.mean_module.constant.detach().reshape(-1)  # [X]
        resid = ys - const[:, None]  # [X, N]
        kern = self._kern
        x = xs.expand(ys.shape[0], -1, -1)  # [X, N, D]
        if not sparse:
            k = kern(x, x, lengthscale, outputscale)  # [X, N, N]
            k = k + torch.diag_embed(noise[:, None].expand_as(ys))
            chol, jitter = _cholesky(k)
            alpha = torch.cholesky_solve(resid[..., None], chol).squeeze(-1)  # [X, N]
            if xs.shape[0] <= self.love_rank:
                eye = torch.eye(xs.shape[0], device=xs.device).expand_as(chol)
                root = torch.linalg.solve_triangular(chol, eye, upper=False).mT  # [X, N, N]
            else:
                op = to_linear_operator(k + jitter * torch.eye(xs.shape[0], device=xs.device))
                with (
                    gpytorch.settings.fast_pred_var(),
                    gpytorch.settings.max_root_decomposition_size(self.love_rank),
                ):
                    start = resid[..., None]  # [X, N, 1] Lanczos start: the targets (LOVE)
                    inv = op.root_inv_decomposition(initial_vectors=start, method="lanczos")
                    root = to_dense(inv.root)  # [X, N, r]
            centers = x
        else:
            centers = gp.covar_module.inducing_points.detach()  # [X, M, D]
            kuu = kern(centers, centers, lengthscale, outputscale)  # [X, M, M]
            luu, j1 = _cholesky(kuu)
            kuf = kern(centers, x, lengthscale, outputscale)  # [X, M, N]
            a_mat = (
                torch.linalg.solve_triangular(luu, kuf, upper=False) / noise.sqrt()[:, None, None]
            )  # [X, M, N]  L_uu^{-1} K_uf / σ
            eye = torch.eye(centers.shape[1], device=xs.device)
            lb, j2 = _cholesky(eye + a_mat @ a_mat.mT)  # [X, M, M]
            jitter = max(j1, j2)
            c = torch.linalg.solve_triangular(
                lb, (a_mat @ resid[..., None]) / noise.sqrt()[:, None, None], upper=False
            )  # [X, M, 1]
            w1 = torch.linalg.solve_triangular(luu.mT, eye.expand_as(luu), upper=True)  # L_uu^{-T}
            w2 = w1 @ torch.linalg.solve_triangular(lb.mT, eye.expand_as(lb), upper=True)
            alpha = (w2 @ c).squeeze(-1)  # [X, M]
            # R R^T = K_uu^{-1} - Σ = W1 W1^T - W2 W2^T, PSD; its eigen-root drops round-off < 0
            # R R^T = K_uu^{-1} - Σ = W1 W1^T - W2 W2^T, PSD; its eigen-root drops round-off < 0.
            # Full rank: truncating it removes most of the variance reduction (measured).
            evals, evecs = torch.linalg.eigh(w1 @ w1.mT - w2 @ w2.mT)
            root = evecs * evals.clamp_min(0.0).sqrt()[:, None, :]  # [X, M, M]
        cache = {
            "centers": centers.contiguous(),  # [X, C, D]
            "alpha": alpha.contiguous(),  # [X, C]
            "root": root.contiguous(),  # [X, C, r]
            "lengthscale": lengthscale.contiguous(),  # [X, D]
            "outputscale": outputscale.contiguous(),  # [X]
            "noise": noise.contiguous(),  # [X]
            "const": const.contiguous(),  # [X]
        }
        for name, t in cache.items():
            if not bool(torch.isfinite(t.float()).all()):
                raise NotPSDError(
                    f"GP cache {name!r} is not finite after the fit; the kernel matrix is "
                    "ill-conditioned: raise noise_floor or remove duplicated inputs"
                )
        return cache, jitter

    # -------------------------------------------------------------- prediction
    def _require_fit(self) -> dict[str, torch.Tensor]:
        if self._cache is None:
            raise RuntimeError("GaussianProcessModel is not fitted: call fit(data) first")
        return self._cache

    def _delta(
        self, obs: torch.Tensor, act: torch.Tensor, with_var: bool = True
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Mean and variance ``[B, X]`` of the next observation (observation units); the
        variance (the costly part) is skipped when ``with_var`` is False."""
        cache = self._require_fit()
        z = (torch.cat([obs, act], dim=-1) - self._x_mean) / self._x_std  # [B, D]
        mean, var = _predict_normalized(cache, z, self._kern, with_var)  # [X, B]
        mean = obs + self._y_mean + mean.T * self._y_std
        return mean, (var.T * self._y_std**2 if var is not None else None)

    def predict(self, obs: torch.Tensor, act: torch.Tensor) -> Prediction:
        """One-step predictive ``N(mean, var)`` of the next observation, ``[B, X]`` each; the
        variance is latent (epistemic) plus noise (aleatoric), per output."""
        check_rows(obs, act, self.obs_dim, self.act_dim)
        mean, var = self._delta(obs, act)
        return Prediction(mean=mean, var=var)  # type: ignore[arg-type]

    def mean_dynamics(self, obs: torch.Tensor, act: torch.Tensor) -> torch.Tensor:
        """Predictive mean ``[B, X]`` of the next observation for ``obs [B, X]``, ``act [B, U]``;
        differentiable in both inputs."""
        check_rows(obs, act, self.obs_dim, self.act_dim)
        return self._delta(obs, act, with_var=False)[0]

    def rollout_start(
        self, obs: torch.Tensor, particles: int, generator: torch.Generator | None = None
    ) -> RolloutState:
        """``B * P`` particles, particle ``p`` of start ``b`` at row ``b * P + p``."""
        self._require_fit()
        check_start(obs, particles, self.obs_dim)
        return RolloutState(obs=obs.repeat_interleave(particles, dim=0))

    def rollout_step(
        self, state: RolloutState, act: torch.Tensor, generator: torch.Generator | None = None
    ) -> RolloutState:
        """Next particles ``[B * P, X]``: a draw from the per-output Gaussian predictive
        (``propagation="sample"``, using ``generator`` or the model's own) or its mean, under
        ``act [B * P, U]``; :class:`~mbrl.shapes.ShapeError` for other shapes."""
        check_rows(state.obs, act, self.obs_dim, self.act_dim, "state.obs")
        if not self._sample:
            return RolloutState(obs=self._delta(state.obs, act, with_var=False)[0])
        mean, var = self._delta(state.obs, act)
        gen = self.generator if generator is None else generator
        eps = torch.randn(mean.shape, generator=gen, device=gen.device).to(mean.device)
        return RolloutState(obs=mean + var.sqrt() * eps)

    # ----------------------------------------------------------- checkpoints
    def state_dict(self) -> dict:
        """Caches, normalisation and hyperparameters: tensors and plain values only."""
        cache = self._require_fit()
        return {
            "kernel": self.kernel,
            "obs_dim": self.obs_dim,
            "act_dim": self.act_dim,
            "cache": {k: v.detach().cpu() for k, v in cache.items()},
            "norm": {
                k: getattr(self, k).detach().cpu()
                for k in ("_x_mean", "_x_std", "_y_mean", "_y_std")
            },
            "diagnostics": {
                "sparse": self.diagnostics.sparse,
                "num_points": self.diagnostics.num_points,
                "jitter": self.diagnostics.jitter,
            },
            "generator": self.generator.get_state(),
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore a fitted model saved by :meth:`state_dict` (same kernel and dimensions)."""
        for key in ("kernel", "obs_dim", "act_dim"):
            if state.get(key) != getattr(self, key):
                raise ValueError(
                    f"GP state has {key}={state.get(key)!r} but this model has "
                    f"{getattr(self, key)!r}; build the model with the saved settings"
                )
        self._cache = {k: v.to(self.device) for k, v in state["cache"].items()}
        for k, v in state["norm"].items():
            setattr(self, k, v.to(self.device))
        d = state["diagnostics"]
        self.diagnostics = GPDiagnostics(
            sparse=bool(d["sparse"]),
            num_points=int(d["num_points"]),
            num_centers=self._cache["centers"].shape[1],
            jitter=float(d["jitter"]),
            lengthscale=self._cache["lengthscale"].clone(),
            outputscale=self._cache["outputscale"].clone(),
            noise=self._cache["noise"].clone(),
        )
        self.generator.set_state(state["generator"])


# --------------------------------------------------------------------- kernels
def _sqdist(x: torch.Tensor, z: torch.Tensor, lengthscale: torch.Tensor) -> torch.Tensor:
    """Scaled squared distances ``[X, Q, C]`` between ``x [X or 1, Q, D]``, ``z [X, C, D]``
    (may be slightly negative from round-off)."""
    ls = lengthscale[:, None, :]  # [X, 1, D]
    xs, zs = x / ls, z / ls
    sq = (xs * xs).sum(-1, keepdim=True) + (zs * zs).sum(-1)[:, None, :]  # [X, Q, C]
    return torch.baddbmm(sq, xs.expand(zs.shape[0], -1, -1), zs.mT, alpha=-2.0)


def _rbf(x: torch.Tensor, z: torch.Tensor, ls: torch.Tensor, os: torch.Tensor) -> torch.Tensor:
    """ARD squared-exponential ``s² exp(-d²/2)``, ``[X, Q, C]``, for ``x [X or 1, Q, D]``,
    ``z [X, C, D]``. The exponent ``x·z - |x|²/2 - |z|²/2 + log s²`` comes out of one batched
    matrix product of augmented coordinates ``[x, 1, -|x|²/2]`` and ``[z, log s² - |z|²/2, 1]``
    (one pass over the ``[X, Q, C]`` block before the in-place ``exp``)."""
    inv = 1.0 / ls[:, None, :]  # [X, 1, D]
    xs = (x * inv).expand(z.shape[0], -1, -1)  # [X, Q, D]
    zs = z * inv  # [X, C, D]
    xa = torch.cat([xs, torch.ones_like(xs[..., :1]), -0.5 * (xs * xs).sum(-1, keepdim=True)], -1)
    zlast = -0.5 * (zs * zs).sum(-1, keepdim=True) + os.log()[:, None, None]  # [X, C, 1]
    za = torch.cat([zs, zlast, torch.ones_like(zs[..., :1])], -1)  # [X, C, D + 2]
    # exponents below -80 are clamped: exp would give float32 denormals (slow on CPU) for
    # values that are zero to working precision anyway (exp(-80) = 1.8e-35)
    return torch.bmm(xa, za.mT).clamp_min_(-80.0).exp_()


def _matern52(x: torch.Tensor, z: torch.Tensor, ls: torch.Tensor, os: torch.Tensor) -> torch.Tensor:
    """ARD Matérn 5/2 ``s² (1 + √5 d + 5 d²/3) exp(-√5 d)``, ``[X, Q, C]``."""
    d2 = _sqdist(x, z, ls).clamp_min_(0.0)
    d = (d2 + 1e-12).sqrt()
    decay = torch.exp((-math.sqrt(5.0) * d).clamp_min(-80.0))  # no float32 denormals
    return os[:, None, None] * (1.0 + math.sqrt(5.0) * d + (5.0 / 3.0) * d2) * decay


def _predict_normalized(
    cache: dict[str, torch.Tensor],
    z: torch.Tensor,
    kern: Callable[..., torch.Tensor],
    with_var: bool = True,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Predictive mean and variance (latent + noise), ``[X, Q]`` each, at ``z [Q, D]``; the
    variance is ``None`` when ``with_var`` is False."""
    ks = kern(z[None], cache["centers"], cache["lengthscale"], cache["outputscale"])  # [X, Q, C]
    # a multiply-and-sum is several times faster than a batched matrix-vector product on CPU
    mean = cache["const"][:, None] + (ks * cache["alpha"][:, None, :]).sum(-1)  # [X, Q]
    if not with_var:
        return mean, None
    reduction = ((ks @ cache["root"]) ** 2).sum(-1)  # [X, Q]
    latent = (cache["outputscale"][:, None] - reduction).clamp_min(1e-8)
    return mean, latent + cache["noise"][:, None]


def _cholesky(a: torch.Tensor) -> tuple[torch.Tensor, float]:
    """Lower Cholesky factor of the batch ``a [..., n, n]``, adding jitter 1e-6, 1e-5, ... up to
    0.1 (normalised units) on failure; returns the factor and the jitter used (0.0 if none)."""
    chol, info = torch.linalg.cholesky_ex(a)
    if not bool((info > 0).any()):
        return chol, 0.0
    eye = torch.eye(a.shape[-1], dtype=a.dtype, device=a.device)
    jitter = 1e-6
    while jitter <= _MAX_JITTER:
        chol, info = torch.linalg.cholesky_ex(a + jitter * eye)
        if not bool((info > 0).any()):
            return chol, jitter
        jitter *= 10.0
    raise NotPSDError(
        f"GP: matrix not positive definite even with jitter {_MAX_JITTER:g}; the data may hold "
        "duplicated inputs with conflicting targets, or noise_floor is too small"
    )


def _jitters(caught: list[warnings.WarningMessage]) -> list[float]:
    """Jitter values gpytorch reports having added ("added jitter of 1.0e-06 ...")."""
    found = []
    for w in caught:
        match = re.search(r"added jitter of ([0-9.eE+-]+)", str(w.message))
        if match:
            found.append(float(match.group(1)))
    return found


def _safe_std(x: torch.Tensor) -> torch.Tensor:
    """Per-column standard deviation ``[D]``; 1 for constant columns."""
    std = x.std(0) if x.shape[0] > 1 else torch.ones_like(x[0])
    return torch.where(std > 1e-6, std, torch.ones_like(std))


def _kmeans(x: torch.Tensor, k: int, iterations: int, generator: torch.Generator) -> torch.Tensor:
    """``k`` centres ``[k, D]`` of ``x [N, D]``: a random subset refined by Lloyd iterations."""
    idx = torch.randperm(x.shape[0], generator=generator, device=generator.device)[:k]
    centers = x[idx.to(x.device)].clone()  # [k, D]
    for _ in range(iterations):
        assign = torch.cdist(x, centers).argmin(dim=1)  # [N]
        sums = torch.zeros_like(centers).index_add_(0, assign, x)
        ones = torch.ones_like(assign, dtype=x.dtype)
        counts = torch.zeros(k, device=x.device).index_add_(0, assign, ones)  # [k]
        centers = torch.where(counts[:, None] > 0, sums / counts.clamp_min(1)[:, None], centers)
    return centers
