"""DeepMind Control tasks: observation layout, torch rewards against the env's own on
recorded steps, the MuJoCo ground truth against env steps, the pixel versions, bad input."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

pytest.importorskip("dm_control", reason="the DeepMind Control tasks need dm-control")

from dm_control import suite  # noqa: E402
from dm_control.utils import rewards as dm_rewards  # noqa: E402

from mbrl import envs  # noqa: E402
from mbrl.dynamics.mujoco_model import MujocoModel  # noqa: E402
from mbrl.envs import dmc  # noqa: E402
from mbrl.envs.pixels import ActionRepeat, PixelSpec, RenderError  # noqa: E402

STATE = list(dmc.TASKS)
TRUTH = [n for n in STATE if dmc.TASKS[n].to_state is not None]
PLANET_REPEATS = {
    "dmc-cartpole-swingup": 8,
    "dmc-reacher-easy": 4,
    "dmc-cheetah-run": 4,
    "dmc-finger-spin": 2,
    "dmc-walker-walk": 2,
    "dmc-ball_in_cup-catch": 4,
}


# ---------------------------------------------------------------- tolerance


@pytest.mark.parametrize("sigmoid", dmc._SIGMOIDS)
def test_tolerance_equals_dm_control(sigmoid: str) -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(0.0, 3.0, 500)
    x[:5] = [-1.0, 0.0, 1.0, 2.0, 2.5]  # on the bounds
    for bounds in ((0.0, 0.0), (-1.0, 2.0), (1.0, math.inf), (-math.inf, 0.5)):
        for margin in (0.0, 0.5, 2.0):
            for vam in (0.0, 0.1, 0.5, 0.9):
                if vam == 0.0 and sigmoid not in ("cosine", "linear", "quadratic"):
                    with pytest.raises(ValueError, match=r"value_at_margin must be in \(0, 1\)"):
                        dmc.tolerance(torch.tensor(x), bounds, margin, sigmoid, vam)
                    continue
                want = dm_rewards.tolerance(x, bounds, margin, sigmoid, vam)
                got = dmc.tolerance(torch.tensor(x), bounds, margin, sigmoid, vam)
                np.testing.assert_allclose(got.numpy(), want, rtol=1e-12, atol=1e-12)
    got32 = dmc.tolerance(torch.tensor(x, dtype=torch.float32), (-1.0, 2.0), 0.5, sigmoid, 0.5)
    assert got32.dtype == torch.float32


def test_tolerance_bad_arguments() -> None:
    x = torch.zeros(3)
    with pytest.raises(ValueError, match="lower bound 1 exceeds upper bound 0"):
        dmc.tolerance(x, (1, 0))
    with pytest.raises(ValueError, match="margin must be >= 0"):
        dmc.tolerance(x, margin=-1)
    with pytest.raises(ValueError, match="unknown sigmoid 'step'; valid: gaussian"):
        dmc.tolerance(x, margin=1, sigmoid="step")


# ---------------------------------------------------------------- kinematics


@pytest.mark.parametrize("name", STATE)
def test_kinematics_equal_mujoco(name: str) -> None:
    import mujoco

    env = dmc.DMCEnv(name)
    env.reset(seed=0)
    m = env.model
    kin = dmc.Kinematics(m)
    rng = np.random.default_rng(1)
    qpos = m.qpos0 + rng.normal(0.0, 0.7, (4, m.nq))
    qvel = rng.normal(0.0, 2.0, (4, m.nv))
    pose = kin.pose(torch.tensor(qpos), torch.tensor(qvel))
    data = mujoco.MjData(m)
    for i in range(4):
        data.qpos[:], data.qvel[:] = qpos[i], qvel[i]
        mujoco.mj_forward(m, data)
        mujoco.mj_subtreeVel(m, data)
        np.testing.assert_allclose(pose.xpos[i].numpy(), data.xpos, atol=1e-12)
        np.testing.assert_allclose(pose.xmat[i].numpy().reshape(-1, 9), data.xmat, atol=1e-12)
        com = torch.stack([kin.subtree_com_velocity(pose, b)[i] for b in range(m.nbody)])
        np.testing.assert_allclose(com.numpy(), data.subtree_linvel, atol=1e-12)
        geoms = torch.stack([kin.geom_xpos(pose, g)[i] for g in range(m.ngeom)])
        np.testing.assert_allclose(geoms.numpy(), data.geom_xpos, atol=1e-12)
    env.close()


# ---------------------------------------------------------------- specs and envs


def test_registry_has_every_task_and_its_pixel_version() -> None:
    names = set(envs.names())
    for name in STATE:
        assert name in names and f"{name}-pixels" in names


@pytest.mark.parametrize("name", STATE)
def test_observation_layout_matches_dm_control(name: str) -> None:
    task = dmc.TASKS[name]
    spec = envs.make(name)
    raw = suite.load(task.domain, task.task, task_kwargs={"random": 0})
    shapes = {k: int(np.prod(v.shape)) for k, v in raw.observation_spec().items()}
    assert shapes == dict(task.keys)  # the same keys and sizes, in the suite's own order
    assert list(shapes) == [k for k, _ in task.keys]
    assert (spec.obs_dim, spec.act_dim) == (task.obs_dim, raw.action_spec().shape[0])
    assert raw._step_limit == spec.max_episode_steps == 1000  # the suite's default limit
    env = spec.make()
    obs, _ = env.reset(seed=4)
    first = raw.reset()
    raw_env = dmc.DMCEnv(name)
    again, _ = raw_env.reset(seed=4)
    assert obs.dtype == np.float32 and obs.shape == (spec.obs_dim,)
    assert np.array_equal(obs, again)  # a seeded reset is reproducible
    assert first.observation.keys() == dict(task.keys).keys()
    env.close()
    raw_env.close()


def test_episodes_are_truncated_at_the_limit_and_must_be_reset() -> None:
    env = envs.make("dmc-cartpole-swingup").make()
    with pytest.raises(RuntimeError, match="reset"):
        env.step(np.zeros(1, np.float32))
    env.reset(seed=0)
    for t in range(1, 1001):
        _, _, terminated, truncated, _ = env.step(np.zeros(1, np.float32))
        assert not terminated and truncated == (t == 1000)
    with pytest.raises(RuntimeError, match="the episode is over"):
        env.step(np.zeros(1, np.float32))
    env.close()


def test_bad_input() -> None:
    with pytest.raises(ValueError, match="unknown DeepMind Control task 'dmc-nope'; valid: dmc-"):
        dmc.DMCEnv("dmc-nope")
    with pytest.raises(ValueError, match="cannot pass \\['time_limit'\\]; allowed"):
        envs.make("dmc-cheetah-run").make(time_limit=5)
    with pytest.raises(ValueError, match="render_mode must be None or 'rgb_array'"):
        dmc.DMCEnv("dmc-cheetah-run", render_mode="human")
    with pytest.raises(KeyError, match="dmc-cartpole-swingup"):
        envs.make("dmc-cartpole-swingup-pixel")  # the valid names are listed
    with pytest.raises(TypeError, match="made by a dmc-\\* state spec"):
        dmc.truth_model(envs.make("pendulum").make())


def _record(name: str, steps: int, seed: int = 1, nudge=None):
    """Random-action steps of the state task: ``(obs, act, next_obs, reward)`` tensors; ``nudge
    (physics, t)`` may set the simulator state before step ``t``."""
    spec = envs.make(name)
    env = spec.make()
    obs, _ = env.reset(seed=seed)
    rng = np.random.default_rng(seed)
    rows = []
    for t in range(steps):
        if nudge is not None and nudge(env.unwrapped.physics, t):
            obs = env.unwrapped.observation()
        act = rng.uniform(-1, 1, spec.act_dim).astype(np.float32)
        nxt, r, *_ = env.step(act)
        rows.append((obs, act, nxt, r))
        obs = nxt
    env.close()
    o, a, n, r = (torch.tensor(np.array(x)) for x in zip(*rows, strict=True))
    return spec, o, a, n, r


# Nudges: on some steps the simulator is moved to a state where the task pays well, so that
# the recorded rewards span low and high values.


def _cartpole_up(physics, t: int) -> bool:
    """Cartpole: every 20 steps the pole starts upright at rest, 10 steps later hanging."""
    if t % 10:
        return False
    with physics.reset_context():
        physics.named.data.qpos["hinge_1"] = 0.0 if t % 20 == 0 else math.pi
        physics.named.data.qpos["slider"] = 0.1 * (t % 3 - 1)
        physics.named.data.qvel[:] = 0.0
    return True


def _target_at_finger(physics, t: int) -> bool:
    """Reacher: every 20 steps the target is moved next to the fingertip, 10 steps later to
    the far side of the arena."""
    if t % 10:
        return False
    finger = physics.named.data.geom_xpos["finger", :2]
    target = finger + 0.02 if t % 20 == 0 else -finger
    physics.named.model.geom_pos["target", :2] = target
    physics.forward()
    return True


def _walker_up(physics, t: int) -> bool:
    """Walker: every 20 steps it starts upright walking at 1.5 m/s, 10 steps later lying."""
    if t % 10:
        return False
    with physics.reset_context():
        q = physics.named.data.qpos
        q[:] = 0.0
        if t % 20:
            q["rootz"], q["rooty"] = -1.0, math.pi / 2
        physics.named.data.qvel[:] = 0.0
        physics.named.data.qvel["rootx"] = 0.0 if t % 20 else 1.5
    return True


def _run_fast(physics, t: int) -> bool:
    """Cheetah: every third step starts moving forward at 2 to 14 m/s."""
    if t % 3:
        return False
    with physics.reset_context():
        physics.named.data.qvel["rootx"] = 2.0 + (t % 7) * 2.0
    return True


def _spin(physics, t: int) -> bool:
    """Finger: every other step starts with the hinge spinning at -20 or +20 rad/s."""
    if t % 2:
        return False
    with physics.reset_context():
        physics.named.data.qvel["hinge"] = -20.0 if t % 4 == 0 else 20.0
    return True


def _ball_in_cup(physics, t: int) -> bool:
    """Cup: every third step starts with the ball at the centre of the cup's target box."""
    if t % 3:
        return False
    with physics.reset_context():
        q = physics.named.data.qpos
        target = physics.named.model.site_pos["target"] + physics.named.model.body_pos["cup"]
        ball = physics.named.model.body_pos["ball"]
        q["ball_x"] = q["cup_x"] + target[0] - ball[0]
        q["ball_z"] = q["cup_z"] + target[2] - ball[2]
        physics.named.data.qvel[:] = 0.0
    return True


