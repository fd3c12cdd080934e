"""MuJoCo ground truth for the gymnasium tasks whose observation is not ``[qpos, qvel]``.

:meth:`MujocoModel.from_spec <mbrl.dynamics.mujoco_model.MujocoModel.from_spec>` covers the
registry entries whose observation is the simulator state (cartpole-swingup, inverted-pendulum,
half-cheetah, hopper). Two more need maps between observation and state:

- **reacher** (Reacher-v5, ``obs [10] = [cos q, sin q, target, q_dot, fingertip - target]``):
  the observation determines the state (the target's slide joints never move), so the truth is
  exact on the env's own observation while the elbow stays within its range of +-3 rad. The
  range is a soft limit: large torques can push the elbow past +-pi, where the angle read back
  from its cosine and sine lands on the other side of the range (seen with random actions of
  full size; a model started there is wrong for that plan).
- **pusher** (Pusher-v5, ``obs [23] = [q, q_dot, tip, object, goal]``): the observation leaves
  out the velocities of the object's and the goal's slide joints, which the simulator carries
  once the arm pushes the object. The truth plans on :class:`PusherFullState`'s observation,
  the env's 23 entries followed by those 4 velocities; the registry's ``pusher_reward`` reads
  only the first 23, so the same reward scores it. Pusher-v5 integrates with semi-implicit
  Euler and ``mj_step`` computes body positions before it integrates, so the positions in an
  observation after a step are those at ``qpos - timestep * qvel`` (the last substep's start,
  about 1 mm from the final positions); the truth computes them there too.

:func:`ground_truth` returns the env to step and the model to plan on, for every task above::

    make_env, model = ground_truth("pusher")
    env = make_env()               # observations the model's maps understand

Used by the benchmarks that need the true-model ceiling of a task (``experiments/bench_icem.py``,
``experiments/bench_gps.py``).
"""

from __future__ import annotations

from collections.abc import Callable

import gymnasium as gym
import mujoco
import numpy as np

from mbrl.dynamics.mujoco_model import MujocoModel, env_observations
from mbrl.envs.registry import make as make_spec

__all__ = ["PusherFullState", "PusherTruth", "ReacherTruth", "ground_truth"]

_ATOL = 1e-8


