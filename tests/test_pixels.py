"""Pixel observations: the wrapper (shapes, frame stack, action repeat, bit depth, bad frames),
PlaNet's image preprocessing, the pixel specs and the headless-rendering set-up."""

from __future__ import annotations

import math

import gymnasium as gym
import numpy as np
import pytest
import torch

from mbrl import envs
from mbrl.envs import pixels
from mbrl.envs.pixels import (
    ActionRepeat,
    PendulumRenderer,
    PixelObservation,
    PixelSpec,
    RenderError,
    check_images,
    postprocess,
    preprocess,
    reduce_bits,
)


class Counter(gym.Env):
    """A toy env: the state counts steps, the reward is the action, it terminates at step
    ``end``; its frame is filled with ``10 * count`` (so frames tell steps apart)."""

    def __init__(self, end: int = 5, size: tuple[int, int] = (8, 6), dtype=np.uint8) -> None:
        self.end, self.size, self.dtype = end, size, dtype
        self.observation_space = gym.spaces.Box(0, 100, (1,), np.float32)
        self.action_space = gym.spaces.Box(-10, 10, (1,), np.float32)
        self.count = 0

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self.count = 0
        return np.array([0.0], np.float32), {}

    def step(self, action):
        self.count += 1
        done = self.count >= self.end
        return np.array([self.count], np.float32), float(action[0]), done, False, {"k": 1}

    def render(self):
        return np.full((*self.size, 3), 10 * self.count, dtype=self.dtype)


def _wrapped(**kw) -> PixelObservation:
    return PixelObservation(Counter(), size=(8, 6), **kw)


# ---------------------------------------------------------------- the wrapper


def test_observation_is_uint8_channels_first() -> None:
    env = _wrapped()
    obs, info = env.reset(seed=0)
    assert env.observation_space.shape == (3, 8, 6) and env.observation_space.dtype == np.uint8
    assert obs.shape == (3, 8, 6) and obs.dtype == np.uint8 and env.observation_space.contains(obs)
    assert info["state"].tolist() == [0.0]
    assert env.render().shape == (8, 6, 3)


def test_frame_stack_keeps_the_newest_frames_oldest_first() -> None:
    env = _wrapped(frame_stack=3)
    obs, _ = env.reset(seed=0)
    assert obs.shape == (9, 8, 6)
    assert obs[:, 0, 0].tolist() == [0] * 9  # the reset frame fills the stack
    env.step(np.array([1.0]))
    obs, *_ = env.step(np.array([1.0]))
    assert obs[::3, 0, 0].tolist() == [0, 10, 20]  # frames of steps 0, 1, 2
    obs, *_ = env.step(np.array([1.0]))
    assert obs[::3, 0, 0].tolist() == [10, 20, 30]


def test_action_repeat_sums_rewards_and_stops_at_termination() -> None:
    env = _wrapped(action_repeat=3)
    env.reset(seed=0)
    obs, reward, terminated, truncated, info = env.step(np.array([2.0]))
    assert (reward, terminated, info["repeats"], info["state"].tolist()) == (6.0, False, 3, [3.0])
    assert obs[0, 0, 0] == 30  # the frame after the last repeat
    obs, reward, terminated, truncated, info = env.step(np.array([2.0]))
    assert (reward, terminated, info["repeats"], info["k"]) == (4.0, True, 2, 1)  # ends at 5
    assert obs[0, 0, 0] == 50


def test_action_repeat_wrapper_on_a_state_env() -> None:
    env = ActionRepeat(Counter(end=4), 3)
    env.reset(seed=0)
    assert env.step(np.array([1.0]))[1:3] == (3.0, False)
    obs, reward, terminated, _, info = env.step(np.array([1.0]))
    assert (obs.tolist(), reward, terminated, info["repeats"]) == ([4.0], 1.0, True, 1)
    with pytest.raises(ValueError, match="repeat must be an int >= 1"):
        ActionRepeat(Counter(), 0)


def test_bit_depth_keeps_the_top_bits() -> None:
    env = PixelObservation(Counter(), size=(8, 6), bit_depth=3)
    env.reset(seed=0)
    for _ in range(3):
        obs, *_ = env.step(np.array([0.0]))
    assert obs[0, 0, 0] == 0  # 30 = 0b00011110 -> top 3 bits 000
    env.unwrapped.count = 9  # 90 = 0b01011010 -> 0b01000000
    obs, *_ = env.step(np.array([0.0]))
    assert obs[0, 0, 0] == 96  # 100 = 0b01100100 -> 0b01100000


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        ({"frame_stack": 0}, "frame_stack must be an int >= 1"),
        ({"action_repeat": 1.5}, "action_repeat must be an int >= 1"),
        ({"bit_depth": 9}, r"bit_depth must be an int in \[1, 8\]"),
        ({"size": (0, 4)}, "height must be an int >= 1"),
        ({"size": (4,)}, r"size must be \(H, W\)"),
    ],
)
def test_bad_wrapper_arguments(kw: dict, match: str) -> None:
    kw = {"size": (8, 6), **kw}
    with pytest.raises(ValueError, match=match):
        PixelObservation(Counter(), **kw)


