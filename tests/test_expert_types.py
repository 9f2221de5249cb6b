"""Expert types (relu, gelu, relu2, swiglu) and shared experts against hand-written references."""

import pytest
import torch
import torch.nn.functional as F

from moex.config import MoEConfig
from moex.models.mlp import DenseMLP
from moex.models.moe import MoELayer
from moex.ops import activations, expert_mlp, expert_mlp_reference

ACTS = ["relu", "gelu", "relu2", "swiglu"]
BY_HAND = {  # each activation's code written out, independent of the table
    "relu": lambda a, b: torch.clamp(a, min=0),
    "gelu": lambda a, b: 0.5 * a * (1 + torch.erf(a / 2**0.5)),
    "relu2": lambda a, b: torch.clamp(a, min=0) ** 2,
    "swiglu": lambda a, b: a / (1 + torch.exp(-a)) * b,
}


def layer(act, backend="auto", **kw):
    torch.manual_seed(0)
    cfg = MoEConfig(**{"num_experts": 4, "top_k": 2, "d_expert": 12, "router": "topk", "activation": act,
                       "gemm_backend": backend, **kw})
    return MoELayer(8, cfg, std=0.3)


def loop_reference(m: MoELayer, x_TD):
    """y_t = sum over the router's choices of gate * w2 code(x_t), one assignment at a time."""
    r = m.router(x_TD, m.experts)
    y = torch.zeros_like(x_TD)
    ex = m.experts
    for t, e, g in zip(r.token_A.tolist(), r.expert_A.tolist(), r.gate_A):
        up = None if ex.w3_EDH is None else x_TD[t] @ ex.w3_EDH[e]
        y[t] = y[t] + g * (BY_HAND[ex.act_name](x_TD[t] @ ex.w1_EDH[e], up) @ ex.w2_EHD[e])
    return y


@pytest.mark.parametrize("act", ACTS)
def test_hidden_code_matches_hand_formula(act):
    a, b = torch.randn(5, 7), torch.randn(5, 7)
    torch.testing.assert_close(activations.hidden_code(act, a, b if act == "swiglu" else None), BY_HAND[act](a, b))


@pytest.mark.parametrize("act", ACTS)
def test_activation_grad_matches_autograd(act):
    pre = torch.randn(6, 5, dtype=torch.float64, requires_grad=True)
    g = torch.randn(6, 5, dtype=torch.float64)
    want, = torch.autograd.grad(activations.get(act).fn(pre), pre, g)
    torch.testing.assert_close(activations.get(act).grad(g, pre.detach()), want)


@pytest.mark.parametrize("backend", ["fused", "loop", "torch"])
@pytest.mark.parametrize("act", ACTS)
def test_layer_matches_loop_for_every_activation(act, backend):
    m = layer(act, backend)
    x = torch.randn(2, 5, 8, requires_grad=True)
    out = m(x)
    ref = loop_reference(m, x.reshape(-1, 8)).reshape(2, 5, 8)
    torch.testing.assert_close(out.y, ref, rtol=1e-5, atol=1e-6)
    params = [x] + [p for p in m.parameters()]
    g = torch.randn_like(ref)
    got = torch.autograd.grad((out.y * g).sum(), params)
    want = torch.autograd.grad((ref * g).sum(), params)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("act", ACTS)
def test_fused_op_matches_reference(act):
    g = torch.Generator().manual_seed(3)
    E, T, D, H, counts = 3, 6, 8, 5, [4, 0, 5]
    x = torch.randn(T, D, generator=g, dtype=torch.float64, requires_grad=True)
    tok = torch.randint(0, T, (sum(counts),), generator=g)
    gate = torch.rand(sum(counts), generator=g, dtype=torch.float64, requires_grad=True)
    w = [torch.randn(*s, generator=g, dtype=torch.float64, requires_grad=True) for s in ((E, D, H), (E, H, D), (E, D, H))]
    w3 = w[2] if act == "swiglu" else None
    inputs = [x, gate, w[0], w[1]] + ([w3] if w3 is not None else [])
    outs = []
    for fn, kw in ((expert_mlp, {"block_rows": 2}), (expert_mlp_reference, {})):
        y, h = fn(x, tok, gate, torch.tensor(counts), w[0], w[1], act, w3_EDH=w3, **kw)
        outs.append((y, h, *torch.autograd.grad(y, inputs, torch.ones_like(y) + y.detach())))
    for a, b in zip(*outs):
        torch.testing.assert_close(a, b)
    assert torch.autograd.gradcheck(
        lambda *t: expert_mlp(t[0], tok, t[1], torch.tensor(counts), t[2], t[3], act,
                              w3_EDH=t[4] if w3 is not None else None, block_rows=2)[0], tuple(inputs))


def test_fused_op_rejects_missing_or_extra_w3():
    x, tok, gate, counts = torch.randn(2, 4), torch.tensor([0, 1]), torch.ones(2), torch.tensor([2])
    w1, w2 = torch.randn(1, 4, 3), torch.randn(1, 3, 4)
    with pytest.raises(ValueError, match="needs w3_EDH"):
        expert_mlp(x, tok, gate, counts, w1, w2, "swiglu")
    with pytest.raises(ValueError, match="not gated"):
        expert_mlp(x, tok, gate, counts, w1, w2, "relu", w3_EDH=w1)


@pytest.mark.parametrize("backend", ["fused", "loop"])
@pytest.mark.parametrize("act", ACTS)
def test_one_expert_top1_equals_dense_block(act, backend):
    m = layer(act, backend, num_experts=1, top_k=1)
    dense = DenseMLP(8, 12, act)
    with torch.no_grad():
        dense.fc.weight.copy_(m.experts.w1_EDH[0].T)
        dense.proj.weight.copy_(m.experts.w2_EHD[0].T)
        if act == "swiglu":
            dense.up.weight.copy_(m.experts.w3_EDH[0].T)
    x = torch.randn(7, 8, requires_grad=True)
    y_moe, y_dense = m(x).y, dense(x).y
    torch.testing.assert_close(y_moe, y_dense)
    g = torch.randn_like(y_dense)
    gx_moe, gw1_moe = torch.autograd.grad((y_moe * g).sum(), (x, m.experts.w1_EDH))
    gx_d, gfc = torch.autograd.grad((y_dense * g).sum(), (x, dense.fc.weight))
    torch.testing.assert_close(gx_moe, gx_d)
    torch.testing.assert_close(gw1_moe[0], gfc.T)


@pytest.mark.parametrize("gate", [False, True])
@pytest.mark.parametrize("act", ["relu", "swiglu"])
def test_shared_experts_equal_adding_a_dense_mlp_by_hand(act, gate):
    m = layer(act, num_shared_experts=2, d_shared_expert=6, shared_expert_gate=gate)
    assert m.shared.mlp.fc.weight.shape == (12, 8)  # two experts of 6 units = one MLP of 12
    x = torch.randn(9, 8)
    routed = loop_reference(m, x)
    s = m.shared.mlp
    up = None if s.up is None else x @ s.up.weight.T
    shared = BY_HAND[act](x @ s.fc.weight.T, up) @ s.proj.weight.T
    if gate:
        shared = shared / (1 + torch.exp(-(x @ m.shared.gate.weight.T)))
    torch.testing.assert_close(m(x).y, routed + shared, rtol=1e-5, atol=1e-6)


def test_moex_router_rejects_non_relu_experts():
    with pytest.raises(ValueError, match="ReLU"):
        layer("swiglu", router="moex")
