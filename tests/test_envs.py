"""The env registry: every entry's torch reward and termination equal the env's own on real
random-action rollouts; env checker; names; errors; batching; seeding."""

from __future__ import annotations

import math

import gymnasium as gym
import numpy as np
import pytest
import torch
from gymnasium.utils.env_checker import check_env

import mbrl.envs
from mbrl.envs import cartpole, tasks

ALL = [
    "cartpole-balance",
    "cartpole-swingup",
    "pendulum",
    "pendulum-hanging",
    "inverted-pendulum",
    "reacher",
    "pusher",
    "half-cheetah",
    "hopper",
]
TERMINATING = {"cartpole-balance", "inverted-pendulum", "hopper"}


def _rollouts(name: str, steps: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """``steps`` random-action transitions across resets: obs, act, next_obs [T, *], reward,
    terminated [T]."""
    spec = mbrl.envs.make(name)
    env = spec.make()
    env.action_space.seed(seed)
    obs_l, act_l, nxt_l, rew_l, term_l = [], [], [], [], []
    obs, _ = env.reset(seed=seed)
    episode = 0
    for _ in range(steps):
        act = env.action_space.sample()
        nxt, rew, term, trunc, _ = env.step(act)
        obs_l.append(obs)
        act_l.append(act)
        nxt_l.append(nxt)
        rew_l.append(rew)
        term_l.append(term)
        obs = nxt
        if term or trunc:
            episode += 1
            obs, _ = env.reset(seed=seed + episode)
    env.close()

    def f32(x: list) -> torch.Tensor:
        return torch.as_tensor(np.asarray(x), dtype=torch.float32)

    return {
        "obs": f32(obs_l),
        "act": f32(act_l),
        "next_obs": f32(nxt_l),
        "reward": f32(rew_l),
        "terminated": torch.as_tensor(term_l),
    }


@pytest.fixture(scope="module", params=ALL)
def rollout(request: pytest.FixtureRequest) -> tuple[str, dict[str, torch.Tensor]]:
    return request.param, _rollouts(request.param, steps=240)


def test_names_lists_every_box_task() -> None:
    assert set(ALL) <= set(mbrl.envs.names())


def test_unknown_name_raises_with_valid_names() -> None:
    with pytest.raises(KeyError) as err:
        mbrl.envs.make("nope")
    msg = str(err.value)
    assert "nope" in msg
    for name in ALL:
        assert name in msg


def test_reward_and_termination_equal_the_env(rollout) -> None:
    name, r = rollout
    spec = mbrl.envs.make(name)
    reward = spec.reward_fn(r["obs"], r["act"], r["next_obs"])
    assert reward.shape == r["reward"].shape and reward.dtype == torch.float32
    scale = max(1.0, float(r["reward"].abs().max()))
    torch.testing.assert_close(reward, r["reward"], rtol=1e-5, atol=1e-4 * scale)
    term = spec.termination_fn(r["next_obs"])
    assert term.dtype == torch.bool and term.shape == r["terminated"].shape
    assert torch.equal(term, r["terminated"])
    if name in TERMINATING:  # the comparison above saw both outcomes
        assert r["terminated"].any() and not r["terminated"].all()
    # the rewards vary, so equality above is not a constant matching a constant
    if name not in {"cartpole-balance", "inverted-pendulum"}:
        assert float(r["reward"].std()) > 1e-3


def test_fns_take_any_leading_batch(rollout) -> None:
    name, r = rollout
    spec = mbrl.envs.make(name)
    flat = spec.reward_fn(r["obs"], r["act"], r["next_obs"])  # [B]
    b = (flat.shape[0] // 6) * 6
    x, u = r["obs"].shape[-1], r["act"].shape[-1]
    shaped = spec.reward_fn(
        r["obs"][:b].reshape(2, 3, -1, x),
        r["act"][:b].reshape(2, 3, -1, u),
        r["next_obs"][:b].reshape(2, 3, -1, x),
    )
    assert shaped.shape == (2, 3, b // 6)
    torch.testing.assert_close(shaped.reshape(-1), flat[:b])
    term = spec.termination_fn(r["next_obs"][:b].reshape(2, 3, -1, x))
    assert term.shape == (2, 3, b // 6)
    assert torch.equal(term.reshape(-1), spec.termination_fn(r["next_obs"][:b]))
    one = spec.reward_fn(r["obs"][:1], r["act"][:1], r["next_obs"][:1])
    assert one.shape == (1,)


@pytest.mark.parametrize("name", ALL)
def test_spec_matches_env(name: str) -> None:
    spec = mbrl.envs.make(name)
    env = spec.make()
    assert env.observation_space.shape == (spec.obs_dim,)
    assert env.action_space.shape == (spec.act_dim,)
    np.testing.assert_array_equal(env.action_space.low, spec.action_low)
    np.testing.assert_array_equal(env.action_space.high, spec.action_high)
    assert env.spec.max_episode_steps == spec.max_episode_steps
    assert spec.description and spec.name == name and spec.solved_return is not None
    low, high = spec.action_bounds()
    assert low.dtype == torch.float32 and low.shape == (spec.act_dim,)
    assert bool((low < high).all())
    env.close()


@pytest.mark.parametrize("name", ALL)
def test_env_checker(name: str) -> None:
    env = mbrl.envs.make(name).make()
    check_env(env.unwrapped, skip_render_check=True)
    env.close()


@pytest.mark.parametrize("seed", [0, 1, 7, 12345])
def test_pendulum_hanging_resets_hanging_at_rest_and_rewards_as_the_env(seed: int) -> None:
    spec = mbrl.envs.make("pendulum-hanging")
    env = spec.make()
    obs, _ = env.reset(seed=seed)
    np.testing.assert_array_equal(env.unwrapped.state, [math.pi, 0.0])
    np.testing.assert_allclose(obs, [-1.0, 0.0, 0.0], atol=1e-7)
    rows = []
    for t in range(40):  # out-of-bound torques too: both clip them to [-2, 2]
        act = np.array([4.0 * math.sin(0.3 * t + seed)], dtype=np.float32)
        nxt, rew, term, trunc, _ = env.step(act)
        assert not term and not trunc
        rows.append((obs, act, nxt, rew))
        obs = nxt
    env.close()
    o, a, n = (torch.as_tensor(np.stack([r[i] for r in rows])) for i in range(3))
    rewards = torch.tensor([r[3] for r in rows], dtype=torch.float32)
    torch.testing.assert_close(spec.reward_fn(o, a, n), rewards, rtol=1e-5, atol=1e-4)
    # the first step is scored at the hanging state: -(pi^2 + 0.001 * 2^2) for |u| >= 2
    u0 = min(abs(float(rows[0][1][0])), 2.0)
    assert rows[0][3] == pytest.approx(-(math.pi**2 + 0.001 * u0**2), rel=1e-6)
    assert spec.solved_return == -328.0 and spec.max_episode_steps == 200


def test_pendulum_hanging_differs_from_pendulum_only_in_its_start() -> None:
    hanging, plain = mbrl.envs.make("pendulum-hanging"), mbrl.envs.make("pendulum")
    assert hanging.reward_fn is plain.reward_fn and hanging.obs_dim == plain.obs_dim
    starts = set()
    for seed in range(3):
        env = plain.make()
        env.reset(seed=seed)
        starts.add(tuple(env.unwrapped.state))
        env.close()
    assert len(starts) == 3  # Pendulum-v1 draws its start; pendulum-hanging does not


def test_system_envs_name_each_state_and_action_with_a_unit() -> None:
    from mbrl.envs import systems

    for name in systems.ENV_NAMES:
        system = mbrl.envs.make(name).dynamics
        assert len(system.state_labels) == system.obs_dim, name
        assert len(system.action_labels) == system.act_dim, name
        for label in (*system.state_labels, *system.action_labels):
            assert label.endswith("]") and " [" in label, (name, label)
    with pytest.raises(ValueError, match=r"state_labels has 1 names \('p \[m\]',\) for 2"):
        systems.linear(np.eye(2), np.ones((2, 1)), state_labels=("p [m]",))


def test_forward_reward_dt_matches_env() -> None:
    for name, dt in (("half-cheetah", tasks.HALF_CHEETAH_DT), ("hopper", tasks.HOPPER_DT)):
        env = mbrl.envs.make(name).make()
        assert math.isclose(env.unwrapped.dt, dt, rel_tol=1e-12)
        env.close()


def test_make_refuses_reward_changing_kwargs() -> None:
    spec = mbrl.envs.make("half-cheetah")
    with pytest.raises(ValueError, match="ctrl_cost_weight"):
        spec.make(ctrl_cost_weight=0.5)


def test_register_twice_is_an_error() -> None:
    with pytest.raises(ValueError, match="already registered"):
        mbrl.envs.register("pendulum", tasks.SPECS["pendulum"])
    before = mbrl.envs.names()
    tasks.register_all()  # idempotent: registers nothing new
    assert mbrl.envs.names() == before


@pytest.mark.parametrize("name", ["cartpole-balance", "cartpole-swingup"])
def test_custom_envs_are_seeded(name: str) -> None:
    def run(seed: int) -> np.ndarray:
        env = mbrl.envs.make(name).make()
        obs, _ = env.reset(seed=seed)
        out = [obs]
        for _ in range(20):
            obs, *_ = env.step(np.full(1, 0.3, dtype=np.float32))
            out.append(obs)
        return np.stack(out)

    np.testing.assert_array_equal(run(3), run(3))
    assert not np.array_equal(run(3), run(4))


def test_cartpole_balance_known_step() -> None:
    """One Euler step of CartPole-v1's equations from a hand-set state, force 10 * 0.5 N."""
    env = gym.make("mbrl/CartpoleBalance-v0")
    env.reset(seed=0)
    env.unwrapped.state = np.array([0.1, 0.2, 0.05, -0.1])
    obs, reward, term, trunc, _ = env.step(np.array([0.5], dtype=np.float32))
    # by hand: temp = (5 + 0.05 * 0.01 * sin .05) / 1.1; thacc = (9.8 sin .05 - cos .05 temp) /
    # (0.5 (4/3 - 0.1 cos^2 .05 / 1.1)); xacc = temp - 0.05 thacc cos .05 / 1.1
    s, c = math.sin(0.05), math.cos(0.05)
    temp = (5.0 + 0.05 * 0.01 * s) / 1.1
    thacc = (9.8 * s - c * temp) / (0.5 * (4 / 3 - 0.1 * c * c / 1.1))
    xacc = temp - 0.05 * thacc * c / 1.1
    want = [0.1 + 0.02 * 0.2, 0.2 + 0.02 * xacc, 0.05 - 0.02 * 0.1, -0.1 + 0.02 * thacc]
    np.testing.assert_allclose(obs, want, rtol=1e-6)
    assert reward == 1.0 and not term and not trunc
    # the step that terminates still gives 1, as in CartPole
    env.unwrapped.state = np.array([2.399, 1.0, 0.0, 0.0])
    _, reward, term, _, _ = env.step(np.array([1.0], dtype=np.float32))
    assert term and reward == 1.0
    env.close()


def test_swingup_geometry_and_start() -> None:
    """Tip site at (x - 0.6 sin th, 0.6 cos th); starts hanging; upright at x=0 scores 1."""
    env = mbrl.envs.make("cartpole-swingup").make()
    obs, _ = env.reset(seed=0)
    assert abs(obs[1] - math.pi) < 0.5 and abs(obs[0]) < 0.5
    u = env.unwrapped
    u.set_state(np.array([0.0, 0.0]), np.array([0.0, 0.0]))
    obs, reward, *_ = env.step(np.zeros(1, dtype=np.float32))
    # upright is an unstable equilibrium: one step from it stays there (to rounding)
    assert abs(obs[1]) < 1e-6 and reward == pytest.approx(1.0, abs=1e-6)
    hanging = torch.tensor([[0.0, math.pi, 0.0, 0.0]])
    r = cartpole.cartpole_swingup_reward(hanging, torch.zeros(1, 1), hanging)
    torch.testing.assert_close(r, torch.tensor([math.exp(-4.0)]))
    env.close()


def test_swingup_pole_falls_by_gravity() -> None:
    """From theta = 0.1 with no force, the pole's angle grows (it falls away from upright)."""
    env = mbrl.envs.make("cartpole-swingup").make()
    env.reset(seed=0)
    env.unwrapped.set_state(np.array([0.0, 0.1]), np.array([0.0, 0.0]))
    for _ in range(5):
        obs, *_ = env.step(np.zeros(1, dtype=np.float32))
    assert obs[1] > 0.15 and obs[3] > 0.0
    env.close()


@pytest.mark.parametrize("name", ["pendulum", "cartpole-swingup", "reacher"])
def test_reward_with_out_of_bound_actions(name: str) -> None:
    """Actions outside the bounds: Pendulum clips the torque before its cost; the MuJoCo envs
    clamp the control but charge the control cost on the action as given."""
    spec = mbrl.envs.make(name)
    env = spec.make()
    obs, _ = env.reset(seed=1)
    for a in (3.0, -5.0):
        act = np.full(spec.act_dim, a, dtype=np.float32)
        nxt, rew, *_ = env.unwrapped.step(act)  # unwrapped: no bounds checker
        got = spec.reward_fn(
            torch.as_tensor(obs[None], dtype=torch.float32),
            torch.as_tensor(act[None]),
            torch.as_tensor(nxt[None], dtype=torch.float32),
        )
        assert got.item() == pytest.approx(rew, rel=1e-5, abs=1e-4)
        obs = nxt
    env.close()


@pytest.mark.parametrize("name", ALL)
def test_fns_stay_on_the_inputs_device_and_dtype(name: str) -> None:
    """No tensor is made on a fixed device: the fns run on ``meta`` tensors (shapes only)."""
    spec = mbrl.envs.make(name)
    obs = torch.empty(5, spec.obs_dim, device="meta")
    act = torch.empty(5, spec.act_dim, device="meta")
    reward = spec.reward_fn(obs, act, obs)
    term = spec.termination_fn(obs)
    assert reward.device.type == "meta" and reward.shape == (5,)
    assert reward.dtype == torch.float32
    assert term.device.type == "meta" and term.shape == (5,) and term.dtype == torch.bool


@pytest.mark.parametrize("name", ["half-cheetah", "hopper"])
def test_position_obs_do_not_change_the_dynamics(name: str) -> None:
    """``EnvSpec.position_obs`` are features the simulation is invariant to: the same state
    moved along x steps to the same next state moved along x, with the same reward."""
    spec = mbrl.envs.make(name)
    assert spec.position_obs == (0,)
    a, b = spec.make(), spec.make()
    a.reset(seed=0)
    b.reset(seed=0)
    rng = np.random.default_rng(0)
    for _ in range(5):  # leave the initial pose
        act = rng.uniform(spec.action_low, spec.action_high)
        a.step(act)
    qpos, qvel = a.unwrapped.data.qpos.copy(), a.unwrapped.data.qvel.copy()
    moved = qpos.copy()
    moved[0] += 3.0
    b.unwrapped.set_state(moved, qvel)
    act = rng.uniform(spec.action_low, spec.action_high)
    na, ra, *_ = a.step(act)
    nb, rb, *_ = b.step(act)
    np.testing.assert_allclose(nb[1:], na[1:], atol=1e-9)
    np.testing.assert_allclose(nb[0], na[0] + 3.0, atol=1e-9)
    assert math.isclose(ra, rb, abs_tol=1e-9)
    a.close()
    b.close()


# ---------------------------------------------------------------- discrete actions

DISCRETE = ["CartPole-v1", "Acrobot-v1"]


def _discrete_rollouts(name: str, steps: int, seed: int = 0, near_goal: bool = False):
    """``steps`` random-index transitions across resets, actions stored as the index's action
    vector. ``near_goal`` (Acrobot) starts every step from a random state near the goal height,
    so that both outcomes of the termination test occur."""
    spec = mbrl.envs.make(name)
    env = spec.make()
    env.action_space.seed(seed)
    rng = np.random.default_rng(seed)
    rows: dict[str, list] = {k: [] for k in ("obs", "act", "next_obs", "reward", "terminated")}
    obs, _ = env.reset(seed=seed)
    episode = 0
    for _ in range(steps):
        if near_goal:
            t1, t2 = rng.uniform(np.pi - 1.0, np.pi + 1.0), rng.uniform(-1.0, 1.0)
            dt1, dt2 = rng.uniform(-1.0, 1.0, size=2)
            env.unwrapped.state = np.array([t1, t2, dt1, dt2])
            obs = np.array(
                [np.cos(t1), np.sin(t1), np.cos(t2), np.sin(t2), dt1, dt2], dtype=np.float32
            )
        index = env.action_space.sample()
        nxt, rew, term, trunc, _ = env.step(index)
        for k, v in zip(rows, (obs, spec.action_vector(index), nxt, rew, term), strict=True):
            rows[k].append(v)
        obs = nxt
        if term or trunc:
            episode += 1
            obs, _ = env.reset(seed=seed + episode)
    env.close()
    out = {k: torch.as_tensor(np.asarray(v), dtype=torch.float32) for k, v in rows.items()}
    out["terminated"] = torch.as_tensor(rows["terminated"])
    return out


@pytest.mark.parametrize("name", DISCRETE)
def test_discrete_reward_and_termination_equal_the_env(name: str) -> None:
    spec = mbrl.envs.make(name)
    assert spec.discrete and spec.action_values.shape == (spec.num_actions, spec.act_dim)
    batches = [_discrete_rollouts(name, 400)]
    if name == "Acrobot-v1":  # random play rarely reaches the goal
        batches.append(_discrete_rollouts(name, 300, seed=1, near_goal=True))
    for r in batches:
        reward = spec.reward_fn(r["obs"], r["act"], r["next_obs"])
        assert reward.dtype == torch.float32 and torch.equal(reward, r["reward"])
        term = spec.termination_fn(r["next_obs"])
        assert term.dtype == torch.bool and torch.equal(term, r["terminated"])
    seen = torch.cat([r["terminated"] for r in batches])
    assert seen.any() and not seen.all()  # both outcomes compared
    # any leading batch
    r = batches[-1]
    shaped = spec.termination_fn(r["next_obs"][:300].reshape(3, 100, -1))
    assert torch.equal(shaped.reshape(-1), spec.termination_fn(r["next_obs"][:300]))


@pytest.mark.parametrize("name", DISCRETE)
def test_discrete_spec_matches_env(name: str) -> None:
    spec = mbrl.envs.make(name)
    env = spec.make()
    assert env.action_space == gym.spaces.Discrete(spec.num_actions)
    assert env.observation_space.shape == (spec.obs_dim,)
    assert env.spec.max_episode_steps == spec.max_episode_steps
    assert spec.description and spec.solved_return is not None
    np.testing.assert_array_equal(spec.action_low, spec.action_values.min(axis=0))
    np.testing.assert_array_equal(spec.action_high, spec.action_values.max(axis=0))
    values = spec.discrete_actions()
    assert values.dtype == torch.float32 and values.shape == (spec.num_actions, spec.act_dim)
    check_env(env.unwrapped, skip_render_check=True)
    env.close()


def test_discrete_envs_are_listed() -> None:
    assert {"CartPole-v1", "Acrobot-v1"} <= set(mbrl.envs.names())


def test_env_action_maps_vectors_and_refuses_mismatches() -> None:
    cart, box = mbrl.envs.make("CartPole-v1"), mbrl.envs.make("pendulum")
    # a planner's vector -> nearest value's index; indices pass; vectors of indices round-trip
    assert cart.env_action(np.array([0.2], dtype=np.float32)) == 1
    assert cart.env_action(torch.tensor([-0.7])) == 0
    assert cart.env_action(1) == 1
    idx = cart.action_index(torch.tensor([[[-2.0], [0.1]], [[0.9], [-0.1]]]))
    assert idx.tolist() == [[0, 1], [1, 0]] and idx.dtype == torch.long
    np.testing.assert_array_equal(cart.action_vector(np.array([1, 0])), [[1.0], [-1.0]])
    # a vector where the env expects an index
    env = cart.make()
    env.reset(seed=0)
    with pytest.raises(TypeError, match=r"takes an action index in \[0, 2\).*env_action"):
        env.step(np.array([1.0], dtype=np.float32))
    with pytest.raises(ValueError, match=r"\[0, 2\), got 2"):
        env.step(2)
    env.close()
    # an index where a box env expects a vector
    with pytest.raises(TypeError, match=r"box action space.*vectors \[U=1\].*index 1"):
        box.env_action(1)
    with pytest.raises(ValueError, match=r"expected an action vector \[U=1\], got \[2\]"):
        box.env_action(np.zeros(2, dtype=np.float32))
    np.testing.assert_array_equal(box.env_action([0.5]), np.array([0.5], dtype=np.float32))
    with pytest.raises(ValueError, match="box action space.*discretize"):
        box.action_vector(0)
    with pytest.raises(ValueError, match=r"\[0, 2\)"):
        cart.action_vector(5)


def test_discretize_grid_shapes_and_env() -> None:
    from mbrl.envs.discrete import discretize

    reacher = mbrl.envs.make("reacher")
    spec = discretize(reacher, 3)
    assert spec.discrete and spec.num_actions == 9 and spec.act_dim == 2
    assert spec.action_values.shape == (9, 2) and spec.action_values.dtype == np.float32
    # last dimension fastest, bounds included
    np.testing.assert_array_equal(spec.action_values[:3], [[-1, -1], [-1, 0], [-1, 1]])
    np.testing.assert_array_equal(spec.action_values[-1], reacher.action_high)
    assert len({tuple(v) for v in spec.action_values}) == 9
    assert spec.reward_fn is reacher.reward_fn and spec.max_episode_steps == 50
    pend = discretize(mbrl.envs.make("pendulum"), 5)
    np.testing.assert_allclose(pend.action_values[:, 0], [-2, -1, 0, 1, 2])
    # the wrapped env takes the index and plays its vector: same step as the box env
    a, b = spec.make(), reacher.make()
    a.reset(seed=3)
    b.reset(seed=3)
    na, ra, *_ = a.step(5)
    nb, rb, *_ = b.step(spec.action_values[5])
    np.testing.assert_array_equal(na, nb)
    assert ra == rb
    with pytest.raises(TypeError, match="action index"):
        a.step(spec.action_values[5])
    a.close()
    b.close()
    with pytest.raises(ValueError, match="per_dim must be an int >= 2"):
        discretize(reacher, 1)
    with pytest.raises(ValueError, match="already discrete"):
        discretize(spec, 3)
