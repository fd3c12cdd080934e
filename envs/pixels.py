"""Pixel-observation tasks: images rendered from a state task, with frame stack, action repeat
and bit depth, and the image preprocessing of PlaNet.

:class:`PixelObservation` wraps any gymnasium env that can render: every observation is the
rendered frame as ``uint8 [C, H, W]`` (RGB, ``C = 3``; ``k`` stacked frames give
``[k * C, H, W]``, oldest first), each step repeats the action ``action_repeat`` times with
the rewards summed (stopping early when the inner env terminates or truncates), and
``bit_depth < 8`` keeps only the top bits of every pixel. ``info["state"]`` holds the inner
env's observation after the step, so state-based checks stay possible.

:class:`PixelSpec` is the registry entry of a pixel task: an :class:`~mbrl.envs.EnvSpec` whose
observations are images (``obs_shape [k * C, H, W]``, ``obs_dim`` the number of their
entries) and that keeps the state task it wraps (``state``, with the state task's batched torch
reward for checks). Images cannot be scored in closed form, so its ``reward_fn`` refuses to
run: pixel tasks are planned with models that learn the reward. Registered here:
``pendulum-pixels`` (Pendulum-v1 drawn by :class:`PendulumRenderer` in numpy, no OpenGL) and
``inverted-pendulum-pixels`` (InvertedPendulum-v5 rendered by MuJoCo at 64 x 64); the
DeepMind Control pixel tasks are in :mod:`mbrl.envs.dmc`.

Model-side preprocessing (PlaNet, Hafner et al. 2019, Sec. 5 and its ``tools/preprocess.py``):
:func:`preprocess` turns ``uint8`` images into floats in ``[-0.5, 0.5)`` at a bit depth (5 in
PlaNet) with optional uniform dequantization noise, and :func:`postprocess` turns model outputs
back into ``uint8`` images; ``postprocess(preprocess(x, b), b) == reduce_bits(x, b)``.

Headless rendering. MuJoCo picks its OpenGL backend from ``MUJOCO_GL`` when it is first
imported. :func:`default_mujoco_gl` gives ``MUJOCO_GL=egl`` (GPU or Mesa, no display needed)
when the variable is unset, the system is Linux and ``libEGL`` loads; importing
:mod:`mbrl.envs` applies it before anything imports mujoco. To choose another backend, set
``MUJOCO_GL`` yourself before the first import of mujoco or mbrl.envs (``osmesa`` for software
rendering, ``glfw`` with a display). A render that fails raises :class:`RenderError` with the
fix.
"""

from __future__ import annotations

import ctypes
import math
import os
import sys
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, SupportsFloat

import gymnasium as gym
import numpy as np
import torch

from mbrl.envs.registry import names, register
from mbrl.envs.spec import EnvSpec, never_terminates

Renderer = Callable[[gym.Env], np.ndarray]
"""``render(env) -> uint8 [H, W, 3]``: the current frame of ``env``."""

CHANNELS = 3  # RGB


class RenderError(RuntimeError):
    """An env could not render a frame (no OpenGL backend, say); the message says how to fix it."""


def default_mujoco_gl() -> dict[str, str]:
    """``{"MUJOCO_GL": "egl"}`` when ``MUJOCO_GL`` is unset, the system is Linux and ``libEGL``
    loads; else ``{}`` (a backend the user chose is kept, and where EGL is missing MuJoCo's own
    default stays, since ``MUJOCO_GL=egl`` without ``libEGL`` breaks ``import mujoco``).

    Apply it with ``os.environ.update(default_mujoco_gl())`` before mujoco is first imported.
    """
    if "MUJOCO_GL" in os.environ or not sys.platform.startswith("linux"):
        return {}
    try:
        ctypes.CDLL("libEGL.so.1")
    except OSError:
        return {}
    return {"MUJOCO_GL": "egl"}


def render_help(what: str, error: BaseException) -> str:
    """The message of a render that failed with ``error``: the cause and how to fix it."""
    backend = os.environ.get("MUJOCO_GL")
    return (
        f"{what} cannot render a frame ({type(error).__name__}: {error}). Rendering without a "
        f"display needs an OpenGL backend; MUJOCO_GL is {backend!r}. With MUJOCO_GL=egl "
        "install libEGL and a driver for it (Debian/Ubuntu: apt-get install libegl1 "
        "libgl1-mesa-dri; on a GPU machine the vendor driver); or software rendering: "
        "apt-get install libosmesa6 and set MUJOCO_GL=osmesa; or set MUJOCO_GL=glfw where a "
        "display is available. Set MUJOCO_GL before mujoco or mbrl.envs is first imported "
        "(PYOPENGL_PLATFORM, if set, must match it)"
    )


