"""DeepMind Control Suite tasks (Tassa et al. 2018, ``dm-control`` on PyPI) in the registry.

Six tasks, each in two versions:

- ``dmc-<domain>-<task>``: the state task. The observation is dm_control's observation dict
  flattened to float32 in a fixed key order (:data:`TASKS`); one step is one control step of
  the suite (1000 per episode); ``reward_fn`` is the task's reward in batched torch, written
  from dm_control's sources with :func:`tolerance` (the torch twin of
  ``dm_control.utils.rewards.tolerance``) and :class:`Kinematics` (forward kinematics and
  subtree centre-of-mass velocities in torch, for the rewards that need positions or speeds
  the observation does not list).
- ``dmc-<domain>-<task>-pixels``: the same task from 64 x 64 RGB frames of camera 0, with
  PlaNet's action repeat (Hafner et al. 2019, Sec. 5: cartpole 8, reacher 4, cheetah 4,
  finger 2, cup 4, walker 2; camera 0 as in PlaNet's ``DeepMindWrapper``; PlaNet's code uses
  6 for cup, its paper 4), 1000 / R steps per episode (:mod:`mbrl.envs.pixels`).

The suite is wrapped directly (``suite.load``, no shimmy): :class:`DMCEnv` is a gymnasium env
around a ``dm_control.rl.control.Environment`` that also exposes the MuJoCo model, data and
control substeps, which is what :class:`~mbrl.dynamics.mujoco_model.MujocoModel` needs. A
seeded reset reseeds the task's random state, so episodes are reproducible; an episode is
truncated after 1000 control steps, the suite's own limit for these tasks (none of them
terminates).

Rewards, from the observation after the step (as dm_control scores the state after the
step): cartpole swingup (``upright * centered * small_control * small_velocity``), reacher
easy (fingertip within the target), cheetah run (torso subtree speed, :class:`Kinematics`),
finger spin (hinge velocity <= -15), walker walk (height, uprightness and subtree speed) and
ball_in_cup catch (ball inside the cup's target box). Each equals the env's reward on recorded
steps (``tests/test_dmc.py``).

Ground truth (:func:`truth_model`): the env's own MuJoCo model behind the model seam,
batched native rollouts from the state the observation determines (cheetah and walker leave
out their x position, on which nothing depends). Not for finger spin: its observation holds
touch sensors (contact forces), which are not a function of ``(qpos, qvel)``. With an action
repeat, :class:`ActionRepeatModel` rolls ``R`` control steps per step and sums the task's
reward over them.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import gymnasium as gym
import numpy as np
import torch

from mbrl.dynamics.base import DynamicsModel, FitReport, Prediction, RolloutState, Transitions
from mbrl.envs.registry import names, register
from mbrl.envs.spec import EnvSpec, RewardFn, never_terminates
from mbrl.extras import MissingExtraError, install_hint

if TYPE_CHECKING:
    from mbrl.dynamics.mujoco_model import MujocoModel


def _suite() -> Any:
    """``dm_control.suite``, or :class:`~mbrl.extras.MissingExtraError` naming the extra."""
    try:
        from dm_control import suite
    except ModuleNotFoundError as e:
        raise MissingExtraError(
            f"the DeepMind Control tasks need dm-control ({e}): {install_hint('dmc')}"
        ) from e
    return suite


# ---------------------------------------------------------------- tolerance

_SIGMOIDS = (
    "gaussian",
    "hyperbolic",
    "long_tail",
    "reciprocal",
    "cosine",
    "linear",
    "quadratic",
    "tanh_squared",
)


def tolerance(
    x: torch.Tensor,
    bounds: tuple[float, float] = (0.0, 0.0),
    margin: float = 0.0,
    sigmoid: str = "gaussian",
    value_at_margin: float = 0.1,
) -> torch.Tensor:
    """``dm_control.utils.rewards.tolerance`` in torch, elementwise on ``x [...]``.

    1 inside ``[lower, upper]`` (inclusive; either may be infinite); outside, 0 when
    ``margin == 0``, else ``sigmoid(d / margin)`` of the distance ``d`` to the nearer bound,
    scaled so that it equals ``value_at_margin`` at ``d = margin``. Same dtype and device as
    ``x``.

    Raises:
        ValueError: ``lower > upper``, a negative margin, an unknown sigmoid, or a
            ``value_at_margin`` outside ``(0, 1)`` (``[0, 1)`` for cosine, linear, quadratic).
    """
    lower, upper = bounds
    if lower > upper:
        raise ValueError(f"tolerance: lower bound {lower} exceeds upper bound {upper}")
    if margin < 0:
        raise ValueError(f"tolerance: margin must be >= 0, got {margin}")
    if sigmoid not in _SIGMOIDS:
        raise ValueError(f"tolerance: unknown sigmoid {sigmoid!r}; valid: {', '.join(_SIGMOIDS)}")
    zero_ok = sigmoid in ("cosine", "linear", "quadratic")
    if not ((0 <= value_at_margin < 1) if zero_ok else (0 < value_at_margin < 1)):
        raise ValueError(
            f"tolerance: value_at_margin must be in {'[0, 1)' if zero_ok else '(0, 1)'} for "
            f"sigmoid {sigmoid!r}, got {value_at_margin}"
        )
    inside = (x >= lower) & (x <= upper)
    one = torch.ones_like(x)
    if margin == 0:
        return torch.where(inside, one, torch.zeros_like(x))
    d = torch.where(x < lower, lower - x, x - upper) / margin
    return torch.where(inside, one, _sigmoid(d, value_at_margin, sigmoid))


def _sigmoid(x: torch.Tensor, value_at_1: float, sigmoid: str) -> torch.Tensor:
    """dm_control's ``_sigmoids``: 1 at 0, ``value_at_1`` at 1."""
    if sigmoid == "gaussian":
        scale = math.sqrt(-2 * math.log(value_at_1))
        return torch.exp(-0.5 * (x * scale).square())
    if sigmoid == "hyperbolic":
        return 1 / torch.cosh(x * math.acosh(1 / value_at_1))
    if sigmoid == "long_tail":
        return 1 / ((x * math.sqrt(1 / value_at_1 - 1)).square() + 1)
    if sigmoid == "reciprocal":
        return 1 / (x.abs() * (1 / value_at_1 - 1) + 1)
    if sigmoid == "cosine":
        scaled = x * (math.acos(2 * value_at_1 - 1) / math.pi)
        return torch.where(scaled.abs() < 1, (1 + torch.cos(math.pi * scaled)) / 2, 0.0)
    if sigmoid == "linear":
        scaled = x * (1 - value_at_1)
        return torch.where(scaled.abs() < 1, 1 - scaled, 0.0)
    if sigmoid == "quadratic":
        scaled = x * math.sqrt(1 - value_at_1)
        return torch.where(scaled.abs() < 1, 1 - scaled.square(), 0.0)
    return 1 - torch.tanh(x * math.atanh(math.sqrt(1 - value_at_1))).square()  # tanh_squared