NUDGES = {
    "dmc-cartpole-swingup": _cartpole_up,
    "dmc-reacher-easy": _target_at_finger,
    "dmc-cheetah-run": _run_fast,
    "dmc-finger-spin": _spin,
    "dmc-walker-walk": _walker_up,
    "dmc-ball_in_cup-catch": _ball_in_cup,
}


@pytest.mark.parametrize("name", STATE)
def test_torch_reward_equals_env_reward(name: str) -> None:
    spec, obs, act, nxt, reward = _record(name, 200, nudge=NUDGES[name])
    assert obs.dtype == torch.float32
    got = spec.reward_fn(obs, act, nxt)
    assert got.shape == (200,) and got.dtype == torch.float32
    np.testing.assert_allclose(got.double().numpy(), reward.numpy(), atol=1e-5)
    assert reward.max() > 0.5 and reward.min() < 0.2  # low and high rewards were checked
    batched = spec.reward_fn(obs.view(10, 20, -1), act.view(10, 20, -1), nxt.view(10, 20, -1))
    assert torch.equal(batched.reshape(-1), got)  # leading dims are batch dims


# ---------------------------------------------------------------- ground truth


@pytest.mark.parametrize("name", TRUTH)
def test_truth_model_steps_equal_env_steps(name: str) -> None:
    spec = envs.make(name)
    env = spec.make()
    model = dmc.truth_model(env, nthread=0)
    assert isinstance(model, MujocoModel) and model.frame_skip == env.unwrapped.frame_skip
    obs, _ = env.reset(seed=2)
    rng = np.random.default_rng(2)
    acts = rng.uniform(-1, 1, (10, spec.act_dim)).astype(np.float32)
    real = [obs]
    for a in acts:
        real.append(env.step(a)[0])
    real = torch.tensor(np.array(real))  # [11, X]
    open_loop = model.rollout_actions(real[0], torch.tensor(acts)[None])[0]  # [11, X]
    np.testing.assert_allclose(open_loop.numpy(), real.numpy(), atol=1e-4, rtol=1e-4)
    one_step = model.step(real[:-1], torch.tensor(acts))  # from every recorded observation
    np.testing.assert_allclose(one_step.numpy(), real[1:].numpy(), atol=1e-4, rtol=1e-4)
    env.close()