# ---------------------------------------------------------------- images


def check_images(what: str, images: torch.Tensor | np.ndarray, shape: Sequence[int]) -> None:
    """Raise ``ValueError`` unless ``images`` is ``uint8 [..., C, H, W]`` with ``[C, H, W] ==
    shape``: the check at the seams where images enter a buffer or a model.

    The message names ``what``, the expected and the actual shape and dtype, and the fix.
    """
    dtype = images.dtype
    ok_dtype = dtype == torch.uint8 if torch.is_tensor(images) else dtype == np.uint8
    tail = tuple(images.shape[-len(shape) :]) if images.ndim >= len(shape) else ()
    if ok_dtype and tail == tuple(shape):
        return
    fix = []
    if not ok_dtype:
        fix.append(
            "images travel as uint8 (0-255; float images in [0, 1]: (255 * x).round() to "
            "uint8; model outputs: postprocess)"
        )
    if tail != tuple(shape):
        fix.append(
            "render at the task's size, channels first (an [H, W, C] frame: transpose it to "
            "[C, H, W])"
        )
    raise ValueError(
        f"{what}: expected uint8 images [..., {', '.join(map(str, shape))}], got "
        f"{str(dtype).replace('torch.', '')} {list(images.shape)}; " + "; ".join(fix)
    )


def _check_bit_depth(bit_depth: int) -> None:
    if isinstance(bit_depth, bool) or not isinstance(bit_depth, int) or not 1 <= bit_depth <= 8:
        raise ValueError(f"bit_depth must be an int in [1, 8], got {bit_depth!r}")


def reduce_bits(images: torch.Tensor | np.ndarray, bit_depth: int) -> torch.Tensor | np.ndarray:
    """``uint8`` images with only their top ``bit_depth`` bits kept (the low bits zeroed):
    ``x >> (8 - b) << (8 - b)``; same type and shape. ``bit_depth = 8`` returns the input."""
    _check_bit_depth(bit_depth)
    if bit_depth == 8:
        return images
    shift = 8 - bit_depth
    return (images >> shift) << shift


def preprocess(
    images: torch.Tensor, bit_depth: int = 5, generator: torch.Generator | None = None
) -> torch.Tensor:
    """PlaNet's image preprocessing: ``uint8 [..., C, H, W] -> float32 [..., C, H, W]`` in
    ``[-0.5, 0.5)``.

    Each pixel is reduced to its bin ``floor(x / 2^(8 - b))`` of ``2^b``, scaled to
    ``bin / 2^b - 0.5``; with a ``generator``, uniform noise in ``[0, 2^-b)`` drawn from it is
    added (PlaNet's dequantization, for training); without one the result is the bin's lower
    edge (deterministic, for evaluation). The output is on ``images``' device.

    Raises:
        ValueError: images that are not ``uint8``, or a bit depth outside ``[1, 8]``.
    """
    _check_bit_depth(bit_depth)
    if images.dtype != torch.uint8:
        check_images("preprocess", images, tuple(images.shape[-3:]))
    bins = 2**bit_depth
    x = torch.div(images, 2 ** (8 - bit_depth), rounding_mode="floor").float() / bins
    if generator is not None:
        x = x + torch.rand(x.shape, generator=generator, device=x.device) / bins
    return x - 0.5


def postprocess(x: torch.Tensor, bit_depth: int = 5) -> torch.Tensor:
    """The inverse of :func:`preprocess`: floats ``[..., C, H, W]`` (a decoder's output) to
    ``uint8`` images, ``clip(floor(2^b (x + 0.5)), 0, 2^b - 1) * 2^(8 - b)``.

    PlaNet's ``postprocess`` clips after scaling, so its value for ``x >= 0.5`` is 255; here the
    bin is clipped first, so every output is a value :func:`reduce_bits` can give.
    """
    _check_bit_depth(bit_depth)
    bins = 2**bit_depth
    index = torch.floor(bins * (x.float() + 0.5)).clamp(0, bins - 1)
    return (index * 2 ** (8 - bit_depth)).to(torch.uint8)


