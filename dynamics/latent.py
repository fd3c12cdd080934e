"""What the latent image models share: PlaNet's convolutional encoder and decoder, the checks of
images and chunks at their seams, one guarded optimizer step, the start of planning rows, and
the learned reward as a stage cost for gradient planners.

The models themselves are :class:`~mbrl.dynamics.rssm.RSSM` (PlaNet's recurrent state-space
model) and :class:`~mbrl.dynamics.single_step.SingleStepLatent` (a deterministic encoder of
stacked frames with latent dynamics). Both train on :class:`~mbrl.data.Sequences` chunks of
``uint8`` images (:meth:`update`: one optimizer step, :class:`LatentLosses`), filter real frames
into a :class:`~mbrl.dynamics.base.Belief`, and roll out in their latent space: a planning row
is a latent feature vector ``[F]`` (the model's ``obs_dim``), its reward the model's reward head
(``learns_reward = True``).

Networks (Hafner et al. 2019, "Learning Latent Dynamics for Planning from Pixels", App. A, and
its ``networks/conv_ha.py``): the encoder is ``layers`` convolutions of kernel 4 and stride 2
with ``depth * 2^i`` channels and ReLU, flattened (``1024`` features for ``64 x 64`` images at
depth 32); the decoder is a dense layer to ``32 * depth`` features seen as a ``1 x 1`` map, then
``layers`` transposed convolutions of stride 2 with ``4 * depth, 2 * depth, depth`` channels and
ReLU, the last to the image's ``C`` channels (kernels 5, 5, 6, 6 for 64 x 64 images:
:func:`decoder_kernels`). Images enter as PlaNet preprocesses them
(:func:`~mbrl.envs.pixels.preprocess`: floats in ``[-0.5, 0.5)`` at a bit depth, with uniform
dequantization noise), and the decoder's output is the mean of a unit-variance Gaussian over
those pixels.

Shape letters follow DESIGN.md: ``B`` batch, ``L`` chunk length, ``C H W`` image channels,
height and width, ``U`` action dim, ``F`` latent feature dim, ``P`` particles.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from mbrl.data import Sequences
from mbrl.dynamics.base import Belief, FitError, FitReport, RolloutState
from mbrl.envs.pixels import check_images
from mbrl.planners.derivatives import CostExpansion, autograd_cost_expansion
from mbrl.shapes import ShapeError, check_shape

KERNEL, STRIDE = 4, 2  # PlaNet's encoder convolutions


def encoder_sizes(size: tuple[int, int], layers: int) -> list[tuple[int, int]]:
    """The ``(H, W)`` of the input and of each encoder layer's output: ``layers + 1`` sizes.

    Raises:
        ValueError: the image is too small for ``layers`` convolutions of kernel 4, stride 2.
    """
    sizes = [tuple(size)]
    for _ in range(layers):
        h, w = sizes[-1]
        sizes.append(((h - KERNEL) // STRIDE + 1, (w - KERNEL) // STRIDE + 1))
    if min(sizes[-1]) < 1:
        fit = 0
        while fit < layers and min(sizes[fit + 1]) >= 1:
            fit += 1
        raise ValueError(
            f"images of {size[0]} x {size[1]} are too small for {layers} convolutions of kernel "
            f"{KERNEL} and stride {STRIDE}; use conv_layers <= {fit} (or larger images)"
        )
    return sizes


def decoder_kernels(size: tuple[int, int], layers: int) -> list[tuple[int, int]]:
    """Kernels ``(kh, kw)`` of the decoder's ``layers`` transposed convolutions of stride 2 from
    a ``1 x 1`` map to an image of ``size``.

    PlaNet's rule, generalised: kernel 5 for the first ``layers // 2`` layers, 6 after, and the
    last layer's kernel set so the output is exactly ``size`` (``k = S - 2 (s - 1)`` from the
    size ``s`` before it). For 64 x 64 and 4 layers this is PlaNet's 5, 5, 6, 6.

    Raises:
        ValueError: no kernel >= 2 reaches ``size`` (the image is too small for ``layers``).
    """
    kernels = [5 if i < layers // 2 else 6 for i in range(layers - 1)]
    out = []
    for dim in size:
        s = 1
        for k in kernels:
            s = (s - 1) * STRIDE + k
        last = dim - (s - 1) * STRIDE
        if last < STRIDE:
            raise ValueError(
                f"a decoder of {layers} transposed convolutions cannot end at {size[0]} x "
                f"{size[1]} images (its last kernel would be {last}); use fewer conv_layers"
            )
        out.append(last)
    return [(k, k) for k in kernels] + [(out[0], out[1])]


def memory_format_for(device: torch.device) -> torch.memory_format:
    """The image layout of the convolutions: channels last on the CPU (oneDNN's convolutions
    and their backward pass take about 0.7x the time there), PyTorch's default elsewhere."""
    return torch.channels_last if device.type == "cpu" else torch.contiguous_format