# ---------------------------------------------------------------- kinematics


@dataclass(frozen=True)
class Pose:
    """Body frames of ``B`` configurations (world coordinates), and their velocities when
    ``qvel`` was given: ``omega`` the angular velocity, ``v0`` the linear velocity of the body's
    rigid motion evaluated at the world origin (the velocity of a point ``p`` of the body is
    ``v0 + omega x p``)."""

    xpos: torch.Tensor  # [B, nbody, 3]
    xmat: torch.Tensor  # [B, nbody, 3, 3]
    omega: torch.Tensor | None = None  # [B, nbody, 3]
    v0: torch.Tensor | None = None  # [B, nbody, 3]


class Kinematics:
    """Forward kinematics of a MuJoCo model whose joints are hinges and slides, batched in
    torch (in the dtype and on the device of ``qpos``).

    :meth:`pose` follows MuJoCo's ``mj_kinematics``: each body's frame is its parent's moved by
    ``body_pos`` and ``body_quat``, then by its joints in order (a slide moves the frame along
    its axis by ``q - qpos0``, a hinge turns it about its axis through the joint anchor by
    ``q - qpos0``). With ``qvel`` each joint adds its twist (MuJoCo's ``cdof`` times the joint
    velocity) to its body and the bodies below. :meth:`subtree_com_velocity` is the velocity
    of a subtree's centre of mass, MuJoCo's ``subtree_linvel`` (the ``subtreelinvel`` sensor).
    Model arrays are read at construction, except :meth:`geom_xpos` and :meth:`site_xpos`,
    which read ``geom_pos`` / ``site_pos`` of the model when called (dm_control tasks move
    targets between episodes).

    Raises:
        ValueError: the model has ball or free joints.
    """

    def __init__(self, model: Any) -> None:
        import mujoco

        hinge, slide = mujoco.mjtJoint.mjJNT_HINGE, mujoco.mjtJoint.mjJNT_SLIDE
        types = [int(t) for t in model.jnt_type]
        if any(t not in (hinge, slide) for t in types):
            raise ValueError("Kinematics supports hinge and slide joints only")
        self.model = model
        self.nbody, self.nq = int(model.nbody), int(model.nq)
        self.parent = [int(p) for p in model.body_parentid]
        self.joints = [
            [
                (j, types[j] == hinge, int(model.jnt_qposadr[j]))
                for j in range(model.body_jntadr[b], model.body_jntadr[b] + model.body_jntnum[b])
            ]
            for b in range(self.nbody)
        ]
        rot = np.zeros((self.nbody, 9))
        for b in range(self.nbody):
            mujoco.mju_quat2Mat(rot[b], model.body_quat[b])
        self.body_rot = rot.reshape(-1, 3, 3)  # [nbody, 3, 3] body frame in its parent's
        mass = np.asarray(model.body_mass, dtype=np.float64)
        subtree = np.zeros((self.nbody, self.nbody))  # [root, body] 1 if body is below root
        for b in range(self.nbody):
            a = b
            while True:
                subtree[a, b] = 1.0
                if a == 0:
                    break
                a = self.parent[a]
        self._const64 = {
            "body_pos": torch.tensor(np.array(model.body_pos)),
            "body_rot": torch.tensor(self.body_rot),
            "body_ipos": torch.tensor(np.array(model.body_ipos)),
            "jnt_axis": torch.tensor(np.array(model.jnt_axis)),
            "jnt_pos": torch.tensor(np.array(model.jnt_pos)),
            "qpos0": torch.tensor(np.array(model.qpos0)),
            "mass_share": torch.tensor(
                subtree * mass / np.maximum(subtree @ mass, 1e-300)[:, None]
            ),
        }
        self._cache: dict[tuple[torch.dtype, torch.device], dict[str, torch.Tensor]] = {}

    def _const(self, like: torch.Tensor) -> dict[str, torch.Tensor]:
        key = (like.dtype, like.device)
        if key not in self._cache:
            self._cache[key] = {k: v.to(like) for k, v in self._const64.items()}
        return self._cache[key]

    def pose(self, qpos: torch.Tensor, qvel: torch.Tensor | None = None) -> Pose:
        """Frames of every body for ``qpos [B, nq]`` (and velocities for ``qvel [B, nv]``)."""
        c = self._const(qpos)
        b = qpos.shape[0]
        eye = torch.eye(3, dtype=qpos.dtype, device=qpos.device)
        xpos = [qpos.new_zeros(b, 3)]  # world body
        xmat = [eye.expand(b, 3, 3)]
        omega = [qpos.new_zeros(b, 3)] if qvel is not None else None
        v0 = [qpos.new_zeros(b, 3)] if qvel is not None else None
        for body in range(1, self.nbody):
            p = self.parent[body]
            rot = xmat[p] @ c["body_rot"][body]  # [B, 3, 3]
            pos = xpos[p] + xmat[p] @ c["body_pos"][body]  # [B, 3]
            w, v = (omega[p], v0[p]) if qvel is not None else (None, None)
            for j, is_hinge, adr in self.joints[body]:
                axis = rot @ c["jnt_axis"][j]  # [B, 3] world axis
                anchor = rot @ c["jnt_pos"][j] + pos  # [B, 3]
                q = qpos[:, adr] - c["qpos0"][adr]  # [B]
                if is_hinge:
                    rot = rot @ _axis_angle(c["jnt_axis"][j], q)
                    pos = anchor - rot @ c["jnt_pos"][j]
                else:
                    pos = pos + axis * q[:, None]
                if qvel is not None:
                    rate = axis * qvel[:, adr, None]  # [B, 3]; nq == nv for these joints
                    if is_hinge:
                        w, v = w + rate, v + torch.linalg.cross(anchor, rate)
                    else:
                        v = v + rate
            xpos.append(pos)
            xmat.append(rot)
            if qvel is not None:
                omega.append(w)
                v0.append(v)
        stack = torch.stack
        if qvel is None:
            return Pose(stack(xpos, 1), stack(xmat, 1))
        return Pose(stack(xpos, 1), stack(xmat, 1), stack(omega, 1), stack(v0, 1))

    def geom_xpos(self, pose: Pose, geom: int) -> torch.Tensor:
        """World position ``[B, 3]`` of geom ``geom``."""
        return self._point(pose, int(self.model.geom_bodyid[geom]), self.model.geom_pos[geom])

    def site_xpos(self, pose: Pose, site: int) -> torch.Tensor:
        """World position ``[B, 3]`` of site ``site``."""
        return self._point(pose, int(self.model.site_bodyid[site]), self.model.site_pos[site])

    def _point(self, pose: Pose, body: int, local: np.ndarray) -> torch.Tensor:
        offset = torch.as_tensor(np.array(local), dtype=pose.xpos.dtype, device=pose.xpos.device)
        return pose.xpos[:, body] + pose.xmat[:, body] @ offset

    def subtree_com_velocity(self, pose: Pose, body: int) -> torch.Tensor:
        """Linear velocity ``[B, 3]`` of the centre of mass of the subtree rooted at ``body``
        (needs a pose with velocities)."""
        if pose.omega is None:
            raise ValueError("subtree_com_velocity needs a pose computed with qvel")
        c = self._const(pose.xpos)
        xipos = pose.xpos + (pose.xmat @ c["body_ipos"][..., None])[..., 0]  # [B, nbody, 3]
        vel = pose.v0 + torch.linalg.cross(pose.omega, xipos)  # [B, nbody, 3]
        return torch.einsum("n,bnk->bk", c["mass_share"][body], vel)


