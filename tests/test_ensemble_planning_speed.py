"""The ensemble's planning kernel computes the model's own math, and the planning dtype choice.

The rollout kernel (feature-major workspaces, folded input normalization and biases, bounds and
sampling along the row axis) is checked against the differentiable float32 path,
:meth:`ProbabilisticEnsemble.predict_members`, with the same noise drawn from a copy of the
generator: every propagation, with and without a learned reward, with fewer elites than members
and an ignored input. bfloat16 rollouts stay close to float32 ones.
"""

from __future__ import annotations

import functools

import pytest
import torch

from mbrl import cli
from mbrl.algorithms import pets
from mbrl.algorithms.factory import resolve_planning_dtype
from mbrl.dynamics import ProbabilisticEnsemble, Transitions
from mbrl.dynamics import ensemble as ens
from mbrl.dynamics.ensemble import auto_planning_dtype

X, U, E, ELITES = 3, 2, 4, 3


@functools.cache
def _fitted_once(learns_reward: bool) -> ProbabilisticEnsemble:
    g = torch.Generator().manual_seed(0)
    n = 200
    obs, act = torch.randn(n, X, generator=g), torch.rand(n, U, generator=g) * 2 - 1
    nxt = obs + 0.1 * torch.tanh(obs @ torch.ones(X, X) + act.sum(-1, keepdim=True))
    reward = -(nxt**2).sum(-1)
    m = ProbabilisticEnsemble(
        X,
        U,
        ensemble_size=E,
        hidden_size=32,
        num_layers=2,
        num_elites=ELITES,
        learns_reward=learns_reward,
        max_epochs=2,
        ignored_obs=(0,),
        angle_obs=(1,),
        seed=0,
    )
    m.fit(Transitions(obs, act, nxt, reward, torch.zeros(n, dtype=torch.bool)))
    return m


def _fitted(learns_reward: bool, propagation: str) -> ProbabilisticEnsemble:
    """A fitted ensemble (fitted once per ``learns_reward``) set to ``propagation`` and
    float32."""
    m = _fitted_once(learns_reward)
    m.propagation, m.planning_dtype = propagation, torch.float32
    return m


