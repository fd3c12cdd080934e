"""PlaNet's RSSM: the layers against their definitions, the filter and rollout seams, the loss
terms (KL, free nats, balancing), learning on a toy video, exact checkpoints, bf16 rollouts,
the learned reward as iLQR's stage cost, and bad input."""

from __future__ import annotations

import io

import pytest
import torch
import torch.nn.functional as F

from mbrl.data import Sequences, Transitions
from mbrl.dynamics import (
    RSSM,
    Belief,
    DifferentiableModel,
    DynamicsModel,
    Filter,
    FitError,
    LatentRewardCost,
)
from mbrl.dynamics.latent import ConvDecoder, ConvEncoder, decoder_kernels, encoder_sizes
from mbrl.dynamics.rssm import _kl
from mbrl.planners import CEM, MPPI, PlanningProblem
from mbrl.planners.base import StageCost
from mbrl.planners.derivatives import finite_difference_jacobians
from mbrl.shapes import ShapeError

torch.set_num_threads(1)

IMAGE = (3, 16, 16)
TINY = dict(deterministic=12, stochastic=4, hidden=16, depth=4, conv_layers=2)


def tiny(**kw) -> RSSM:
    return RSSM(IMAGE, 1, **{**TINY, **kw})


def moving_square(batch: int, steps: int, seed: int = 0) -> Sequences:
    """A white 4 x 4 square moved by the action (one pixel per unit) on a black 16 x 16 image;
    the reward is the square's column after the step, scaled to [0, 1]."""
    g = torch.Generator().manual_seed(seed)
    act = torch.randint(-1, 2, (batch, steps, 1), generator=g).float()
    col = torch.randint(2, 10, (batch,), generator=g)
    cols = [col]
    for t in range(steps):
        cols.append((cols[-1] + act[:, t, 0].long()).clamp(0, 12))
    cols = torch.stack(cols, 1)  # [B, L + 1]
    obs = torch.zeros(batch, steps + 1, *IMAGE, dtype=torch.uint8)
    for b in range(batch):
        for t in range(steps + 1):
            c = int(cols[b, t])
            obs[b, t, :, 6:10, c : c + 4] = 255
    reward = cols[:, 1:].float() / 12
    return Sequences(
        obs, act, reward, torch.zeros(batch, steps, dtype=torch.bool),
        torch.arange(steps).expand(batch, -1),
    )  # fmt: skip


def problem(model, horizon=4, particles=1, seed=0, **kw) -> PlanningProblem:
    def no_reward(*_):
        raise AssertionError("the model's own reward must be used")

    return PlanningProblem(
        model, no_reward, None, horizon, -torch.ones(1), torch.ones(1), particles,
        torch.Generator().manual_seed(seed), **kw,
    )  # fmt: skip


# ------------------------------------------------------------------ the layers


def test_planet_sizes_at_64_pixels():
    assert decoder_kernels((64, 64), 4) == [(5, 5), (5, 5), (6, 6), (6, 6)]  # PlaNet's
    assert encoder_sizes((64, 64), 4)[-1] == (2, 2)
    enc = ConvEncoder(3, (64, 64), 32, 4)
    assert enc.out_dim == 1024 and enc(torch.zeros(2, 3, 64, 64)).shape == (2, 1024)
    dec = ConvDecoder(230, 3, (64, 64), 32, 4)
    assert dec(torch.zeros(2, 230)).shape == (2, 3, 64, 64)
    channels = [m.out_channels for m in dec.net if hasattr(m, "out_channels")]
    assert dec.width == 1024 and dec.first.out_channels == 128 and channels == [64, 32, 3]


def test_other_sizes_get_kernels_that_reach_them_or_a_clear_error():
    for size, layers in (((16, 16), 2), ((32, 48), 3), ((64, 64), 3)):
        dec = ConvDecoder(8, 6, size, 2, layers)
        assert dec(torch.zeros(1, 8)).shape == (1, 6, *size)
    with pytest.raises(ValueError, match="too small for 4 convolutions.*conv_layers <= 2"):
        ConvEncoder(3, (16, 16), 4, 4)


