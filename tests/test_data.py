"""The data layer and the episode-aware replay buffer: episodes in and out, chunks inside
episodes, uint8 images stored once, ring wrap, checkpoints, old-format refusal, bad input."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch

from mbrl.buffer import BUFFER_FORMAT, ReplayBuffer
from mbrl.data import Episode, Sequences, Transitions
from mbrl.dynamics.base import Transitions as ReexportedTransitions


def _episode(t: int, x: int, u: int, seed: int, terminated: bool = False) -> Episode:
    """``t`` steps whose observations and actions are random but unique; obs ``[T + 1, X]``."""
    g = np.random.default_rng(seed)
    term = np.zeros(t, dtype=bool)
    term[-1] = terminated
    return Episode(
        obs=g.standard_normal((t + 1, x)).astype(np.float32),
        act=g.standard_normal((t, u)).astype(np.float32),
        reward=g.standard_normal(t).astype(np.float32),
        terminated=term,
        truncated=not terminated,
        seconds=0.0,
    )


def _image_episode(t: int, seed: int) -> Episode:
    g = np.random.default_rng(seed)
    return Episode(
        obs=g.integers(0, 256, size=(t + 1, 3, 8, 8), dtype=np.uint8),
        act=g.standard_normal((t, 2)).astype(np.float32),
        reward=g.standard_normal(t).astype(np.float32),
        terminated=np.zeros(t, dtype=bool),
        truncated=True,
        seconds=0.0,
    )


def _assert_same_episode(got: Episode, want: Episode) -> None:
    np.testing.assert_array_equal(got.obs, want.obs)
    np.testing.assert_array_equal(got.act, want.act)
    np.testing.assert_array_equal(got.reward, want.reward)
    np.testing.assert_array_equal(got.terminated, want.terminated)
    assert got.truncated == want.truncated


def test_transitions_live_in_the_data_layer_and_are_reexported():
    assert ReexportedTransitions is Transitions
    from mbrl.control import Episode as ControlEpisode

    assert ControlEpisode is Episode


def test_episodes_in_and_out():
    buf = ReplayBuffer(3, 2, capacity=100)
    eps = [_episode(t, 3, 2, seed=t, terminated=t % 2 == 0) for t in (5, 8, 1, 12)]
    for ep in eps:
        buf.add_episode(ep)
    assert len(buf) == 26 and buf.num_episodes == 4
    for got, want in zip(buf.episodes(), eps, strict=True):
        _assert_same_episode(got, want)
    data = buf.all()  # the transitions, oldest first
    np.testing.assert_array_equal(data.obs, np.concatenate([e.obs[:-1] for e in eps]))
    np.testing.assert_array_equal(data.next_obs, np.concatenate([e.obs[1:] for e in eps]))
    np.testing.assert_array_equal(data.act, np.concatenate([e.act for e in eps]))
    np.testing.assert_array_equal(data.terminated, np.concatenate([e.terminated for e in eps]))


def test_streamed_steps_find_their_episodes():
    """``add`` one step at a time, as the Dyna loops do, without saying where episodes end: a
    reset (a new obs) starts a new episode; ``truncated`` and ``terminated`` close one."""
    eps = [_episode(t, 2, 1, seed=10 + t) for t in (4, 6, 3)]
    buf = ReplayBuffer(2, 1, capacity=50)
    for ep in eps:
        for t in range(len(ep)):
            buf.add(ep.obs[t], ep.act[t], float(ep.reward[t]), ep.obs[t + 1], False)
    got = buf.episodes()
    assert [len(e) for e in got] == [4, 6, 3]
    for g, e in zip(got, eps, strict=True):
        np.testing.assert_array_equal(g.obs, e.obs)
    # the same obs again after a terminated or truncated step is still a new episode
    buf = ReplayBuffer(2, 1, capacity=50)
    o = np.ones(2, dtype=np.float32)
    buf.add(o, [0.0], 0.0, o, False, truncated=True)
    buf.add(o, [0.0], 0.0, o, True)
    buf.add(o, [0.0], 0.0, o, False)
    buf.add(o, [0.0], 0.0, o, False)
    assert [len(e) for e in buf.episodes()] == [1, 1, 2]
    assert buf.episodes()[0].truncated and not buf.episodes()[1].truncated


def test_chunks_never_cross_episode_boundaries():
    """Property over random episode lengths (with and without ring wrap): every chunk is ``L``
    consecutive steps of one stored episode, ``obs[:, L]`` is the last step's next obs."""
    g = torch.Generator().manual_seed(0)
    rng = np.random.default_rng(0)
    for trial in range(20):
        cap = int(rng.integers(20, 80))
        buf = ReplayBuffer(2, 1, capacity=cap)
        lengths = rng.integers(1, 15, size=int(rng.integers(3, 12)))
        for i, t in enumerate(lengths):
            ep = _episode(int(t), 1, 1, seed=1000 * trial + i)
            # the observation encodes (episode, step) so chunks can be checked exactly
            obs = np.stack([np.full(t + 1, i), np.arange(t + 1)], 1).astype(np.float32)
            buf.add_episode(Episode(obs, ep.act, ep.reward, ep.terminated, True, 0.0))
        longest = max(len(e) for e in buf.episodes())
        length = int(rng.integers(1, longest + 1))
        seq = buf.sample_chunks(32, length, g)
        assert isinstance(seq, Sequences) and len(seq) == 32 and seq.length == length
        assert seq.obs.shape == (32, length + 1, 2) and seq.act.shape == (32, length, 1)
        assert seq.reward.shape == seq.terminated.shape == seq.time.shape == (32, length)
        ep_id, step = seq.obs[..., 0], seq.obs[..., 1]
        assert bool((ep_id == ep_id[:, :1]).all())  # one episode per chunk
        assert bool((step[:, 1:] - step[:, :-1] == 1).all())  # consecutive steps
        assert torch.equal(seq.time, step[:, :-1].long())
        assert bool((seq.first == (seq.time[:, 0] == 0)).all())
        rows = seq.transitions()
        assert len(rows) == 32 * length
        assert torch.equal(rows.next_obs, seq.obs[:, 1:].reshape(-1, 2))