def _check_frame(what: str, frame: Any, height: int, width: int) -> np.ndarray:
    """``frame`` as ``uint8 [H, W, 3]``, or ``ValueError`` naming what it is and the fix."""
    if not isinstance(frame, np.ndarray):
        raise ValueError(
            f"{what}: the renderer returned {type(frame).__name__}, expected a uint8 array "
            f"[H={height}, W={width}, 3]; make the env with render_mode='rgb_array' (or pass "
            "renderer=...)"
        )
    if frame.shape != (height, width, CHANNELS) or frame.dtype != np.uint8:
        raise ValueError(
            f"{what}: the renderer returned a {frame.dtype} frame {list(frame.shape)}, expected "
            f"uint8 [H={height}, W={width}, 3]; render at the wrapper's size (gymnasium MuJoCo "
            f"envs: width={width}, height={height}) as RGB uint8"
        )
    return frame


# ---------------------------------------------------------------- action repeat


def repeat_step(
    env: gym.Env, action: Any, repeat: int
) -> tuple[Any, float, bool, bool, dict[str, Any], int]:
    """Step ``env`` with ``action`` up to ``repeat`` times, stopping after a step that
    terminates or truncates: ``(obs, summed reward, terminated, truncated, info, steps)`` with
    the last step's observation, flags and info."""
    total, steps = 0.0, 0
    while steps < repeat:
        obs, reward, terminated, truncated, info = env.step(action)
        total, steps = total + float(reward), steps + 1
        if terminated or truncated:
            break
    return obs, total, bool(terminated), bool(truncated), info, steps


