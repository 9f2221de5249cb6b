"""Expert-choice, aux-loss-free and hash routers against hand-written references."""

import math

import torch

from moex.config import MoEConfig
from moex.models.moe import MoELayer
from moex.routers import build_router
from moex.routers.expert_choice import expert_capacity


def cfg(**kw):
    return MoEConfig(**{"num_experts": 4, "top_k": 2, "d_expert": 8, **kw})


def test_expert_choice_capacity_and_reference():
    torch.manual_seed(0)
    c = cfg(router="expert_choice", num_experts=4, top_k=2, capacity_factor=None)
    r = build_router("expert_choice", d_model=6, cfg=c).train()
    x = torch.randn(10, 6)
    out = r(x)
    C = expert_capacity(10, 2, 4, None)
    assert C == math.ceil(10 * 2 / 4) == 5
    assert torch.equal(torch.bincount(out.expert_A, minlength=4), torch.full((4,), C))  # capacity respected exactly
    probs = (x @ r.gate.weight.T).softmax(-1)
    for e in range(4):  # each expert's tokens are its top-C scores; gate = that score
        mine = out.token_A[out.expert_A == e]
        want = set(probs[:, e].topk(C).indices.tolist())
        assert set(mine.tolist()) == want
        torch.testing.assert_close(out.gate_A[out.expert_A == e], probs[mine, e])
    assert len(set(zip(out.token_A.tolist(), out.expert_A.tolist()))) == out.token_A.numel()  # no duplicates


def test_expert_choice_capacity_factor_and_eval_is_causal_token_choice():
    torch.manual_seed(1)
    r = build_router("expert_choice", d_model=6, cfg=cfg(router="expert_choice", capacity_factor=0.5)).train()
    x = torch.randn(12, 6)
    assert torch.bincount(r(x).expert_A, minlength=4).max() == math.ceil(0.5 * 12 * 2 / 4)
    r.eval()
    out = r(x)
    assert torch.equal(torch.bincount(out.token_A), torch.full((12,), 2))  # every token gets k experts
    # causal: a token's routing does not change when later tokens change
    x2 = x.clone()
    x2[6:] = torch.randn(6, 6)
    out2 = r(x2)
    torch.testing.assert_close(out.expert_A[:12], out2.expert_A[:12])


def test_expert_choice_through_moe_layer_trains():
    torch.manual_seed(2)
    m = MoELayer(8, cfg(router="expert_choice"), std=0.3)
    x = torch.randn(3, 7, 8, requires_grad=True)
    o = m(x)
    o.y.square().sum().backward()
    assert m.router.gate.weight.grad.abs().sum() > 0
    assert o.stats["tokens_per_expert"].sum() == 4 * math.ceil(21 * 2 / 4)


def test_aux_free_gates_and_bias_only_steers_selection():
    torch.manual_seed(3)
    r = build_router("aux_free", d_model=6, cfg=cfg(router="aux_free", num_experts=5, top_k=2)).train()
    x = torch.randn(9, 6)
    with torch.no_grad():
        r.bias_E.copy_(torch.tensor([0.0, 10.0, 0.0, 0.0, 10.0]))  # force experts 1 and 4
    out = r(x)
    assert set(out.expert_A.tolist()) == {1, 4}
    s = torch.sigmoid(x @ r.gate.weight.T)
    want = s[:, [1, 4]] / s[:, [1, 4]].sum(-1, keepdim=True)
    got = torch.zeros(9, 5)
    got[out.token_A, out.expert_A] = out.gate_A
    torch.testing.assert_close(got[:, [1, 4]], want)
    assert "bias_E" in r.state_dict() and "load_E" not in r.state_dict()


def test_aux_free_bias_moves_toward_balance():
    torch.manual_seed(4)
    E, D = 4, 8
    r = build_router("aux_free", d_model=D, cfg=cfg(router="aux_free", num_experts=E, top_k=1, bias_update_rate=0.05))
    r.train()
    with torch.no_grad():  # skewed router: expert 0 strongly preferred
        r.gate.weight.zero_()
        r.gate.weight[0, 0] = 3.0
        r.gate.weight[1:, 1:4] = torch.eye(3) * 0.5
    def max_load():
        x = torch.randn(512, D, generator=torch.Generator().manual_seed(99))
        x[:, 0] = x[:, 0].abs() + 0.5
        with torch.no_grad():
            out = r(x)
        r.load_E.zero_()
        return torch.bincount(out.expert_A, minlength=E).max().item()
    before = max_load()
    for step in range(60):
        x = torch.randn(256, D)
        x[:, 0] = x[:, 0].abs() + 0.5
        r(x)
        r(x)  # two micro-batches per step: load accumulates
        load = r.load_E.clone()
        b0 = r.bias_E.clone()
        r.post_step()
        torch.testing.assert_close(r.bias_E, b0 + 0.05 * torch.sign(load.mean() - load))
        assert r.load_E.sum() == 0
    after = max_load()
    assert before > 400 and after < 0.6 * before
    assert r.bias_E[0] < 0


def test_hash_router_is_fixed_and_uniform():
    torch.manual_seed(5)
    r = build_router("hash", d_model=6, cfg=cfg(router="hash", num_experts=6, top_k=3))
    x = torch.randn(11, 6)
    out = r(x)
    want = (x @ r.proj_DE).topk(3, dim=-1).indices.reshape(-1)
    assert torch.equal(out.expert_A, want)
    torch.testing.assert_close(out.gate_A, torch.full((33,), 1 / 3))
    assert not list(r.parameters()) and "proj_DE" in r.state_dict()
    m = MoELayer(6, cfg(router="hash", num_experts=6, top_k=3), std=0.3)
    m(x).y.sum().backward()
    assert m.experts.w1_EDH.grad is not None