def test_chunk_longer_than_every_episode_names_both_lengths():
    buf = ReplayBuffer(2, 1, capacity=100)
    for t in (3, 7, 5):
        buf.add_episode(_episode(t, 2, 1, seed=t))
    assert buf.sample_chunks(4, 7).act.shape == (4, 7, 1)
    with pytest.raises(ValueError, match=r"L=8.*longest stored episode has 7 steps"):
        buf.sample_chunks(4, 8)
    with pytest.raises(ValueError, match=r"L=200.*has 7 steps"):
        buf.sample_chunks(4, 200)
    with pytest.raises(ValueError, match="empty"):
        ReplayBuffer(2, 1, 10).sample_chunks(1, 1)


def test_uint8_images_are_stored_once():
    """Pixel observations stay uint8, one frame per step plus one per episode: no next_obs
    copy (half the bytes of storing both)."""
    cap, frame = 120, 3 * 8 * 8
    buf = ReplayBuffer((3, 8, 8), 2, capacity=cap, obs_dtype=torch.uint8)
    eps = [_image_episode(t, seed=t) for t in (30, 40, 25)]
    for ep in eps:
        buf.add_episode(ep)
    assert buf.obs.dtype == torch.uint8
    assert buf.obs_nbytes <= (cap + 16) * frame < 2 * cap * frame
    for got, want in zip(buf.episodes(), eps, strict=True):
        _assert_same_episode(got, want)
    data = buf.sample(16, torch.Generator().manual_seed(0))
    assert data.obs.dtype == data.next_obs.dtype == torch.uint8
    assert data.obs.shape == (16, 3, 8, 8)
    seq = buf.sample_chunks(4, 10, torch.Generator().manual_seed(0))
    assert seq.obs.dtype == torch.uint8 and seq.obs.shape == (4, 11, 3, 8, 8)
    with pytest.raises(TypeError, match=r"uint8 observations.*float32"):
        e = eps[0]
        buf.add_episode(Episode(e.obs.astype(np.float32), e.act, e.reward, e.terminated, True, 0))


