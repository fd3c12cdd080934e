"""MuJoCo ground truth behind the model seam: planning on the simulator's own dynamics.

:class:`MujocoModel` advances batches of simulator states with MuJoCo's native multi-threaded
``mujoco.rollout`` (one persistent thread pool, one ``MjData`` per thread), so sampling planners
(CEM, random shooting) score candidates on the exact dynamics of the gymnasium env, and it gives
finite-difference Jacobians for LQR and iLQR: it is a :class:`~mbrl.dynamics.base.Linearizable`
model, not a :class:`~mbrl.dynamics.base.DifferentiableModel` (no autograd through the
simulator; gradient planners roll it forward with :meth:`MujocoModel.predict`).

Observation <-> simulator state. A planner only sees observations ``[B, X]``; the simulator needs
``(qpos [B, nq], qvel [B, nv])``. The model works for envs whose observation determines that
state: ``obs_to_state`` and ``state_to_obs`` (batched numpy functions) given to the constructor,
or, when both are omitted, the identity layout ``obs = [qpos, qvel]`` (cartpole-swingup,
inverted-pendulum, half-cheetah and hopper made with x in the observation). The constructor
checks the default layout against the env's own observation on perturbed states (a given
mapping: its round trip) and raises a clear error where the observation does not determine the
state (reacher, pusher, half-cheetah without x, models with actuator activations). Hopper
clips velocities at +-10 in its observation, so a hopper state faster than that is not recovered
exactly; the check uses moderate velocities.

Every other part of the simulator state (time, mocap poses, plugin state) is taken from the
model's reset state. One control step is ``frame_skip`` simulator steps with the control held,
exactly as gymnasium's ``MujocoEnv.step`` does, so rollouts equal stepping the env (tested to
1e-6 in float64; open-loop rollouts agree exactly, step-by-step ones to ~1e-9 because each call
starts the constraint solver without the env's warm start).

A simulation that diverges is reset by MuJoCo itself (``mjWARN_BADQACC``), which would make a
blown-up rollout look like a plausible state. Every rollout starts at a known simulator time, so
a reset shows up as a wrong time; those rows, and rows whose actions are not finite, come back
as NaN, which :meth:`~mbrl.planners.base.PlanningProblem.evaluate` scores as minus infinity.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import TYPE_CHECKING

import gymnasium as gym
import mujoco
import numpy as np
import torch
from mujoco import rollout as mj_rollout

from mbrl.dynamics.base import (
    FitReport,
    Prediction,
    RolloutState,
    Transitions,
    check_rows,
    check_start,
    check_transitions,
)
from mbrl.shapes import check_shape

if TYPE_CHECKING:
    from mbrl.envs.spec import EnvSpec

ObsToState = Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]
"""``obs [B, X] -> (qpos [B, nq], qvel [B, nv])``, batched numpy float64."""

StateToObs = Callable[[np.ndarray, np.ndarray], np.ndarray]
"""``(qpos [B, nq], qvel [B, nv]) -> obs [B, X]``, batched numpy float64."""

_FULL = mujoco.mjtState.mjSTATE_FULLPHYSICS.value
_CTRL = mujoco.mjtState.mjSTATE_CTRL.value
_LINEARIZE_METHODS = ("auto", "transition_fd", "rollout_fd")


def env_observations(
    base: gym.Env,
    qpos: np.ndarray,
    qvel: np.ndarray,
    obs_fn: Callable[[], np.ndarray],
    step: bool = False,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``obs_fn()`` of the MuJoCo env ``base`` at each state ``qpos [B, nq]``, ``qvel [B, nv]``,
    or one simulator step (zero control) after it with ``step``: the observations ``[B, X]``
    and the states ``(qpos, qvel)`` they were taken at. The env's data is restored afterwards.
    Used to check observation maps against the env's own observation."""
    m, d = base.model, base.data
    sig = mujoco.mjtState.mjSTATE_INTEGRATION.value
    saved = np.empty(mujoco.mj_stateSize(m, sig))
    mujoco.mj_getState(m, d, saved, sig)
    try:
        obs, qs, vs = [], [], []
        for q, v in zip(qpos, qvel, strict=True):
            d.qpos[:], d.qvel[:], d.ctrl[:] = q, v, 0.0
            mujoco.mj_forward(m, d)
            if step:
                mujoco.mj_step(m, d)
            obs.append(np.asarray(obs_fn(), dtype=np.float64).ravel())
            qs.append(d.qpos.copy())
            vs.append(d.qvel.copy())
    finally:
        mujoco.mj_setState(m, d, saved, sig)
        mujoco.mj_forward(m, d)
    return np.stack(obs), np.stack(qs), np.stack(vs)


