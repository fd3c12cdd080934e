"""The fast SAC keeps SAC's numbers: the batched twin critic against two separate critics, the
transposed narrow products against the plain ones, one update against a plainly written SAC step
(two ``nn.Linear`` critics, unfused Adam, the temperature by autograd), and checkpoints (exact
resume; a state saved by unfused optimizers loads into the fused ones)."""

from __future__ import annotations

import io

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mbrl.dynamics.base import Transitions
from mbrl.learners import SAC
from mbrl.learners.networks import EnsembleLinear, EnsembleMLP

torch.set_num_threads(1)
X, U, H = 5, 3, 32
LOW, HIGH = [-2.0, 0.0, -1.0], [2.0, 1.0, 1.0]
IGNORED = (0,)  # a position feature the networks never read
KEPT = [1, 2, 3, 4]


def make(**kw) -> SAC:
    kw = {"hidden_size": H, "num_layers": 2, "seed": 3, "ignored_obs": IGNORED, **kw}
    return SAC(X, U, LOW, HIGH, target_entropy=-1.0, **kw)


def batch(n: int = 64, seed: int = 0) -> Transitions:
    g = torch.Generator().manual_seed(seed)
    low, high = torch.tensor(LOW), torch.tensor(HIGH)
    return Transitions(
        obs=torch.randn(n, X, generator=g),
        act=low + (high - low) * torch.rand(n, U, generator=g),
        next_obs=torch.randn(n, X, generator=g),
        reward=torch.randn(n, generator=g),
        terminated=torch.rand(n, generator=g) < 0.2,
    )


def member_mlp(net: EnsembleMLP, e: int) -> nn.Sequential:
    """Member ``e`` of ``net`` as a plain ``nn.Linear``/``nn.ReLU`` stack with its weights."""
    layers: list[nn.Module] = []
    for m in net.net:
        if isinstance(m, EnsembleLinear):
            lin = nn.Linear(m.weight.shape[1], m.weight.shape[2])
            with torch.no_grad():
                lin.weight.copy_(m.weight[e].T)
                lin.bias.copy_(m.bias[e, 0])
            layers.append(lin)
        else:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


def assert_member(net: EnsembleMLP, e: int, seq: nn.Sequential, atol: float, grad: bool = False):
    """Member ``e`` of ``net`` equals ``seq`` (weights, or their gradients with ``grad``)."""
    ours = [m for m in net.net if isinstance(m, EnsembleLinear)]
    theirs = [m for m in seq if isinstance(m, nn.Linear)]
    if grad:
        mine = [(m.weight.grad[e], m.bias.grad[e, 0]) for m in ours]
        ref = [(m.weight.grad.T, m.bias.grad) for m in theirs]
    else:
        mine = [(m.weight[e], m.bias[e, 0]) for m in ours]
        ref = [(m.weight.T, m.bias) for m in theirs]
    for (w, b), (rw, rb) in zip(mine, ref, strict=True):
        torch.testing.assert_close(w, rw, rtol=1e-5, atol=atol)
        torch.testing.assert_close(b, rb, rtol=1e-5, atol=atol)


