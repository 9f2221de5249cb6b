"""MoE layer and the Foundation routers against hand-written references."""

import math

import pytest
import torch

from moex.config import MoEConfig
from moex.models.mlp import DenseMLP
from moex.models.moe import MoELayer
from moex.routers import REGISTRY, build_router
from moex.routers.moex import sparsity_logits


def layer(**kw):
    torch.manual_seed(0)
    cfg = MoEConfig(**{"num_experts": 4, "top_k": 2, "d_expert": 12, "router": "topk", **kw})
    return MoELayer(8, cfg, std=0.3)


def moe_loop_reference(m: MoELayer, x_TD):
    """y_t = sum over the router's choices of gate * expert(x_t), one token at a time."""
    r = m.router(x_TD, m.experts)
    y = torch.zeros_like(x_TD)
    for t, e, g in zip(r.token_A.tolist(), r.expert_A.tolist(), r.gate_A):
        h = m.experts.act(x_TD[t] @ m.experts.w1_EDH[e])
        y[t] = y[t] + g * (h @ m.experts.w2_EHD[e])
    return y


@pytest.mark.parametrize("router,act", [("topk", "relu"), ("topk", "gelu"), ("moex", "relu")])
def test_layer_matches_loop_reference(router, act):
    m = layer(router=router, activation=act)
    x = torch.randn(2, 5, 8, requires_grad=True)
    out = m(x)
    ref = moe_loop_reference(m, x.reshape(-1, 8)).reshape(2, 5, 8)
    torch.testing.assert_close(out.y, ref, rtol=1e-5, atol=1e-6)
    g = torch.randn_like(ref)
    gx, gw = torch.autograd.grad((out.y * g).sum(), (x, m.experts.w1_EDH))
    rx, rw = torch.autograd.grad((ref * g).sum(), (x, m.experts.w1_EDH))
    torch.testing.assert_close(gx, rx, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gw, rw, rtol=1e-5, atol=1e-6)


def test_one_expert_top1_equals_dense_relu_mlp():
    m = layer(num_experts=1, top_k=1)
    dense = DenseMLP(8, 12, "relu")
    with torch.no_grad():
        dense.fc.weight.copy_(m.experts.w1_EDH[0].T)
        dense.proj.weight.copy_(m.experts.w2_EHD[0].T)
    x = torch.randn(7, 8, requires_grad=True)
    y_moe, y_dense = m(x).y, dense(x).y
    torch.testing.assert_close(y_moe, y_dense)
    g = torch.randn_like(y_dense)
    (y_moe * g).sum().backward()
    gx_moe, x.grad = x.grad.clone(), None
    (y_dense * g).sum().backward()
    torch.testing.assert_close(gx_moe, x.grad)
    torch.testing.assert_close(m.experts.w1_EDH.grad[0], dense.fc.weight.grad.T)
    torch.testing.assert_close(m.experts.w2_EHD.grad[0], dense.proj.weight.grad.T)


@pytest.mark.parametrize("router", ["topk", "moex"])
def test_tokens_per_expert_sum_to_T_times_k(router):
    m = layer(router=router, num_experts=6, top_k=3)
    out = m(torch.randn(33, 8))
    assert out.stats["tokens_per_expert"].sum() == 33 * 3
    assert out.stats["dropped_frac"] == 0


def test_moex_gate_matches_hand_written_formula():
    torch.manual_seed(1)
    E, D, H = 3, 5, 7
    w1 = torch.randn(E, D, H)
    x = torch.randn(4, D)
    got = sparsity_logits(x, w1)
    for t in range(4):
        for j in range(E):
            mu = [sum(w1[j, d, h].item() for h in range(H)) / H for d in range(D)]
            var = [sum((w1[j, d, h].item() - mu[d]) ** 2 for h in range(H)) / H for d in range(D)]
            m = sum(mu[d] * x[t, d].item() for d in range(D))
            s = math.sqrt(sum(var[d] * x[t, d].item() ** 2 for d in range(D)))
            assert got[t, j].item() == pytest.approx(-math.erf(m / (math.sqrt(2) * s)), abs=1e-5)


