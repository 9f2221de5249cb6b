"""Monet (HD, VD) and PEER against materialised per-expert references."""

from statistics import NormalDist

import pytest
import torch
import torch.nn.functional as F

from moex import config as C
from moex.config import MonetConfig, PEERConfig
from moex.models import GPT
from moex.models.monet import MonetLayer, MonetRouter, monet_aux_losses
from moex.models.peer import PEERLayer, product_key_topk


def monet(mode, H=2, N=4, k=2, M=6, D=8):
    torch.manual_seed(0)
    m = MonetLayer(D, MonetConfig(num_sub_experts=N, num_heads=H, top_k=k, d_expert=M, mode=mode))
    with torch.no_grad():  # non-zero biases so the reference checks them too
        for p in m.parameters():
            p.copy_(torch.randn_like(p) * 0.4)
    return m.train()


def expert_ij(m: MonetLayer, x_D, i, j):
    """E_ij(x) written out from the sub-experts' own weight slices."""
    a = lambda t: F.relu(t) ** 2
    if m.mode == "hd":
        M = m.M
        U, b1 = m.u.weight[i * M:(i + 1) * M], m.u.bias[i * M:(i + 1) * M]
        V = m.v.weight[:, j * M:(j + 1) * M]
        return V @ a(U @ x_D + b1) + m.b2_ND[j]
    M2 = m.M // 2
    sl = lambda n: slice(n * M2, (n + 1) * M2)
    h1 = a(m.u1.weight[sl(i)] @ x_D + m.u1.bias[sl(i)])
    h2 = a(m.u2.weight[sl(j)] @ x_D + m.u2.bias[sl(j)])
    top = m.v11.weight[:, sl(i)] @ h1 + m.v12.weight[:, sl(i)] @ h2 + m.b1_ND2[i]
    bot = m.v21.weight[:, sl(j)] @ h1 + m.v22.weight[:, sl(j)] @ h2 + m.b2_ND2[j]
    return torch.cat((top, bot))


@pytest.mark.parametrize("mode", ["hd", "vd"])
def test_monet_matches_materialised_experts_forward_and_grad(mode):
    m = monet(mode)
    x = torch.randn(5, 8, requires_grad=True)
    g1, g2, *_ = m.router(x)
    out = m.combine(m.hidden(x, g1, g2), g1, g2)
    ref = torch.stack([
        sum(g1[t, h, i] * g2[t, h, j] * expert_ij(m, x[t], i, j)
            for h in range(2) for i in range(4) for j in range(4))
        for t in range(5)
    ])
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    gy = torch.randn_like(ref)
    params = [x] + [p for n, p in m.named_parameters() if not n.startswith("router.")] + [m.router.w1.weight]
    got = torch.autograd.grad((out * gy).sum(), params, retain_graph=True)
    want = torch.autograd.grad((ref * gy).sum(), params)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_monet_router_threshold_batchnorm_and_gates():
    torch.manual_seed(1)
    r = MonetRouter(8, num_sub=6, num_heads=2, top_k=2).train()
    x = torch.randn(20, 8)
    g1, g2, z1, z2, keep1, keep2 = r(x)
    thr = NormalDist().inv_cdf(1 - 2 / 6)
    for h in range(2):
        z = z1[:, h]  # BatchNorm (no affine): per-head stats over tokens and sub-experts, biased var
        zn = (z - z.mean()) / (z.var(unbiased=False) + 1e-5).sqrt()
        for t in range(20):
            kept = (zn[t] >= min(thr, zn[t].max().item())).tolist()
            assert keep1[t, h].tolist() == kept and any(kept)
            want = torch.zeros(6)
            idx = [i for i in range(6) if kept[i]]
            want[idx] = z[t, idx].softmax(-1)
            torch.testing.assert_close(g1[t, h], want)
    r.eval()  # running stats at eval: still a distribution over the kept set
    g1e, *_ = r(x)
    torch.testing.assert_close(g1e.sum(-1), torch.ones(20, 2))


def test_monet_aux_losses_reference():
    g = torch.tensor([[[0.5, 0.5, 0.0, 0.0]], [[0.0, 0.0, 1.0, 0.0]]])  # T=2, H=1, N=4
    aux = monet_aux_losses(g, g, uniformity_coef=1e-3, ambiguity_coef=2e-2)
    usage = torch.tensor([0.25, 0.25, 0.5, 0.0])
    torch.testing.assert_close(aux["monet_uniformity"], 1e-3 * 4 * ((usage - 0.25) ** 2).sum())
    torch.testing.assert_close(aux["monet_ambiguity"], torch.tensor(2e-2 * 0.25))
    flat = torch.full((3, 1, 4), 0.25)
    assert monet_aux_losses(flat, flat, uniformity_coef=1.0, ambiguity_coef=1.0)["monet_uniformity"] == 0


def test_monet_layer_honours_configured_aux_coefs():
    x = torch.randn(10, 8)
    base = monet("hd")(x).aux_losses
    torch.manual_seed(0)
    m = MonetLayer(8, MonetConfig(num_sub_experts=4, num_heads=2, top_k=2, d_expert=6, uniformity_coef=0.5,
                                  ambiguity_coef=0.0))
    m.load_state_dict(monet("hd").state_dict())
    aux = m.train()(x).aux_losses
    torch.testing.assert_close(aux["monet_uniformity"], base["monet_uniformity"] * 500)  # default 1e-3
    assert aux["monet_ambiguity"] == 0 and base["monet_ambiguity"] > 0