def test_truth_model_with_action_repeat_sums_the_reward() -> None:
    spec = envs.make("dmc-cheetah-run")
    env = ActionRepeat(spec.make(), 4)
    model = dmc.truth_model(env, action_repeat=4, nthread=0)
    assert model.learns_reward
    obs, _ = env.reset(seed=5)
    rng = np.random.default_rng(5)
    for _ in range(5):
        a = rng.uniform(-1, 1, spec.act_dim).astype(np.float32)
        pred = model.predict(torch.tensor(obs)[None], torch.tensor(a)[None])
        obs, reward, *_, info = env.step(a)
        assert info["repeats"] == 4
        np.testing.assert_allclose(pred.mean[0].numpy(), obs, atol=1e-4)
        assert abs(float(pred.reward_mean[0]) - reward) < 1e-5
    state = model.rollout_start(torch.tensor(obs)[None], 3)
    nxt = model.rollout_step(state, torch.zeros(3, spec.act_dim))
    assert nxt.obs.shape == (3, spec.obs_dim) and nxt.reward.shape == (3,)


@pytest.mark.parametrize("name", ["dmc-cartpole-swingup", "dmc-walker-walk"])
def test_held_action_rollouts_equal_step_by_step_ones(name: str) -> None:
    """The action-repeat model's one native rollout per step (MujocoModel.rollout_held) gives
    the observations, simulator states and summed rewards of R single steps: bit for bit on
    cartpole; within 1e-12 on walker, whose contact solver starts each single step without the
    previous step's warm start."""

    class StepByStep:  # the inner model without rollout_held
        def __init__(self, model):
            self.model = model
            self.learns_reward = False
            self.obs_dim, self.act_dim = model.obs_dim, model.act_dim

        def rollout_start(self, obs, particles, generator=None):
            return self.model.rollout_start(obs, particles, generator)

        def rollout_step(self, state, act, generator=None):
            return self.model.rollout_step(state, act, generator)

    spec = envs.make(name)
    env = spec.make()
    obs, _ = env.reset(seed=3)
    fast = dmc.truth_model(env, action_repeat=4, nthread=0)
    slow = dmc.ActionRepeatModel(StepByStep(fast.model), 4, fast.reward_fn)
    gen = torch.Generator().manual_seed(0)
    a = fast.rollout_start(torch.tensor(obs)[None], 6)
    b = slow.rollout_start(torch.tensor(obs)[None], 6)
    for _ in range(3):
        act = torch.rand(6, spec.act_dim, generator=gen) * 2 - 1
        a, b = fast.rollout_step(a, act), slow.rollout_step(b, act)
        if name == "dmc-cartpole-swingup":
            assert torch.equal(a.obs, b.obs) and torch.equal(a.hidden, b.hidden)
            assert torch.equal(a.reward, b.reward)
        torch.testing.assert_close(a.hidden, b.hidden, rtol=0, atol=1e-12)
        torch.testing.assert_close(a.obs, b.obs, rtol=0, atol=1e-6)
        torch.testing.assert_close(a.reward, b.reward, rtol=0, atol=1e-6)
    env.close()