class ConvEncoder(nn.Module):
    """Images ``[N, C, H, W]`` (preprocessed floats) to features ``[N, E]``: ``layers``
    convolutions of kernel 4, stride 2, ``depth * 2^i`` channels, ReLU (PlaNet's encoder).
    ``out_dim`` is ``E``; ``memory_format`` the layout the images are put in."""

    def __init__(
        self,
        channels: int,
        size: tuple[int, int],
        depth: int,
        layers: int,
        memory_format: torch.memory_format = torch.contiguous_format,
    ) -> None:
        super().__init__()
        sizes = encoder_sizes(size, layers)
        convs: list[nn.Module] = []
        c = channels
        for i in range(layers):
            convs += [nn.Conv2d(c, depth * 2**i, KERNEL, STRIDE), nn.ReLU(inplace=True)]
            c = depth * 2**i
        self.net = nn.Sequential(*convs, nn.Flatten())
        self.out_dim = c * sizes[-1][0] * sizes[-1][1]
        self.memory_format = memory_format

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.net(images.contiguous(memory_format=self.memory_format))


class ConvDecoder(nn.Module):
    """Features ``[N, F]`` to image means ``[N, C, H, W]``: a dense layer to ``32 * depth``
    features seen as a ``1 x 1`` map, then transposed convolutions of stride 2 with
    :func:`decoder_kernels` and ``depth * 2^(layers - 2 - i)`` channels, ReLU between, the last
    to ``C`` channels (PlaNet's decoder).

    The first transposed convolution acts on a ``1 x 1`` map, so it is a dense layer from the
    ``32 * depth`` features to ``C' x k x k`` outputs: it is computed as that matmul with the
    convolution's own weight (the same numbers; on the CPU about 10x faster than
    ``conv_transpose2d`` on 1 x 1 inputs, forward and backward)."""

    def __init__(
        self,
        in_dim: int,
        channels: int,
        size: tuple[int, int],
        depth: int,
        layers: int,
        memory_format: torch.memory_format = torch.contiguous_format,
    ) -> None:
        super().__init__()
        kernels = decoder_kernels(size, layers)
        self.width = 32 * depth
        self.dense = nn.Linear(in_dim, self.width)
        deconvs: list[nn.Module] = []
        c = self.width
        for i, k in enumerate(kernels):
            last = i == layers - 1
            out = channels if last else depth * 2 ** (layers - 2 - i)
            deconvs.append(nn.ConvTranspose2d(c, out, k, STRIDE))
            if not last:
                deconvs.append(nn.ReLU(inplace=True))
            c = out
        self.first = deconvs[0]  # from the 1 x 1 map: a matmul
        self.net = nn.Sequential(*deconvs[1:])
        self.memory_format = memory_format

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        first = self.first
        c, kh, kw = first.out_channels, *first.kernel_size
        x = F.linear(self.dense(features), first.weight.flatten(1).t())  # [N, C' kh kw]
        x = x.view(-1, c, kh, kw) + first.bias.view(1, c, 1, 1)
        return self.net(x.contiguous(memory_format=self.memory_format))