def test_first_decoder_layer_as_a_matmul_equals_the_transposed_convolution():
    dec = ConvDecoder(10, 3, (16, 16), 2, 2)
    f = torch.randn(5, 10)
    x = dec.dense(f).view(-1, dec.width, 1, 1)
    reference = dec.net(dec.first(x))
    assert torch.allclose(dec(f), reference, atol=1e-5)


def test_written_out_gru_equals_torch_gru_cell():
    model = tiny()
    h, s, a = torch.randn(7, 12), torch.randn(7, 4), torch.randn(7, 1)
    cells = model.cells
    reference = cells.cell(F.elu(cells.embed(torch.cat([s, a], -1))), h)
    assert torch.allclose(cells.transition(h, s, a), reference, atol=1e-6)


def test_kl_equals_torch_distributions():
    qm, pm = torch.randn(3, 5), torch.randn(3, 5)
    qs, ps = torch.rand(3, 5) + 0.1, torch.rand(3, 5) + 0.1
    N = torch.distributions.Normal
    reference = torch.distributions.kl_divergence(N(qm, qs), N(pm, ps)).sum(-1)
    assert torch.allclose(_kl(qm, qs, pm, ps), reference, atol=1e-5)


# ------------------------------------------------------------------ the seams


def test_rssm_is_a_filter_and_a_differentiable_dynamics_model():
    model = tiny()
    assert isinstance(model, DynamicsModel) and isinstance(model, Filter)
    assert isinstance(model, DifferentiableModel) and model.learns_reward
    assert model.obs_dim == 16  # planning rows are [h, s]


def test_filter_rollout_and_predict_shapes():
    model = tiny()
    chunks = moving_square(2, 3)
    belief = model.reset_belief(2)
    assert torch.equal(belief.mean, torch.zeros(2, 16))
    belief = model.observe(belief, chunks.obs[:, 0], None)
    belief = model.observe(belief, chunks.obs[:, 1], chunks.act[:, 0])
    assert belief.mean.shape == (2, 16) and belief.hidden.shape == (2, 8)
    assert bool((belief.hidden[:, 4:] >= 0.1).all())  # posterior std >= min_std
    g = torch.Generator().manual_seed(0)
    state = model.rollout_start(belief, 3, g)
    assert state.obs.shape == (6, 16) and torch.equal(state.obs[0], state.obs[2])
    nxt = model.rollout_step(state, torch.zeros(6, 1), g)
    assert nxt.obs.shape == (6, 16) and nxt.reward.shape == (6,)
    assert not torch.equal(nxt.obs[0], nxt.obs[1])  # one prior sample per row
    pred = model.predict(belief.mean, torch.zeros(2, 1))
    assert pred.mean.shape == pred.var.shape == (2, 16) and pred.reward_mean.shape == (2,)
    assert torch.equal(pred.var[:, :12], torch.zeros(2, 12))  # h is deterministic


def test_rollouts_are_reproducible_under_the_generator():
    model = tiny()
    belief = model.observe(model.reset_belief(1), moving_square(1, 1).obs[:, 0], None)
    runs = []
    for _ in range(2):
        g = torch.Generator().manual_seed(5)
        state = model.rollout_start(belief, 4, g)
        for _ in range(3):
            state = model.rollout_step(state, torch.ones(4, 1), g)
        runs.append(state.obs)
    assert torch.equal(runs[0], runs[1])


def test_planners_plan_from_the_belief_with_the_learned_reward():
    model = tiny()
    belief = model.observe(model.reset_belief(1), moving_square(1, 1).obs[:, 0], None)
    for planner in (CEM(population=30, iterations=2), MPPI(population=30, iterations=2)):
        plan = planner.plan(problem(model, particles=2), belief)
        assert plan.actions.shape == (4, 1) and plan.ok and plan.nonfinite == 0
    returns = problem(model).evaluate(belief, torch.zeros(5, 4, 1))
    assert returns.shape == (5,) and bool(torch.isfinite(returns).all())