@pytest.mark.parametrize("out_dim, in_dim", [(1, 40), (6, 40), (40, 7), (40, 40), (3, 5)])
@pytest.mark.parametrize("members", [1, 2])
def test_narrow_products_equal_the_plain_ones(out_dim, in_dim, members):
    g = torch.Generator().manual_seed(0)
    plain = EnsembleLinear(members, in_dim, out_dim, g)
    fast = EnsembleLinear(members, in_dim, out_dim, None, narrow=True)
    fast.load_state_dict(plain.state_dict())
    assert fast.transposed == (min(in_dim, out_dim) < 16)
    x = torch.randn(members, 50, in_dim, generator=g)
    grad_out = torch.randn(members, 50, out_dim, generator=g)
    outs = []
    for layer in (plain, fast):
        xi = x.clone().requires_grad_()
        y = layer(xi)
        y.backward(grad_out)
        outs.append((y.detach(), xi.grad, layer.weight.grad, layer.bias.grad))
    for a, b in zip(*outs, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    with torch.inference_mode():  # the planning and rollout path: no graph
        torch.testing.assert_close(fast(x), outs[0][0], rtol=1e-5, atol=1e-5)
    xi = x.clone()  # an input that needs no gradient gets none, the weights still do
    fast.weight.grad = None
    fast(xi).backward(grad_out)
    torch.testing.assert_close(fast.weight.grad, outs[0][2], rtol=1e-5, atol=1e-5)


def test_batched_twin_critic_equals_two_separate_critics():
    sac = make()
    q1, q2 = member_mlp(sac.critic, 0), member_mlp(sac.critic, 1)
    b = batch()
    act = sac.scale.to_unit(b.act).requires_grad_()
    q = sac.q(b.obs, act)  # [2, B]
    inputs = torch.cat([b.obs[:, KEPT], act], -1)
    ref = torch.stack([q1(inputs).squeeze(-1), q2(inputs).squeeze(-1)])
    torch.testing.assert_close(q, ref, rtol=1e-5, atol=1e-6)
    # the gradient the actor step takes through min_j Q_j, and the critic step's weight gradients
    (g_act,) = torch.autograd.grad(q.min(0).values.sum(), act, retain_graph=True)
    (g_ref,) = torch.autograd.grad(ref.min(0).values.sum(), act, retain_graph=True)
    torch.testing.assert_close(g_act, g_ref, rtol=1e-5, atol=1e-6)
    target = torch.randn(len(b))
    (q - target).pow(2).mean(-1).sum().backward()
    (F.mse_loss(ref[0], target) + F.mse_loss(ref[1], target)).backward()
    assert_member(sac.critic, 0, q1, atol=1e-6, grad=True)
    assert_member(sac.critic, 1, q2, atol=1e-6, grad=True)


class PlainSAC:
    """The SAC step written plainly on a copy of ``sac``'s weights: the actor and two critics
    as ``nn.Linear`` stacks, unfused ``torch.optim.Adam``, the temperature loss by autograd,
    Polyak averaging parameter by parameter. Draws its noise from ``sac``'s generator state."""

    def __init__(self, sac: SAC, lr: float = 3e-4) -> None:
        self.sac = sac
        self.actor = member_mlp(sac.actor, 0)
        self.q = [member_mlp(sac.critic, e) for e in (0, 1)]
        self.q_target = [member_mlp(sac.critic_target, e) for e in (0, 1)]
        self.log_alpha = sac.log_alpha.detach().clone().requires_grad_()
        self.actor_opt = torch.optim.Adam(self.actor.parameters(), lr=lr, foreach=False)
        critic_params = [p for q in self.q for p in q.parameters()]
        self.critic_opt = torch.optim.Adam(critic_params, lr=lr, foreach=False)
        self.alpha_opt = torch.optim.Adam([self.log_alpha], lr=lr, foreach=False)
        self.generator = torch.Generator().manual_seed(0)
        self.generator.set_state(sac.generator.get_state())

    def sample(self, obs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mean, log_std = self.actor(obs[:, KEPT]).chunk(2, dim=-1)
        log_std = log_std.clamp(-20.0, 2.0)
        u = mean + log_std.exp() * torch.randn(mean.shape, generator=self.generator)
        a = torch.tanh(u)
        normal = torch.distributions.Normal(mean, log_std.exp())
        return a, (normal.log_prob(u) - torch.log1p(-a.pow(2))).sum(-1)

    def critics(self, nets: list[nn.Sequential], obs, act_unit) -> torch.Tensor:
        x = torch.cat([obs[:, KEPT], act_unit], -1)
        return torch.stack([q(x).squeeze(-1) for q in nets])  # [2, B]

    def update(self, b: Transitions) -> dict[str, float]:
        s = self.sac
        alpha = self.log_alpha.detach().exp()
        with torch.no_grad():
            a2, logp2 = self.sample(b.next_obs)
            v = self.critics(self.q_target, b.next_obs, a2).min(0).values - alpha * logp2
            target = b.reward + s.gamma * (1.0 - b.terminated.float()) * v
        q = self.critics(self.q, b.obs, s.scale.to_unit(b.act))
        q_loss = F.mse_loss(q[0], target) + F.mse_loss(q[1], target)
        self.critic_opt.zero_grad()
        q_loss.backward()
        self.critic_opt.step()
        a, logp = self.sample(b.obs)
        for net in self.q:
            net.requires_grad_(False)
        q_pi = self.critics(self.q, b.obs, a).min(0).values
        for net in self.q:
            net.requires_grad_(True)
        actor_loss = (alpha * logp - q_pi).mean()
        self.actor_opt.zero_grad()
        actor_loss.backward()
        self.actor_opt.step()
        alpha_loss = -(self.log_alpha * (logp.detach() + s.target_entropy)).mean()
        self.alpha_opt.zero_grad()
        alpha_loss.backward()
        self.alpha_opt.step()
        with torch.no_grad():
            for net, tgt in zip(self.q, self.q_target, strict=True):
                for p, pt in zip(net.parameters(), tgt.parameters(), strict=True):
                    pt.mul_(1 - s.tau).add_(s.tau * p)
        return {
            "q_loss": q_loss.item(),
            "actor_loss": actor_loss.item(),
            "alpha": self.log_alpha.exp().item(),
            "alpha_loss": alpha_loss.item(),
            "entropy": -logp.mean().item(),
            "q_mean": q.mean().item(),
            "q_abs_max": q.abs().max().item(),
        }


def test_update_equals_the_plain_sac_step():
    sac = make()
    plain = PlainSAC(sac)
    for seed in range(3):
        b = batch(seed=seed)
        stats, ref = sac.update(b), plain.update(b)
        assert stats.keys() == ref.keys()
        for k in stats:
            assert stats[k] == pytest.approx(ref[k], rel=1e-5, abs=1e-6), (seed, k)
    # gradients of the last step, then the weights after it
    assert_member(sac.critic, 0, plain.q[0], atol=1e-6, grad=True)
    assert_member(sac.critic, 1, plain.q[1], atol=1e-6, grad=True)
    assert_member(sac.actor, 0, plain.actor, atol=1e-6, grad=True)
    for e in (0, 1):
        assert_member(sac.critic, e, plain.q[e], atol=1e-6)
        assert_member(sac.critic_target, e, plain.q_target[e], atol=1e-6)
    assert_member(sac.actor, 0, plain.actor, atol=1e-6)
    torch.testing.assert_close(sac.log_alpha.detach(), plain.log_alpha.detach())
    assert torch.equal(sac.generator.get_state(), plain.generator.get_state())  # same draws


def test_fixed_temperature_stays_and_reports_its_loss():
    sac = make(learn_alpha=False, init_alpha=0.2)
    stats = sac.update(batch())
    assert sac.alpha.item() == pytest.approx(0.2)
    mean_logp = -stats["entropy"]
    assert stats["alpha_loss"] == pytest.approx(-torch.tensor(0.2).log().item() * (mean_logp - 1))


def _roundtrip(state: dict) -> dict:
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


STATE_KEYS = {
    "actor", "critic", "critic_target", "log_alpha", "actor_opt", "critic_opt", "alpha_opt",
    "generator", "updates",
}  # fmt: skip


def test_checkpoint_layout_and_exact_resume():
    batches = [batch(seed=s) for s in range(6)]
    a = make()
    for b in batches[:3]:
        a.update(b)
    state = _roundtrip(a.state_dict())
    assert set(state) == STATE_KEYS
    assert set(state["critic"]) == {f"net.{i}.{w}" for i in (0, 2, 4) for w in ("weight", "bias")}
    assert state["critic"]["net.0.weight"].shape == (2, X - 1 + U, H)  # members lead
    b = make(seed=11)
    b.load_state_dict(state)
    rest_a = [a.update(x) for x in batches[3:]]
    rest_b = [b.update(x) for x in batches[3:]]
    assert rest_a == rest_b
    for p, q in zip(
        a.state_dict()["critic"].values(), b.state_dict()["critic"].values(), strict=True
    ):
        assert torch.equal(p, q)


def test_state_of_unfused_optimizers_loads_fused():
    """A state saved before the optimizers were fused (plain ``torch.optim.Adam``) loads: the
    fused optimizers take its moments and step counts and continue as the plain ones do."""
    old = make()
    old.actor_opt = torch.optim.Adam(old.actor.parameters(), lr=3e-4)
    old.critic_opt = torch.optim.Adam(old.critic.parameters(), lr=3e-4)
    old.alpha_opt = torch.optim.Adam([old.log_alpha], lr=3e-4)
    for s in range(3):
        old.update(batch(seed=s))
    state = _roundtrip(old.state_dict())
    assert state["critic_opt"]["param_groups"][0]["fused"] is None
    new = make(seed=5)
    new.load_state_dict(state)
    for name in ("actor_opt", "critic_opt", "alpha_opt"):
        opt = getattr(new, name)
        assert opt.param_groups[0]["fused"] is True
        for p, saved in zip(
            opt.param_groups[0]["params"], state[name]["state"].values(), strict=True
        ):
            torch.testing.assert_close(opt.state[p]["exp_avg_sq"], saved["exp_avg_sq"])
            assert opt.state[p]["step"].item() == 3
    b = batch(seed=7)
    s_old, s_new = old.update(b), new.update(b)
    for k in s_old:
        assert s_new[k] == pytest.approx(s_old[k], rel=1e-5, abs=1e-6), k
    for p, q in zip(old.critic.parameters(), new.critic.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
