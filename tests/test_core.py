"""Unit tests of the run machinery: buffer, configs, run folders and checkpoints."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pytest
import torch

from mbrl.buffer import ReplayBuffer
from mbrl.config import ConfigError, load_config
from mbrl.runs import CheckpointError, Run, numpy_rng_state, set_numpy_rng_state
from mbrl.shapes import ShapeError, check_shape


def _fill(buffer: ReplayBuffer, n: int, start: int = 0) -> None:
    i = torch.arange(start, start + n, dtype=torch.float32)
    buffer.add_batch(
        i[:, None].repeat(1, 3), i[:, None], i, i[:, None].repeat(1, 3) + 1, i % 2 == 0
    )


def test_buffer_ring_keeps_the_newest_in_order():
    buffer = ReplayBuffer(3, 1, capacity=5)
    _fill(buffer, 4)
    _fill(buffer, 3, start=4)
    data = buffer.all()
    assert len(buffer) == 5
    assert data.reward.tolist() == [2, 3, 4, 5, 6]
    assert data.next_obs[:, 0].tolist() == [3, 4, 5, 6, 7]
    assert data.terminated.tolist() == [True, False, True, False, True]


def test_buffer_round_trip_and_sampling_is_seeded():
    buffer = ReplayBuffer(3, 1, capacity=8)
    _fill(buffer, 11)
    copy = ReplayBuffer(3, 1, capacity=8)
    copy.load_state_dict(buffer.state_dict())
    for a, b in zip(vars(buffer.all()).values(), vars(copy.all()).values(), strict=True):
        assert torch.equal(a, b)
    _fill(buffer, 1, start=100)
    _fill(copy, 1, start=100)
    assert torch.equal(buffer.all().obs, copy.all().obs)
    s1 = buffer.sample(16, torch.Generator().manual_seed(1))
    s2 = buffer.sample(16, torch.Generator().manual_seed(1))
    assert torch.equal(s1.obs, s2.obs)


def test_buffer_rejects_wrong_shapes_with_expected_and_actual():
    buffer = ReplayBuffer(3, 1, capacity=8)
    with pytest.raises(ShapeError, match=r"obs: expected \[2, 3\], got \[2, 4\]"):
        buffer.add_batch(
            torch.zeros(2, 4), torch.zeros(2, 1), torch.zeros(2), torch.zeros(2, 3), torch.zeros(2)
        )
    with pytest.raises(ValueError, match="empty"):
        buffer.sample(1)


def test_check_shape_message():
    with pytest.raises(ShapeError, match=r"actions: expected \[N, 15, 1\], got \[4, 10, 1\]"):
        check_shape("actions", torch.zeros(4, 10, 1), ("N", 15, 1))
    check_shape("actions", torch.zeros(4, 15, 1), ("N", 15, 1))


@dataclass
class _Inner:
    width: int = 3
    """Units."""
    rate: float = 0.1
    """Rate."""


@dataclass
class _Cfg:
    env: str = "pendulum"
    """Env."""
    steps: int = 10
    """Steps."""
    flag: bool = False
    """Flag."""
    limit: int | None = None
    """Limit."""
    inner: _Inner = field(default_factory=_Inner)


def test_config_yaml_then_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("steps: 20\ninner:\n  width: 7\n")
    cfg = load_config(_Cfg, path, ["inner.rate=1e-3", "flag=true", "limit=5"])
    assert cfg == _Cfg(steps=20, flag=True, limit=5, inner=_Inner(width=7, rate=1e-3))
    assert load_config(_Cfg, None, ["limit=null"]).limit is None


@dataclass
class _Parent:
    inner: _Inner = field(default_factory=lambda: _Inner(width=9))
    """A nested config whose defaults differ from the class's own."""


def test_nested_override_keeps_the_parents_defaults():
    assert load_config(_Parent, None, ["inner.rate=0.5"]).inner == _Inner(width=9, rate=0.5)