def test_ring_wrap_keeps_boundaries_and_transitions():
    buf = ReplayBuffer(2, 1, capacity=10)
    eps = [_episode(t, 2, 1, seed=t) for t in (4, 5, 6)]
    for ep in eps:
        buf.add_episode(ep)
    assert len(buf) == 10
    got = buf.episodes()  # the first episode is gone, the second lost its first step
    assert [len(e) for e in got] == [4, 6]
    np.testing.assert_array_equal(got[0].obs, eps[1].obs[1:])
    _assert_same_episode(got[1], eps[2])
    data = buf.all()
    np.testing.assert_array_equal(data.next_obs, np.concatenate([eps[1].obs[2:], eps[2].obs[1:]]))
    assert buf.sample_chunks(8, 4).time[:, 0].min() >= 0
    with pytest.raises(ValueError, match="longest stored episode has 6"):
        buf.sample_chunks(1, 7)
    # one batch longer than the capacity: the newest rows remain, in order
    big = ReplayBuffer(2, 1, capacity=4)
    big.add_episode(_episode(9, 2, 1, seed=3))
    np.testing.assert_array_equal(big.episodes()[0].obs, _episode(9, 2, 1, seed=3).obs[5:])
    assert big.num_episodes == 1


def test_iid_sampling_draws_the_same_rows_as_before():
    """``sample`` takes ``torch.randint(len, (B,), generator)`` rows, so seeded runs keep their
    numbers: row ``k`` is the ``k``-th stored transition while the ring has not wrapped."""
    buf = ReplayBuffer(3, 1, capacity=100)
    for t in (7, 9):
        buf.add_episode(_episode(t, 3, 1, seed=t))
    rows = torch.randint(len(buf), (32,), generator=torch.Generator().manual_seed(4))
    got = buf.sample(32, torch.Generator().manual_seed(4))
    every = buf.all()
    for name in ("obs", "act", "next_obs", "reward", "terminated"):
        assert torch.equal(getattr(got, name), getattr(every, name)[rows])


def test_checkpoint_round_trip_equals_uninterrupted(tmp_path):
    buf = ReplayBuffer(2, 1, capacity=30)
    for i, t in enumerate((8, 12, 9, 7)):  # wraps
        buf.add_episode(_episode(t, 2, 1, seed=i, terminated=i == 1))
    ep = _episode(6, 2, 1, seed=99)
    for t in range(3):  # an open streamed episode
        buf.add(ep.obs[t], ep.act[t], float(ep.reward[t]), ep.obs[t + 1], False)
    path = tmp_path / "buffer.pt"
    torch.save(buf.state_dict(), path)
    state = torch.load(path, weights_only=True)
    assert state["version"] == BUFFER_FORMAT and "next_obs" not in state
    copy = ReplayBuffer(2, 1, capacity=30)
    copy.load_state_dict(state)
    for x, y in zip(vars(buf.all()).values(), vars(copy.all()).values(), strict=True):
        assert torch.equal(x, y)
    for b in (buf, copy):  # the open episode continues in both
        for t in range(3, 6):
            b.add(ep.obs[t], ep.act[t], float(ep.reward[t]), ep.obs[t + 1], False)
    assert [len(e) for e in buf.episodes()] == [len(e) for e in copy.episodes()]
    assert len(buf.episodes()[-1]) == 6
    s1 = buf.sample_chunks(8, 5, torch.Generator().manual_seed(2))
    s2 = copy.sample_chunks(8, 5, torch.Generator().manual_seed(2))
    for x, y in zip(vars(s1).values(), vars(s2).values(), strict=True):
        assert torch.equal(x, y)
    r1, r2 = (b.sample(8, torch.Generator().manual_seed(2)) for b in (buf, copy))
    for x, y in zip(vars(r1).values(), vars(r2).values(), strict=True):
        assert torch.equal(x, y)
    with pytest.raises(ValueError, match="capacity mismatch"):
        ReplayBuffer(2, 1, capacity=31).load_state_dict(state)
    with pytest.raises(ValueError, match="observations mismatch"):
        ReplayBuffer(3, 1, capacity=30).load_state_dict(state)