def _reference(
    m: ProbabilisticEnsemble, obs: torch.Tensor, act: torch.Tensor, gen: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One rollout step from ``predict_members`` with the kernel's draws: the next observations
    ``[R, X]`` and the rewards ``[R]`` (``None`` without a learned reward)."""
    rows, e, d = obs.shape[0], m.num_elites, m.out_dim
    pm = m.predict_members(obs, act, m.elites)  # [E, R, X] over every elite for every row
    mean, var = pm.mean, pm.var
    if m.learns_reward:
        mean = torch.cat((mean, pm.reward_mean[..., None]), dim=-1)  # [E, R, D]
        var = torch.cat((var, pm.reward_var[..., None]), dim=-1)
    if m.propagation == "expectation":
        out = mean.mean(dim=0)  # [R, D]
    else:
        if m.propagation == "ts1":
            perm = torch.randperm(rows, generator=gen)
            pos = torch.cat((perm, perm[: (-rows) % e]))  # position k -> elite k % E
        else:
            pos = torch.arange(rows)  # row r -> elite r % E
        k = torch.arange(pos.shape[0])
        eps = torch.randn((e, pos.shape[0] // e, d), generator=gen)  # [E, M, D]
        noise = eps[k % e, k // e]  # [K, D] the draw of position k
        sampled = mean[k % e, pos] + var[k % e, pos].sqrt() * noise  # [K, D]
        out = torch.empty(rows, d)
        out[pos[:rows]] = sampled[:rows]
    reward = out[:, X] if m.learns_reward else None
    return out[:, :X], reward


@pytest.mark.parametrize("propagation", ["ts_inf", "ts1", "expectation"])
@pytest.mark.parametrize("learns_reward", [False, True])
def test_rollout_step_is_the_models_own_math(propagation, learns_reward):
    m = _fitted(learns_reward, propagation)
    particles = 1 if propagation == "expectation" else 2 * ELITES
    g = torch.Generator().manual_seed(5)
    starts = torch.randn(7, X, generator=g)
    with torch.inference_mode():
        state = m.rollout_start(starts, particles)
        for _ in range(3):
            act = torch.rand(state.obs.shape[0], U, generator=g) * 2 - 1
            gen = torch.Generator().manual_seed(11)
            ref_obs, ref_reward = _reference(m, state.obs, act, gen.clone_state())
            nxt = m.rollout_step(state, act, gen)
            torch.testing.assert_close(nxt.obs, ref_obs, rtol=1e-5, atol=1e-5)
            if learns_reward:
                torch.testing.assert_close(nxt.reward, ref_reward, rtol=1e-5, atol=1e-5)
            else:
                assert nxt.reward is None
            state = nxt


def test_ts1_with_rows_not_a_multiple_of_the_elites():
    m = _fitted(False, "ts1")
    g = torch.Generator().manual_seed(2)
    obs, act = torch.randn(7, X, generator=g), torch.rand(7, U, generator=g)
    gen = torch.Generator().manual_seed(4)
    ref_obs, _ = _reference(m, obs, act, gen.clone_state())
    with torch.inference_mode():
        m.rollout_start(obs, 1)
        nxt = m.rollout_step(ens.RolloutState(obs=obs), act, gen)
    torch.testing.assert_close(nxt.obs, ref_obs, rtol=1e-5, atol=1e-5)


def test_steps_do_not_alias_the_reused_workspaces():
    """A later step (same or other row count) leaves the states of earlier steps unchanged."""
    m = _fitted(True, "ts_inf")
    gen = torch.Generator().manual_seed(0)
    with torch.inference_mode():
        s0 = m.rollout_start(torch.randn(4, X), ELITES)
        s1 = m.rollout_step(s0, torch.zeros(4 * ELITES, U), gen)
        kept_obs, kept_reward = s1.obs.clone(), s1.reward.clone()
        m.rollout_step(s1, torch.ones(4 * ELITES, U), gen)
        m.rollout_step(m.rollout_start(torch.randn(2, X), ELITES), torch.ones(2 * ELITES, U), gen)
    assert torch.equal(s1.obs, kept_obs) and torch.equal(s1.reward, kept_reward)


def test_bfloat16_rollout_close_to_float32():
    m = _fitted(True, "ts_inf")
    starts = torch.randn(6, X, generator=torch.Generator().manual_seed(1))
    finals = {}
    for dtype in (torch.float32, torch.bfloat16):
        m.planning_dtype = dtype
        gen = torch.Generator().manual_seed(3)
        with torch.inference_mode():
            state = m.rollout_start(starts, ELITES)
            for t in range(4):
                state = m.rollout_step(state, torch.full((6 * ELITES, U), 0.2 * t), gen)
        assert state.obs.dtype == torch.float32 and state.reward.dtype == torch.float32
        finals[dtype] = (state.obs, state.reward)
    moved = (finals[torch.float32][0] - starts.repeat_interleave(ELITES, 0)).abs().max()
    obs_err = (finals[torch.bfloat16][0] - finals[torch.float32][0]).abs().max()
    reward_err = (finals[torch.bfloat16][1] - finals[torch.float32][1]).abs().max()
    assert 0 < obs_err < 0.05 * moved, (obs_err, moved)
    assert reward_err < 0.05 * finals[torch.float32][1].abs().max()


def test_auto_dtype_follows_the_cpu_flags(monkeypatch):
    monkeypatch.setattr(ens, "_cpu_flags", lambda: frozenset({"avx2", "avx512_bf16"}))
    monkeypatch.setattr(torch.backends.mkldnn, "is_available", lambda: True)
    dtype, why = auto_planning_dtype("cpu")
    assert dtype == torch.bfloat16 and "avx512_bf16" in why
    monkeypatch.setattr(ens, "_cpu_flags", lambda: frozenset({"avx2", "amx_bf16", "amx_tile"}))
    assert auto_planning_dtype() == (torch.bfloat16, auto_planning_dtype()[1])
    assert "amx_bf16" in auto_planning_dtype()[1]
    monkeypatch.setattr(ens, "_cpu_flags", lambda: frozenset({"avx2", "avx512f"}))
    dtype, why = auto_planning_dtype("cpu")
    assert dtype == torch.float32 and "no amx_bf16/avx512_bf16" in why
    monkeypatch.setattr(ens, "_cpu_flags", lambda: frozenset({"avx512_bf16"}))
    monkeypatch.setattr(torch.backends.mkldnn, "is_available", lambda: False)
    assert auto_planning_dtype("cpu") == (torch.float32, auto_planning_dtype("cpu")[1])
    assert "oneDNN" in auto_planning_dtype("cpu")[1]


def test_auto_dtype_on_gpus(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "GPU-X")
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert auto_planning_dtype("cuda") == (torch.bfloat16, "GPU-X has native bfloat16")
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert auto_planning_dtype("cuda")[0] == torch.float32


def test_config_choices_and_the_pets_default(monkeypatch):
    monkeypatch.setattr(ens, "_cpu_flags", lambda: frozenset({"avx512_bf16"}))
    assert resolve_planning_dtype("float32", "cpu") == (
        torch.float32,
        "planning dtype: float32 (model.planning_dtype)",
    )
    assert resolve_planning_dtype("bfloat16", "cpu")[0] == torch.bfloat16
    dtype, line = resolve_planning_dtype("auto", "cpu")
    assert dtype == auto_planning_dtype("cpu")[0]
    assert line.startswith(f"planning dtype: {str(dtype).removeprefix('torch.')} (auto: ")
    assert pets.Config().model.planning_dtype == "auto"


def test_pets_run_prints_the_planning_dtype_once(tmp_path, capsys):
    args = ["run", "pets", "--env", "cartpole-balance", "--runs-dir", str(tmp_path),
            "trials=0", "seed_steps=20", "--name", "dtype"]  # fmt: skip
    assert cli.main(args) == 0
    out = capsys.readouterr()
    lines = [x for x in (out.out + out.err).splitlines() if x.startswith("planning dtype:")]
    assert lines == [resolve_planning_dtype("auto", "cpu")[1]]