def gpt(ffn, n_layer=4, **layer):
    ov = [f"model.{ffn}.{k}={v}" for k, v in {"top_k": 2, **layer}.items()]
    if ffn == "monet":
        ov.append("model.monet.d_expert=4")
    cfg = C.load(None, ["model.vocab_size=32", f"model.n_layer={n_layer}", "model.d_model=16", "model.n_head=2",
                        "model.block_size=8", f"model.ffn={ffn}", *ov])
    return cfg, GPT(cfg.model)


def test_monet_router_shared_per_group_not_across_models():
    cfg, a = gpt("monet", n_layer=4, router_share_every=2)
    routers = [b.ffn.router for b in a.blocks]
    assert routers[0] is routers[1] and routers[2] is routers[3] and routers[0] is not routers[2]
    b = GPT(cfg.model)
    assert b.blocks[0].ffn.router is not routers[0]
    assert not hasattr(cfg.model, "_monet_router_cache")
    out = a(torch.randint(0, 32, (2, 8)), torch.randint(0, 32, (2, 8)))
    out.loss.backward()
    assert all(p.grad is not None for p in a.parameters())
    s = out.layer_stats[0]
    assert s["tokens_per_expert"].shape == (2 * 16,) and 0 <= s["active_frac"] <= 1
    b.load_state_dict(a.state_dict())  # shared modules round-trip through a state dict


def peer(H=2, N=5, k=3, D=8, act="relu", norm=True):
    torch.manual_seed(2)
    m = PEERLayer(D, PEERConfig(num_sub_experts=N, num_heads=H, top_k=k, activation=act, query_norm=norm))
    with torch.no_grad():
        m.down.weight.normal_(0, 0.5)
        m.up.weight.normal_(0, 0.5)
    return m.train()


def _unreachable(*_):
    raise AssertionError("PEER took the gather path where N^2 <= G*k*D")


def test_product_key_topk_equals_bruteforce_topk():
    torch.manual_seed(3)
    for N, k in [(4, 1), (5, 3), (6, 6)]:
        s1, s2 = torch.randn(7, 2, N), torch.randn(7, 2, N)
        score, idx = product_key_topk(s1, s2, k)
        full = (s1[..., :, None] + s2[..., None, :]).flatten(-2)  # all N^2 keys scored
        want_s, want_i = full.topk(k, dim=-1)
        torch.testing.assert_close(score, want_s)
        assert torch.equal(idx, want_i)


@pytest.mark.parametrize("act,norm,path", [("relu", True, "dense"), ("gelu", False, "dense"), ("relu", True, "gather")])
def test_peer_matches_bruteforce_reference(act, norm, path, monkeypatch):
    m = peer(act=act, norm=norm)
    other = {"dense": "_forward_gather", "gather": "_forward_dense"}[path]  # N^2 <= G*k*D picks dense
    monkeypatch.setattr(m, other, m._forward_gather if path == "gather" else _unreachable)
    x = torch.randn(6, 8, requires_grad=True)
    y = m(x).y
    # brute force: score all N^2 experts by their full key [C1_i; C2_j], top-k, softmax, sum of neurons
    T, H, N, k = 6, 2, 5, 3
    q = m.query(x).view(T, H, 8)
    if norm:
        q = (q - q.reshape(-1, 8).mean(0)) / (q.reshape(-1, 8).var(0, unbiased=False) + 1e-5).sqrt()
    ref = torch.zeros(T, 8)
    for t in range(T):
        for h in range(H):
            keys = torch.stack([torch.cat((m.keys1_HNK[h, i], m.keys2_HNK[h, j])) for i in range(N) for j in range(N)])
            s, p = (keys @ q[t, h]).topk(k)
            g = s.softmax(-1)
            for gi, pi in zip(g, p.tolist()):
                a = F.relu if act == "relu" else F.gelu
                ref[t] += gi * m.up.weight[pi] * a(m.down.weight[pi] @ x[t])
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)
    gy = torch.randn_like(y)
    params = [x, m.down.weight, m.up.weight, m.keys1_HNK, m.query.weight]
    for a, b in zip(torch.autograd.grad((y * gy).sum(), params), torch.autograd.grad((ref * gy).sum(), params)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_peer_in_gpt_stats_and_param_counts():
    from moex.models.transformer import param_counts

    cfg, m = gpt("peer", n_layer=2, num_sub_experts=4, num_heads=2)
    out = m(torch.randint(0, 32, (2, 8)), torch.randint(0, 32, (2, 8)))
    s = out.layer_stats[1]
    assert s["tokens_per_expert"].sum() == 2 * 8 * 2 * 2  # T * H * k retrievals
    c = param_counts(m)
    experts = 2 * 2 * 16 * 16  # layers * (down + up) * N^2 * D
    assert c["total"] - c["active"] == experts - experts * 4 // 16

