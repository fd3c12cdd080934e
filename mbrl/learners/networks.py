"""Network parts shared by the learners: a batched MLP with members as the leading axis,
Polyak averaging, and the map between env action units and the policy's ``[-1, 1]`` box.

``EnsembleMLP`` is one network for ``E`` independent members (twin critics are ``E = 2``, an
actor is ``E = 1``): every weight is ``[E, in, out]`` and a forward pass is one batched matmul per
layer, so members are never looped over in Python. Initialisation draws from an explicit
``torch.Generator`` (same seed, same weights).

With ``narrow=True`` the products of a layer whose input or output has fewer than
:data:`NARROW` features (a critic's 1-unit head, an actor's ``2U`` outputs, a first layer's few
inputs) are computed transposed, ``(B^T A^T)^T`` for ``A B``: CPU BLAS kernels run a product
with a handful of output columns several times slower than the same product with a handful of
rows (a ``[2, 256, 256] x [2, 256, 1]`` head takes about 150 us against 35 us transposed on one
thread, forward or backward). The numbers are those of the plain products up to float32
rounding.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from mbrl.shapes import feature_indices

NARROW = 16
"""Layers with fewer input or output features than this take the transposed products."""


def _product(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a @ b`` for ``a [E, M, K]``, ``b [E, K, N]``; as ``(b^T a^T)^T`` when ``N < NARROW``."""
    if b.shape[-1] < NARROW:
        return torch.bmm(b.mT, a.mT).mT
    return torch.bmm(a, b)


