"""The single-step latent model of the lecture notes (eq. 8.5): its loss against the three
terms written out, normalised codes, learning a pixel point mass from two stacked frames,
Gaussian dynamics, the filter and rollout seams, iLQR's stage cost, and bad input."""

from __future__ import annotations

import copy

import pytest
import torch

from mbrl.data import Sequences, Transitions
from mbrl.dynamics import (
    Belief,
    DifferentiableModel,
    DynamicsModel,
    Filter,
    FitError,
    SingleStepLatent,
)
from mbrl.envs.pixels import preprocess
from mbrl.planners import CEM, ILQR, PlanningProblem
from mbrl.planners.base import StageCost

torch.set_num_threads(1)

IMAGE = (6, 16, 16)  # two stacked RGB frames
TINY = dict(latent=6, hidden=32, depth=4, conv_layers=2)


def tiny(**kw) -> SingleStepLatent:
    return SingleStepLatent(IMAGE, 1, **{**TINY, **kw})


def point_mass(batch: int, steps: int, seed: int = 0) -> Sequences:
    """A 4 x 4 square on a 16 x 16 image at column ``x`` with velocity ``v``: ``v' = clip(v + a,
    -2, 2)``, ``x' = clip(x + v', 0, 12)``; observations stack the previous and the current
    frame (so the velocity is visible), the reward is ``-|x' - 6| / 6``."""
    g = torch.Generator().manual_seed(seed)
    act = torch.randint(-1, 2, (batch, steps, 1), generator=g).float()
    x = torch.randint(2, 10, (batch,), generator=g)
    v = torch.randint(-1, 2, (batch,), generator=g)
    xs = [(x - v).clamp(0, 12), x]
    for t in range(steps):
        v = (v + act[:, t, 0].long()).clamp(-2, 2)
        x = (x + v).clamp(0, 12)
        xs.append(x)
    xs = torch.stack(xs, 1)  # [B, L + 2]
    frames = torch.zeros(batch, steps + 2, 3, 16, 16, dtype=torch.uint8)
    for b in range(batch):
        for t in range(steps + 2):
            c = int(xs[b, t])
            frames[b, t, :, 6:10, c : c + 4] = 255
    obs = torch.cat([frames[:, :-1], frames[:, 1:]], dim=2)  # [B, L + 1, 6, 16, 16]
    reward = -(xs[:, 2:].float() - 6).abs() / 6
    return Sequences(
        obs, act, reward, torch.zeros(batch, steps, dtype=torch.bool),
        torch.arange(steps).expand(batch, -1),
    )  # fmt: skip


def test_single_step_latent_is_a_filter_and_a_differentiable_dynamics_model():
    model = tiny()
    assert isinstance(model, DynamicsModel) and isinstance(model, Filter)
    assert isinstance(model, DifferentiableModel) and model.learns_reward
    assert model.obs_dim == 6


@pytest.mark.parametrize("dynamics", ["deterministic", "gaussian"])
def test_the_loss_of_one_step_chunks_is_the_notes_three_terms(dynamics):
    model = tiny(dynamics=dynamics, latent_weight=2.0, reward_weight=3.0)
    data = point_mass(4, 1)  # L = 1: exactly eq. 8.5's single-step terms
    twin = copy.deepcopy(model)
    losses = model.update(data, torch.Generator().manual_seed(7))
    with torch.no_grad():
        frames = preprocess(data.obs, 5, torch.Generator().manual_seed(7)).flatten(0, 1)
        codes = twin.encode(frames)
        recon = 0.5 * (twin.decoder(codes) - frames).square().sum(dim=(1, 2, 3)).mean()
        codes = codes.view(4, 2, -1)
        mean, std = twin._step(codes[:, 0], data.act[:, 0])
        if std is None:
            latent = 0.5 * (mean - codes[:, 1]).square().sum(-1).mean()
        else:
            z = (codes[:, 1] - mean) / std
            latent = (0.5 * z.square() + std.log()).sum(-1).mean()
        reward = 0.5 * (twin._reward(codes[:, 0], data.act[:, 0]) - data.reward[:, 0]).square()
        total = recon + 2.0 * latent + 3.0 * reward.mean()
    assert losses.total == pytest.approx(float(total), rel=1e-5)
    assert losses.terms["latent_loss"] == pytest.approx(float(latent), rel=1e-5, abs=1e-6)


def test_codes_and_predictions_are_layer_normalised():
    model = tiny()
    belief = model.observe(model.reset_belief(3), point_mass(3, 1).obs[:, 0], None)
    assert torch.allclose(belief.mean.mean(-1), torch.zeros(3), atol=1e-5)
    assert torch.allclose(belief.mean.var(-1, unbiased=False), torch.ones(3), atol=1e-3)
    nxt = model.mean_dynamics(belief.mean, torch.ones(3, 1))
    assert torch.allclose(nxt.var(-1, unbiased=False), torch.ones(3), atol=1e-3)