def _axis_angle(axis: torch.Tensor, angle: torch.Tensor) -> torch.Tensor:
    """Rotations ``[B, 3, 3]`` by ``angle [B]`` about the unit ``axis [3]`` (Rodrigues)."""
    k = axis.new_zeros(3, 3)
    k[0, 1], k[0, 2], k[1, 2] = -axis[2], axis[1], -axis[0]
    k = k - k.T
    s, c = torch.sin(angle)[:, None, None], torch.cos(angle)[:, None, None]
    eye = torch.eye(3, dtype=axis.dtype, device=axis.device)
    return eye + s * k + (1 - c) * (k @ k)


# ---------------------------------------------------------------- the tasks


class TaskModel:
    """A task's MuJoCo model with its :class:`Kinematics` and name lookups."""

    def __init__(self, model: Any) -> None:
        import mujoco

        self.model = model
        self.kin = Kinematics(model)
        self._types = {
            "body": mujoco.mjtObj.mjOBJ_BODY,
            "geom": mujoco.mjtObj.mjOBJ_GEOM,
            "site": mujoco.mjtObj.mjOBJ_SITE,
            "joint": mujoco.mjtObj.mjOBJ_JOINT,
        }
        self._mj_name2id = mujoco.mj_name2id

    def id(self, kind: str, name: str) -> int:
        """The index of the ``kind`` (body, geom, site, joint) called ``name``."""
        i = self._mj_name2id(self.model, self._types[kind], name)
        if i < 0:
            raise ValueError(f"the model has no {kind} named {name!r}")
        return int(i)

    def qpos0(self, like: torch.Tensor) -> torch.Tensor:
        """``qpos0 [nq]`` in ``like``'s dtype and device."""
        return torch.as_tensor(np.array(self.model.qpos0), dtype=like.dtype, device=like.device)


