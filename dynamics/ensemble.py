"""Probabilistic ensemble of Gaussian MLPs with trajectory sampling (PETS).

Implements the model of Chua et al., "Deep Reinforcement Learning in a Handful of Trials using
Probabilistic Dynamics Models" (NeurIPS 2018), sec. 4:

* ``E`` bootstrapped members, each an MLP that outputs the mean and log-variance of a diagonal
  Gaussian over the normalized state delta ``next_obs - obs`` (and the reward when learned);
  sec. 4.1 (probabilistic networks, P) and sec. 4.2 (ensembles, E).
* The log-variance is kept inside learned soft bounds with softplus, and the loss adds
  ``0.01 * (sum max_logvar - sum min_logvar)`` (appendix A.1 of the paper and its code).
* Particles are propagated by trajectory sampling, sec. 4.3: ``"ts1"`` re-draws the member of
  every particle at every step, ``"ts_inf"`` fixes one member per particle for the whole
  rollout, ``"expectation"`` moves every particle by the mean over members (no sampling).

Members are the leading axis of every parameter (weights ``[E, in, out]``, biases
``[E, 1, out]``) and every layer is one ``torch.baddbmm`` for all members; no Python loop runs over
members, particles or rows. Shape letters follow DESIGN.md: ``B`` batch, ``E`` members, ``P``
particles, ``X`` observation dim, ``U`` action dim; ``D = X (+1 with a learned reward)`` is the
target dim, ``R = B * P`` the rows of a rollout and ``M = R / E`` the rows per member.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

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
from mbrl.shapes import ShapeError, feature_indices

PROPAGATIONS = ("ts1", "ts_inf", "expectation")
ACTIVATIONS = ("silu", "relu", "tanh", "elu")
PLANNING_DTYPES = (torch.float32, torch.bfloat16)
VAL_METRICS = ("nll", "mse")

# PETS's per-layer L2 decays (input layer, hidden layers, output layer) of its MuJoCo models.
_PETS_DECAY_FIRST, _PETS_DECAY_SECOND, _PETS_DECAY_HIDDEN, _PETS_DECAY_OUT = (
    2.5e-5,
    5e-5,
    7.5e-5,
    1e-4,
)
_STD_FLOOR = 1e-8  # features whose std is below this are not scaled (std set to 1)
_LOGVAR_PENALTY = 0.01  # weight of the soft-bound penalty, PETS appendix A.1

_Activation = Callable[[torch.Tensor], torch.Tensor]
_ACT_FNS: dict[str, tuple[_Activation, _Activation]] = {
    # name -> (out-of-place for training with autograd, in-place for planning)
    "silu": (F.silu, lambda x: F.silu(x, inplace=True)),
    "relu": (F.relu, torch.relu_),
    "tanh": (torch.tanh, torch.tanh_),
    "elu": (F.elu, lambda x: F.elu(x, inplace=True)),
}


@dataclass(frozen=True)
class MemberPrediction:
    """Per-member one-step Gaussians, in observation units."""

    mean: torch.Tensor  # [E, B, X] mean next observation of each member
    var: torch.Tensor  # [E, B, X] aleatoric variance of each member
    reward_mean: torch.Tensor | None = None  # [E, B] when the model learns the reward
    reward_var: torch.Tensor | None = None  # [E, B]


@dataclass(frozen=True)
class _PlanningWeights:
    """Elite weights cast to the planning dtype, built once per change of the model."""

    layers: tuple[torch.Tensor, ...]  # per layer [E, out, in + 1]: W^T, bias last; planning dtype
    out_mu: torch.Tensor  # [D, 1] float32, feature-major like the outputs
    out_std: torch.Tensor  # [D, 1] float32
    max_logvar: torch.Tensor  # [E, D, 1] float32
    min_logvar: torch.Tensor  # [E, D, 1] float32


class ProbabilisticEnsemble(nn.Module):
    """PETS probabilistic ensemble behind the :class:`~mbrl.dynamics.base.DynamicsModel` seam.

    Args:
        obs_dim: ``X``.
        act_dim: ``U``.
        ensemble_size: ``E``, members trained on separate bootstrap resamples.
        hidden_size: width of each hidden layer.
        num_layers: number of hidden layers (PETS uses 4 on the MuJoCo tasks, 3 on cartpole).
        learns_reward: also predict the reward; rollouts then return it in
            :attr:`RolloutState.reward`.
        propagation: ``"ts1"``, ``"ts_inf"`` or ``"expectation"`` (PETS sec. 4.3); settable.
        num_elites: members used by ``predict``, ``mean_dynamics`` and rollouts, the ones with
            the lowest validation loss after each fit; ``None`` uses all members.
        lr: Adam learning rate.
        weight_decay: L2 decay on the weights, one float for every layer or one per layer
            (``num_layers + 1`` values, input layer first); ``None`` uses PETS's schedule
            ``2.5e-5, 5e-5, 7.5e-5, ..., 7.5e-5, 1e-4``. Biases and log-variance bounds are
            not decayed. Applied as Adam's ``weight_decay``, i.e. a loss term
            ``decay / 2 * ||W||^2`` per layer.
        batch_size: rows per member per optimizer step.
        max_epochs: epoch budget of one :meth:`fit`.
        patience: stop after this many epochs without a lower validation loss.
        val_fraction: share of the data held out for validation and early stopping;
            0 trains for ``max_epochs`` with no split.
        val_metric: ``"nll"`` (Gaussian negative log-likelihood) or ``"mse"`` of the
            normalized targets; used for early stopping and to pick elites.
        bootstrap: train each member on its own resample with replacement of the training
            split (PETS); ``False`` gives each member its own shuffle of the same rows.
        activation: ``"silu"`` (PETS's swish), ``"relu"``, ``"tanh"`` or ``"elu"``.
        planning_dtype: dtype of the MLP in rollouts, ``torch.float32`` or ``torch.bfloat16``;
            rollouts still return float32 observations. Settable; takes effect at the next
            :meth:`rollout_start`. bfloat16 pays off only where matmuls run natively in it
            (GPUs, CPUs with AVX512-BF16/AMX); on CPUs without it, it is many times slower.
            :func:`auto_planning_dtype` picks the dtype for a device.
        ignored_obs: observation features the network never reads, e.g. an absolute x
            position the dynamics do not depend on; their change is still predicted. Their
            input std is held at ``inf``, so they normalize to 0 and the first layer gets
            nothing from them.
        angle_obs: observation features that are angles: the network reads their sine and
            cosine (extra inputs after the observation) instead of the raw angle, which is
            ignored as ``ignored_obs`` are (PETS's cart-pole preprocessing); their change is
            still predicted in radians.
        device: where parameters live (``None``: CPU).
        seed: seeds the model's own ``torch.Generator`` (CPU), used for the initial weights
            and, when :meth:`fit` is given no generator, the validation split, bootstraps and
            minibatch shuffles.
    """

    def __init__(
        self,
        obs_dim: int,
        act_dim: int,
        ensemble_size: int = 5,
        hidden_size: int = 200,
        num_layers: int = 4,
        learns_reward: bool = False,
        propagation: str = "ts_inf",
        num_elites: int | None = None,
        lr: float = 1e-3,
        weight_decay: float | Sequence[float] | None = None,
        batch_size: int = 32,
        max_epochs: int = 50,
        patience: int = 5,
        val_fraction: float = 0.2,
        val_metric: str = "nll",
        bootstrap: bool = True,
        activation: str = "silu",
        planning_dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
        seed: int = 0,
        ignored_obs: Sequence[int] = (),
        angle_obs: Sequence[int] = (),
    ) -> None:
        super().__init__()
        for name, value, low in (
            ("obs_dim", obs_dim, 1),
            ("act_dim", act_dim, 0),
            ("ensemble_size", ensemble_size, 1),
            ("hidden_size", hidden_size, 1),
            ("num_layers", num_layers, 1),
            ("batch_size", batch_size, 1),
            ("max_epochs", max_epochs, 1),
            ("patience", patience, 1),
        ):
            if not isinstance(value, int) or value < low:
                raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
        num_elites = ensemble_size if num_elites is None else num_elites
        if not 1 <= num_elites <= ensemble_size:
            raise ValueError(
                f"num_elites must be in [1, ensemble_size={ensemble_size}], got {num_elites}; "
                "pass None to use all members"
            )
        if activation not in ACTIVATIONS:
            raise ValueError(f"unknown activation {activation!r}; valid: {', '.join(ACTIVATIONS)}")
        if val_metric not in VAL_METRICS:
            raise ValueError(f"unknown val_metric {val_metric!r}; valid: {', '.join(VAL_METRICS)}")
        if not 0.0 <= val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
        if lr <= 0:
            raise ValueError(f"lr must be > 0, got {lr}")
        decays = _layer_decays(weight_decay, num_layers)

        self.obs_dim = obs_dim
        self.act_dim = act_dim
        self.learns_reward = learns_reward
        self.ensemble_size = ensemble_size
        self.num_elites = num_elites
        self.hidden_size = hidden_size
        self.num_layers = num_layers
        self.batch_size = batch_size
        self.max_epochs = max_epochs
        self.patience = patience
        self.val_fraction = val_fraction
        self.val_metric = val_metric
        self.bootstrap = bootstrap
        self.activation = activation
        self.weight_decay = tuple(decays)  # [num_layers + 1] per-layer decays, input layer first
        self.ignored_obs = feature_indices("ignored_obs", ignored_obs, obs_dim)
        self.angle_obs = feature_indices("angle_obs", angle_obs, obs_dim)
        self._angles = list(self.angle_obs)
        self.in_dim = obs_dim + 2 * len(self.angle_obs) + act_dim  # [obs, sin, cos, act]
        self.out_dim = obs_dim + int(learns_reward)  # D
        self._act, self._act_inplace = _ACT_FNS[activation]
        self._reward_of: Callable[[torch.Tensor], torch.Tensor | None] = (
            (lambda delta: delta[..., obs_dim]) if learns_reward else (lambda delta: None)
        )
        self._flat_reward_of: Callable[[torch.Tensor], torch.Tensor | None] = (
            (lambda delta: delta[..., obs_dim].reshape(-1))
            if learns_reward
            else (lambda delta: None)
        )
        device = torch.device("cpu") if device is None else torch.device(device)
        self.generator = torch.Generator().manual_seed(seed)

        # Parameters, members first; initialised on the CPU from the model's generator so that
        # the same seed gives the same weights on every device.
        sizes = [self.in_dim] + [hidden_size] * num_layers + [2 * self.out_dim]
        self.weights = nn.ParameterList()
        self.biases = nn.ParameterList()
        for fan_in, fan_out in zip(sizes[:-1], sizes[1:], strict=True):
            std = 1.0 / (2.0 * math.sqrt(fan_in))  # PETS: truncated normal, 2 std cut-off
            w = torch.empty(ensemble_size, fan_in, fan_out)  # [E, in, out]
            nn.init.trunc_normal_(w, 0.0, std, -2 * std, 2 * std, generator=self.generator)
            self.weights.append(nn.Parameter(w.to(device)))
            self.biases.append(nn.Parameter(torch.zeros(ensemble_size, 1, fan_out, device=device)))
        d = self.out_dim
        self.max_logvar = nn.Parameter(torch.full((ensemble_size, 1, d), 0.5, device=device))
        self.min_logvar = nn.Parameter(torch.full((ensemble_size, 1, d), -10.0, device=device))

        # Normalizer statistics (re-fitted by every fit) and elites travel in the state dict.
        self.register_buffer("in_mu", torch.zeros(self.in_dim, device=device))  # [X + 2A + U]
        self.register_buffer("in_std", torch.ones(self.in_dim, device=device))  # [X + 2A + U]
        self.register_buffer("out_mu", torch.zeros(d, device=device))  # [D]
        self.register_buffer("out_std", torch.ones(d, device=device))  # [D]
        self.register_buffer("elites", torch.arange(num_elites, device=device))  # [E_el] long
        self._blind_ignored_inputs()

        groups = [
            {"params": [w], "weight_decay": wd} for w, wd in zip(self.weights, decays, strict=True)
        ]
        groups.append(
            {"params": [*self.biases, self.max_logvar, self.min_logvar], "weight_decay": 0.0}
        )
        self.optimizer = torch.optim.Adam(groups, lr=lr)

        self._plan_cache: _PlanningWeights | None = None
        self._workspaces: dict = {}  # (rows, device, dtype) -> rollout buffers, see _workspace
        self._plan_key: tuple = ()
        self.planning_dtype = planning_dtype
        self.propagation = propagation
        self.register_load_state_dict_post_hook(ProbabilisticEnsemble._blind_ignored_inputs)
        self._planning_weights()

    # ------------------------------------------------------------------ settable options

    @property
    def propagation(self) -> str:
        """``"ts1"``, ``"ts_inf"`` or ``"expectation"``; setting it picks the step function."""
        return self._propagation

    @propagation.setter
    def propagation(self, value: str) -> None:
        steps = {
            "ts1": self._step_ts1,
            "ts_inf": self._step_ts_inf,
            "expectation": self._step_expectation,
        }
        if value not in steps:
            raise ValueError(f"unknown propagation {value!r}; valid: {', '.join(PROPAGATIONS)}")
        self._propagation = value
        self._step = steps[value]

    @property
    def planning_dtype(self) -> torch.dtype:
        """dtype of the MLP inside rollouts (``torch.float32`` or ``torch.bfloat16``)."""
        return self._planning_dtype

    @planning_dtype.setter
    def planning_dtype(self, value: torch.dtype) -> None:
        if value not in PLANNING_DTYPES:
            raise ValueError(
                f"planning_dtype must be one of {', '.join(map(str, PLANNING_DTYPES))}, got {value}"
            )
        self._planning_dtype = value

    @property
    def device(self) -> torch.device:
        return self.max_logvar.device

    # ------------------------------------------------------------------ network

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """All members on normalized inputs ``x [E, B, X + U]``.

        Returns the mean ``[E, B, D]`` and the soft-bounded log-variance ``[E, B, D]`` of the
        normalized targets. Differentiable; float32.
        """
        return self._forward(x, self.weights, self.biases, self.max_logvar, self.min_logvar)

    def _forward(
        self,
        x: torch.Tensor,  # [E', B, X + U]
        weights: Sequence[torch.Tensor],
        biases: Sequence[torch.Tensor],
        max_logvar: torch.Tensor,  # [E', 1, D]
        min_logvar: torch.Tensor,  # [E', 1, D]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        h = x
        for w, b in zip(weights[:-1], biases[:-1], strict=True):
            h = self._act(torch.baddbmm(b, h, w))
        out = torch.baddbmm(biases[-1], h, weights[-1])  # [E', B, 2 D]
        mean, logvar = out.split(self.out_dim, dim=-1)
        return mean, _bound_logvar(logvar, max_logvar, min_logvar)

    def _inputs(self, obs: torch.Tensor, act: torch.Tensor) -> torch.Tensor:
        """The network's raw inputs ``[..., X + 2A + U]``: the observation, the sine and cosine
        of its ``A`` angle features, the action."""
        if not self._angles:
            return torch.cat((obs, act), dim=-1)
        ang = obs[..., self._angles]
        return torch.cat((obs, ang.sin(), ang.cos(), act), dim=-1)

    def _normalize_inputs(self, obs: torch.Tensor, act: torch.Tensor) -> torch.Tensor:
        return (self._inputs(obs, act) - self.in_mu) / self.in_std  # [B, X + 2A + U]

    # ------------------------------------------------------------------ fitting

    def fit(self, data: Transitions, generator: torch.Generator | None = None) -> FitReport:
        """Train every member on ``data`` (PETS sec. 4.2) and pick the elites.

        ``generator`` (default: the model's own, :attr:`generator`) draws the validation split,
        the bootstrap resamples and the minibatch shuffles, on its own device.

        The normalizer is re-fitted on the training split, then training continues from the
        current weights and optimizer state (PETS retrains after each trial). A random
        ``val_fraction`` of the rows is held out; each member trains on its own bootstrap
        resample of the rest (``bootstrap=True``) in shuffled minibatches of ``batch_size``.
        Loss per step: Gaussian NLL of the normalized targets, mean over rows and target dims,
        summed over members, plus ``0.01 * (sum max_logvar - sum min_logvar)``.

        Stopping rule: after every epoch the validation loss (mean over members of
        ``val_metric``) is measured; training stops after ``patience`` epochs without a new
        minimum or at ``max_epochs``, and the weights of the best epoch are restored. Elites
        are the ``num_elites`` members with the lowest validation loss at that epoch (lowest
        training loss without a split). ``FitReport.train_loss`` is the mean over the epoch and
        over members of the NLL per target dim (``0.5 * (err^2 / var + log var)``, no constant);
        ``val_loss`` is the member mean of ``val_metric``.

        Raises:
            ValueError: non-finite data, or a training split smaller than ``batch_size``.
            ShapeError: a field of ``data`` of the wrong shape.
            FitError: the training loss of an epoch (or the validation loss) is NaN or inf,
                e.g. from too large a learning rate; the message names the epoch, the loss and
                ``lr`` / ``weight_decay`` / ``batch_size``. The weights are left as the failing
                epoch made them (nothing is silently restored).
        """
        start = time.perf_counter()
        inputs, targets = self._fit_tensors(data)  # [B, X + U], [B, D]
        n = inputs.shape[0]
        n_val = max(1, int(self.val_fraction * n)) if self.val_fraction > 0 else 0
        n_train = n - n_val
        if n_train < self.batch_size:
            raise ValueError(
                f"too little data to fit: {n} transitions leave {n_train} training rows "
                f"(val_fraction={self.val_fraction}), fewer than batch_size={self.batch_size}; "
                "collect more transitions or lower batch_size / val_fraction"
            )
        gen = self.generator if generator is None else generator
        perm = torch.randperm(n, generator=gen, device=gen.device).to(inputs.device)
        train_idx, val_idx = perm[:n_train], perm[n_train:]
        x_train, y_train = inputs[train_idx], targets[train_idx]
        x_val, y_val = inputs[val_idx], targets[val_idx]
        self._fit_normalizer(x_train, y_train)
        x_train, y_train = self._normalized(x_train, y_train)
        x_val, y_val = self._normalized(x_val, y_val)

        e = self.ensemble_size
        if self.bootstrap:
            rows = torch.randint(n_train, (e, n_train), generator=gen, device=gen.device)  # [E, n]
        else:
            rows = torch.arange(n_train).expand(e, n_train)  # [E, n]
        rows = rows.to(inputs.device)
        n_batches = math.ceil(n_train / self.batch_size)

        train_hist: list[float] = []
        val_hist: list[float] = []
        best, best_epoch, stale = math.inf, 0, 0
        best_state = self._snapshot()
        best_member_loss = torch.zeros(e)
        for epoch in range(self.max_epochs):
            self.train()
            order = torch.argsort(torch.rand(e, n_train, generator=gen, device=gen.device), dim=1)
            epoch_rows = rows.gather(1, order.to(rows.device))  # [E, n] per-member shuffle
            total = torch.zeros((), device=inputs.device)
            for i in range(n_batches):
                idx = epoch_rows[:, i * self.batch_size : (i + 1) * self.batch_size]  # [E, b]
                mean, logvar = self(x_train[idx])  # [E, b, D]
                nll = _gaussian_nll(mean, logvar, y_train[idx]).mean(dim=(1, 2))  # [E]
                bound = self.max_logvar.sum() - self.min_logvar.sum()
                loss = nll.sum() + _LOGVAR_PENALTY * bound
                self.optimizer.zero_grad(set_to_none=True)
                loss.backward()
                self.optimizer.step()
                total += nll.detach().mean()
            train_hist.append(float(total) / n_batches)
            if not math.isfinite(train_hist[-1]):
                raise self._fit_error("training", train_hist[-1], epoch)

            if n_val == 0:
                best_epoch = epoch
                continue
            member_loss = self._member_loss(x_val, y_val)  # [E]
            val = float(member_loss.mean())
            if not math.isfinite(val):
                raise self._fit_error("validation", val, epoch)
            val_hist.append(val)
            if val < best:
                best, best_epoch, stale = val, epoch, 0
                best_state = self._snapshot()
                best_member_loss = member_loss
            else:
                stale += 1
                if stale >= self.patience:
                    break

        if n_val == 0:
            best_member_loss = self._member_loss(x_train, y_train)
            if not bool(torch.isfinite(best_member_loss).all()):
                raise self._fit_error("training", float(best_member_loss.mean()), best_epoch)
        else:
            self._restore(best_state)
        elites = torch.argsort(best_member_loss.cpu(), stable=True)[: self.num_elites]
        self.elites.copy_(elites.sort().values)
        self.eval()
        self._planning_weights()
        return FitReport(
            train_loss=tuple(train_hist),
            val_loss=tuple(val_hist),
            epochs=len(train_hist),
            best_epoch=best_epoch,
            elites=tuple(int(i) for i in self.elites),
            seconds=time.perf_counter() - start,
        )

    def _fit_error(self, which: str, value: float, epoch: int) -> FitError:
        decays = set(self.weight_decay)
        decay = f"{decays.pop():g}" if len(decays) == 1 else str(list(self.weight_decay))
        lr = self.optimizer.param_groups[0]["lr"]
        return FitError(
            f"ProbabilisticEnsemble.fit: {which} loss {value} at epoch {epoch} with lr={lr:g}, "
            f"weight_decay={decay}, batch_size={self.batch_size}; lower lr (and check the "
            "data for extreme values)"
        )

    def _fit_tensors(self, data: Transitions) -> tuple[torch.Tensor, torch.Tensor]:
        check_transitions(data, self.obs_dim, self.act_dim)
        dev = self.device
        obs = data.obs.to(dev, torch.float32)
        inputs = self._inputs(obs, data.act.to(dev, torch.float32))  # [B, X + 2A + U]
        delta = data.next_obs.to(dev, torch.float32) - obs  # [B, X]
        if self.learns_reward:
            delta = torch.cat((delta, data.reward.to(dev, torch.float32)[:, None]), dim=-1)
        return inputs, delta  # [B, X + U], [B, D]

    @torch.no_grad()
    def _fit_normalizer(self, x: torch.Tensor, y: torch.Tensor) -> None:
        for mu, std, t in ((self.in_mu, self.in_std, x), (self.out_mu, self.out_std, y)):
            s = t.std(dim=0) if t.shape[0] > 1 else torch.ones_like(std)
            mu.copy_(t.mean(dim=0))
            std.copy_(torch.where(s < _STD_FLOOR, torch.ones_like(s), s))
        self._blind_ignored_inputs()  # normalized to 0: never read

    def _normalized(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return (x - self.in_mu) / self.in_std, (y - self.out_mu) / self.out_std

    @torch.no_grad()
    def _member_loss(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """``val_metric`` of every member on normalized ``x [B, X + U]``, ``y [B, D]``: ``[E]``."""
        self.eval()
        mean, logvar = self(x.expand(self.ensemble_size, -1, -1))  # [E, B, D]
        if self.val_metric == "mse":
            return (mean - y).square().mean(dim=(1, 2))
        return _gaussian_nll(mean, logvar, y).mean(dim=(1, 2))

    def _snapshot(self) -> list[torch.Tensor]:
        return [p.detach().clone() for p in self.parameters()]

    @torch.no_grad()
    def _restore(self, snapshot: list[torch.Tensor]) -> None:
        for p, saved in zip(self.parameters(), snapshot, strict=True):
            p.copy_(saved)

    # ------------------------------------------------------------------ prediction

    def predict_members(
        self, obs: torch.Tensor, act: torch.Tensor, members: torch.Tensor | None = None
    ) -> MemberPrediction:
        """Each member's Gaussian over the next observation for ``obs [B, X]``, ``act [B, U]``.

        ``members`` (long ``[E']``) picks members; ``None`` gives all ``E``. Differentiable.
        """
        check_rows(obs, act, self.obs_dim, self.act_dim)
        x = self._normalize_inputs(obs, act)  # [B, X + U]
        if members is None:
            weights, biases = list(self.weights), list(self.biases)
            max_lv, min_lv = self.max_logvar, self.min_logvar
        else:
            weights = [w[members] for w in self.weights]
            biases = [b[members] for b in self.biases]
            max_lv, min_lv = self.max_logvar[members], self.min_logvar[members]
        mean_n, logvar = self._forward(
            x.expand(len(weights[0]), -1, -1), weights, biases, max_lv, min_lv
        )  # [E', B, D]
        delta = mean_n * self.out_std + self.out_mu  # [E', B, D]
        var = logvar.exp() * self.out_std.square()  # [E', B, D]
        x_dim = self.obs_dim
        return MemberPrediction(
            mean=obs + delta[..., :x_dim],
            var=var[..., :x_dim],
            reward_mean=self._reward_of(delta),
            reward_var=self._reward_of(var),
        )

    def predict(self, obs: torch.Tensor, act: torch.Tensor) -> Prediction:
        """Moments of the elite mixture for ``obs [B, X]``, ``act [B, U]``.

        ``mean`` is the mean of the elite means; ``var`` the mean of the elite variances plus
        the variance (population, ``1 / E``) of the elite means. Observation units.
        """
        m = self.predict_members(obs, act, self.elites)
        mean, var = _mixture(m.mean, m.var)
        if m.reward_mean is None:
            return Prediction(mean=mean, var=var)
        r_mean, r_var = _mixture(m.reward_mean, m.reward_var)
        return Prediction(mean=mean, var=var, reward_mean=r_mean, reward_var=r_var)

    def mean_dynamics(self, obs: torch.Tensor, act: torch.Tensor) -> torch.Tensor:
        """Mean next observation ``[B, X]`` averaged over elites; autograd flows to the inputs."""
        return self.predict_members(obs, act, self.elites).mean.mean(dim=0)

    # ------------------------------------------------------------------ rollouts

    def rollout_start(
        self, obs: torch.Tensor, particles: int, generator: torch.Generator | None = None
    ) -> RolloutState:
        """``P`` copies of each row of ``obs [B, X]``: ``obs [B * P, X]``, row ``b * P + p``.

        Also (re)builds the elite weights in ``planning_dtype`` when the model changed since the
        last rollout. With ``"ts_inf"``, particle ``p`` follows elite ``elites[p % E_el]`` for
        the whole rollout, which needs ``P`` divisible by ``E_el``.
        """
        check_start(obs, particles, self.obs_dim)
        if self._propagation == "ts_inf" and particles % self.num_elites:
            raise ValueError(
                f"propagation 'ts_inf' gives particle p elite p % E, so particles (P={particles}) "
                f"must be a multiple of the number of elites (E={self.num_elites}); use "
                f"P={self.num_elites * max(1, round(particles / self.num_elites))}, or "
                "propagation 'ts1' or 'expectation'"
            )
        self._planning_weights()
        rows = obs.to(self.device, torch.float32).repeat_interleave(particles, dim=0)  # [B * P, X]
        return RolloutState(obs=rows)

    def rollout_step(
        self, state: RolloutState, act: torch.Tensor, generator: torch.Generator | None = None
    ) -> RolloutState:
        """Advance every particle: ``state.obs [R, X]``, ``act [R, U]`` -> next state ``[R, X]``.

        Samples ``obs + delta`` from the Gaussian of the particle's elite (``"ts_inf"``: elite
        fixed by the row, ``"ts1"``: a fresh balanced random assignment of rows to elites from
        ``generator``), or moves it by the mean over elites (``"expectation"``). Uses the
        weights (elites, dtype) current at the last :meth:`rollout_start` or :meth:`fit`. The
        reward is the sampled (or mean) reward when ``learns_reward``. ``"ts_inf"`` assumes the
        rows came from :meth:`rollout_start` (``R`` a multiple of ``E_el``).

        Raises:
            ShapeError: ``state.obs`` is not ``[R, X]``, ``act`` not ``[R, U]``, or (``"ts_inf"``)
                ``R`` is not a multiple of ``E_el``.
        """
        check_rows(state.obs, act, self.obs_dim, self.act_dim, "state.obs")
        return self._step(state.obs, act, generator)

    @torch.no_grad()
    def _planning_weights(self) -> _PlanningWeights:
        tensors = [*self.parameters(), *self.buffers()]
        key = (self._planning_dtype, *((t.data_ptr(), t._version) for t in tensors))
        if self._plan_cache is not None and key == self._plan_key:
            return self._plan_cache
        dtype, el = self._planning_dtype, self.elites
        weights = [w[el].float() for w in self.weights]  # [E, in, out]
        biases = [b[el].float() for b in self.biases]  # [E, 1, out]
        # fold the input normalization into the first layer: W^T ((x - mu) / std) + b
        inv_std = self.in_std.reciprocal()  # [X + U]
        biases[0] = biases[0] - ((self.in_mu * inv_std)[None, None, :] @ weights[0])
        weights[0] = weights[0] * inv_std[None, :, None]
        layers = tuple(
            torch.cat((w.transpose(1, 2), b.transpose(1, 2)), dim=2).to(dtype).contiguous()
            for w, b in zip(weights, biases, strict=True)
        )
        self._workspaces = {}
        self._plan_cache = _PlanningWeights(
            layers=layers,
            out_mu=self.out_mu[:, None].clone(),
            out_std=self.out_std[:, None].clone(),
            max_logvar=self.max_logvar[el].detach().transpose(1, 2).contiguous(),
            min_logvar=self.min_logvar[el].detach().transpose(1, 2).contiguous(),
        )
        self._plan_key = key
        return self._plan_cache

    def _mlp(self, obs: torch.Tensor, act: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Elites on feature-major inputs ``obs [E, X, M]``, ``act [E, U, M]`` (any strides).

        Returns the normalized mean ``[E, D, M]`` (planning dtype; a view into the workspace,
        valid until the next call) and the bounded log-variance ``[E, D, M]`` (float32, fresh).

        Activations are kept feature-major (``[E, features + 1, M]``) in reused workspaces
        whose last feature row is all ones, so that each layer is one ``bmm`` with the bias
        folded into the weights and written straight into the next layer's input: no bias
        broadcast copies and no allocation per step. The input normalization is folded into
        the first layer. The outputs stay feature-major too, so that every elementwise op
        after the network (bounds, sampling) runs along the contiguous row axis ``M``.
        """
        pw = self._plan_cache
        inp, hidden, out = self._workspace(obs.shape[2], obs.device, pw.layers[0].dtype)
        x, a_n = self.obs_dim, len(self._angles)
        inp[:, :x].copy_(obs)
        if a_n:
            ang = obs[:, self._angles]  # [E, A, M]
            inp[:, x : x + a_n].copy_(ang.sin())
            inp[:, x + a_n : x + 2 * a_n].copy_(ang.cos())
        inp[:, x + 2 * a_n : -1].copy_(act)
        a = inp  # [E, in + 1, M]
        for i, w in enumerate(pw.layers[:-1]):
            self._act_inplace(torch.bmm(w, a, out=hidden[i % 2][:, :-1]))  # [E, hidden, M]
            a = hidden[i % 2]
        torch.bmm(pw.layers[-1], a, out=out)  # [E, 2 D, M]
        d = self.out_dim
        logvar = _bound_logvar(out[:, d:].float(), pw.max_logvar, pw.min_logvar)
        return out[:, :d], logvar

    def _workspace(
        self, rows: int, device: torch.device, dtype: torch.dtype
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor], torch.Tensor]:
        """Input ``[E, X + 2A + U + 1, M]`` and two hidden ``[E, hidden + 1, M]`` buffers whose
        last row is ones, and the output ``[E, 2 D, M]``, made once per row count ``M`` (and
        planning weights)."""
        key = (rows, device, dtype)
        if key not in self._workspaces:
            if len(self._workspaces) >= 8:  # iCEM's shrinking populations: a few sizes at most
                self._workspaces.clear()
            e, kw = self.num_elites, {"device": device, "dtype": dtype}
            self._workspaces[key] = (
                torch.ones(e, self.in_dim + 1, rows, **kw),
                tuple(torch.ones(e, self.hidden_size + 1, rows, **kw) for _ in range(2)),
                torch.empty(e, 2 * self.out_dim, rows, **kw),
            )
        return self._workspaces[key]

    def _sample(
        self, mean: torch.Tensor, logvar: torch.Tensor, generator: torch.Generator | None
    ) -> torch.Tensor:
        """Sampled delta in target units ``[E, D, M]`` from the normalized ``mean`` and the
        bounded ``logvar`` of :meth:`_mlp` (``logvar`` is overwritten).

        The noise is drawn as ``[E, M, D]`` (member, row, target dim: the order every earlier
        version drew it in, so that seeded rollouts keep their numbers) and read transposed.
        """
        pw = self._plan_cache
        e, d, m = mean.shape
        eps = torch.randn((e, m, d), generator=generator, device=mean.device).transpose(1, 2)
        noisy = torch.addcmul(mean, logvar.mul_(0.5).exp_(), eps)  # [E, D, M] float32
        return torch.addcmul(pw.out_mu, noisy, pw.out_std)

    def _step_ts_inf(
        self, obs: torch.Tensor, act: torch.Tensor, generator: torch.Generator | None
    ) -> RolloutState:
        e = self.num_elites
        if obs.shape[0] % e:
            raise ShapeError(
                f"state.obs: expected [R, {self.obs_dim}] with R a multiple of E={e} (the rows "
                f"of rollout_start) for propagation 'ts_inf', got {list(obs.shape)}"
            )
        obs_me = obs.view(-1, e, self.obs_dim)  # [M, E, X]: row r uses elite r % E
        act_me = act.view(-1, e, self.act_dim)  # [M, E, U]
        mean, logvar = self._mlp(obs_me.permute(1, 2, 0), act_me.permute(1, 2, 0))
        delta = self._sample(mean, logvar, generator).permute(2, 0, 1)  # [M, E, D]
        nxt = torch.add(obs_me, delta[..., : self.obs_dim]).view(-1, self.obs_dim)  # [R, X]
        return RolloutState(obs=nxt, reward=self._flat_reward_of(delta))

    def _step_ts1(
        self, obs: torch.Tensor, act: torch.Tensor, generator: torch.Generator | None
    ) -> RolloutState:
        e, rows = self.num_elites, obs.shape[0]
        perm = torch.randperm(rows, generator=generator, device=obs.device)  # [R]
        # Position k of the permutation goes to elite k % E; rows are padded by wrapping
        # around when R is not a multiple of E, and the padded results are dropped.
        pos = torch.cat((perm, perm[: (-rows) % e]))  # [E * M]
        obs_me = obs[pos].view(-1, e, self.obs_dim).permute(1, 2, 0)  # [E, X, M]
        act_me = act[pos].view(-1, e, self.act_dim).permute(1, 2, 0)  # [E, U, M]
        mean, logvar = self._mlp(obs_me, act_me)
        delta_pos = self._sample(mean, logvar, generator).permute(2, 0, 1)  # [M, E, D]
        delta = torch.empty(rows, self.out_dim, device=obs.device)  # [R, D]
        delta.index_copy_(0, perm, delta_pos.reshape(-1, self.out_dim)[:rows])
        nxt = obs + delta[:, : self.obs_dim]  # [R, X]
        return RolloutState(obs=nxt, reward=self._reward_of(delta))

    def _step_expectation(
        self, obs: torch.Tensor, act: torch.Tensor, generator: torch.Generator | None
    ) -> RolloutState:
        e = self.num_elites
        mean, _ = self._mlp(obs.T.expand(e, -1, -1), act.T.expand(e, -1, -1))  # [E, D, R]
        pw = self._plan_cache
        delta = torch.addcmul(pw.out_mu, mean.float().mean(dim=0), pw.out_std).T  # [R, D]
        nxt = obs + delta[:, : self.obs_dim]  # [R, X]
        return RolloutState(obs=nxt, reward=self._reward_of(delta))

    # ------------------------------------------------------------------ checkpoints

    def optimizer_state_dict(self) -> dict:
        """The Adam state (moments and step counts); also inside :meth:`state_dict`."""
        return self.optimizer.state_dict()

    def load_optimizer_state_dict(self, state: dict) -> None:
        """Restore the Adam state saved by :meth:`optimizer_state_dict`."""
        self.optimizer.load_state_dict(state)

    @torch.no_grad()
    def _blind_ignored_inputs(self, *_) -> None:
        """Hold the ignored inputs' (and raw angles') std at inf, also over a state saved
        without them."""
        self.in_std[sorted({*self.ignored_obs, *self.angle_obs})] = math.inf

    def get_extra_state(self) -> dict:
        """Optimizer and generator state, saved in :meth:`state_dict` so training resumes
        exactly."""
        return {"optimizer": self.optimizer.state_dict(), "generator": self.generator.get_state()}

    def set_extra_state(self, state: dict) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        self.generator.set_state(state["generator"])


_BF16_CPU_FLAGS = ("amx_bf16", "avx512_bf16")  # /proc/cpuinfo flags of native bf16 dot products


def auto_planning_dtype(device: torch.device | str | None = None) -> tuple[torch.dtype, str]:
    """The planning dtype for ``device`` (``None``: CPU) and a line that says why.

    ``torch.bfloat16`` where matmuls run natively in it: a CUDA GPU that supports it
    (``torch.cuda.is_bf16_supported()``), or a CPU whose flags (``/proc/cpuinfo``) list
    ``amx_bf16`` or ``avx512_bf16``, with oneDNN in this torch build (torch runs bfloat16 CPU
    matmuls through oneDNN). ``torch.float32`` everywhere else, including CPUs whose flags
    cannot be read (not Linux): there bfloat16 would be emulated and many times slower.
    """
    dev = torch.device("cpu" if device is None else device)
    if dev.type == "cuda":
        if torch.cuda.is_bf16_supported():
            return torch.bfloat16, f"{torch.cuda.get_device_name(dev)} has native bfloat16"
        return torch.float32, f"{torch.cuda.get_device_name(dev)} has no native bfloat16"
    if dev.type != "cpu":
        return torch.float32, f"no native bfloat16 matmul known on {dev.type}"
    capability = torch.backends.cpu.get_cpu_capability()
    flags = [f for f in _BF16_CPU_FLAGS if f in _cpu_flags()]
    if flags and torch.backends.mkldnn.is_available():
        return torch.bfloat16, f"CPU flags {', '.join(flags)}, torch capability {capability}"
    reason = "no amx_bf16/avx512_bf16 CPU flag" if not flags else "torch built without oneDNN"
    return torch.float32, f"{reason}, torch capability {capability}"


def _cpu_flags() -> frozenset[str]:
    """The CPU feature flags of ``/proc/cpuinfo`` (empty where it cannot be read)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return frozenset(line.partition(":")[2].split())
    except OSError:
        pass
    return frozenset()


def _layer_decays(weight_decay: float | Sequence[float] | None, num_layers: int) -> list[float]:
    n = num_layers + 1
    if weight_decay is None:
        hidden = [_PETS_DECAY_SECOND] + [_PETS_DECAY_HIDDEN] * (num_layers - 2)
        return [_PETS_DECAY_FIRST, *hidden[: num_layers - 1], _PETS_DECAY_OUT]
    if isinstance(weight_decay, (int, float)):
        decays = [float(weight_decay)] * n
    else:
        decays = [float(d) for d in weight_decay]
        if len(decays) != n:
            raise ValueError(
                f"weight_decay needs one value per layer: num_layers + 1 = {n} values "
                f"(input layer first), got {len(decays)}; or pass one float"
            )
    if any(d < 0 for d in decays):
        raise ValueError(f"weight_decay must be >= 0, got {decays}")
    return decays


def _bound_logvar(
    logvar: torch.Tensor, max_logvar: torch.Tensor, min_logvar: torch.Tensor
) -> torch.Tensor:
    """Soft-clamp ``logvar`` into ``[min_logvar, max_logvar]`` with softplus (PETS A.1)."""
    logvar = max_logvar - F.softplus(max_logvar - logvar)
    return min_logvar + F.softplus(logvar - min_logvar)


def _gaussian_nll(mean: torch.Tensor, logvar: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Elementwise Gaussian NLL without the constant: ``0.5 * (err^2 / var + log var)``."""
    return 0.5 * ((mean - target).square() * torch.exp(-logvar) + logvar)


def _mixture(mean: torch.Tensor, var: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Moments of an equal-weight mixture over the leading axis: ``[E, ...] -> [...]``."""
    mu = mean.mean(dim=0)
    return mu, var.mean(dim=0) + mean.var(dim=0, correction=0)
