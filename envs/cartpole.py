"""The two cart-pole tasks of the PETS benchmark (Chua et al. 2018) and their torch twins.

``CartpoleBalanceEnv``: the classic cart-pole (Barto, Sutton & Anderson 1983; gymnasium's
CartPole-v1 equations: Euler, tau 0.02 s) with a continuous action ``a in [-1, 1]`` giving a
force ``10 a`` N, as in mbrl-lib's ``cartpole_continuous``. Reward 1 per step including the
step that terminates; terminated when ``|x| > 2.4`` m or ``|theta| > 12`` degrees, or when the
state is not finite (a NaN action played on the raw env: never scored as alive).

``CartpoleSwingupEnv``: a MuJoCo cart-pole (``assets/cartpole.xml``) whose 0.6 m pole starts
hanging down; PETS reward ``exp(-|ee - (0, 0.6)|^2 / 0.6^2) - 0.01 |a|^2`` with ``ee`` the pole
tip; never terminates.

The torch functions take any leading batch ``[..., X]`` and work in the inputs' dtype (float32
expected) on the inputs' device.
"""

from __future__ import annotations

import math
from importlib import resources

import gymnasium as gym
import mujoco
import numpy as np
import torch
from gymnasium import spaces
from gymnasium.envs.mujoco import MujocoEnv

# ---------------------------------------------------------------- cart-pole balance

GRAVITY = 9.8
MASS_CART = 1.0
MASS_POLE = 0.1
HALF_LENGTH = 0.5  # half the pole's length, m
FORCE_MAG = 10.0  # N per unit action
TAU = 0.02  # s per step
X_THRESHOLD = 2.4  # m
THETA_THRESHOLD = 12 * 2 * math.pi / 360  # rad


class CartpoleBalanceEnv(gym.Env):
    """Continuous-action cart-pole balance; observation ``[x, x_dot, theta, theta_dot]``.

    The dynamics are CartPole-v1's (Florian 2007 equations, explicit Euler) with force
    ``10 * clip(a, -1, 1)``. The initial state is uniform in ``[-0.05, 0.05]^4``. Stepping after
    termination returns reward 0 (as CartPole does); the time limit (200 steps) comes from the
    ``TimeLimit`` wrapper added by ``gymnasium.make("mbrl/CartpoleBalance-v0")``.
    """

    metadata = {"render_modes": [], "render_fps": 50}

    def __init__(self, render_mode: str | None = None) -> None:
        if render_mode is not None:
            raise ValueError(f"CartpoleBalanceEnv does not render; got render_mode={render_mode!r}")
        high = np.array([2 * X_THRESHOLD, np.inf, 2 * THETA_THRESHOLD, np.inf], dtype=np.float32)
        self.observation_space = spaces.Box(-high, high, dtype=np.float32)
        self.action_space = spaces.Box(-1.0, 1.0, shape=(1,), dtype=np.float32)
        self.render_mode = render_mode
        self.state: np.ndarray | None = None  # [4] float64
        self._steps_beyond_terminated: int | None = None

    def step(self, action: np.ndarray) -> tuple[np.ndarray, float, bool, bool, dict]:
        if self.state is None:
            raise RuntimeError("call reset() before step()")
        a = float(np.clip(np.asarray(action, dtype=np.float64).reshape(-1)[0], -1.0, 1.0))
        x, x_dot, theta, theta_dot = self.state
        force = FORCE_MAG * a
        cos, sin = math.cos(theta), math.sin(theta)
        total_mass = MASS_CART + MASS_POLE
        pml = MASS_POLE * HALF_LENGTH
        temp = (force + pml * theta_dot**2 * sin) / total_mass
        theta_acc = (GRAVITY * sin - cos * temp) / (
            HALF_LENGTH * (4.0 / 3.0 - MASS_POLE * cos**2 / total_mass)
        )
        x_acc = temp - pml * theta_acc * cos / total_mass
        self.state = np.array(
            [
                x + TAU * x_dot,
                x_dot + TAU * x_acc,
                theta + TAU * theta_dot,
                theta_dot + TAU * theta_acc,
            ]
        )
        x, theta = self.state[0], self.state[2]
        outside = abs(x) > X_THRESHOLD or abs(theta) > THETA_THRESHOLD
        terminated = bool(outside or not np.isfinite(self.state).all())
        if not terminated:
            reward = 1.0
        elif self._steps_beyond_terminated is None:
            self._steps_beyond_terminated = 0
            reward = 1.0  # the pole just fell: this step still counts
        else:
            self._steps_beyond_terminated += 1
            reward = 0.0
        return self.state.astype(np.float32), reward, terminated, False, {}

    def reset(
        self, *, seed: int | None = None, options: dict | None = None
    ) -> tuple[np.ndarray, dict]:
        super().reset(seed=seed)
        self.state = self.np_random.uniform(low=-0.05, high=0.05, size=(4,))
        self._steps_beyond_terminated = None
        return self.state.astype(np.float32), {}


def cartpole_balance_termination(next_obs: torch.Tensor) -> torch.Tensor:
    """``|x| > 2.4`` or ``|theta| > 12 deg`` (NaN there too): ``[..., 4] -> bool [...]``.

    The registry's spec wraps it (:class:`~mbrl.envs.spec.NonfiniteTerminates`) so that, as in
    the env, a NaN or inf anywhere in the state terminates."""
    x, theta = next_obs[..., 0], next_obs[..., 2]
    inside = (
        (x >= -X_THRESHOLD)
        & (x <= X_THRESHOLD)
        & (theta >= -THETA_THRESHOLD)
        & (theta <= THETA_THRESHOLD)
    )
    return ~inside


