"""Feature sources are what the layers computed: checked against direct formulas and the layer outputs."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from moex import config as C
from moex.config import MoEConfig, MonetConfig, PEERConfig
from moex.interp.features import NoFeatureSource, collect, iter_positions, require_sources, source_names
from moex.models import GPT
from moex.models.moe import MoELayer
from moex.models.monet import MonetLayer
from moex.models.peer import PEERLayer


def model(ffn="moe", router="moex", *extra):
    cfg = C.load(None, ["model.vocab_size=32", "model.n_layer=2", "model.d_model=16", "model.n_head=2",
                        "model.block_size=16", "model.moe.d_expert=8", "model.moe.num_experts=4",
                        f"model.ffn={ffn}", f"model.moe.router={router}", "model.d_ff=12", "model.mlp_activation=relu",
                        *extra])
    torch.manual_seed(0)
    return GPT(cfg.model).eval()


@pytest.mark.parametrize("capacity", [None, 0.5])
@pytest.mark.parametrize("backend", ["auto", "loop"])
@pytest.mark.parametrize("d_expert", [8, 24])  # H <= D folds the gate into the hidden layer; H > D does not
def test_moe_code_rebuilds_the_layer_output(capacity, backend, d_expert):
    torch.manual_seed(0)
    cfg = MoEConfig(num_experts=4, top_k=2, d_expert=d_expert, capacity_factor=capacity, gemm_backend=backend)
    layer = MoELayer(16, cfg).eval()
    x = torch.randn(40, 16)
    out = layer(x, features=True)
    code = out.features["moe.code"].to_dense(40).view(40, 4, d_expert)
    raw = out.features["moe.code_raw"].to_dense(40).view(40, 4, d_expert)
    gates = out.features["moe.gates"].to_dense(40)
    # W_dec applied to the gate-weighted code is the layer output, exactly (capacity drops included)
    torch.testing.assert_close(torch.einsum("teh,ehd->td", code, layer.experts.w2_EHD),
                               out.y, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(code, raw * gates[..., None])
    # raw = ReLU(x W_enc_e) exactly where the token was kept by expert e, zero elsewhere
    kept = gates > 0
    ref = F.relu(torch.einsum("td,edh->teh", x, layer.experts.w1_EDH)) * kept[..., None]
    torch.testing.assert_close(raw, ref, rtol=1e-5, atol=1e-6)
    if capacity is None:
        assert (kept.sum(1) == 2).all()
    else:
        C_ = int(np.ceil(capacity * 40 * 2 / 4))
        assert (kept.sum(0) <= C_).all() and kept.sum() < 80  # some assignments were dropped


@pytest.mark.parametrize("act", ["swiglu", "relu2"])
@pytest.mark.parametrize("gate", [False, True])
def test_moe_code_with_other_experts_and_shared_experts(act, gate):
    torch.manual_seed(0)
    cfg = MoEConfig(num_experts=4, top_k=2, d_expert=8, activation=act, router="topk", capacity_factor=0.75,
                    num_shared_experts=1,
                    shared_expert_gate=gate)
    layer = MoELayer(16, cfg).eval()
    x = torch.randn(40, 16)
    out = layer(x, features=True)
    assert set(out.features) == set(layer.FEATURE_SOURCES) == {"moe.code", "moe.code_raw", "moe.gates", "moe.shared"}
    code = out.features["moe.code"].to_dense(40).view(40, 4, 8)
    y = torch.einsum("teh,ehd->td", code, layer.experts.w2_EHD) + layer.shared.mlp.proj(out.features["moe.shared"])
    torch.testing.assert_close(y, out.y, rtol=1e-5, atol=1e-6)


def test_peer_code_rebuilds_the_layer_output():
    torch.manual_seed(0)
    for N in (4, 16):  # the dense-combine and the gather path
        layer = PEERLayer(8, PEERConfig(num_sub_experts=N, num_heads=3, top_k=2)).eval()
        x = torch.randn(30, 8)
        out = layer(x, features=True)
        code = out.features["peer.code"].to_dense(30)
        raw = out.features["peer.code_raw"].to_dense(30)
        torch.testing.assert_close(code @ layer.up.weight, out.y, rtol=1e-5, atol=1e-6)
        # raw: act(u_p . x) on every retrieved expert (counted once even when several heads retrieve it)
        pre = F.relu(x @ layer.down.weight.T)
        retrieved = code != 0
        torch.testing.assert_close(raw, pre * retrieved)
        assert (retrieved.sum(1) <= 3 * 2).all()


@pytest.mark.parametrize("mode", ["hd", "vd"])
def test_monet_sources_match_gates_and_hidden_units(mode):
    torch.manual_seed(0)
    N, H, M = 8, 2, 6
    layer = MonetLayer(8, MonetConfig(num_sub_experts=N, num_heads=H, top_k=2, d_expert=M, mode=mode)).eval()
    x = torch.randn(12, 8)
    out = layer(x, features=True)
    g1, g2, _, _, keep1, keep2 = layer.router(x)
    experts = out.features["monet.experts"].to_dense(12).view(12, N, N)
    torch.testing.assert_close(experts, torch.einsum("thi,thj->tij", g1, g2))
    torch.testing.assert_close(out.features["monet.sub1"], g1.sum(1))
    code = out.features["monet.code"].to_dense(12)
    a = lambda t: F.relu(t) ** 2
    if mode == "hd":
        ref = (g1.sum(1)[..., None] * a(layer.u(x)).view(12, N, M)).reshape(12, -1)
    else:
        h1, h2 = a(layer.u1(x)).view(12, N, -1), a(layer.u2(x)).view(12, N, -1)
        ref = torch.cat([(g1.sum(1)[..., None] * h1).reshape(12, -1), (g2.sum(1)[..., None] * h2).reshape(12, -1)], 1)
    torch.testing.assert_close(code, ref)
    assert (out.features["monet.experts"].values_NB != 0).all()  # only kept pairs are stored


def test_every_layer_reports_with_moe_every_and_monet():
    m = model("monet", "moex", "model.moe_every=2", "model.monet.num_sub_experts=4")
    assert source_names(m) == ["L0.mlp.pre", "L0.mlp.post", "L1.monet.experts", "L1.monet.sub1",
                               "L1.monet.sub2", "L1.monet.code"]
    feats = collect(m, torch.randint(0, 32, (2, 16)))
    assert set(feats) == set(source_names(m))
    assert feats["L1.monet.experts"].shape == (2, 16, 16)


def test_collect_and_sparse_rows_agree():
    m = model("moe")
    idx = torch.randint(0, 32, (3, 16))
    mask = torch.rand(3, 16) < 0.4
    dense = collect(m, idx)
    assert set(dense) == {f"L{i}.moe.{s}" for i in (0, 1) for s in ("code", "code_raw", "gates")}
    rows_d = next(iter_positions(m, idx, mask, batch_size=8))
    rows_s = next(iter_positions(m, idx, mask, batch_size=8, sparse=True))
    for k, v in dense.items():
        torch.testing.assert_close(rows_d[k], v[mask])
        np.testing.assert_allclose(rows_s[k].toarray(), v[mask].numpy(), rtol=1e-6, atol=1e-7)


def test_dense_sources():
    m = model(ffn="dense")
    feats = collect(m, torch.randint(0, 32, (1, 16)), select=lambda n: n.startswith("L0"))
    assert set(feats) == {"L0.mlp.pre", "L0.mlp.post"}
    torch.testing.assert_close(feats["L0.mlp.post"], feats["L0.mlp.pre"].relu())


def test_no_source_is_a_clear_error():
    m = model(ffn="dense")
    with pytest.raises(NoFeatureSource, match="no measurable feature source"):
        require_sources(m, select=lambda n: False)
