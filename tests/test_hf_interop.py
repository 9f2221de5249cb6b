"""`moex import hf` / `moex export --format hf` against `transformers` itself, on tiny random models built here.

Import: moex logits == transformers logits. Export: transformers logits == moex logits.
"""

import json
import os
import sys
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

from moex.cli import main  # noqa: E402
from moex.checkpoint.load import load_model  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
UD = ROOT.parent / "shared/data/ud-english-ewt/en_ewt-ud-dev.conllu"
V = 300
TEXT = "The quick brown fox jumps over the lazy dog. A cat sat on the mat, and it was happy.\n" * 20
COMMON = dict(vocab_size=V, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=32, rms_norm_eps=1e-6)
FAMILIES = {
    "llama": (transformers.LlamaConfig, dict(COMMON, rope_theta=500000.0)),
    "mixtral": (transformers.MixtralConfig, dict(COMMON, num_local_experts=4, num_experts_per_tok=2)),
    "olmoe": (transformers.OlmoeConfig, dict(COMMON, num_experts=4, num_experts_per_tok=2, norm_topk_prob=False)),
    "qwen2_moe": (transformers.Qwen2MoeConfig, dict(COMMON, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16,
                                                   shared_expert_intermediate_size=24, norm_topk_prob=False)),
    "gpt2": (transformers.GPT2Config, dict(vocab_size=V, n_embd=32, n_layer=2, n_head=4, n_positions=32)),
}


def tiny_tokenizer():
    """A byte-level BPE trained here (lossless, as moex's text suite needs)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator([TEXT], trainers.BpeTrainer(vocab_size=V, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                                        show_progress=False))
    return tok


def hf_checkpoint(family, directory, **extra):
    cfg_cls, kw = FAMILIES[family]
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(cfg_cls(**{**kw, **extra}))
    with torch.no_grad():  # non-trivial norms and biases, so a misplaced tensor cannot hide
        for name, p in model.named_parameters():
            p.copy_(1 + 0.3 * torch.randn_like(p) if "norm" in name or "ln_" in name else 0.2 * torch.randn_like(p))
    model.eval().save_pretrained(directory)
    tiny_tokenizer().save(str(Path(directory) / "tokenizer.json"))
    return model


def ids():
    return torch.randint(0, V, (2, 12), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("family", list(FAMILIES))
def test_import_then_export_match_transformers(tmp_path, family):
    hf = hf_checkpoint(family, tmp_path / "hf")
    assert main(["import", "hf", str(tmp_path / "hf"), "--out", str(tmp_path / "run")]) == 0
    moex_model = load_model(tmp_path / "run").model
    with torch.no_grad():
        want = hf(ids()).logits
        got = moex_model(ids()).logits
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    assert main(["export", str(tmp_path / "run"), "--format", "hf", "--out", str(tmp_path / "back")]) == 0
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "back").eval()
    with torch.no_grad():
        torch.testing.assert_close(back(ids()).logits, got, rtol=1e-4, atol=1e-4)
    assert json.loads((tmp_path / "back" / "config.json").read_text())["model_type"] == family


def test_tokenizer_travels_with_the_run(tmp_path):
    from moex.data import load_tokenizer

    hf_checkpoint("llama", tmp_path / "hf")
    main(["import", "hf", str(tmp_path / "hf"), "--out", str(tmp_path / "run")])
    tok = load_tokenizer(tmp_path / "run" / "tokenizer")
    assert tok.kind == "hf" and tok.encode("the lazy cat") == tiny_tokenizer().encode("the lazy cat").ids
    assert tok.decode(tok.encode("A fox sat.")) == "A fox sat."
    main(["export", str(tmp_path / "run"), "--format", "hf", "--out", str(tmp_path / "back")])
    hf_tok = transformers.PreTrainedTokenizerFast(tokenizer_file=str(tmp_path / "back" / "tokenizer.json"))
    assert hf_tok.encode("the lazy cat", add_special_tokens=False) == tok.encode("the lazy cat")


def test_unsupported_and_missing_inputs_are_one_line_errors(tmp_path, capsys):
    hf_checkpoint("llama", tmp_path / "hf", rope_scaling={"rope_type": "linear", "factor": 2.0})
    assert main(["import", "hf", str(tmp_path / "hf"), "--out", str(tmp_path / "run")]) == 2
    assert "RoPE scaling 'linear'" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()  # nothing half-written
    assert main(["import", "hf", str(tmp_path / "nope"), "--out", str(tmp_path / "run")]) == 2
    assert "not a checkpoint directory" in capsys.readouterr().err


def test_hub_name_without_network_says_so(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # what a machine without a network sees, without waiting for timeouts
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    assert main(["import", "hf", "nobody/no-such-model", "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("moex: error: cannot download 'nobody/no-such-model'") and "without a network" in err
    assert err.count("\n") == 1


@pytest.mark.slow
def test_imported_model_evaluates_interprets_upcycles_and_fine_tunes(tmp_path):
    """The commands a user runs after `moex import hf`, on a tiny Llama with local text."""
    import subprocess

    hf_checkpoint("llama", tmp_path / "hf")
    (tmp_path / "train.txt").write_text(TEXT * 5)
    (tmp_path / "val.txt").write_text(TEXT)
    data = [f"data.path={tmp_path}/train.txt", f"data.val_path={tmp_path}/val.txt", f"data.cache_dir={tmp_path}/cache"]
    run = tmp_path / "runs" / "llama"
    assert main(["import", "hf", str(tmp_path / "hf"), "--out", str(run), *data]) == 0
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu"}

    def moex(*args):
        p = subprocess.run([sys.executable, "-m", "moex.cli", *args], cwd=tmp_path, env=env, capture_output=True, text=True)
        assert p.returncode == 0, p.stderr[-2000:]
        return p.stdout

    out = moex("eval", str(run), "--max-batches", "2", "--batch-size", "2")
    assert "word ppl" in out
    if UD.exists():
        moex("interpret", str(run), "--suite", "text", "--conllu", str(UD), "--sentences", "10", "--out", "interp")
        assert json.loads((tmp_path / "interp" / "report.json").read_text())["suite"] == "text"
    short = ["train.max_steps=2", "train.batch_size=2", "train.eval_interval=2", "train.ckpt_interval=2",
             "train.progress=false"]
    moex("train", str(run / "config.yaml"), *short)
    tuned = load_model(tmp_path / "runs" / "llama-finetune")
    assert tuned.step == 2 and tuned.cfg.data.tokenizer == "hf"
    # Mixtral-style upcycling of the imported dense SwiGLU model, then training it
    moe = ["model.ffn=moe", "model.moe.activation=swiglu", "model.moe.router=topk", "model.moe.num_experts=4",
           "model.moe.d_expert=48"]
    moex("upcycle", str(run), str(run / "config.yaml"), *moe, "--scheme", "copy", "--out", "runs/up")
    moex("train", "runs/up/recipe.yaml", *short)
    assert load_model(tmp_path / "runs" / "up").step == 2
