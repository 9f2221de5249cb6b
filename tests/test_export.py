"""`moex export` + `moex.load_pretrained`: safetensors round trip with identical logits, experts stacked."""

import json

import pytest
import torch

import moex
from moex import config as C
from moex.cli import main
from moex.data import ChessTokenizer, load_tokenizer
from moex.models import GPT
from moex import checkpoint


def write_run(run, *over):
    """A run directory holding a fresh tiny model as a weights-only checkpoint (what `moex import` writes)."""
    cfg = C.load(None, ["model.vocab_size=32", "model.n_layer=2", "model.d_model=32", "model.n_head=4",
                        "model.block_size=16", "model.moe.num_experts=4", "model.moe.d_expert=8", "model.d_ff=32",
                        *over])
    torch.manual_seed(0)
    model = GPT(cfg.model).eval()
    checkpoint.save_weights(run / "checkpoints", 0, model.state_dict(), {"config": C.to_dict(cfg)})
    ChessTokenizer().save(run / "tokenizer")
    return model


@pytest.mark.parametrize("over", [
    (),  # moex's defaults: MoE-X layers, tied embeddings
    ("model.tie_embeddings=false", "model.norm=rmsnorm", "model.n_kv_head=2", "model.qk_norm=true",
     "model.moe.router=topk", "model.moe_every=2", "model.rope_base=500000"),
    ("model.ffn=dense", "model.pos_emb=learned", "model.bias=all"),
])
def test_export_then_load_pretrained_gives_identical_logits(tmp_path, over):
    model = write_run(tmp_path / "run", *over)
    assert main(["export", str(tmp_path / "run"), "--out", str(tmp_path / "out")]) == 0
    loaded = moex.load_pretrained(tmp_path / "out")
    idx = torch.randint(0, 32, (2, 16), generator=torch.Generator().manual_seed(1))
    assert torch.equal(loaded(idx).logits, model(idx).logits)
    assert loaded.cfg == model.cfg
    assert (loaded.lm_head.weight is loaded.wte.weight) == model.cfg.tie_embeddings
    assert load_tokenizer(tmp_path / "out" / "tokenizer").encode(";1.e4") == ChessTokenizer().encode(";1.e4")
    meta = json.loads((tmp_path / "out" / "config.json").read_text())
    assert meta["format"] == "moex" and meta["source"]["step"] == 0


def test_experts_stay_stacked_and_tied_head_is_stored_once(tmp_path):
    from safetensors import safe_open

    write_run(tmp_path / "run")
    from moex.interop.pretrained import export_run

    export_run(tmp_path / "run", tmp_path / "out")
    with safe_open(str(tmp_path / "out" / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
        assert tuple(f.get_slice("blocks.1.ffn.experts.w1_EDH").get_shape()) == (4, 32, 8)  # E x D x H
        assert tuple(f.get_slice("blocks.1.ffn.experts.w2_EHD").get_shape()) == (4, 8, 32)  # E x H x D
    assert "wte.weight" in keys and "lm_head.weight" not in keys


def test_load_pretrained_errors_name_the_problem(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        moex.load_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(ValueError, match="moex import hf"):
        moex.load_pretrained(tmp_path)


def test_weights_only_checkpoint_reads_like_a_trained_one(tmp_path):
    from moex.checkpoint.load import load_model

    model = write_run(tmp_path / "run")
    loaded = load_model(tmp_path / "run")
    idx = torch.randint(0, 32, (1, 8))
    assert torch.equal(loaded.model(idx).logits, model(idx).logits)
    assert loaded.step == 0 and checkpoint.is_weights_only(loaded.ckpt_dir)