def _check_count(name: str, value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an int >= 1, got {value!r}")


class ActionRepeat(gym.Wrapper):
    """Each step plays the action ``repeat`` times (:func:`repeat_step`): rewards summed, early
    stop when the env terminates or truncates; ``info["repeats"]`` counts the steps played."""

    def __init__(self, env: gym.Env, repeat: int) -> None:
        _check_count("repeat", repeat)
        super().__init__(env)
        self.repeat = repeat

    def step(self, action: Any) -> tuple[Any, SupportsFloat, bool, bool, dict[str, Any]]:
        obs, reward, terminated, truncated, info, steps = repeat_step(self.env, action, self.repeat)
        return obs, reward, terminated, truncated, {**info, "repeats": steps}


# ---------------------------------------------------------------- the wrapper


class PixelObservation(gym.Wrapper):
    """Observations are rendered frames, ``uint8 [frame_stack * 3, H, W]``.

    Args:
        env: the state env. Without ``renderer`` it must render RGB frames of the wrapper's
            size itself (``render_mode="rgb_array"``; gymnasium MuJoCo envs take ``width`` and
            ``height``).
        size: ``(H, W)`` of every frame.
        frame_stack: ``k`` latest frames stacked along the channels, oldest first; the reset
            frame fills the stack.
        action_repeat: env steps per wrapper step, rewards summed (:func:`repeat_step`).
        bit_depth: keep the top ``bit_depth`` bits of each pixel (:func:`reduce_bits`); 8 keeps
            the frame as rendered.
        renderer: ``render(env) -> uint8 [H, W, 3]`` in place of ``env.render()``.

    ``reset`` and ``step`` put the inner observation in ``info["state"]``; ``step`` also gives
    ``info["repeats"]``. ``render()`` returns the newest frame ``[H, W, 3]``.

    Raises:
        ValueError: bad sizes or counts; at reset or step, a frame of the wrong size or dtype.
        RenderError: the env could not render (the message says how to fix the set-up).
    """

    def __init__(
        self,
        env: gym.Env,
        size: tuple[int, int] = (64, 64),
        frame_stack: int = 1,
        action_repeat: int = 1,
        bit_depth: int = 8,
        renderer: Renderer | None = None,
    ) -> None:
        if len(size) != 2:
            raise ValueError(f"size must be (H, W), got {size!r}")
        for name, value in (("height", size[0]), ("width", size[1])):
            _check_count(name, value)
        _check_count("frame_stack", frame_stack)
        _check_count("action_repeat", action_repeat)
        _check_bit_depth(bit_depth)
        super().__init__(env)
        self.height, self.width = int(size[0]), int(size[1])
        self.frame_stack, self.action_repeat, self.bit_depth = frame_stack, action_repeat, bit_depth
        self._renderer = renderer
        self._frames: deque[np.ndarray] = deque(maxlen=frame_stack)  # [3, H, W] each
        self._what = f"PixelObservation({env.unwrapped.__class__.__name__})"
        shape = (frame_stack * CHANNELS, self.height, self.width)
        self.observation_space = gym.spaces.Box(0, 255, shape, dtype=np.uint8)

    def reset(
        self, *, seed: int | None = None, options: dict[str, Any] | None = None
    ) -> tuple[np.ndarray, dict[str, Any]]:
        state, info = self.env.reset(seed=seed, options=options)
        frame = self._frame()
        self._frames.clear()
        self._frames.extend([frame] * self.frame_stack)
        return self._stacked(), {**info, "state": state}

    def step(self, action: Any) -> tuple[np.ndarray, SupportsFloat, bool, bool, dict[str, Any]]:
        state, reward, terminated, truncated, info, steps = repeat_step(
            self.env, action, self.action_repeat
        )
        self._frames.append(self._frame())
        info = {**info, "state": state, "repeats": steps}
        return self._stacked(), reward, terminated, truncated, info

    def render(self) -> np.ndarray:
        """The newest frame, ``uint8 [H, W, 3]`` (after :meth:`reset`)."""
        if not self._frames:
            raise RuntimeError(f"{self._what}: call reset() before render()")
        return np.ascontiguousarray(self._frames[-1].transpose(1, 2, 0))

    def _frame(self) -> np.ndarray:
        """The current frame, ``uint8 [3, H, W]`` at the bit depth."""
        try:
            raw = self._renderer(self.env) if self._renderer is not None else self.env.render()
        except Exception as e:  # GL set-up failures surface as many exception types
            raise RenderError(render_help(self._what, e)) from e
        frame = _check_frame(self._what, raw, self.height, self.width)
        frame = reduce_bits(frame, self.bit_depth)
        return np.ascontiguousarray(frame.transpose(2, 0, 1))

    def _stacked(self) -> np.ndarray:
        return np.concatenate(self._frames, axis=0) if self.frame_stack > 1 else self._frames[0]


class PendulumRenderer:
    """Pendulum-v1 drawn in numpy from its angle, no OpenGL: a red rod (gymnasium's colours)
    from the centre of a white ``[H, W]`` image, anti-aliased, upright at ``theta = 0`` and
    drawn as gymnasium draws it (tip at ``(-sin theta, cos theta)`` with y up), with a dark
    pivot. Reads ``env.unwrapped.state[0]``; returns ``uint8 [H, W, 3]``."""

    ROD = np.array([204, 77, 77], dtype=np.float32)
    PIVOT = np.array([0, 0, 0], dtype=np.float32)

    def __init__(self, height: int = 64, width: int = 64) -> None:
        _check_count("height", height)
        _check_count("width", width)
        self.height, self.width = height, width
        scale = min(height, width)
        self.length = 0.4 * scale
        self.half_width = max(0.06 * scale, 0.75)
        self.pivot = max(0.05 * scale, 0.75)
        rows, cols = np.mgrid[0:height, 0:width].astype(np.float32) + 0.5
        self._cy, self._cx = height / 2.0, width / 2.0
        self._px, self._py = cols - self._cx, self._cy - rows  # [H, W], y up

    def __call__(self, env: gym.Env) -> np.ndarray:
        theta = float(env.unwrapped.state[0])
        tip = np.array([-math.sin(theta), math.cos(theta)], dtype=np.float32) * self.length
        # distance of each pixel centre to the segment pivot -> tip
        along = np.clip((self._px * tip[0] + self._py * tip[1]) / (self.length**2), 0.0, 1.0)
        dist = np.hypot(self._px - along * tip[0], self._py - along * tip[1])  # [H, W]
        rod = np.clip(self.half_width + 0.5 - dist, 0.0, 1.0)[..., None]  # [H, W, 1] coverage
        pivot = np.clip(self.pivot + 0.5 - np.hypot(self._px, self._py), 0.0, 1.0)[..., None]
        img = 255.0 * (1.0 - rod) + self.ROD * rod
        img = img * (1.0 - pivot) + self.PIVOT * pivot
        return np.round(img).astype(np.uint8)


# ---------------------------------------------------------------- the spec


def _image_reward(name: str) -> Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]:
    def image_reward(obs: torch.Tensor, act: torch.Tensor, next_obs: torch.Tensor) -> torch.Tensor:
        raise ValueError(
            f"{name} observes images, whose reward has no closed form: plan it with a model that "
            "learns the reward (learns_reward=True, a latent model); the state task's reward "
            "is spec.state.reward_fn"
        )

    return image_reward