class _NarrowAffine(torch.autograd.Function):
    """``x @ W + b`` (``x [E, B, in]``, ``W [E, in, out]``, ``b [E, 1, out]``) with every product
    of the forward and backward pass in its faster orientation (:func:`_product`)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x, weight)
        if weight.shape[-1] < NARROW:
            return torch.baddbmm(bias.mT, weight.mT, x.mT).mT  # [E, B, out]
        return torch.baddbmm(bias, x, weight)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # grad [E, B, out]
        x, weight = ctx.saved_tensors
        need_x, need_w, need_b = ctx.needs_input_grad
        gx = gw = gb = None
        if need_x:  # [E, B, in]; one output feature: a broadcast product, no matmul
            gx = grad * weight.mT if weight.shape[-1] == 1 else _product(grad, weight.mT)
        if need_w:
            gw = _product(x.mT, grad).contiguous()  # [E, in, out]
        if need_b:
            gb = grad.sum(1, keepdim=True)  # [E, 1, out]
        return gx, gw, gb


class EnsembleLinear(nn.Module):
    """``E`` affine maps applied at once: ``x [E, B, in] -> x @ W + b : [E, B, out]``.

    Initialised like ``torch.nn.Linear``: weights and biases uniform in ``+-1/sqrt(in)``. With
    ``narrow`` and fewer than :data:`NARROW` input or output features, the products run
    transposed (module docstring).
    """

    def __init__(
        self,
        members: int,
        in_dim: int,
        out_dim: int,
        generator: torch.Generator | None = None,
        narrow: bool = False,
    ) -> None:
        super().__init__()
        bound = 1.0 / math.sqrt(in_dim)
        weight = torch.empty(members, in_dim, out_dim)  # [E, in, out]
        bias = torch.empty(members, 1, out_dim)  # [E, 1, out]
        nn.init.uniform_(weight, -bound, bound, generator=generator)
        nn.init.uniform_(bias, -bound, bound, generator=generator)
        self.weight = nn.Parameter(weight)  # [E, in, out]
        self.bias = nn.Parameter(bias)  # [E, 1, out]
        self.transposed = narrow and min(in_dim, out_dim) < NARROW

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.transposed:
            return _NarrowAffine.apply(x, self.weight, self.bias)
        return torch.baddbmm(self.bias, x, self.weight)


class EnsembleMLP(nn.Module):
    """``E`` MLPs with ``num_layers`` hidden layers of ``hidden_size`` ReLU units.

    ``forward(x)`` takes ``x [B, in]`` (shared by all members) or ``x [E, B, in]`` and returns
    ``[E, B, out]``. With ``inputs``, the first layer reads only those features of ``x`` (in that
    order); the others are never seen. Built on CPU from ``generator``; move it with
    ``.to(device)``. ``narrow`` picks the transposed products for narrow layers
    (:class:`EnsembleLinear`).
    """

    def __init__(
        self,
        members: int,
        in_dim: int,
        out_dim: int,
        hidden_size: int,
        num_layers: int,
        generator: torch.Generator | None = None,
        inputs: Sequence[int] | None = None,
        narrow: bool = False,
    ) -> None:
        super().__init__()
        if members < 1 or num_layers < 0 or hidden_size < 1:
            raise ValueError(
                f"EnsembleMLP needs members >= 1, num_layers >= 0, hidden_size >= 1; got "
                f"members={members}, num_layers={num_layers}, hidden_size={hidden_size}"
            )
        self.members = members
        if inputs is not None:
            inputs = list(inputs)
            if not inputs or not all(0 <= i < in_dim for i in inputs):
                raise ValueError(
                    f"inputs must be a non-empty list of feature indices in [0, {in_dim}), "
                    f"got {inputs}"
                )
            self.register_buffer("inputs", torch.tensor(inputs), persistent=False)
        else:
            self.inputs = None
        read = in_dim if inputs is None else len(inputs)
        sizes = [read] + [hidden_size] * num_layers + [out_dim]
        layers: list[nn.Module] = []
        for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:], strict=True)):
            layers.append(EnsembleLinear(members, a, b, generator, narrow))
            if i < len(sizes) - 2:
                layers.append(nn.ReLU())
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.inputs is not None:
            x = x.index_select(-1, self.inputs)  # [..., len(inputs)]
        if x.dim() == 2:
            x = x.unsqueeze(0).expand(self.members, -1, -1)  # [E, B, in]
        return self.net(x)


@torch.no_grad()
def soft_update(target: nn.Module, source: nn.Module, tau: float) -> None:
    """Polyak averaging, in place: ``theta_target <- (1 - tau) theta_target + tau theta``."""
    t_params = list(target.parameters())
    s_params = list(source.parameters())
    torch._foreach_lerp_(t_params, s_params, tau)


FUSED_ADAM_DEVICES = ("cpu", "cuda", "mps", "xpu")
"""Device types with torch's fused Adam kernel (one kernel for every parameter's update)."""


def adam(params: Sequence[torch.Tensor], lr: float) -> torch.optim.Adam:
    """``torch.optim.Adam(params, lr)``, fused where the device has the kernel: the same update
    up to float32 rounding, without a Python loop over parameters (about 2.5x faster for a
    twin critic on one CPU thread)."""
    params = list(params)
    fused = params[0].device.type in FUSED_ADAM_DEVICES
    return torch.optim.Adam(params, lr=lr, fused=fused or None)


def load_adam(opt: torch.optim.Adam, state: dict) -> None:
    """Load ``state`` into ``opt`` keeping ``opt``'s kernel choice (``fused``, ``foreach``): a
    state saved by an unfused optimizer continues fused, with the same moments and steps."""
    groups = [
        {**saved, "fused": own["fused"], "foreach": own["foreach"]}
        for saved, own in zip(state["param_groups"], opt.param_groups, strict=False)
    ]
    opt.load_state_dict({**state, "param_groups": groups})


def frozen_copy(module: nn.Module) -> nn.Module:
    """A copy of ``module`` (same weights) whose parameters need no gradient: a target network."""
    import copy

    target = copy.deepcopy(module)
    target.requires_grad_(False)
    return target


class ActionScale:
    """Affine map between env actions in ``[low, high]`` and policy actions in ``[-1, 1]``."""

    def __init__(
        self,
        low: torch.Tensor | list[float],
        high: torch.Tensor | list[float],
        act_dim: int,
        device: torch.device | str,
    ) -> None:
        low_t = torch.as_tensor(low, dtype=torch.float32, device=device).reshape(-1)  # [U]
        high_t = torch.as_tensor(high, dtype=torch.float32, device=device).reshape(-1)  # [U]
        if low_t.shape != (act_dim,) or high_t.shape != (act_dim,):
            raise ValueError(
                f"action bounds: expected [U={act_dim}], got low {list(low_t.shape)}, "
                f"high {list(high_t.shape)}"
            )
        if not bool((high_t > low_t).all()):
            raise ValueError(
                f"action bounds need high > low; got low={low_t.tolist()}, high={high_t.tolist()}"
            )
        if not bool(torch.isfinite(low_t).all() & torch.isfinite(high_t).all()):
            raise ValueError("action bounds must be finite; clip the env's action space first")
        self.mid = (high_t + low_t) / 2  # [U]
        self.half = (high_t - low_t) / 2  # [U]

    def to_unit(self, act: torch.Tensor) -> torch.Tensor:
        """Env actions ``[B, U]`` to ``[-1, 1]``."""
        return (act - self.mid) / self.half

    def to_env(self, unit: torch.Tensor) -> torch.Tensor:
        """Policy actions ``[B, U]`` in ``[-1, 1]`` to env units."""
        return self.mid + self.half * unit


def as_batch(
    obs: torch.Tensor | list, obs_dim: int, device: torch.device
) -> tuple[torch.Tensor, bool]:
    """``obs [B, X]`` or ``[X]`` (tensor or array) as float32 ``[B, X]`` on ``device``.

    Returns the batch and whether the input was a single observation. A wrong last axis raises
    an error naming the expected and the actual shape.
    """
    x = torch.as_tensor(obs, dtype=torch.float32, device=device)
    single = x.dim() == 1
    if single:
        x = x.unsqueeze(0)
    if x.dim() != 2 or x.shape[-1] != obs_dim:
        raise ValueError(f"obs: expected [B, X={obs_dim}] or [X={obs_dim}], got {list(x.shape)}")
    return x, single


def observation_inputs(
    obs_dim: int, act_dim: int, ignored_obs: Sequence[int]
) -> tuple[list[int] | None, list[int] | None]:
    """The feature indices an actor (reading ``obs [X]``) and a critic (reading
    ``[obs, act] [X + U]``) keep when the observation features ``ignored_obs`` are hidden from
    them; ``(None, None)`` (read everything) when none are.

    Raises:
        ValueError: an index outside ``[0, X)``, or every observation feature ignored.
    """
    ignored = feature_indices("ignored_obs", ignored_obs, obs_dim)
    if not ignored:
        return None, None
    kept = [i for i in range(obs_dim) if i not in ignored]
    if not kept:
        raise ValueError(f"ignored_obs={list(ignored_obs)} hides every observation feature")
    return kept, kept + [obs_dim + j for j in range(act_dim)]