TaskFn = Callable[[TaskModel, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
"""``(model, obs [B, X], act [B, U], next_obs [B, X]) -> reward [B]``."""

StateFn = Callable[[TaskModel, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
"""``(model, obs [B, X]) -> (qpos [B, nq], qvel [B, nv])``."""

ObsFn = Callable[[TaskModel, torch.Tensor, torch.Tensor], torch.Tensor]
"""``(model, qpos [B, nq], qvel [B, nv]) -> obs [B, X]``."""


def _wrap(angle: torch.Tensor) -> torch.Tensor:
    return torch.remainder(angle + math.pi, 2 * math.pi) - math.pi


# cartpole swingup: obs [cart x, cos, sin (pole), cart velocity, pole angular velocity]


def _cartpole_reward(
    tm: TaskModel, obs: torch.Tensor, act: torch.Tensor, nxt: torch.Tensor
) -> torch.Tensor:
    upright = (nxt[:, 1] + 1) / 2
    centered = (1 + tolerance(nxt[:, 0], margin=2)) / 2
    control = tolerance(act[:, 0], margin=1, value_at_margin=0, sigmoid="quadratic")
    small_control = (4 + control) / 5
    small_velocity = (1 + tolerance(nxt[:, 4], margin=5)) / 2
    return upright * small_control * small_velocity * centered


def _cartpole_state(tm: TaskModel, obs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    angle = torch.atan2(obs[:, 2], obs[:, 1]) + tm.qpos0(obs)[1]
    return torch.stack([obs[:, 0], angle], 1), obs[:, 3:5]


def _cartpole_obs(tm: TaskModel, qpos: torch.Tensor, qvel: torch.Tensor) -> torch.Tensor:
    pole = tm.id("body", "pole_1")
    rot = tm.kin.pose(qpos).xmat[:, pole]  # [B, 3, 3]
    return torch.cat([qpos[:, :1], rot[:, 2, 2, None], rot[:, 0, 2, None], qvel], 1)


# reacher easy: obs [shoulder, wrist, target - finger (x, y), velocities]


def _reacher_reward(
    tm: TaskModel, obs: torch.Tensor, act: torch.Tensor, nxt: torch.Tensor
) -> torch.Tensor:
    size = tm.model.geom_size
    radii = float(size[tm.id("geom", "target"), 0] + size[tm.id("geom", "finger"), 0])
    return (torch.linalg.vector_norm(nxt[:, 2:4], dim=-1) <= radii).to(nxt.dtype)


def _reacher_xy(tm: TaskModel, qpos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Target and fingertip positions ``([B, 2], [B, 2])`` of the model as it is now."""
    pose = tm.kin.pose(qpos)
    target = tm.kin.geom_xpos(pose, tm.id("geom", "target"))[:, :2]
    return target, tm.kin.geom_xpos(pose, tm.id("geom", "finger"))[:, :2]


def _reacher_state(tm: TaskModel, obs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    qpos = obs[:, 0:2]
    target, finger = _reacher_xy(tm, qpos)
    off = (obs[:, 2:4] + finger - target).abs().amax() if obs.shape[0] else obs.new_zeros(())
    if not bool(off <= 1e-3):
        raise ValueError(
            f"reacher: the observation's to_target differs from the target of the env's model by "
            f"{float(off):.3g}; the target moves every episode and the ground-truth model reads "
            "it from the env: make the model from the env you step (truth_model(env)) and plan "
            "from that env's observations"
        )
    return qpos, obs[:, 4:6]


def _reacher_obs(tm: TaskModel, qpos: torch.Tensor, qvel: torch.Tensor) -> torch.Tensor:
    target, finger = _reacher_xy(tm, qpos)
    return torch.cat([qpos, target - finger, qvel], 1)


# cheetah run: obs [qpos without rootx (8), qvel (9)]

_RUN_SPEED = 10.0  # dm_control cheetah


def _cheetah_state(tm: TaskModel, obs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    rootx = tm.qpos0(obs)[:1].expand(obs.shape[0], 1)
    return torch.cat([rootx, obs[:, :8]], 1), obs[:, 8:17]


def _cheetah_obs(tm: TaskModel, qpos: torch.Tensor, qvel: torch.Tensor) -> torch.Tensor:
    return torch.cat([qpos[:, 1:], qvel], 1)


def _cheetah_reward(
    tm: TaskModel, obs: torch.Tensor, act: torch.Tensor, nxt: torch.Tensor
) -> torch.Tensor:
    qpos, qvel = _cheetah_state(tm, nxt)
    pose = tm.kin.pose(qpos, qvel)
    speed = tm.kin.subtree_com_velocity(pose, tm.id("body", "torso"))[:, 0]
    return tolerance(
        speed, (_RUN_SPEED, math.inf), margin=_RUN_SPEED, value_at_margin=0, sigmoid="linear"
    )


# finger spin: obs [proximal, distal, tip x, tip z, 3 velocities, 2 touch]

_SPIN_VELOCITY = 15.0  # dm_control finger


def _finger_reward(
    tm: TaskModel, obs: torch.Tensor, act: torch.Tensor, nxt: torch.Tensor
) -> torch.Tensor:
    return (nxt[:, 6] <= -_SPIN_VELOCITY).to(nxt.dtype)


# walker walk: obs [xx, xz of the 7 bodies' frames (14), torso height, qvel (9)]

_STAND_HEIGHT, _WALK_SPEED = 1.2, 1.0  # dm_control walker


def _walker_state(tm: TaskModel, obs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Joint angles from the bodies' planar orientations (every hinge turns about +-y); rootz
    from the torso height; rootx at ``qpos0``."""
    m, kin = tm.model, tm.kin
    phi = torch.atan2(obs[:, 1:14:2], obs[:, 0:14:2])  # [B, 7] body angles about +y
    phi = torch.cat([phi.new_zeros(obs.shape[0], 1), phi], 1)  # [B, nbody] with the world
    qpos = tm.qpos0(obs).expand(obs.shape[0], -1).clone()  # [B, nq]
    for body in range(1, kin.nbody):
        rot = kin.body_rot[body]
        local = math.atan2(rot[0, 2], rot[0, 0])  # body_quat's turn about +y
        for j, is_hinge, adr in kin.joints[body]:
            if is_hinge:
                sign = float(np.sign(m.jnt_axis[j, 1]))
                rel = phi[:, body] - phi[:, kin.parent[body]] - local
                qpos[:, adr] = qpos[:, adr] + sign * _wrap(rel)
    torso = tm.id("body", "torso")
    rootz = int(m.jnt_qposadr[tm.id("joint", "rootz")])
    qpos[:, rootz] = qpos[:, rootz] + obs[:, 14] - kin.pose(qpos).xpos[:, torso, 2]
    return qpos, obs[:, 15:24]


def _walker_obs(tm: TaskModel, qpos: torch.Tensor, qvel: torch.Tensor) -> torch.Tensor:
    pose = tm.kin.pose(qpos)
    frames = torch.stack([pose.xmat[:, 1:, 0, 0], pose.xmat[:, 1:, 0, 2]], 2).flatten(1)
    height = pose.xpos[:, tm.id("body", "torso"), 2:3]
    return torch.cat([frames, height, qvel], 1)


def _walker_reward(
    tm: TaskModel, obs: torch.Tensor, act: torch.Tensor, nxt: torch.Tensor
) -> torch.Tensor:
    height, upright = nxt[:, 14], (1 + nxt[:, 0]) / 2  # torso zz == xx for a turn about y
    standing = tolerance(height, (_STAND_HEIGHT, math.inf), margin=_STAND_HEIGHT / 2)
    stand = (3 * standing + upright) / 4
    qpos, qvel = _walker_state(tm, nxt)
    pose = tm.kin.pose(qpos, qvel)
    speed = tm.kin.subtree_com_velocity(pose, tm.id("body", "torso"))[:, 0]
    move = tolerance(
        speed,
        (_WALK_SPEED, math.inf),
        margin=_WALK_SPEED / 2,
        value_at_margin=0.5,
        sigmoid="linear",
    )
    return stand * (5 * move + 1) / 6


# ball_in_cup catch: obs [cup x, cup z, ball x, ball z, their velocities]


def _cup_state(tm: TaskModel, obs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return obs[:, :4], obs[:, 4:8]


def _cup_obs(tm: TaskModel, qpos: torch.Tensor, qvel: torch.Tensor) -> torch.Tensor:
    return torch.cat([qpos, qvel], 1)


def _cup_reward(
    tm: TaskModel, obs: torch.Tensor, act: torch.Tensor, nxt: torch.Tensor
) -> torch.Tensor:
    pose = tm.kin.pose(nxt[:, :4])
    target = tm.kin.site_xpos(pose, tm.id("site", "target"))[:, [0, 2]]
    ball = pose.xpos[:, tm.id("body", "ball")][:, [0, 2]]
    m = tm.model
    size = (
        np.array(m.site_size[tm.id("site", "target")])[[0, 2]]
        - m.geom_size[tm.id("geom", "ball"), 0]
    )
    inside = (target - ball).abs() < torch.as_tensor(size, dtype=nxt.dtype, device=nxt.device)
    return inside.all(dim=-1).to(nxt.dtype)


@dataclass(frozen=True)
class DMCTask:
    """One DeepMind Control task: its observation layout, PlaNet's action repeat, its torch
    reward and (where the observation determines the simulator state) the maps of the
    ground-truth model."""

    domain: str
    task: str
    keys: tuple[tuple[str, int], ...]  # observation keys and sizes, in the flat order
    act_dim: int
    action_repeat: int  # PlaNet's, for the -pixels version
    reward: TaskFn
    description: str
    to_state: StateFn | None = None  # None: no ground-truth model (see truth_model)
    to_obs: ObsFn | None = None
    unobserved_qpos: tuple[int, ...] = ()
    max_episode_steps: int = 1000

    @property
    def obs_dim(self) -> int:
        return sum(n for _, n in self.keys)

    @property
    def name(self) -> str:
        return f"dmc-{self.domain}-{self.task}"


TASKS: dict[str, DMCTask] = {
    t.name: t
    for t in (
        DMCTask(
            domain="cartpole",
            task="swingup",
            keys=(("position", 3), ("velocity", 2)),
            act_dim=1,
            action_repeat=8,
            reward=_cartpole_reward,
            description="DMC cartpole swingup: swing the pole up from hanging and balance it.",
            to_state=_cartpole_state,
            to_obs=_cartpole_obs,
        ),
        DMCTask(
            domain="reacher",
            task="easy",
            keys=(("position", 2), ("to_target", 2), ("velocity", 2)),
            act_dim=2,
            action_repeat=4,
            reward=_reacher_reward,
            description="DMC reacher easy: put the fingertip in a large random target.",
            to_state=_reacher_state,
            to_obs=_reacher_obs,
        ),
        DMCTask(
            domain="cheetah",
            task="run",
            keys=(("position", 8), ("velocity", 9)),
            act_dim=6,
            action_repeat=4,
            reward=_cheetah_reward,
            description="DMC cheetah run: run forward, reward linear in speed up to 10 m/s.",
            to_state=_cheetah_state,
            to_obs=_cheetah_obs,
            unobserved_qpos=(0,),  # rootx
        ),
        DMCTask(
            domain="finger",
            task="spin",
            keys=(("position", 4), ("velocity", 3), ("touch", 2)),
            act_dim=2,
            action_repeat=2,
            reward=_finger_reward,
            description="DMC finger spin: spin the hinged body faster than 15 rad/s.",
        ),
        DMCTask(
            domain="walker",
            task="walk",
            keys=(("orientations", 14), ("height", 1), ("velocity", 9)),
            act_dim=6,
            action_repeat=2,
            reward=_walker_reward,
            description="DMC walker walk: stand upright and walk forward at 1 m/s.",
            to_state=_walker_state,
            to_obs=_walker_obs,
            unobserved_qpos=(1,),  # rootx
        ),
        DMCTask(
            domain="ball_in_cup",
            task="catch",
            keys=(("position", 4), ("velocity", 4)),
            act_dim=2,
            action_repeat=4,
            reward=_cup_reward,
            description="DMC ball_in_cup catch: swing the ball on its string into the cup.",
            to_state=_cup_state,
            to_obs=_cup_obs,
        ),
    )
}
"""The six tasks by state-task registry name."""


# ---------------------------------------------------------------- the env


class DMCEnv(gym.Env):
    """A DeepMind Control task as a gymnasium env, with flat float32 observations
    ``[X]`` (the task's keys in :data:`TASKS` order) and its action box.

    Args:
        name: a :data:`TASKS` name (``dmc-cartpole-swingup`` ...).
        render_mode: ``"rgb_array"`` to render frames of camera ``camera_id`` at
            ``height x width`` (``physics.render``); ``None`` for none.

    ``reset(seed=s)`` reseeds the task's random state (the initial state, and the target of
    reacher) with ``s``. An episode is truncated after ``max_episode_steps`` control steps
    (the suite's own limit is switched off for it); stepping a finished episode is an error.
    ``model``, ``data`` and ``frame_skip`` (MuJoCo substeps per control step) are the
    simulator's, as :class:`~mbrl.dynamics.mujoco_model.MujocoModel` reads them; ``physics``
    is dm_control's.

    Raises:
        MissingExtraError: dm-control is not installed (the message says how to install it).
    """

    metadata = {"render_modes": ["rgb_array"]}

    def __init__(
        self,
        name: str,
        render_mode: str | None = None,
        width: int = 64,
        height: int = 64,
        camera_id: int = 0,
    ) -> None:
        if name not in TASKS:
            raise ValueError(f"unknown DeepMind Control task {name!r}; valid: {', '.join(TASKS)}")
        if render_mode not in (None, "rgb_array"):
            raise ValueError(
                f"{name}: render_mode must be None or 'rgb_array', got {render_mode!r}"
            )
        self.task = TASKS[name]
        self.render_mode = render_mode
        self.width, self.height, self.camera_id = int(width), int(height), int(camera_id)
        suite = _suite()
        task = self.task
        self._env = suite.load(task.domain, task.task, task_kwargs={"time_limit": math.inf})
        self.physics = self._env.physics
        self.model, self.data = self.physics.model.ptr, self.physics.data.ptr
        self.frame_skip = round(self._env.control_timestep() / self.physics.timestep())
        self.max_episode_steps = task.max_episode_steps
        spec = self._env.action_spec()
        self.action_space = gym.spaces.Box(
            spec.minimum.astype(np.float32), spec.maximum.astype(np.float32), dtype=np.float32
        )
        self.observation_space = gym.spaces.Box(-np.inf, np.inf, (task.obs_dim,), np.float32)
        self._steps, self._over = 0, True

    def _flat(self, observation: dict[str, np.ndarray]) -> np.ndarray:
        return np.concatenate(
            [np.asarray(observation[k], dtype=np.float32).ravel() for k, _ in self.task.keys]
        )

    def observation(self) -> np.ndarray:
        """The observation ``[X]`` of the simulator's current state (after setting it through
        ``physics``, say)."""
        return self._flat(self._env.task.get_observation(self.physics))

    def reset(
        self, *, seed: int | None = None, options: dict[str, Any] | None = None
    ) -> tuple[np.ndarray, dict[str, Any]]:
        super().reset(seed=seed)
        if seed is not None:
            self._env.task.random.seed(seed)
        step = self._env.reset()
        self._steps, self._over = 0, False
        return self._flat(step.observation), {}

    def step(self, action: Any) -> tuple[np.ndarray, float, bool, bool, dict[str, Any]]:
        if self._over:
            raise RuntimeError(f"{self.task.name}: the episode is over (or never began); reset()")
        step = self._env.step(np.asarray(action, dtype=np.float64))
        self._steps += 1
        terminated = step.last() and step.discount == 0.0
        truncated = not terminated and self._steps >= self.max_episode_steps
        self._over = terminated or truncated
        return self._flat(step.observation), float(step.reward or 0.0), terminated, truncated, {}

    def render(self) -> np.ndarray | None:
        """The frame of camera ``camera_id``, ``uint8 [H, W, 3]`` (``render_mode="rgb_array"``)."""
        if self.render_mode is None:
            return None
        return self.physics.render(self.height, self.width, camera_id=self.camera_id)

    def close(self) -> None:
        self.physics.free()


# ---------------------------------------------------------------- specs

_MAKE_KWARGS = frozenset({"render_mode", "width", "height", "camera_id"})


class TaskReward:
    """The batched torch reward ``(obs [..., X], act [..., U], next_obs [..., X]) -> [...]`` of a
    DeepMind Control task; the task's model (for its geometry) is loaded on the first call, so
    a spec is made without dm-control."""

    def __init__(self, task: DMCTask) -> None:
        self.task = task
        self._model: TaskModel | None = None
        self.__name__ = f"{task.domain}_{task.task}_reward"

    def __call__(
        self, obs: torch.Tensor, act: torch.Tensor, next_obs: torch.Tensor
    ) -> torch.Tensor:
        if self._model is None:
            env = DMCEnv(self.task.name)
            env.reset(seed=0)  # tasks set some sizes (reacher's target) at the first reset
            self._model = TaskModel(env.model)
        lead = next_obs.shape[:-1]
        x, u = self.task.obs_dim, self.task.act_dim
        r = self.task.reward(
            self._model, obs.reshape(-1, x), act.reshape(-1, u), next_obs.reshape(-1, x)
        )
        return r.reshape(lead)


def state_spec(name: str) -> EnvSpec:
    """The state task ``name`` (a :data:`TASKS` name); made without importing dm-control."""
    task = TASKS[name]

    def make_env(**kwargs: Any) -> gym.Env:
        bad = sorted(set(kwargs) - _MAKE_KWARGS)
        if bad:
            raise ValueError(f"{name}: cannot pass {bad}; allowed: {sorted(_MAKE_KWARGS)}")
        return DMCEnv(name, **kwargs)

    low, high = np.full(task.act_dim, -1.0, np.float32), np.full(task.act_dim, 1.0, np.float32)
    return EnvSpec(
        name=name,
        make_env=make_env,
        obs_dim=task.obs_dim,
        act_dim=task.act_dim,
        action_low=low,
        action_high=high,
        max_episode_steps=task.max_episode_steps,
        reward_fn=TaskReward(task),
        termination_fn=never_terminates,
        description=task.description,
    )


def pixel_spec(name: str) -> EnvSpec:
    """The pixel task ``name + "-pixels"``: 64 x 64 RGB frames of camera 0 with PlaNet's
    action repeat (:func:`mbrl.envs.pixels.pixel_spec`)."""
    from mbrl.envs.pixels import pixel_spec as make_pixel_spec

    task = TASKS[name]
    return make_pixel_spec(
        state_spec(name),
        f"{name}-pixels",
        action_repeat=task.action_repeat,
        render_kwargs={"render_mode": "rgb_array", "camera_id": 0},
        description=(
            f"{task.description.removesuffix('.')}; from 64x64 RGB frames of camera 0, action "
            f"repeat {task.action_repeat} (PlaNet)."
        ),
    )


def register_all() -> None:
    """Register the six state tasks and their ``-pixels`` versions; safe to call twice."""
    registered = set(names())
    for name in TASKS:
        for full, factory in ((name, state_spec), (f"{name}-pixels", pixel_spec)):
            if full not in registered:
                register(full, lambda n=name, f=factory: f(n))


# ---------------------------------------------------------------- ground truth


def truth_model(
    env: gym.Env, action_repeat: int = 1, nthread: int | None = None
) -> MujocoModel | ActionRepeatModel:
    """The MuJoCo ground truth of the DeepMind Control env ``env`` (made by a state spec of
    this module: ``env.unwrapped`` is a :class:`DMCEnv`) behind the model seam.

    A :class:`~mbrl.dynamics.mujoco_model.MujocoModel` on the env's own ``MjModel``: batched
    native rollouts from the simulator state the observation determines (cheetah's and
    walker's x position, which nothing depends on, start at ``qpos0``), one control step
    (``frame_skip`` substeps) per step. It shares the model with ``env``, so reacher's target,
    which moves every episode, is the env's current one: make the model from the env you step.
    With ``action_repeat = R > 1`` it is wrapped in :class:`ActionRepeatModel` (R control steps
    per step, the task's reward summed over them), the model of ``ActionRepeat(env, R)``.

    Raises:
        TypeError: ``env`` is not a DeepMind Control env of this module.
        ValueError: finger spin, whose observation holds contact forces (touch sensors) that
            are not a function of the simulator's positions and velocities.
    """
    from mbrl.dynamics.mujoco_model import MujocoModel

    base = env.unwrapped
    if not isinstance(base, DMCEnv):
        raise TypeError(
            f"truth_model takes an env made by a dmc-* state spec, got {type(base).__name__}"
        )
    task = base.task
    if task.to_state is None or task.to_obs is None:
        raise ValueError(
            f"{task.name} has no ground-truth model: its observation holds touch sensors "
            "(contact forces), which are not a function of the simulator's qpos and qvel; plan "
            "it with a learned model"
        )
    tm = TaskModel(base.model)
    to_state, to_obs = task.to_state, task.to_obs

    def obs_to_state(obs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        qpos, qvel = to_state(tm, torch.from_numpy(np.ascontiguousarray(obs, dtype=np.float64)))
        return qpos.numpy(), qvel.numpy()

    def state_to_obs(qpos: np.ndarray, qvel: np.ndarray) -> np.ndarray:
        q = torch.from_numpy(np.ascontiguousarray(qpos, dtype=np.float64))
        v = torch.from_numpy(np.ascontiguousarray(qvel, dtype=np.float64))
        return to_obs(tm, q, v).numpy()

    model = MujocoModel(
        env,
        obs_to_state,
        state_to_obs,
        nthread=nthread,
        unobserved_qpos=task.unobserved_qpos,
    )
    if action_repeat == 1:
        return model
    return ActionRepeatModel(model, action_repeat, TaskReward(task))


class ActionRepeatModel:
    """``R`` steps of ``model`` per step with the action held, the reward of each summed: the
    model of an env wrapped in :class:`~mbrl.envs.pixels.ActionRepeat`.

    The summed reward is not a function of the step's first and last observations, so this
    model reports it itself (``learns_reward = True``; the planning problem then scores steps
    with ``RolloutState.reward``). ``reward_fn`` scores each inner step, ``(obs, act,
    next_obs) -> [B]``; an imagined episode does not stop early inside a step (the tasks here
    never terminate).
    """

    learns_reward = True

    def __init__(self, model: DynamicsModel, repeat: int, reward_fn: RewardFn) -> None:
        if isinstance(repeat, bool) or not isinstance(repeat, int) or repeat < 1:
            raise ValueError(f"repeat must be an int >= 1, got {repeat!r}")
        if model.learns_reward:
            raise ValueError("ActionRepeatModel sums reward_fn; give it a model of the dynamics")
        self.model, self.repeat, self.reward_fn = model, repeat, reward_fn
        self.obs_dim, self.act_dim = model.obs_dim, model.act_dim

    def fit(self, data: Transitions, generator: torch.Generator | None = None) -> FitReport:
        """The inner model's fit (nothing to learn for a ground-truth model)."""
        return self.model.fit(data, generator)

    def predict(self, obs: torch.Tensor, act: torch.Tensor) -> Prediction:
        """The observation after ``R`` steps ``[B, X]`` (zero variance) and the summed reward."""
        state = self.model.rollout_start(obs, 1, None)
        nxt = self.rollout_step(state, act, None)
        zeros = torch.zeros_like(nxt.reward)
        return Prediction(nxt.obs, torch.zeros_like(nxt.obs), nxt.reward, zeros)

    def rollout_start(
        self, obs: torch.Tensor, particles: int, generator: torch.Generator | None = None
    ) -> RolloutState:
        """The inner model's start."""
        return self.model.rollout_start(obs, particles, generator)

    def rollout_step(
        self, state: RolloutState, act: torch.Tensor, generator: torch.Generator | None = None
    ) -> RolloutState:
        """``R`` inner steps under ``act [B * P, U]``; ``reward [B * P]`` is their sum. An inner
        model that rolls a held action natively (``rollout_held``: the MuJoCo model) makes
        one call of it, and the reward scores the ``R`` inner steps in one batch."""
        held = getattr(self.model, "rollout_held", None)
        if held is not None:
            obs, last = held(state, act, self.repeat)  # [R, B * P, X]
            before = torch.cat([state.obs[None], obs[:-1]])  # [R, B * P, X]
            acts = act[None].expand(self.repeat, *act.shape)
            r = self.reward_fn(before, acts, obs)  # [R, B * P]
            total = r[0]
            for i in range(1, self.repeat):  # the order of the step-by-step sum
                total = total + r[i]
            return RolloutState(obs=last.obs, reward=total, hidden=last.hidden)
        total = None
        for _ in range(self.repeat):
            nxt = self.model.rollout_step(state, act, generator)
            r = self.reward_fn(state.obs, act, nxt.obs)
            total = r if total is None else total + r
            state = nxt
        return RolloutState(obs=state.obs, reward=total, hidden=state.hidden)