def mlp(sizes: list[int], activation: type[nn.Module] = nn.ReLU) -> nn.Sequential:
    """Dense layers ``sizes[0] -> ... -> sizes[-1]`` with ``activation`` between them."""
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:], strict=True)):
        layers.append(nn.Linear(a, b))
        if i < len(sizes) - 2:
            layers.append(activation())
    return nn.Sequential(*layers)


@dataclass(frozen=True)
class LatentLosses:
    """What one update of a latent model did: the minimised total and its terms (per chunk
    step, averaged over the batch), the gradient norm before clipping, the seconds it took."""

    total: float
    terms: Mapping[str, float]  # "recon_loss", "reward_loss", and "kl_loss" or "latent_loss"
    grad_norm: float
    seconds: float

    def report(self) -> FitReport:
        """The update as a :class:`~mbrl.dynamics.base.FitReport` of one step."""
        return FitReport((self.total,), (), 1, 0, (0,), self.seconds)


def check_chunks(
    chunks: Sequences, image_shape: tuple[int, ...], act_dim: int, what: str
) -> tuple[int, int]:
    """Check chunks of images at a latent model's update and return ``(B, L)``.

    Raises:
        TypeError: not :class:`~mbrl.data.Sequences`.
        ValueError: images that are not ``uint8 [B, L + 1, C, H, W]`` of the model's size.
        ShapeError: actions or rewards of the wrong shape.
    """
    if not isinstance(chunks, Sequences):
        raise TypeError(
            f"{what} trains on Sequences chunks [B, L] (ReplayBuffer.sample_chunks), got "
            f"{type(chunks).__name__}"
        )
    check_images(f"{what}: chunks.obs", chunks.obs, image_shape)
    check_shape("chunks.act", chunks.act, ("B", "L", act_dim))
    b, length = chunks.act.shape[:2]
    check_shape("chunks.obs", chunks.obs, (b, length + 1, *image_shape))
    check_shape("chunks.reward", chunks.reward, (b, length))
    if not bool(torch.isfinite(chunks.act).all() & torch.isfinite(chunks.reward).all()):
        raise ValueError(
            f"{what}: chunks hold NaN/inf actions or rewards; remove the episode they come "
            "from before training"
        )
    return b, length


def check_frames(obs: torch.Tensor, image_shape: tuple[int, ...], what: str) -> None:
    """Refuse anything but ``uint8 [B, C, H, W]`` frames of the model's size."""
    check_images(what, obs, image_shape)
    if obs.ndim != len(image_shape) + 1:
        raise ShapeError(
            f"{what}: expected a batch of frames [B, {', '.join(map(str, image_shape))}], got "
            f"{list(obs.shape)}"
        )


def check_images_of(obs: torch.Tensor, shape: tuple[int, ...], what: str) -> None:
    """Refuse anything but ``uint8`` images of exactly ``shape`` (``[..., C, H, W]``)."""
    check_images(what, obs, shape[-3:])
    check_shape(what, obs, shape)


def check_args(
    image_shape: tuple[int, ...],
    bit_depth: int,
    counts: Mapping[str, int],
    positives: Mapping[str, float],
    nonnegatives: Mapping[str, float],
) -> None:
    """Refuse malformed constructor arguments of a latent model, naming the argument."""
    if len(image_shape) != 3 or any(isinstance(s, bool) or int(s) < 1 for s in image_shape):
        raise ValueError(f"image_shape must be (C, H, W) of ints >= 1, got {image_shape!r}")
    if isinstance(bit_depth, bool) or not isinstance(bit_depth, int) or not 1 <= bit_depth <= 8:
        raise ValueError(f"bit_depth must be an int in [1, 8], got {bit_depth!r}")
    for name, value in counts.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be an int >= 1, got {value!r}")
    for name, value in positives.items():
        if not (isinstance(value, int | float) and math.isfinite(value) and value > 0):
            raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
    for name, value in nonnegatives.items():
        if not (isinstance(value, int | float) and math.isfinite(value) and value >= 0):
            raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")