def test_learns_a_pixel_point_mass_from_two_stacked_frames():
    model = tiny(lr=3e-3)
    data = point_mass(16, 6)
    g = torch.Generator().manual_seed(0)
    first = model.update(data, g)
    for _ in range(250):
        last = model.update(data, g)
    assert last.terms["recon_loss"] < 0.1 * first.terms["recon_loss"]
    assert last.terms["reward_loss"] < 0.2 * first.terms["reward_loss"]
    frames = model.open_loop(data.obs[:8], data.act[:8], 1)  # one stack, then f open loop
    truth = data.obs[:8].float() / 255 - 0.5
    err = (frames[:, 1:, 3:] - truth[:, 1:, 3:]).square().mean()  # the newest frame
    hold = (truth[:, :1, 3:] - truth[:, 1:, 3:]).square().mean()
    assert float(err) < 0.6 * float(hold)  # beats holding the first frame still (0.43 here)


def test_the_filter_encodes_the_latest_frames_only():
    a, b = tiny(seed=1), tiny(seed=1)
    obs = point_mass(2, 1).obs[:, 0]
    from_prior = a.observe(a.reset_belief(2), obs, None)
    from_other = b.observe(Belief(torch.randn(2, 6)), obs, torch.ones(2, 1))
    assert torch.equal(from_prior.mean, from_other.mean)


def test_gaussian_rollouts_sample_per_row_and_repeat_under_the_generator():
    model = tiny(dynamics="gaussian")
    belief = model.observe(model.reset_belief(1), point_mass(1, 1).obs[:, 0], None)
    out = []
    for _ in range(2):
        g = torch.Generator().manual_seed(3)
        state = model.rollout_start(belief, 4, g)
        state = model.rollout_step(state, torch.zeros(4, 1), g)
        out.append(state)
    assert torch.equal(out[0].obs, out[1].obs) and not torch.equal(out[0].obs[0], out[0].obs[1])
    assert torch.equal(out[0].reward, out[0].reward[:1].expand(4))  # the reward of (s, a)
    det = tiny()
    state = det.rollout_step(det.rollout_start(belief, 2, None), torch.zeros(2, 1), None)
    assert torch.allclose(state.obs[0], state.obs[1], atol=1e-6)  # no noise when deterministic


def test_cem_and_ilqr_plan_in_latent_space_with_the_learned_reward():
    model = tiny()
    belief = model.observe(model.reset_belief(1), point_mass(1, 1).obs[:, 0], None)
    cost = model.stage_cost()
    assert isinstance(cost, StageCost)

    def no_reward(*_):
        raise AssertionError("the model's own reward must be used")

    def problem(**kw):
        return PlanningProblem(
            model, no_reward, None, 5, -torch.ones(1), torch.ones(1), 1,
            torch.Generator().manual_seed(0), **kw,
        )  # fmt: skip

    plan = CEM(population=40, iterations=3).plan(problem(), belief)
    assert plan.actions.shape == (5, 1) and plan.ok
    with pytest.raises(ValueError, match="learns the reward"):
        ILQR(max_iterations=5).plan(problem(), belief.mean[0])
    plan = ILQR(max_iterations=10).plan(problem(stage_cost=cost), belief.mean[0])
    assert plan.actions.shape == (5, 1) and plan.K.shape == (5, 1, 6)
    zeros = torch.zeros(1, 5, 1)
    # iLQR's plan is at least as good as doing nothing, by the learned reward
    scored = problem().evaluate(belief, torch.cat([plan.actions[None], zeros]))
    assert float(scored[0]) >= float(scored[1]) - 1e-5


def test_bad_input_is_refused_with_the_fix():
    model = tiny()
    data = point_mass(2, 2)
    with pytest.raises(ValueError, match="uint8"):
        model.observe(model.reset_belief(2), data.obs[:, 0].float(), None)
    with pytest.raises(ValueError, match=r"\[\.\.\., 6, 16, 16\]"):
        model.observe(model.reset_belief(2), data.obs[:, 0, :3], None)  # one frame, not two
    with pytest.raises(TypeError, match="Sequences"):
        model.fit(Transitions(*(torch.zeros(2, 1) for _ in range(5))))
    with pytest.raises(ValueError, match="unknown dynamics"):
        tiny(dynamics="linear")
    with torch.no_grad():
        model.reward_net[-1].bias.fill_(float("nan"))
    with pytest.raises(FitError, match="SingleStepLatent update diverged"):
        model.update(data)
    assert not model.optimizer.state