def test_finger_has_no_truth_model() -> None:
    env = envs.make("dmc-finger-spin").make()
    with pytest.raises(ValueError, match="touch sensors.*not a function of the simulator's qpos"):
        dmc.truth_model(env)
    env.close()


def test_reacher_truth_model_follows_the_env_target() -> None:
    spec = envs.make("dmc-reacher-easy")
    env = spec.make()
    model = dmc.truth_model(env, nthread=0)
    first, _ = env.reset(seed=0)
    second, _ = env.reset(seed=1)  # a new target
    x = torch.tensor(np.stack([second, second]))
    nxt = model.step(x, torch.zeros(2, 2))
    real, *_ = env.step(np.zeros(2, np.float32))
    np.testing.assert_allclose(nxt[0].numpy(), real, atol=1e-5)
    with pytest.raises(ValueError, match="to_target differs from the target.*truth_model\\(env\\)"):
        model.step(torch.tensor(first)[None], torch.zeros(1, 2))
    env.close()


def test_unobserved_qpos_is_checked() -> None:
    env = envs.make("dmc-cheetah-run").make()
    with pytest.raises(ValueError, match="unobserved_qpos \\(9,\\) must index qpos"):
        MujocoModel(env, lambda o: o, lambda q, v: q, unobserved_qpos=(9,))
    env.close()