def test_old_format_checkpoint_is_refused_with_the_reason():
    old = {
        "obs": torch.zeros(4, 3),
        "act": torch.zeros(4, 1),
        "reward": torch.zeros(4),
        "next_obs": torch.zeros(4, 3),
        "terminated": torch.zeros(4, dtype=torch.bool),
        "next": 4,
        "size": 4,
        "capacity": 8,
    }
    buf = io.BytesIO()
    torch.save(old, buf)
    buf.seek(0)
    with pytest.raises(ValueError, match=r"older version of the buffer.*Start a new run"):
        ReplayBuffer(3, 1, capacity=8).load_state_dict(torch.load(buf, weights_only=True))
    with pytest.raises(ValueError, match="format 1.*reads format 2"):
        ReplayBuffer(3, 1, capacity=8).load_state_dict({**old, "version": 1})


def test_discrete_action_indices_are_refused_by_the_buffer():
    buf = ReplayBuffer(2, 1, capacity=10)
    o = np.zeros(2, dtype=np.float32)
    with pytest.raises(TypeError, match=r"action vectors \[U=1\].*action_vector"):
        buf.add(o, 1, 0.0, o, False)
    with pytest.raises(TypeError, match="discrete action indices"):
        buf.add_batch(o[None], torch.tensor([[1]]), torch.zeros(1), o[None], torch.zeros(1))


def test_imagined_rows_keep_the_transition_count():
    """Independent rows (a Dyna model buffer) become one-step episodes; capacity still counts
    transitions and every next_obs comes back exactly."""
    g = torch.Generator().manual_seed(0)
    obs, nxt = torch.randn(50, 3, generator=g), torch.randn(50, 3, generator=g)
    buf = ReplayBuffer(3, 1, capacity=40)
    buf.add_batch(obs, torch.zeros(50, 1), torch.arange(50.0), nxt, torch.zeros(50))
    assert len(buf) == 40 and buf.num_episodes == 40
    data = buf.all()
    assert torch.equal(data.obs, obs[10:]) and torch.equal(data.next_obs, nxt[10:])
    assert data.reward.tolist() == list(range(10, 50))


def test_sequences_to_device():
    buf = ReplayBuffer(2, 1, capacity=20)
    buf.add_episode(_episode(6, 2, 1, seed=0))
    seq = buf.sample_chunks(3, 2, torch.Generator().manual_seed(0)).to("meta")
    assert seq.obs.device.type == "meta" and seq.time.dtype == torch.long


def test_mixed_adds_match_a_plain_list_of_transitions():
    """Property: any mix of ``add``, ``add_batch`` and ``add_episode`` with ring wraps stores
    exactly the newest ``capacity`` transitions, in order, next_obs included; checkpoints
    taken on the way restore the same buffer."""
    rng = np.random.default_rng(1)
    for trial in range(10):
        cap = int(rng.integers(5, 40))
        buf = ReplayBuffer(2, 1, capacity=cap)
        ref: list[tuple[np.ndarray, ...]] = []  # (obs, act, reward, next_obs, terminated)
        for op in range(30):
            ep = _episode(int(rng.integers(1, 10)), 2, 1, seed=100 * trial + op)
            rows = [
                (ep.obs[t], ep.act[t], ep.reward[t], ep.obs[t + 1], bool(rng.random() < 0.1))
                for t in range(len(ep))
            ]
            kind = rng.integers(3)
            if kind == 0:
                buf.add_episode(
                    Episode(ep.obs, ep.act, ep.reward, np.array([r[4] for r in rows]), False, 0.0)
                )
            elif kind == 1:
                for r in rows:
                    buf.add(*r)
            else:
                buf.add_batch(*(np.stack([r[i] for r in rows]) for i in range(5)))
            ref.extend(rows)
            if op % 7 == 3:
                copy = ReplayBuffer(2, 1, capacity=cap)
                copy.load_state_dict(buf.state_dict())
                buf = copy
        want = ref[-cap:]
        data = buf.all()
        assert len(buf) == len(want)
        for i, name in enumerate(("obs", "act", "reward", "next_obs", "terminated")):
            np.testing.assert_array_equal(
                getattr(data, name).numpy(), np.stack([r[i] for r in want])
            )
        assert sum(len(e) for e in buf.episodes()) == len(buf)