def test_config_unknown_key_lists_valid_ones():
    with pytest.raises(ConfigError, match=r"unknown config key\(s\) stepz; valid keys: env, steps"):
        load_config(_Cfg, None, ["stepz=3"])
    with pytest.raises(ConfigError, match=r"inner.depth.*valid keys: inner.width, inner.rate"):
        load_config(_Cfg, None, ["inner.depth=3"])
    with pytest.raises(ConfigError, match="steps: expected an integer"):
        load_config(_Cfg, None, ["steps=abc"])
    with pytest.raises(ConfigError, match="key=value"):
        load_config(_Cfg, None, ["steps"])


def test_run_checkpoint_round_trip_and_metric_rows(tmp_path):
    run = Run(tmp_path / "r", _Cfg(), {"algo": "x"})
    run.log(step=1, loss=0.5)
    run.save_checkpoint({"w": torch.arange(3.0), "n": 4, "names": ["a"]})
    run.log(step=2, loss=0.25)  # logged after the checkpoint: dropped on resume
    again = Run(tmp_path / "r", _Cfg())
    state = again.load_checkpoint()
    assert torch.equal(state["w"], torch.arange(3.0)) and state["n"] == 4
    assert [r["step"] for r in again.metrics()] == ["1"]


def _tensorboard_scalars(path, tag):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(path))
    acc.Reload()
    return [(e.step, round(e.value, 6)) for e in acc.Scalars(tag)]


def test_run_mirrors_metrics_to_tensorboard_and_purges_dropped_rows(tmp_path):
    run = Run(tmp_path / "r", _Cfg())
    run.log(env_steps=100, loss=0.5, note="text is csv-only")
    run.save_checkpoint({"n": 1})
    run.log(env_steps=200, loss=0.25)  # after the checkpoint: dropped on resume
    run.close()
    assert _tensorboard_scalars(run.tensorboard_path, "loss") == [(100, 0.5), (200, 0.25)]

    again = Run(tmp_path / "r", _Cfg())
    again.load_checkpoint()
    again.log(env_steps=200, loss=0.125)  # the resumed run logs step 200 again
    again.close()
    assert _tensorboard_scalars(again.tensorboard_path, "loss") == [(100, 0.5), (200, 0.125)]


def test_run_refuses_other_config_and_truncated_file(tmp_path):
    run = Run(tmp_path / "r", _Cfg())
    run.save_checkpoint({"w": torch.zeros(1000)})
    with pytest.raises(CheckpointError, match="another config"):
        Run(tmp_path / "r", _Cfg(steps=11)).load_checkpoint()
    data = run.checkpoint_path.read_bytes()
    run.checkpoint_path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        Run(tmp_path / "r", _Cfg()).load_checkpoint()


@dataclass
class _CfgWithNewField(_Cfg):
    """``_Cfg`` after a release added a field with a default."""

    decay: float = 0.5


def test_run_resumes_a_checkpoint_from_before_a_config_field_was_added(tmp_path):
    Run(tmp_path / "r", _Cfg(), tensorboard=False).save_checkpoint({"w": torch.ones(3)})
    state = Run(tmp_path / "r", _CfgWithNewField(), tensorboard=False).load_checkpoint()
    assert torch.equal(state["w"], torch.ones(3))
    # a stored value that differs is still another config
    with pytest.raises(CheckpointError, match="another config"):
        Run(tmp_path / "r", _CfgWithNewField(steps=11), tensorboard=False).load_checkpoint()


def test_checkpoint_never_unpickles_code(tmp_path):
    run = Run(tmp_path / "r", _Cfg())
    run.save_checkpoint({"ok": 1})
    payload = torch.load(run.checkpoint_path, weights_only=True)
    payload["state"]["evil"] = _Evil()
    torch.save(payload, run.checkpoint_path)
    with pytest.raises(CheckpointError, match="refused"):
        run.load_checkpoint()


class _Evil:
    pass


def test_numpy_rng_state_round_trip():
    rng = np.random.default_rng(5)
    rng.random(3)
    state = numpy_rng_state(rng)
    expected = rng.random(4)
    other = np.random.default_rng(0)
    set_numpy_rng_state(other, state)
    assert np.array_equal(other.random(4), expected)