def guarded_step(
    loss: torch.Tensor,
    module: nn.Module,
    optimizer: torch.optim.Optimizer,
    grad_clip: float,
    what: str,
    settings: str,
) -> float:
    """Back-propagate ``loss`` and take one optimizer step with the gradient norm clipped at
    ``grad_clip``; return the norm before clipping.

    Nothing is changed when the loss or the gradient is NaN or inf: :class:`FitError` names
    ``what``, the value and ``settings`` (the constructor arguments that drive the fit), and the
    weights stay as they were before this step.
    """
    value = float(loss.detach())
    if not math.isfinite(value):
        raise FitError(
            f"{what} diverged: the training loss is {value}; the weights are kept as before "
            f"this update. Lower lr or grad_clip ({settings}), or restart from the last "
            "checkpoint"
        )
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    norm = float(torch.nn.utils.clip_grad_norm_(module.parameters(), grad_clip))
    if not math.isfinite(norm):
        optimizer.zero_grad(set_to_none=True)
        raise FitError(
            f"{what} diverged: the gradient norm is {norm} at loss {value}; the weights are kept "
            f"as before this update. Lower lr ({settings}), or restart from the last checkpoint"
        )
    optimizer.step()
    return norm


def start_rows(obs: torch.Tensor | Belief, particles: int, feature_dim: int) -> RolloutState:
    """``particles`` planning rows per start: the features of a belief (its ``mean [B, F]``) or
    of ``obs [B, F]``, repeated start-major (``[B * P, F]``)."""
    if isinstance(particles, bool) or not isinstance(particles, int) or particles < 1:
        raise ValueError(f"particles must be an int >= 1, got {particles!r}")
    features = obs.mean if isinstance(obs, Belief) else obs
    if not torch.is_tensor(features):
        raise TypeError(
            f"rollout_start takes a Belief or latent features [B, {feature_dim}], got "
            f"{type(obs).__name__}"
        )
    check_shape("rollout_start features", features, ("B", feature_dim))
    if particles == 1:
        return RolloutState(obs=features)
    return RolloutState(obs=features.repeat_interleave(particles, dim=0))


def seeded_init(seed: int, build: Callable[[], None]) -> None:
    """Run ``build`` (which makes the model's layers) with torch's global generator seeded
    ``seed``, and put the global generator back as it was: the same seed gives the same initial
    weights, whatever else the process drew before."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        build()


class LatentRewardCost:
    """The learned reward of a latent model as a :class:`~mbrl.planners.base.StageCost`:
    ``cost(x, u, t) = -reward(x, u)`` on latent features ``x [B, F]`` and actions ``u [B, U]``,
    its expansion by autograd (:func:`~mbrl.planners.derivatives.autograd_cost_expansion`),
    time-invariant, and no terminal cost. ``reward`` is a model's ``stage_reward``.

    Gradient planners (iLQR) refuse a problem whose model learns the reward unless it brings a
    stage cost; this is that cost for :class:`~mbrl.dynamics.rssm.RSSM` and
    :class:`~mbrl.dynamics.single_step.SingleStepLatent`.
    """

    def __init__(
        self, reward: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], dtype: torch.dtype
    ) -> None:
        self.reward = reward
        self.dtype = dtype  # the model's parameters' dtype

    def cost(self, x: torch.Tensor, u: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode(False), torch.no_grad():
            return -self.reward(x.to(self.dtype), u.to(self.dtype)).to(x.dtype)

    def expansion(self, x: torch.Tensor, u: torch.Tensor, t: torch.Tensor) -> CostExpansion:
        nx = x.shape[-1]
        z = torch.cat([x, u.to(x.dtype)], dim=-1).to(self.dtype)
        return autograd_cost_expansion(lambda w: -self.reward(w[:, :nx], w[:, nx:]), z)

    def terminal_cost(self, x: torch.Tensor) -> torch.Tensor:
        return x.new_zeros(x.shape[0])

    def terminal_expansion(self, x: torch.Tensor) -> CostExpansion:
        b, nx = x.shape
        return CostExpansion(x.new_zeros(b), x.new_zeros(b, nx), x.new_zeros(b, nx, nx))