# ------------------------------------------------------------------ training


def test_update_reports_the_terms_and_free_nats_freeze_the_prior():
    model = tiny(free_nats=1e6)  # every KL is below the free nats: the prior gets no gradient
    prior = [p.detach().clone() for p in model.cells.prior_net.parameters()]
    losses = model.update(moving_square(4, 5), torch.Generator().manual_seed(0))
    assert set(losses.terms) == {"recon_loss", "reward_loss", "kl_loss"}
    assert losses.total == pytest.approx(
        losses.terms["recon_loss"] + losses.terms["reward_loss"] + 1e6, rel=1e-6
    )
    for before, after in zip(prior, model.cells.prior_net.parameters(), strict=True):
        assert torch.equal(before, after)
    assert not torch.equal(model.decoder.dense.weight, tiny().decoder.dense.weight)  # trained


def test_kl_balance_keeps_the_loss_value_and_splits_the_gradient():
    chunks, gen = moving_square(4, 5), lambda: torch.Generator().manual_seed(0)
    plain, balanced = tiny(free_nats=0.0), tiny(free_nats=0.0, kl_balance=0.8)
    a, b = plain.update(chunks, gen()), balanced.update(chunks, gen())
    assert a.total == pytest.approx(b.total, rel=1e-6)  # stop-gradients change no value
    with pytest.raises(ValueError, match="kl_balance"):
        tiny(kl_balance=1.0)


def test_learns_a_moving_square_and_its_reward():
    model = tiny(lr=3e-3, free_nats=1.0)
    data = moving_square(16, 8)
    g = torch.Generator().manual_seed(0)
    first = model.update(data, g)
    for _ in range(300):
        last = model.update(data, g)
    assert last.terms["recon_loss"] < 0.05 * first.terms["recon_loss"]
    assert last.terms["reward_loss"] < 0.05 * first.terms["reward_loss"]
    # open loop: 3 frames filtered, 6 predicted from the actions; the predictions beat holding
    # the last filtered frame still by 2x (it learned how the actions move the square)
    frames = model.open_loop(data.obs[:8], data.act[:8], 3)
    assert frames.shape == (8, 9, *IMAGE)
    truth = data.obs[:8].float() / 255 - 0.5
    err = (frames[:, 3:] - truth[:, 3:]).square().mean()
    hold = (truth[:, 2:3] - truth[:, 3:]).square().mean()
    assert float(err) < 0.5 * float(hold)


def test_same_seed_same_model_and_checkpoints_resume_training_exactly():
    data = moving_square(4, 5)
    a, b = tiny(seed=3), tiny(seed=3)
    for p, q in zip(a.parameters(), b.parameters(), strict=True):
        assert torch.equal(p, q)
    a.update(data, torch.Generator().manual_seed(1))
    buf = io.BytesIO()
    torch.save(a.state_dict(), buf)
    buf.seek(0)
    c = tiny(seed=9)
    c.load_state_dict(torch.load(buf, weights_only=True))
    la, lc = a.update(data), c.update(data)  # optimizer moments and generator included
    assert la.total == lc.total
    for p, q in zip(a.parameters(), c.parameters(), strict=True):
        assert torch.equal(p, q)


def test_bfloat16_rollouts_follow_float32_and_refresh_after_an_update():
    model = tiny()
    belief = model.observe(model.reset_belief(1), moving_square(1, 1).obs[:, 0], None)
    acts = torch.rand(8, 4, 1) * 2 - 1
    full = problem(model).evaluate(belief, acts)
    model.planning_dtype = torch.bfloat16
    half = problem(model).evaluate(belief, acts)
    assert torch.allclose(half, full, atol=0.05 * float(full.abs().max()) + 0.02)
    model.update(moving_square(4, 5))
    after = problem(model).evaluate(belief, acts)
    assert not torch.equal(after, half)  # the bfloat16 copy follows the new weights
    model.planning_dtype = torch.float32
    assert torch.allclose(after, problem(model).evaluate(belief, acts), atol=0.05)
    with pytest.raises(ValueError, match="planning_dtype"):
        model.planning_dtype = torch.float16