def test_a_frame_of_the_wrong_size_or_dtype_is_refused() -> None:
    env = PixelObservation(Counter(size=(8, 8)), size=(8, 6))
    with pytest.raises(
        ValueError, match=r"uint8 frame \[8, 8, 3\], expected uint8 \[H=8, W=6, 3\]"
    ):
        env.reset(seed=0)
    env = PixelObservation(Counter(dtype=np.float32), size=(8, 6))
    with pytest.raises(ValueError, match="returned a float32 frame.*as RGB uint8"):
        env.reset(seed=0)
    env = PixelObservation(Counter(), size=(8, 6), renderer=lambda e: None)
    with pytest.raises(ValueError, match="returned NoneType.*render_mode='rgb_array'"):
        env.reset(seed=0)


def test_a_render_failure_says_how_to_fix_it() -> None:
    def no_gl(env: gym.Env) -> np.ndarray:
        raise AttributeError("'NoneType' object has no attribute 'eglQueryString'")

    env = PixelObservation(Counter(), size=(8, 6), renderer=no_gl)
    with pytest.raises(RenderError) as err:
        env.reset(seed=0)
    msg = str(err.value)
    for fix in ("eglQueryString", "MUJOCO_GL", "libegl1", "MUJOCO_GL=osmesa", "libosmesa6"):
        assert fix in msg
    assert isinstance(err.value.__cause__, AttributeError)