# ---------------------------------------------------------------- pixel versions


def test_pixel_specs_have_planets_action_repeats() -> None:
    for name, repeat in PLANET_REPEATS.items():
        spec = envs.make(f"{name}-pixels")
        assert isinstance(spec, PixelSpec) and spec.state.name == name
        assert (spec.action_repeat, spec.obs_shape) == (repeat, (3, 64, 64))
        assert spec.max_episode_steps == 1000 // repeat
        assert (spec.act_dim, spec.frame_stack, spec.bit_depth) == (spec.state.act_dim, 1, 8)


def test_cartpole_pixels_render_camera_0_and_sum_the_repeats() -> None:
    spec = envs.make("dmc-cartpole-swingup-pixels")
    env = spec.make()
    try:
        obs, info = env.reset(seed=7)
    except RenderError as e:
        env.close()
        pytest.skip(f"MuJoCo cannot render here: {e}")
    state_env = ActionRepeat(spec.state.make(), 8)
    state, _ = state_env.reset(seed=7)
    assert obs.shape == (3, 64, 64) and obs.dtype == np.uint8
    assert np.array_equal(info["state"], state)
    physics = env.unwrapped.physics
    assert np.array_equal(obs, physics.render(64, 64, camera_id=0).transpose(2, 0, 1))
    rng = np.random.default_rng(7)
    for _ in range(3):
        a = rng.uniform(-1, 1, 1).astype(np.float32)
        obs, r, *_, info = env.step(a)
        state, r_state, *_ = state_env.step(a)
        assert info["repeats"] == 8 and r == r_state and np.array_equal(info["state"], state)
    env.close()
    state_env.close()


def test_missing_dm_control_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    from mbrl.extras import MissingExtraError

    spec = envs.make("dmc-cartpole-swingup")  # a spec is made without dm-control
    monkeypatch.setitem(sys.modules, "dm_control", None)
    with pytest.raises(
        MissingExtraError, match=r"need dm-control.*pip install 'torch-mbrl\[dmc\]'"
    ):
        spec.make()