# ------------------------------------------------------------------ gradient planning


def test_mean_dynamics_and_learned_reward_cost_have_the_right_derivatives():
    model = tiny()
    x, u = torch.randn(3, 16, dtype=torch.float64), torch.randn(3, 1, dtype=torch.float64)
    model.double()
    step = model.mean_dynamics
    fa, fb = finite_difference_jacobians(step, x, u, eps=1e-6)
    from mbrl.planners.derivatives import dynamics_jacobians

    ja, jb = dynamics_jacobians(model, x, u)
    assert torch.allclose(ja, fa, atol=1e-6) and torch.allclose(jb, fb, atol=1e-6)
    cost = model.stage_cost()
    assert isinstance(cost, LatentRewardCost) and isinstance(cost, StageCost)
    t = torch.zeros(3, dtype=torch.long)
    ex = cost.expansion(x, u, t)
    assert torch.allclose(ex.cost, -model.stage_reward(x, u).detach())
    eps = 1e-6
    z = torch.cat([x, u], -1)
    for i in (0, 5, 16):
        d = torch.zeros_like(z)
        d[:, i] = eps
        plus = cost.cost((z + d)[:, :16], (z + d)[:, 16:], t)
        minus = cost.cost((z - d)[:, :16], (z - d)[:, 16:], t)
        assert torch.allclose((plus - minus) / (2 * eps), ex.grad[:, i], atol=1e-6)
    assert torch.equal(cost.terminal_cost(x), torch.zeros(3, dtype=torch.float64))


# ------------------------------------------------------------------ bad input


def test_bad_images_chunks_and_data_are_refused_with_the_fix():
    model = tiny()
    chunks = moving_square(2, 3)
    with pytest.raises(ValueError, match="uint8"):
        model.observe(model.reset_belief(2), chunks.obs[:, 0].float(), None)
    with pytest.raises(ValueError, match=r"\[\.\.\., 3, 16, 16\].*\[2, 3, 32, 32\]"):
        model.observe(model.reset_belief(2), torch.zeros(2, 3, 32, 32, dtype=torch.uint8), None)
    with pytest.raises(ShapeError, match="belief.mean"):
        model.observe(Belief(torch.zeros(2, 5)), chunks.obs[:, 0], None)
    with pytest.raises(TypeError, match="Sequences"):
        model.fit(Transitions(*(torch.zeros(2, 1) for _ in range(5))))
    obs, act, reward, term, time = (
        chunks.obs, chunks.act, chunks.reward, chunks.terminated, chunks.time
    )  # fmt: skip
    with pytest.raises(ValueError, match="NaN"):
        model.update(Sequences(obs, act, reward * float("nan"), term, time))
    with pytest.raises(ShapeError, match="chunks.act"):
        model.update(Sequences(obs, act[..., 0], reward, term, time))
    with pytest.raises(ValueError, match="conv_layers"):
        RSSM((3, 16, 16), 1, conv_layers=4)
    with pytest.raises(ValueError, match="stochastic must be an int >= 1"):
        RSSM(IMAGE, 1, stochastic=0, conv_layers=2)


def test_a_diverging_update_raises_and_changes_nothing():
    model = tiny()
    with torch.no_grad():
        model.decoder.dense.bias.fill_(float("inf"))
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(FitError, match="RSSM update diverged.*lr="):
        model.update(moving_square(2, 3))
    for p, q in zip(before, model.parameters(), strict=True):
        assert torch.equal(p, q)
    assert not model.optimizer.state  # no step was taken