def test_moex_router_prefers_the_sparser_expert():
    """Expert 0's encoder weights are mostly positive, expert 1's mostly negative: for a
    positive input expert 1 activates fewer ReLU units, so top-1 must pick it (a router
    with the sign backwards picks expert 0)."""
    torch.manual_seed(2)
    cfg = MoEConfig(num_experts=2, top_k=1, d_expert=64, router="moex")
    m = MoELayer(16, cfg)
    with torch.no_grad():
        m.experts.w1_EDH[0] = 0.5 + 0.3 * torch.randn(16, 64)
        m.experts.w1_EDH[1] = -0.5 + 0.3 * torch.randn(16, 64)
    x = torch.rand(10, 16) + 0.1
    r = m.router(x, m.experts)
    assert (r.expert_A == 1).all()
    active = [(x @ m.experts.w1_EDH[e] > 0).float().mean() for e in range(2)]
    assert active[1] < active[0]
    # and the logit is a monotone map of the expected active fraction Phi(mu/sigma)
    logits = sparsity_logits(x, m.experts.w1_EDH)
    assert (logits[:, 1] > logits[:, 0]).all()


def test_moex_topk_gates_are_softmax_over_selected_logits():
    m = layer(router="moex", top_k=2)
    x = torch.randn(6, 8)
    r = m.router(x, m.experts)
    logits = sparsity_logits(x, m.experts.w1_EDH)
    top, idx = logits.topk(2, -1)
    torch.testing.assert_close(r.gate_A, top.softmax(-1).reshape(-1))
    torch.testing.assert_close(r.expert_A, idx.reshape(-1))


def test_topk_switch_aux_loss_formula_and_gradient():
    m = layer(router="topk", top_k=1, aux_loss_coef=0.01, z_loss_coef=0.001)
    x = torch.randn(20, 8)
    r = m.router(x, m.experts)
    logits = m.router.gate(x)
    p = logits.softmax(-1)
    f = torch.bincount(p.argmax(-1), minlength=4).float() / 20
    torch.testing.assert_close(r.aux_losses["balance"], 0.01 * 4 * (f * p.mean(0)).sum())
    torch.testing.assert_close(r.aux_losses["z"], 0.001 * torch.logsumexp(logits, -1).square().mean())
    r.aux_losses["balance"].backward()
    assert m.router.gate.weight.grad.abs().sum() > 0
    # Switch keeps the raw probability as gate (k = 1)
    torch.testing.assert_close(r.gate_A, p.max(-1).values)


def test_capacity_factor_drops_and_counts():
    m = layer(router="topk", num_experts=4, top_k=1, capacity_factor=0.5)
    x = torch.randn(40, 8)
    out = m(x)
    cap = math.ceil(0.5 * 40 / 4)
    r = m.router(x, m.experts)
    load = torch.bincount(r.expert_A, minlength=4)
    torch.testing.assert_close(out.stats["tokens_per_expert"], load.float())  # router load, before dropping
    expected_dropped = (load - cap).clamp_min(0).sum().item()
    assert out.stats["dropped_frac"].item() == pytest.approx(expected_dropped / 40)
    # dropped tokens contribute nothing: a token dropped by its only expert has zero output
    dropless = layer(router="topk", num_experts=4, top_k=1)(x).y
    n_zero = (out.y.abs().sum(-1) == 0).sum().item()
    assert n_zero == expected_dropped and (dropless.abs().sum(-1) > 0).all()


def test_unknown_router_lists_valid():
    with pytest.raises(KeyError, match="valid routers: .*moex.*topk"):
        build_router("nope", d_model=8, cfg=MoEConfig())
    assert {"topk", "moex"} <= set(REGISTRY)


def test_moex_router_rejects_gelu_experts():
    with pytest.raises(ValueError, match="ReLU"):
        layer(router="moex", activation="gelu")