def _perturbed_states(m: mujoco.MjModel, still: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """Four states near ``qpos0`` with random velocities, the dofs ``still`` at rest."""
    rng = np.random.default_rng(0)
    qpos = m.qpos0[None] + rng.normal(0.0, 0.1, (4, m.nq))  # [4, nq]
    qvel = rng.normal(0.0, 1.0, (4, m.nv))  # [4, nv]
    qvel[:, still] = 0.0
    return qpos, qvel


def _check_against_env(
    model: MujocoModel,
    base: gym.Env,
    obs_fn,
    qpos: np.ndarray,
    qvel: np.ndarray,
    step: bool = False,
) -> None:
    """``state_to_obs`` equals the env's observation (at the states, or one step after them)
    and ``obs_to_state`` inverts it."""
    env_obs, qpos, qvel = env_observations(base, qpos, qvel, obs_fn, step)
    obs = model.state_to_obs(qpos, qvel)
    if env_obs.shape != obs.shape or not np.allclose(env_obs, obs, atol=_ATOL):
        raise ValueError(f"the {model.env_name} observation map disagrees with the env's own")
    q2, v2 = model.obs_to_state(obs)
    if not (np.allclose(q2, qpos, atol=_ATOL) and np.allclose(v2, qvel, atol=_ATOL)):
        raise ValueError(f"the {model.env_name} maps are not inverse to each other")


# ---------------------------------------------------------------- Reacher-v5


def reacher_obs_to_state(obs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Reacher-v5 ``obs [B, 10]`` -> ``qpos [B, 4] = [q1, q2, target_x, target_y]``,
    ``qvel [B, 4]`` (the target's joints never move: zero)."""
    q = np.arctan2(obs[:, 2:4], obs[:, 0:2])
    qpos = np.concatenate([q, obs[:, 4:6]], axis=1)
    qvel = np.concatenate([obs[:, 6:8], np.zeros_like(obs[:, 6:8])], axis=1)
    return qpos, qvel


def reacher_state_to_obs(qpos: np.ndarray, qvel: np.ndarray) -> np.ndarray:
    """The inverse map: the fingertip (body ``fingertip``, 0.11 m along link 1, link 0 of
    0.1 m) from the joint angles."""
    q1, q12 = qpos[:, 0], qpos[:, 0] + qpos[:, 1]
    tip = np.stack(
        [0.1 * np.cos(q1) + 0.11 * np.cos(q12), 0.1 * np.sin(q1) + 0.11 * np.sin(q12)], axis=1
    )
    target = qpos[:, 2:4]
    return np.concatenate(
        [np.cos(qpos[:, :2]), np.sin(qpos[:, :2]), target, qvel[:, :2], tip - target], axis=1
    )


class ReacherTruth(MujocoModel):
    """Reacher-v5's simulator behind the model seam, on the env's own observation.

    The mapping check compares ``state_to_obs`` with the env's ``_get_obs`` at perturbed states
    whose target joints are at rest (they never move in the env: nothing acts on them and they
    start at rest), and checks the round trip.
    """

    def __init__(self, env: gym.Env, nthread: int | None = 1) -> None:
        super().__init__(
            env,
            obs_to_state=reacher_obs_to_state,
            state_to_obs=reacher_state_to_obs,
            nthread=nthread,
        )

    def _check_mapping(self, base: gym.Env) -> None:
        qpos, qvel = _perturbed_states(self.mj_model, still=[2, 3])
        _check_against_env(self, base, base._get_obs, qpos, qvel)


# ---------------------------------------------------------------- Pusher-v5

_PUSHER_HIDDEN = slice(7, 11)  # qvel of obj_slidey, obj_slidex, goal_slidey, goal_slidex


class PusherFullState(gym.ObservationWrapper):
    """Pusher-v5 with the object's and goal's slide-joint velocities after its observation:
    ``obs [27] = [env obs (23), qvel[7:11]]``, so the observation determines the simulator
    state. The first 23 entries are the env's own; rewards that read them are unchanged."""

    def __init__(self, env: gym.Env) -> None:
        super().__init__(env)
        low = np.concatenate([env.observation_space.low, np.full(4, -np.inf)])
        high = np.concatenate([env.observation_space.high, np.full(4, np.inf)])
        self.observation_space = gym.spaces.Box(low, high, dtype=env.observation_space.dtype)

    def observation(self, observation: np.ndarray) -> np.ndarray:
        hidden = self.env.unwrapped.data.qvel[_PUSHER_HIDDEN]
        return np.concatenate([observation, hidden]).astype(observation.dtype)


class PusherTruth(MujocoModel):
    """Pusher-v5's simulator behind the model seam, on :class:`PusherFullState`'s observation.

    ``state_to_obs`` runs MuJoCo's forward kinematics per row (a few microseconds each) at
    ``qpos - timestep * qvel``, where the env's ``mj_step`` computed the fingertip
    (``tips_arm``), object and goal positions it observes (semi-implicit Euler: the last
    substep moved ``qpos`` by ``timestep * qvel``). ``obs_to_state``: the arm's 7 angles and
    velocities are ``obs[0:14]``; the slide joints' velocities are ``obs[23:27]``, their
    positions the bodies' positions ``obs[17:19]``, ``obs[20:22]`` less the bodies' rest
    positions (each slide joint moves its body along a fixed world axis), plus that last
    substep. Right after a reset the env's positions are those of ``qpos`` itself (its reset
    velocities are at most 0.005, so the difference is below 1e-4 m).
    """

    def __init__(self, env: gym.Env, nthread: int | None = 1) -> None:
        if not isinstance(env, PusherFullState):
            raise TypeError(
                "PusherTruth plans on PusherFullState's observation (the env's 23 entries do "
                "not determine the object's velocity): wrap the env, PusherFullState(env)"
            )
        m = env.unwrapped.model
        if m.opt.integrator != mujoco.mjtIntegrator.mjINT_EULER.value:
            raise ValueError("PusherTruth's observation map assumes Pusher-v5's Euler integrator")
        self._h = float(m.opt.timestep)
        self._kin = mujoco.MjData(m)
        self._bodies = [m.body(n).id for n in ("tips_arm", "object", "goal")]
        # Slide joint j moves its body by qpos[j] along a world axis: body xpos = rest + A q.
        mujoco.mj_resetData(m, self._kin)
        self._kin.qpos[:] = 0.0
        mujoco.mj_kinematics(m, self._kin)
        self._rest = self._kin.xpos[self._bodies[1:]].copy()  # [2, 3] object, goal
        axes = np.zeros((4, 3))
        for k, j in enumerate(range(7, 11)):
            self._kin.qpos[:] = 0.0
            self._kin.qpos[j] = 1.0
            mujoco.mj_kinematics(m, self._kin)
            moved = self._kin.xpos[self._bodies[1:]] - self._rest  # [2, 3]
            axes[k] = moved[k // 2]
        # qpos[7:9] -> object xy, qpos[9:11] -> goal xy; each pair spans the body's xy plane.
        self._obj_axes, self._goal_axes = axes[0:2, :2], axes[2:4, :2]  # [2 (joint), 2 (xy)]
        super().__init__(
            env,
            obs_to_state=self._obs_to_state,
            state_to_obs=self._state_to_obs,
            nthread=nthread,
        )

    def _obs_to_state(self, obs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        obj = np.linalg.solve(self._obj_axes.T, (obs[:, 17:19] - self._rest[0, :2]).T).T
        goal = np.linalg.solve(self._goal_axes.T, (obs[:, 20:22] - self._rest[1, :2]).T).T
        qvel = np.concatenate([obs[:, 7:14], obs[:, 23:27]], axis=1)  # [B, 11]
        slides = np.concatenate([obj, goal], axis=1) + self._h * qvel[:, 7:11]
        qpos = np.concatenate([obs[:, 0:7], slides], axis=1)  # [B, 11]
        return qpos, qvel

    def _state_to_obs(self, qpos: np.ndarray, qvel: np.ndarray) -> np.ndarray:
        m, d = self.mj_model, self._kin
        pos = np.empty((qpos.shape[0], 3, 3))  # [B, body, xyz]
        for i, q in enumerate(qpos - self._h * qvel):
            d.qpos[:] = q
            mujoco.mj_kinematics(m, d)
            pos[i] = d.xpos[self._bodies]
        return np.concatenate(
            [qpos[:, :7], qvel[:, :7], pos.reshape(-1, 9), qvel[:, _PUSHER_HIDDEN]], axis=1
        )

    def _check_mapping(self, base: gym.Env) -> None:
        """Compares ``state_to_obs`` with the env's observation one simulator step after
        perturbed states, where its positions lag ``qpos`` as after every env step."""
        qpos, qvel = _perturbed_states(self.mj_model, still=[])

        def full_obs() -> np.ndarray:
            return np.concatenate([base._get_obs(), base.data.qvel[_PUSHER_HIDDEN]])

        _check_against_env(self, base, full_obs, qpos, qvel, step=True)


# ---------------------------------------------------------------- entry point


def ground_truth(name: str, nthread: int | None = 1) -> tuple[Callable[[], gym.Env], MujocoModel]:
    """``(make_env, model)``: the env to step and the MuJoCo ground truth to plan on, for the
    registry entry ``name`` (reacher, pusher, or one whose observation is ``[qpos, qvel]``).

    ``make_env()`` makes a fresh env whose observations ``model`` maps (pusher's is
    :class:`PusherFullState`); ``nthread`` is the model's rollout thread count.
    """
    spec = make_spec(name)
    if name == "reacher":
        return spec.make, ReacherTruth(spec.make(), nthread=nthread)
    if name == "pusher":

        def make_env() -> gym.Env:
            return PusherFullState(spec.make())

        return make_env, PusherTruth(make_env(), nthread=nthread)
    return spec.make, MujocoModel.from_spec(spec, nthread=nthread)