def cartpole_balance_reward(
    obs: torch.Tensor, act: torch.Tensor, next_obs: torch.Tensor
) -> torch.Tensor:
    """1 for every step the env plays (the terminating one included): ``[...]`` ones.

    Steps after termination are zeroed by the planner (see ``PlanningProblem.evaluate``).
    """
    return torch.ones(next_obs.shape[:-1], dtype=next_obs.dtype, device=next_obs.device)


# ---------------------------------------------------------------- cart-pole swing-up

POLE_LENGTH = 0.6  # m, hinge to tip
SWINGUP_FRAME_SKIP = 5  # 5 x 0.01 s = 0.05 s per step
SWINGUP_CTRL_COST = 0.01


def cartpole_xml_path() -> str:
    """Path of the packaged ``cartpole.xml`` (found through ``importlib.resources``)."""
    return str(resources.files("mbrl.envs.assets").joinpath("cartpole.xml"))


class CartpoleSwingupEnv(MujocoEnv):
    """MuJoCo cart-pole swing-up (PETS, Chua et al. 2018); observation ``[x, theta, x_dot,
    theta_dot]`` with ``theta = 0`` upright and ``theta = pi`` hanging down.

    Reset: ``qpos = (0, pi) + N(0, s^2)``, ``qvel = N(0, s^2)`` with ``s = reset_noise_scale``
    (0.1 as in PETS). Step: ``frame_skip = 5`` MuJoCo steps of 0.01 s (dt = 0.05 s), then the
    reward from the simulated tip position (site ``tip``, kinematics recomputed at the new
    state). Action in ``[-1, 1]`` (motor gear 10 N). Never terminates; 200 steps via
    ``gymnasium.make("mbrl/CartpoleSwingup-v0")``.
    """

    metadata = {"render_modes": ["human", "rgb_array", "depth_array"], "render_fps": 20}

    def __init__(self, reset_noise_scale: float = 0.1, **kwargs) -> None:
        self._reset_noise_scale = reset_noise_scale
        obs_space = spaces.Box(-np.inf, np.inf, shape=(4,), dtype=np.float64)
        MujocoEnv.__init__(
            self,
            cartpole_xml_path(),
            SWINGUP_FRAME_SKIP,
            observation_space=obs_space,
            default_camera_config={"distance": 4.0, "elevation": 0.0, "lookat": [0, 0, 0.1]},
            **kwargs,
        )
        self._tip = self.model.site("tip").id

    def step(self, action: np.ndarray) -> tuple[np.ndarray, float, bool, bool, dict]:
        self.do_simulation(action, self.frame_skip)
        mujoco.mj_kinematics(self.model, self.data)  # site positions at the new state
        tip = self.data.site_xpos[self._tip]  # [3] world position of the pole tip
        dist2 = tip[0] ** 2 + (tip[2] - POLE_LENGTH) ** 2
        reward_tip = math.exp(-dist2 / POLE_LENGTH**2)
        reward_ctrl = -SWINGUP_CTRL_COST * float(np.sum(np.square(action)))
        if self.render_mode == "human":
            self.render()
        info = {"reward_tip": reward_tip, "reward_ctrl": reward_ctrl}
        return self._get_obs(), reward_tip + reward_ctrl, False, False, info

    def reset_model(self) -> np.ndarray:
        s = self._reset_noise_scale
        qpos = np.array([0.0, math.pi]) + s * self.np_random.standard_normal(2)
        qvel = s * self.np_random.standard_normal(2)
        self.set_state(qpos, qvel)
        return self._get_obs()

    def _get_obs(self) -> np.ndarray:
        return np.concatenate([self.data.qpos, self.data.qvel]).ravel()


def cartpole_swingup_reward(
    obs: torch.Tensor, act: torch.Tensor, next_obs: torch.Tensor
) -> torch.Tensor:
    """PETS swing-up reward ``exp(-|ee - (0, 0.6)|^2 / 0.6^2) - 0.01 |a|^2`` with
    ``ee = (x - 0.6 sin theta, 0.6 cos theta)`` from ``next_obs [..., 4]``; returns ``[...]``."""
    x, theta = next_obs[..., 0], next_obs[..., 1]
    ee_x = x - POLE_LENGTH * torch.sin(theta)
    ee_z = POLE_LENGTH * torch.cos(theta)
    dist2 = ee_x.square() + (ee_z - POLE_LENGTH).square()
    return torch.exp(-dist2 / POLE_LENGTH**2) - SWINGUP_CTRL_COST * act.square().sum(dim=-1)


def register_with_gymnasium() -> None:
    """Register ``mbrl/CartpoleBalance-v0`` and ``mbrl/CartpoleSwingup-v0`` (200 steps each)
    with gymnasium, once."""
    for env_id, entry in (
        ("mbrl/CartpoleBalance-v0", "mbrl.envs.cartpole:CartpoleBalanceEnv"),
        ("mbrl/CartpoleSwingup-v0", "mbrl.envs.cartpole:CartpoleSwingupEnv"),
    ):
        if env_id not in gym.registry:
            gym.register(id=env_id, entry_point=entry, max_episode_steps=200)
