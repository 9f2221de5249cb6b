"""Feature sources against direct computations."""

import torch

from moex import config as C
from moex.interp.features import collect, source_names
from moex.models import GPT


def model(ffn="moe", router="moex"):
    cfg = C.load(None, ["model.vocab_size=32", "model.n_layer=2", "model.d_model=16", "model.n_head=2",
                        "model.block_size=16", "model.moe.d_expert=8", "model.moe.num_experts=4",
                        f"model.ffn={ffn}", f"model.moe.router={router}", "model.d_ff=12", "model.mlp_activation=relu"])
    torch.manual_seed(0)
    return GPT(cfg.model).eval()


def test_moe_code_is_the_wide_sparse_mlp():
    m = model()
    idx = torch.randint(0, 32, (2, 16))
    feats = collect(m, idx)
    assert set(feats) == set(source_names(m)) == {"L0.moe.code", "L0.moe.gates", "L1.moe.code", "L1.moe.gates"}
    code, gates = feats["L1.moe.code"], feats["L1.moe.gates"]
    assert code.shape == (2, 16, 4 * 8) and gates.shape == (2, 16, 4)
    # each token has exactly k=2 experts with nonzero gates, and code is zero for the others
    assert ((gates > 0).sum(-1) == 2).all()
    blocks = code.reshape(2, 16, 4, 8)
    assert ((blocks.abs().sum(-1) > 0) <= (gates > 0)).all()
    # the wide code reproduces the layer's output: y = sum_e gate_e * code_e @ w2_e
    layer = m.blocks[1].ffn
    x = {}
    h = layer.register_forward_pre_hook(lambda mod, a: x.__setitem__("x", a[0]))
    m(idx)
    h.remove()
    y_direct = layer(x["x"]).y
    y_code = torch.einsum("bte,bteh,ehd->btd", gates, blocks, layer.experts.w2_EHD)
    torch.testing.assert_close(y_code, y_direct, rtol=1e-5, atol=1e-6)


def test_dense_sources():
    m = model(ffn="dense")
    feats = collect(m, torch.randint(0, 32, (1, 16)), select=lambda n: n.startswith("L0"))
    assert set(feats) == {"L0.mlp.pre", "L0.mlp.post"}
    torch.testing.assert_close(feats["L0.mlp.post"], feats["L0.mlp.pre"].relu())
