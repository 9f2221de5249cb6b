"""Upcycling a dense ReLU GPT into a MoE GPT: exact identities through the real layers."""

import pytest
import torch
import yaml

from moex import config as C
from moex.models import GPT
from moex.models.moe import MoELayer
from moex.upcycle import upcycle, upcycle_state

BASE = ["model.vocab_size=32", "model.n_layer=2", "model.d_model=16", "model.n_head=2", "model.block_size=8"]


def dense_model():
    cfg = C.load(None, BASE + ["model.ffn=dense", "model.d_ff=24", "model.mlp_activation=relu"])
    torch.manual_seed(0)
    m = GPT(cfg.model)
    with torch.no_grad():  # bigger FFN weights so the FFN matters to the logits
        for b in m.blocks:
            b.ffn.fc.weight.normal_(0, 0.5)
            b.ffn.proj.weight.normal_(0, 0.5)
    return cfg, m.eval()


def moe_cfg(*extra):
    return C.load(None, BASE + ["model.ffn=moe", "model.moe.activation=relu", *extra])


def test_split_equals_dense_with_all_experts_and_uniform_gates():
    dcfg, dense = dense_model()
    cfg = moe_cfg("model.moe.router=topk", "model.moe.num_experts=4", "model.moe.top_k=4", "model.moe.d_expert=6",
                  "model.moe.aux_loss_coef=0", "model.moe.z_loss_coef=0")
    state = upcycle_state(dense.state_dict(), dcfg.model, cfg.model, scheme="split")
    moe = GPT(cfg.model)
    moe.load_state_dict(state)
    for b in moe.blocks:
        assert isinstance(b.ffn, MoELayer)
        torch.nn.init.zeros_(b.ffn.router.gate.weight)  # uniform gates 1/E
    moe.eval()
    idx = torch.randint(0, 32, (3, 8))
    x = torch.randn(5, 16)
    torch.testing.assert_close(moe.blocks[0].ffn(x).y, dense.blocks[0].ffn(x).y, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(moe(idx).logits, dense(idx).logits, rtol=1e-5, atol=1e-5)
    # expert j holds dense hidden units [6j, 6j+6)
    torch.testing.assert_close(moe.blocks[1].ffn.experts.w1_EDH[2], dense.blocks[1].ffn.fc.weight[12:18].T)
    # a non-uniform router breaks the identity (the test can fail)
    torch.nn.init.normal_(moe.blocks[0].ffn.router.gate.weight, 0, 1.0)
    assert not torch.allclose(moe.blocks[0].ffn(x).y, dense.blocks[0].ffn(x).y, atol=1e-4)


@pytest.mark.parametrize("router", ["moex", "topk"])
def test_copy_without_noise_equals_dense_for_any_routing(router):
    dcfg, dense = dense_model()
    cfg = moe_cfg(f"model.moe.router={router}", "model.moe.num_experts=3", "model.moe.top_k=2", "model.moe.d_expert=24")
    moe = GPT(cfg.model)
    moe.load_state_dict(upcycle_state(dense.state_dict(), dcfg.model, cfg.model, scheme="copy", noise=0.0))
    moe.eval()
    idx = torch.randint(0, 32, (2, 8))
    torch.testing.assert_close(moe(idx).logits, dense(idx).logits, rtol=1e-5, atol=1e-5)
    noisy = upcycle_state(dense.state_dict(), dcfg.model, cfg.model, scheme="copy", noise=0.01)
    w = noisy["blocks.0.ffn.experts.w1_EDH"]
    assert not torch.equal(w[0], w[1])  # noise lets experts diverge
    torch.testing.assert_close(w[0], dense.blocks[0].ffn.fc.weight.T, atol=0.05, rtol=0)


def test_shape_mismatch_is_a_clear_error():
    dcfg, dense = dense_model()
    cfg = moe_cfg("model.moe.num_experts=4", "model.moe.d_expert=5")
    with pytest.raises(ValueError, match="num_experts \\* d_expert"):
        upcycle_state(dense.state_dict(), dcfg.model, cfg.model, scheme="split")
    with pytest.raises(ValueError, match="d_expert == dense d_ff"):
        upcycle_state(dense.state_dict(), dcfg.model, cfg.model, scheme="copy")


def test_upcycle_command_writes_state_and_recipe(tmp_path):
    dcfg, dense = dense_model()
    ckpt = tmp_path / "dense" / "checkpoints" / "step-0000010"  # the layout moex.checkpoint writes
    ckpt.mkdir(parents=True)
    torch.save({"module": dense.state_dict(), "step": 10, "config": C.to_dict(dcfg)}, ckpt / "mp_rank_00_model_states.pt")
    (ckpt.parent / "latest").write_text("step-0000010")
    (tmp_path / "dense" / "tokenizer").mkdir()
    (tmp_path / "dense" / "tokenizer" / "tokenizer.json").write_text("{}")
    recipe = tmp_path / "moe.yaml"
    recipe.write_text(yaml.safe_dump({"model": {"n_layer": 2, "d_model": 16, "n_head": 2, "block_size": 8, "ffn": "moe",
                                                "moe": {"router": "moex", "num_experts": 4, "d_expert": 6}}}))
    path = upcycle(str(tmp_path / "dense"), str(recipe), [], scheme="split", out_dir=str(tmp_path / "up"))
    data = yaml.safe_load(path.read_text())
    assert (tmp_path / "up" / "tokenizer" / "tokenizer.json").exists()  # the dense run's token ids
    assert data["train"]["run_name"] == "up" and data["train"]["init_from"].endswith("upcycled.pt")
    del data["train"]["init_from"]
    cfg = C.from_dict(data)
    moe = GPT(cfg.model)
    moe.load_state_dict(torch.load(tmp_path / "up" / "upcycled.pt"))
    torch.testing.assert_close(moe.wte.weight, dense.wte.weight)


def test_partition_scheme_reproduces_dense_when_k_distinct_chunks_are_chosen():
    """F = 2H, k = 2: experts 0 and 1 hold the two halves; picking them with gates 1/2 is the dense MLP."""
    import torch

    from moex import config as C
    from moex.models import GPT
    from moex.upcycle import upcycle_state

    base = ["model.vocab_size=32", "model.n_layer=1", "model.d_model=16", "model.n_head=2", "model.block_size=8"]
    dense_cfg = C.load(None, base + ["model.ffn=dense", "model.d_ff=24", "model.mlp_activation=relu"]).model
    moe_cfg = C.load(None, base + ["model.moe.num_experts=4", "model.moe.top_k=2", "model.moe.d_expert=12"]).model
    torch.manual_seed(0)
    dense = GPT(dense_cfg).eval()
    state = upcycle_state(dense.state_dict(), dense_cfg, moe_cfg, scheme="partition", noise=0.0)
    moe = GPT(moe_cfg)
    moe.load_state_dict(state)
    x = torch.randn(5, 16)
    layer, mlp = moe.blocks[0].ffn, dense.blocks[0].ffn
    h0 = torch.relu(x @ layer.experts.w1_EDH[0]) @ layer.experts.w2_EHD[0]
    h1 = torch.relu(x @ layer.experts.w1_EDH[1]) @ layer.experts.w2_EHD[1]
    torch.testing.assert_close(0.5 * h0 + 0.5 * h1, mlp(x).y, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(layer.experts.w1_EDH[2], layer.experts.w1_EDH[0])  # expert 2 repeats chunk 0


def test_dense_mlp_biases_cannot_be_upcycled():
    """GPT-2's MLP biases have no place in bias-free experts: refused, not silently dropped."""
    dcfg = C.load(None, ["model.vocab_size=16", "model.n_layer=1", "model.d_model=16", "model.n_head=2",
                         "model.block_size=8", "model.ffn=dense", "model.d_ff=16", "model.mlp_activation=relu",
                         "model.bias=all"])
    mcfg = C.load(None, ["model.vocab_size=16", "model.n_layer=1", "model.d_model=16", "model.n_head=2",
                         "model.block_size=8", "model.moe.d_expert=16", "model.bias=all"])
    with pytest.raises(ValueError, match="without biases"):
        upcycle_state(GPT(dcfg.model).state_dict(), dcfg.model, mcfg.model, scheme="copy")
