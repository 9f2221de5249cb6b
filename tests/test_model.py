"""The decoder: shapes, causality, tied embeddings, recipes' parameter counts."""

from pathlib import Path

import pytest
import torch

from moex import config as C
from moex.models import GPT
from moex.models.info import describe
from moex.models.transformer import param_counts

RECIPES = sorted(Path(__file__).resolve().parents[1].joinpath("recipes").rglob("*.yaml"))


def tiny(**over):
    ov = [f"{k}={v}" for k, v in over.items()]
    cfg = C.load(None, ["model.vocab_size=32", "model.n_layer=2", "model.d_model=32", "model.n_head=4",
                        "model.block_size=16", "model.moe.d_expert=16", "model.d_ff=32", *ov])
    torch.manual_seed(0)
    return GPT(cfg.model)


@pytest.mark.parametrize("ffn,pos", [("dense", "rope"), ("moe", "rope"), ("moe", "learned")])
def test_forward_loss_and_stats(ffn, pos):
    m = tiny(**{"model.ffn": ffn, "model.pos_emb": pos})
    idx = torch.randint(0, 32, (2, 16))
    out = m(idx, torch.randint(0, 32, (2, 16)))
    assert out.logits.shape == (2, 16, 32)
    assert abs(out.ce_loss.item() - torch.log(torch.tensor(32.0)).item()) < 0.3  # ~uniform at init
    assert len(out.layer_stats) == 2
    if ffn == "moe":
        assert "balance" in out.aux_losses and out.loss > out.ce_loss
        assert out.layer_stats[0]["tokens_per_expert"].sum() == 2 * 16 * 2
    out.loss.backward()
    assert all(p.grad is not None for p in m.parameters())


@pytest.mark.parametrize("ffn", ["dense", "moe"])
def test_causal(ffn):
    m = tiny(**{"model.ffn": ffn}).eval()
    a = torch.randint(0, 32, (1, 16))
    b = a.clone()
    b[0, 10:] = (b[0, 10:] + 1) % 32
    la, lb = m(a).logits, m(b).logits
    torch.testing.assert_close(la[:, :10], lb[:, :10], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(la[:, 10:], lb[:, 10:])


def test_tied_embeddings_and_moe_every():
    m = tiny(**{"model.moe_every": 2})
    assert m.lm_head.weight is m.wte.weight
    kinds = [type(b.ffn).__name__ for b in m.blocks]
    assert kinds == ["DenseMLP", "MoELayer"]


def test_active_params_count_k_of_E_experts():
    m = tiny(**{"model.moe.num_experts": 4, "model.moe.top_k": 1})
    c = param_counts(m)
    per_layer = 2 * 4 * 32 * 16  # w1 + w2 of 4 experts
    assert c["total"] - c["active"] == 2 * per_layer * 3 // 4


def test_flash_backend_missing_is_a_clear_error():
    pytest.importorskip("torch")
    try:
        import flash_attn  # noqa: F401
        pytest.skip("flash-attn installed")
    except ImportError:
        pass
    with pytest.raises(ImportError, match="flash-attn"):
        tiny(**{"model.attn_backend": "flash"})


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.stem)
def test_every_recipe_builds_on_meta(recipe):
    info = describe(C.load(recipe))
    assert info["params_total"] >= info["params_active"] > 0
    print(recipe.stem, info["params_total"], info["params_active"])