class MujocoModel:
    """The true dynamics of a gymnasium MuJoCo env as a :class:`DynamicsModel`.

    Args:
        env: a gymnasium env whose ``unwrapped`` is a ``gymnasium.envs.mujoco.MujocoEnv`` (has
            ``model``, ``data``, ``frame_skip``). The model shares its ``MjModel`` read-only and
            never touches the env's ``MjData`` after the mapping check (which restores it).
        obs_to_state, state_to_obs: the observation <-> ``(qpos, qvel)`` mapping; both or
            neither. Neither: ``obs = [qpos, qvel]`` is assumed and checked.
        nthread: threads of the rollout pool; ``None`` uses the CPUs this process may run on,
            ``0`` runs on the calling thread.
        fd_eps: finite-difference step of :meth:`linearize`.
        unobserved_qpos: ``qpos`` indices the observation leaves out because the dynamics do
            not depend on them (the x position of a planar runner, dm_control's cheetah and
            walker): ``obs_to_state`` sets them to their ``qpos0`` value, and the mapping check
            leaves them there instead of perturbing them.
        linearize_method: ``"transition_fd"`` (``mujoco.mjd_transitionFD`` per simulator step,
            chained over ``frame_skip``) or ``"rollout_fd"`` (central differences of the whole
            control step, all points and perturbations in one batched rollout); ``"auto"``:
            ``"transition_fd"``, or ``"rollout_fd"`` for the RK4 integrator, which
            ``mjd_transitionFD`` does not support.

    Raises:
        TypeError: ``env`` is not a MuJoCo env.
        ValueError: the observation does not determine the simulator state (the message says
            which check failed and how to pass a mapping).
    """

    learns_reward = False

    def __init__(
        self,
        env: gym.Env,
        obs_to_state: ObsToState | None = None,
        state_to_obs: StateToObs | None = None,
        nthread: int | None = None,
        fd_eps: float = 1e-6,
        linearize_method: str = "auto",
        unobserved_qpos: tuple[int, ...] = (),
    ) -> None:
        base = env.unwrapped
        if not all(hasattr(base, a) for a in ("model", "data", "frame_skip")):
            raise TypeError(
                f"{type(base).__name__} is not a MuJoCo env (needs model, data and frame_skip, "
                "as gymnasium.envs.mujoco.MujocoEnv has); use KnownModel for analytic systems"
            )
        if (obs_to_state is None) != (state_to_obs is None):
            raise ValueError("give both obs_to_state and state_to_obs, or neither")
        if linearize_method not in _LINEARIZE_METHODS:
            raise ValueError(
                f"unknown linearize_method {linearize_method!r}; valid: {_LINEARIZE_METHODS}"
            )
        self.mj_model: mujoco.MjModel = base.model
        m = self.mj_model
        if m.na > 0:
            raise ValueError(
                f"{type(base).__name__} has {m.na} actuator activations, which are simulator "
                "state the observation does not carry; MujocoModel supports models with na = 0"
            )
        self.frame_skip = int(base.frame_skip)
        self.nq, self.nv, self.nu = m.nq, m.nv, m.nu
        self.obs_dim = int(np.prod(env.observation_space.shape))
        self.act_dim = int(np.prod(env.action_space.shape))
        if self.act_dim != m.nu:
            raise ValueError(f"action dim {self.act_dim} differs from the model's nu = {m.nu}")
        self.dt = float(m.opt.timestep) * self.frame_skip
        self.fd_eps = float(fd_eps)
        rk4 = m.opt.integrator == mujoco.mjtIntegrator.mjINT_RK4.value
        if linearize_method == "transition_fd" and rk4:
            raise ValueError(
                f"{type(base).__name__} uses the RK4 integrator, which mujoco.mjd_transitionFD "
                "does not support; use linearize_method='rollout_fd' or 'auto'"
            )
        if linearize_method == "auto":
            linearize_method = "rollout_fd" if rk4 else "transition_fd"
        self.linearize_method = linearize_method
        self.env_name = type(base).__name__
        self.unobserved_qpos = tuple(int(i) for i in unobserved_qpos)
        if any(not 0 <= i < m.nq for i in self.unobserved_qpos):
            raise ValueError(
                f"unobserved_qpos {self.unobserved_qpos} must index qpos [0, nq={m.nq})"
            )
        self._identity = obs_to_state is None
        if obs_to_state is None:
            if self.obs_dim != m.nq + m.nv:
                raise ValueError(
                    f"{self.env_name}: observation has {self.obs_dim} entries but qpos + qvel "
                    f"has {m.nq} + {m.nv}; the observation does not determine the simulator "
                    "state. Pass obs_to_state and state_to_obs if it does (e.g. angles as "
                    "cos/sin; gymnasium envs that drop x: make them with "
                    "exclude_current_positions_from_observation=False; for reacher and pusher "
                    "mbrl.envs.truth.ground_truth has them), or plan with a learned model"
                )
            obs_to_state, state_to_obs = self._identity_maps()
        self.obs_to_state = obs_to_state
        self.state_to_obs = state_to_obs

        # Simulator state layout: [time, qpos, qvel, act, history, plugin, plastic] (FULLPHYSICS).
        self.nstate = mujoco.mj_stateSize(m, _FULL)
        self._qpos_at = mujoco.mj_stateSize(m, mujoco.mjtState.mjSTATE_TIME.value)
        self._qvel_at = self._qpos_at + m.nq
        template_data = mujoco.MjData(m)
        mujoco.mj_resetData(m, template_data)
        self._template = np.empty(self.nstate)  # [nstate] float64
        mujoco.mj_getState(m, template_data, self._template, _FULL)
        self._template[0] = 0.0  # every rollout starts at time 0 (divergence check)

        cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
        self.nthread = int(cpus or 1) if nthread is None else int(nthread)
        self._pool = mj_rollout.Rollout(nthread=self.nthread)
        self._datas = [mujoco.MjData(m) for _ in range(max(1, self.nthread))]
        self._fd_data = mujoco.MjData(m)
        self._check_mapping(base)

    @classmethod
    def from_spec(cls, spec: EnvSpec, **kwargs) -> MujocoModel:
        """The ground-truth model of a registry entry (a fresh env is made for it)."""
        return cls(spec.make(), **kwargs)

    def close(self) -> None:
        """Stop the rollout thread pool (also done when the model is garbage collected)."""
        if self._pool is not None:
            self._pool.close()
            self._pool = None

    # ------------------------------------------------------------------ mapping
    def _identity_maps(self) -> tuple[ObsToState, StateToObs]:
        nq = self.nq

        def _identity_o2s(obs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
            return obs[:, :nq], obs[:, nq:]

        def _identity_s2o(qpos: np.ndarray, qvel: np.ndarray) -> np.ndarray:
            return np.concatenate([qpos, qvel], axis=1)

        return _identity_o2s, _identity_s2o

    def _check_mapping(self, base: gym.Env) -> None:
        """Check the mapping on perturbed states.

        The default layout is compared with the env's own ``_get_obs`` (its data is saved and
        restored); a given mapping (which may describe a wrapped env's observation) is checked
        for the round trip ``obs_to_state(state_to_obs(s)) == s``.
        """
        m = self.mj_model
        rng = np.random.default_rng(0)
        qpos = m.qpos0[None] + rng.normal(0.0, 0.1, (4, m.nq))  # [4, nq]
        qpos[:, list(self.unobserved_qpos)] = m.qpos0[list(self.unobserved_qpos)]
        qvel = rng.normal(0.0, 1.0, (4, m.nv))  # [4, nv]
        obs = self.state_to_obs(qpos, qvel)  # [4, X]
        if obs.shape != (4, self.obs_dim):
            raise ValueError(
                f"state_to_obs returned shape {obs.shape}, expected (4, {self.obs_dim})"
            )
        if self._identity and hasattr(base, "_get_obs"):
            env_obs, _, _ = env_observations(base, qpos, qvel, base._get_obs)
            if env_obs.shape != obs.shape or not np.allclose(env_obs, obs, atol=1e-8):
                raise ValueError(
                    f"{self.env_name}: its observation is not state_to_obs(qpos, qvel) (checked "
                    "on perturbed states): the observation does not determine the simulator "
                    "state this way. Pass obs_to_state/state_to_obs that match the env (for "
                    "gymnasium envs with x excluded, make them with "
                    "exclude_current_positions_from_observation=False)"
                )
        q2, v2 = self.obs_to_state(obs)
        if not (np.allclose(q2, qpos, atol=1e-8) and np.allclose(v2, qvel, atol=1e-8)):
            raise ValueError(
                f"{self.env_name}: obs_to_state(state_to_obs(s)) != s; the two maps are not "
                "inverse to each other"
            )

    def _states(self, obs: np.ndarray) -> np.ndarray:
        """Full simulator states ``[B, nstate]`` (float64) for observations ``[B, X]``."""
        qpos, qvel = self.obs_to_state(obs)
        state = np.tile(self._template, (obs.shape[0], 1))  # [B, nstate]
        state[:, self._qpos_at : self._qvel_at] = qpos
        state[:, self._qvel_at : self._qvel_at + self.nv] = qvel
        return state

    def _obs(self, state: np.ndarray) -> np.ndarray:
        """Observations ``[..., X]`` of full simulator states ``[..., nstate]``."""
        lead = state.shape[:-1]
        flat = state.reshape(-1, self.nstate)
        qpos = flat[:, self._qpos_at : self._qvel_at]
        qvel = flat[:, self._qvel_at : self._qvel_at + self.nv]
        return np.asarray(self.state_to_obs(qpos, qvel)).reshape(*lead, self.obs_dim)

    # ------------------------------------------------------------------ simulation
    def _simulate(self, state0: np.ndarray, actions: np.ndarray) -> np.ndarray:
        """Roll full states ``[B, nstate]`` through controls ``[B, H, U]`` (held for
        ``frame_skip`` simulator steps each); returns the states after each control step
        ``[B, H, nstate]``, NaN from the first diverged step of a row on.
        """
        if self._pool is None:
            raise RuntimeError("MujocoModel was closed; make a new one")
        b, h, _ = actions.shape
        fs = self.frame_skip
        ctrl = np.repeat(np.ascontiguousarray(actions, dtype=np.float64), fs, axis=1)
        out = np.empty((b, h * fs, self.nstate))  # [B, H * fs, nstate]
        # Small chunks balance the threads (MuJoCo's default, B / (10 nthread), left one thread
        # idle at the end on a busy machine: 5.9k vs 9.3k half-cheetah steps/s at B = 512).
        chunk = max(1, b // (64 * max(1, self.nthread)))
        self._pool.rollout(
            self.mj_model,
            self._datas,
            np.ascontiguousarray(state0),
            ctrl,
            state=out,
            chunk_size=chunk,
        )
        states = out[:, fs - 1 :: fs]  # [B, H, nstate]
        # A MuJoCo auto-reset sets time back to zero: compare with the expected clock.
        steps = np.arange(1, h + 1) * fs  # [H]
        expected = state0[:, :1] + steps[None] * self.mj_model.opt.timestep  # [B, H]
        bad = np.abs(states[:, :, 0] - expected) > 0.5 * self.mj_model.opt.timestep
        bad |= ~np.isfinite(actions).all(axis=2)
        bad |= ~np.isfinite(state0).all(axis=1, keepdims=True)
        bad = np.logical_or.accumulate(bad, axis=1)  # [B, H] stays bad once bad
        if bad.any():
            states = states.copy()
            states[bad] = np.nan
        return states

    def step(self, obs: torch.Tensor, act: torch.Tensor) -> torch.Tensor:
        """Next observations ``[B, X]`` after one control step from ``obs [B, X]``, ``act [B, U]``.

        Output dtype and device follow ``obs``; computed in float64.
        """
        check_rows(obs, act, self.obs_dim, self.act_dim)
        x = obs.detach().cpu().double().numpy()
        u = act.detach().cpu().double().numpy()[:, None]
        nxt = self._obs(self._simulate(self._states(x), u)[:, 0])
        return torch.as_tensor(nxt, dtype=obs.dtype, device=obs.device)

    def rollout_actions(self, x0: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
        """Observations ``[N, H + 1, X]`` of open-loop rollouts of ``actions [N, H, U]``.

        ``x0`` is ``[X]`` (shared start) or ``[N, X]``; row 0 of the output is the start. One
        native multi-threaded rollout of ``N`` trajectories of ``H * frame_skip`` simulator
        steps: the fast path for sampling planners (see ``experiments/bench_mujoco_rollout.py``).
        """
        check_shape("actions", actions, ("N", "H", self.act_dim))
        n = actions.shape[0]
        if x0.ndim == 1:
            x0 = x0.reshape(1, -1).expand(n, -1)
        check_shape("x0", x0, (n, self.obs_dim))
        x = x0.detach().cpu().double().numpy()
        states = self._simulate(self._states(x), actions.detach().cpu().double().numpy())
        obs = np.concatenate([x[:, None], self._obs(states)], axis=1)  # [N, H + 1, X]
        return torch.as_tensor(obs, dtype=x0.dtype, device=x0.device)

    # ------------------------------------------------------------------ model seam
    def fit(self, data: Transitions, generator: torch.Generator | None = None) -> FitReport:
        """Nothing to learn: the simulator is the truth (the shapes of ``data`` are checked)."""
        check_transitions(data, self.obs_dim, self.act_dim, finite=())
        return FitReport((), (), 0, 0, (0,), 0.0)

    def predict(self, obs: torch.Tensor, act: torch.Tensor) -> Prediction:
        """The next observation ``[B, X]`` with zero variance."""
        mean = self.step(obs, act)
        return Prediction(mean=mean, var=torch.zeros_like(mean))

    def rollout_start(
        self, obs: torch.Tensor, particles: int, generator: torch.Generator | None = None
    ) -> RolloutState:
        """``B * P`` copies of the starts (all particles of a start follow one path); the full
        float64 simulator state rides along in ``hidden [B * P, nstate]`` so that a rollout
        never loses precision between steps."""
        check_start(obs, particles, self.obs_dim)
        rows = obs.repeat_interleave(particles, dim=0)  # [B * P, X]
        state = self._states(rows.detach().cpu().double().numpy())
        return RolloutState(obs=rows, hidden=torch.from_numpy(state))

    def rollout_step(
        self, state: RolloutState, act: torch.Tensor, generator: torch.Generator | None = None
    ) -> RolloutState:
        """Advance every row one control step under ``act [B * P, U]`` (one native rollout);
        ``state.obs [B * P, X]`` and, when set, ``state.hidden [B * P, nstate]``."""
        return self.rollout_held(state, act, 1)[1]

    def rollout_held(
        self, state: RolloutState, act: torch.Tensor, repeat: int
    ) -> tuple[torch.Tensor, RolloutState]:
        """``repeat`` control steps with ``act [B * P, U]`` held, in one native rollout: the
        observations after each ``[repeat, B * P, X]`` and the state after the last
        (:meth:`rollout_step` is ``repeat = 1``). Equal to ``repeat`` single steps (the full
        simulator state is carried either way) up to the contact solver's warm start, which a
        new rollout does not carry over (about 1e-14 on walker; bit for bit without contacts)."""
        check_rows(state.obs, act, self.obs_dim, self.act_dim, "state.obs")
        if state.hidden is None:
            full = self._states(state.obs.detach().cpu().double().numpy())
        else:
            check_shape("state.hidden", state.hidden, (state.obs.shape[0], self.nstate))
            full = state.hidden.numpy()
        u = act.detach().cpu().double().numpy()[:, None]  # [B * P, 1, U]
        states = self._simulate(full, np.repeat(u, repeat, axis=1))  # [B * P, R, nstate]
        obs = self._obs(states.transpose(1, 0, 2))  # [R, B * P, X]
        obs = torch.as_tensor(obs, dtype=state.obs.dtype, device=state.obs.device)
        last = np.ascontiguousarray(states[:, -1])
        return obs, RolloutState(obs=obs[-1], hidden=torch.from_numpy(last))

    # ------------------------------------------------------------------ derivatives
    def linearize(
        self, x: torch.Tensor, u: torch.Tensor, t: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Jacobians of one control step in observation coordinates, ``x' = f(x, u)``, at rows
        ``x [B, X]``, ``u [B, U]``; ``t`` is ignored (the simulator is time-invariant).

        Returns ``A = df/dx [B, X, X]`` and ``B = df/du [B, X, U]`` (dtype and device of ``x``).
        ``"transition_fd"``: ``mujoco.mjd_transitionFD`` (centered, ``fd_eps``) at each of the
        ``frame_skip`` simulator steps, chained: ``A = A_k ... A_1``,
        ``B = sum_j A_k ... A_{j+1} B_j`` (the control is held over the step), then mapped to
        observation coordinates with the Jacobians of ``obs_to_state`` / ``state_to_obs``
        (finite differences; identity for the default layout). ``"rollout_fd"``: central
        differences of the whole control step in observation coordinates, all ``B * 2 (X + U)``
        perturbed steps in one batched rollout.

        Requires ``nq == nv`` (hinge and slide joints: the tangent space is qpos itself).
        """
        check_rows(x, u, self.obs_dim, self.act_dim, "x", "u")
        if self.nq != self.nv:
            raise NotImplementedError(
                f"{self.env_name} has nq={self.nq} != nv={self.nv} (ball or free joints); "
                "linearize needs hinge and slide joints only"
            )
        xn = x.detach().cpu().double().numpy()
        un = u.detach().cpu().double().numpy()
        if self.linearize_method == "rollout_fd":
            a, b = self._linearize_rollout(xn, un)
        else:
            a, b = self._linearize_transition(xn, un)
        return (
            torch.as_tensor(a, dtype=x.dtype, device=x.device),
            torch.as_tensor(b, dtype=x.dtype, device=x.device),
        )

    def _linearize_rollout(self, x: np.ndarray, u: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        bsz, nx, nu = x.shape[0], self.obs_dim, self.act_dim
        eps = self.fd_eps
        ex, eu = np.eye(nx) * eps, np.eye(nu) * eps
        # Rows per point: +x_i, -x_i (2 X rows), then +u_j, -u_j (2 U rows).
        dx = np.concatenate([ex, -ex, np.zeros((2 * nu, nx))])  # [2 (X + U), X]
        du = np.concatenate([np.zeros((2 * nx, nu)), eu, -eu])  # [2 (X + U), U]
        xs = (x[:, None] + dx[None]).reshape(-1, nx)  # [B * 2 (X + U), X]
        us = (u[:, None] + du[None]).reshape(-1, 1, nu)
        nxt = self._obs(self._simulate(self._states(xs), us)[:, 0])
        nxt = nxt.reshape(bsz, 2 * (nx + nu), nx)
        a = (nxt[:, :nx] - nxt[:, nx : 2 * nx]) / (2 * eps)  # [B, X(i), X(out)]
        b = (nxt[:, 2 * nx : 2 * nx + nu] - nxt[:, 2 * nx + nu :]) / (2 * eps)
        return a.transpose(0, 2, 1), b.transpose(0, 2, 1)

    def _linearize_transition(self, x: np.ndarray, u: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        m, d = self.mj_model, self._fd_data
        ns = 2 * self.nv
        states = self._states(x)  # [B, nstate]
        a_out = np.empty((x.shape[0], ns, ns))  # [B, 2 nv, 2 nv] in (qpos, qvel)
        b_out = np.empty((x.shape[0], ns, self.nu))
        a_k = np.empty((ns, ns))
        b_k = np.empty((ns, self.nu))
        # A loop over linearization points (horizon steps of iLQR) and simulator substeps.
        for i in range(x.shape[0]):
            mujoco.mj_setState(m, d, states[i], _FULL)
            d.ctrl[:] = u[i]
            a_tot, b_tot = np.eye(ns), np.zeros((ns, self.nu))
            for _ in range(self.frame_skip):
                mujoco.mjd_transitionFD(m, d, self.fd_eps, True, a_k, b_k, None, None)
                a_tot = a_k @ a_tot
                b_tot = a_k @ b_tot + b_k
                mujoco.mj_step(m, d)
            a_out[i], b_out[i] = a_tot, b_tot
        if self._identity:
            return a_out, b_out
        j_in = self._jac_obs_to_state(x)  # [B, 2 nv, X]
        nxt = self._obs(self._simulate(states, u[:, None])[:, 0])
        j_out = self._jac_state_to_obs(nxt)  # [B, X, 2 nv]
        return j_out @ a_out @ j_in, j_out @ b_out

    def _jac_obs_to_state(self, x: np.ndarray) -> np.ndarray:
        """``d (qpos, qvel) / d obs`` at ``x [B, X]`` by central differences: ``[B, 2 nv, X]``."""
        bsz, nx, eps = x.shape[0], self.obs_dim, self.fd_eps
        dx = np.concatenate([np.eye(nx), -np.eye(nx)]) * eps  # [2 X, X]
        q, v = self.obs_to_state((x[:, None] + dx[None]).reshape(-1, nx))
        s = np.concatenate([q, v], axis=1).reshape(bsz, 2 * nx, -1)
        return ((s[:, :nx] - s[:, nx:]) / (2 * eps)).transpose(0, 2, 1)

    def _jac_state_to_obs(self, obs: np.ndarray) -> np.ndarray:
        """``d obs / d (qpos, qvel)`` at the state of ``obs [B, X]``: ``[B, X, 2 nv]``."""
        q, v = self.obs_to_state(obs)
        s = np.concatenate([q, v], axis=1)  # [B, 2 nv]
        bsz, ns, eps = s.shape[0], s.shape[1], self.fd_eps
        ds = np.concatenate([np.eye(ns), -np.eye(ns)]) * eps  # [2 ns, ns]
        sp = (s[:, None] + ds[None]).reshape(-1, ns)
        o = self.state_to_obs(sp[:, : self.nq], sp[:, self.nq :]).reshape(bsz, 2 * ns, -1)
        return ((o[:, :ns] - o[:, ns:]) / (2 * eps)).transpose(0, 2, 1)