def test_default_mujoco_gl(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MUJOCO_GL", "osmesa")
    assert pixels.default_mujoco_gl() == {}  # the user's choice is kept
    monkeypatch.delenv("MUJOCO_GL")
    monkeypatch.setattr(pixels.sys, "platform", "linux")

    def missing(name: str) -> None:
        raise OSError(f"{name}: cannot open shared object file")

    monkeypatch.setattr(pixels.ctypes, "CDLL", missing)
    assert pixels.default_mujoco_gl() == {}  # egl without libEGL would break import mujoco
    monkeypatch.setattr(pixels.ctypes, "CDLL", lambda name: object())
    assert pixels.default_mujoco_gl() == {"MUJOCO_GL": "egl"}
    monkeypatch.setattr(pixels.sys, "platform", "darwin")
    assert pixels.default_mujoco_gl() == {}


# ---------------------------------------------------------------- images at the seams


def test_reduce_bits_known_values() -> None:
    x = np.array([0, 7, 8, 100, 255], dtype=np.uint8)
    assert reduce_bits(x, 5).tolist() == [0, 0, 8, 96, 248]
    assert reduce_bits(x, 1).tolist() == [0, 0, 0, 0, 128]
    assert reduce_bits(x, 8) is x
    assert reduce_bits(torch.from_numpy(x), 5).tolist() == [0, 0, 8, 96, 248]


@pytest.mark.parametrize("bits", [1, 3, 5, 8])
def test_postprocess_inverts_preprocess(bits: int) -> None:
    images = torch.arange(256, dtype=torch.uint8).reshape(4, 1, 8, 8)  # every value once
    gen = torch.Generator().manual_seed(0)
    noisy = preprocess(images, bits, gen)
    clean = preprocess(images, bits)
    assert noisy.dtype == torch.float32 and noisy.shape == images.shape
    assert float(noisy.min()) >= -0.5 and float(noisy.max()) < 0.5
    assert torch.all((noisy >= clean) & (noisy < clean + 2.0**-bits))  # noise inside the bin
    expected = reduce_bits(images, bits)
    assert torch.equal(postprocess(noisy, bits), expected)
    assert torch.equal(postprocess(clean, bits), expected)
    assert torch.equal(preprocess(images, bits, torch.Generator().manual_seed(0)), noisy)


def test_preprocess_known_values_and_postprocess_clips() -> None:
    images = torch.tensor([0, 8, 255], dtype=torch.uint8)
    assert preprocess(images, 5).tolist() == [-0.5, -0.5 + 1 / 32, -0.5 + 31 / 32]
    assert postprocess(torch.tensor([-3.0, 0.0, 0.49, 7.0]), 5).tolist() == [0, 128, 248, 248]


def test_images_of_the_wrong_dtype_or_shape_are_refused() -> None:
    good = torch.zeros(2, 3, 64, 64, dtype=torch.uint8)
    check_images("buffer", good, (3, 64, 64))
    check_images("buffer", good.numpy(), (3, 64, 64))
    with pytest.raises(ValueError, match=r"buffer: expected uint8 images \[\.\.\., 3, 64, 64\], "):
        check_images("buffer", good.float() / 255, (3, 64, 64))
    with pytest.raises(ValueError, match=r"got uint8 \[2, 64, 64, 3\].*transpose"):
        check_images("buffer", good.permute(0, 2, 3, 1), (3, 64, 64))
    with pytest.raises(ValueError, match="got float32.*travel as uint8"):
        preprocess(torch.zeros(3, 8, 8))
    with pytest.raises(ValueError, match="bit_depth"):
        postprocess(torch.zeros(3, 8, 8), 0)


# ---------------------------------------------------------------- pixel specs


def test_pendulum_pixels_spec() -> None:
    spec = envs.make("pendulum-pixels")
    assert isinstance(spec, PixelSpec) and spec.state.name == "pendulum"
    assert spec.obs_shape == (3, 64, 64) and spec.obs_dim == 3 * 64 * 64
    assert (spec.act_dim, spec.max_episode_steps, spec.action_repeat) == (1, 200, 1)
    assert spec.solved_return == spec.state.solved_return
    x = torch.zeros(2, 3)
    with pytest.raises(ValueError, match="pendulum-pixels observes images.*learns_reward"):
        spec.reward_fn(x, torch.zeros(2, 1), x)
    latent = torch.tensor([[0.0, 1.0], [math.nan, 0.0]])  # what planners see: latent rows
    assert spec.termination_fn(latent).tolist() == [False, True]
    with pytest.raises(ValueError, match="takes no make"):
        spec.make(render_mode="rgb_array")


def test_pixel_spec_arguments_are_checked() -> None:
    state = envs.make("pendulum")
    with pytest.raises(ValueError, match="give render_kwargs or renderer"):
        pixels.pixel_spec(state, "p")
    with pytest.raises(ValueError, match="frame_stack must be an int >= 1"):
        pixels.pixel_spec(state, "p", renderer=PendulumRenderer, frame_stack=0)
    spec = pixels.pixel_spec(state, "p", renderer=PendulumRenderer, frame_stack=2, action_repeat=3)
    assert spec.obs_shape == (6, 64, 64) and spec.max_episode_steps == 67  # ceil(200 / 3)
    with pytest.raises(ValueError, match="needs its state task"):
        PixelSpec(**{**spec.__dict__, "state": None})


def test_pendulum_pixels_rewards_equal_the_state_task() -> None:
    spec = envs.make("pendulum-pixels")
    env, state_env = spec.make(), spec.state.make()
    obs, info = env.reset(seed=3)
    state, _ = state_env.reset(seed=3)
    assert np.array_equal(info["state"], state)
    rng = np.random.default_rng(0)
    for _ in range(10):
        a = rng.uniform(-2, 2, 1).astype(np.float32)
        obs, r, *_, info = env.step(a)
        state, r_state, *_ = state_env.step(a)
        assert r == r_state and np.array_equal(info["state"], state)
    assert obs.dtype == np.uint8 and obs.shape == (3, 64, 64)


def test_pendulum_renderer_draws_the_rod_at_the_angle() -> None:
    env = gym.make("Pendulum-v1")
    env.reset(seed=0)
    render = PendulumRenderer(64, 64)
    red, white = [204, 77, 77], [255, 255, 255]
    env.unwrapped.state = np.array([0.0, 0.0])  # upright: the rod above the pivot
    img = render(env)
    assert img.shape == (64, 64, 3) and img.dtype == np.uint8
    assert img[12, 32].tolist() == red and img[52, 32].tolist() == white
    assert img[0, 0].tolist() == white and img[32, 32].tolist() == [0, 0, 0]  # the pivot
    env.unwrapped.state = np.array([math.pi / 2, 0.0])  # a quarter turn: tip at (-1, 0), y up
    img = render(env)
    assert img[32, 12].tolist() == red and img[12, 32].tolist() == white


@pytest.fixture(scope="module")
def inverted_pixels():
    spec = envs.make("inverted-pendulum-pixels")
    env = spec.make()
    try:
        env.reset(seed=0)
    except RenderError as e:
        env.close()
        pytest.skip(f"MuJoCo cannot render here: {e}")
    yield spec, env
    env.close()


def test_inverted_pendulum_pixels_follow_the_state_task(inverted_pixels) -> None:
    spec, env = inverted_pixels
    assert isinstance(spec, PixelSpec) and spec.state.name == "inverted-pendulum"
    obs, info = env.reset(seed=1)
    state_env = spec.state.make()
    state, _ = state_env.reset(seed=1)
    assert np.array_equal(info["state"], state)
    assert obs.shape == (3, 64, 64) and obs.dtype == np.uint8 and int(obs.std()) > 0
    first, steps, terminated = obs, 0, False
    while not terminated and steps < 100:
        a = np.array([3.0], dtype=np.float32)  # pushes the pole over
        obs, r, terminated, truncated, info = env.step(a)
        state, r_state, term_state, *_ = state_env.step(a)
        assert (r, terminated) == (r_state, term_state)
        steps += 1
    assert terminated and 1 < steps < 100
    assert np.abs(obs.astype(int) - first.astype(int)).max() > 50  # the picture changed
    state_env.close()


def test_a_pixel_env_refuses_a_nonfinite_action() -> None:
    env = envs.make("pendulum-pixels").make()
    env.reset(seed=0)
    with pytest.raises(ValueError, match=r"pendulum-pixels: action \[nan\] is not finite"):
        env.step(np.array([math.nan], dtype=np.float32))
    env.step(np.array([0.5], dtype=np.float32))