@dataclass(frozen=True)
class PixelSpec(EnvSpec):
    """A pixel task: an :class:`~mbrl.envs.EnvSpec` whose observations are ``uint8 [k * C, H,
    W]`` images (``obs_shape``; ``obs_dim`` is their number of entries), with the state task
    it renders (``state``). Action space and bounds are the state task's; an episode is
    ``ceil(T_state / action_repeat)`` steps; the return of an episode is the state task's
    (rewards are summed over the repeats), and so is ``solved_return``. ``termination_fn``
    never terminates a row (the rows planners see are latent states; a task that terminates,
    inverted-pendulum-pixels, ends its real episodes by its own rule)."""

    obs_shape: tuple[int, ...] = ()  # (k * C, H, W)
    state: EnvSpec | None = None
    frame_stack: int = 1
    action_repeat: int = 1
    bit_depth: int = 8

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.state is None or len(self.obs_shape) != 3:
            raise ValueError(
                f"{self.name}: a PixelSpec needs its state task and obs_shape (k * C, H, W); "
                "build it with mbrl.envs.pixels.pixel_spec"
            )
        if self.obs_shape[0] != self.frame_stack * CHANNELS:
            raise ValueError(
                f"{self.name}: obs_shape {self.obs_shape} does not hold frame_stack="
                f"{self.frame_stack} RGB frames"
            )
        if self.obs_dim != math.prod(self.obs_shape):
            raise ValueError(f"{self.name}: obs_dim must be prod(obs_shape)")


def pixel_spec(
    state: EnvSpec,
    name: str,
    *,
    size: tuple[int, int] = (64, 64),
    frame_stack: int = 1,
    action_repeat: int = 1,
    bit_depth: int = 8,
    render_kwargs: dict[str, Any] | None = None,
    renderer: Callable[[int, int], Renderer] | None = None,
    description: str = "",
) -> PixelSpec:
    """The pixel task of ``state``: ``PixelObservation(state.make(**render_kwargs, width=W,
    height=H), size, frame_stack, action_repeat, bit_depth)``.

    Args:
        state: the state task.
        name: the pixel task's registry name.
        render_kwargs: keyword arguments for ``state.make`` that make it render
            (``{"render_mode": "rgb_array"}`` for gymnasium MuJoCo envs, to which ``width``
            and ``height`` are added); ``None`` with ``renderer``.
        renderer: ``renderer(H, W) -> Renderer``, a frame maker in place of ``env.render()``
            (:class:`PendulumRenderer`).
    """
    if (render_kwargs is None) == (renderer is None):
        raise ValueError(f"{name}: give render_kwargs or renderer (exactly one)")
    for key, value in (("frame_stack", frame_stack), ("action_repeat", action_repeat)):
        _check_count(key, value)
    _check_bit_depth(bit_depth)
    height, width = int(size[0]), int(size[1])
    shape = (frame_stack * CHANNELS, height, width)

    def make_env(**kwargs: Any) -> gym.Env:
        if kwargs:
            raise ValueError(
                f"{name}: takes no make() arguments (got {sorted(kwargs)}); its image size, "
                "frame stack, action repeat and bit depth are fixed by the spec: build another "
                "with mbrl.envs.pixels.pixel_spec"
            )
        if renderer is not None:
            env, frame = state.make(), renderer(height, width)
        else:
            env, frame = state.make(**render_kwargs, width=width, height=height), None
        return PixelObservation(env, (height, width), frame_stack, action_repeat, bit_depth, frame)

    return PixelSpec(
        name=name,
        make_env=make_env,
        obs_dim=math.prod(shape),
        act_dim=state.act_dim,
        action_low=state.action_low,
        action_high=state.action_high,
        max_episode_steps=-(-state.max_episode_steps // action_repeat),
        reward_fn=_image_reward(name),
        termination_fn=never_terminates,
        description=description or f"{state.name} from {height}x{width} RGB frames",
        solved_return=state.solved_return,
        obs_shape=shape,
        state=state,
        frame_stack=frame_stack,
        action_repeat=action_repeat,
        bit_depth=bit_depth,
    )


def _pendulum_pixels() -> PixelSpec:
    from mbrl.envs.registry import make

    return pixel_spec(
        make("pendulum"),
        "pendulum-pixels",
        renderer=PendulumRenderer,
        description="Pendulum-v1 from 64x64 RGB frames drawn in numpy (no OpenGL needed).",
    )


def _inverted_pendulum_pixels() -> PixelSpec:
    from mbrl.envs.registry import make

    return pixel_spec(
        make("inverted-pendulum"),
        "inverted-pendulum-pixels",
        render_kwargs={"render_mode": "rgb_array"},
        description="InvertedPendulum-v5 from 64x64 RGB frames rendered by MuJoCo.",
    )


SPECS: dict[str, Callable[[], EnvSpec]] = {
    "pendulum-pixels": _pendulum_pixels,
    "inverted-pendulum-pixels": _inverted_pendulum_pixels,
}


def register_all() -> None:
    """Register ``pendulum-pixels`` and ``inverted-pendulum-pixels``; safe to call twice."""
    registered = set(names())
    for name, factory in SPECS.items():
        if name not in registered:
            register(name, factory)
