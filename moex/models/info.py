"""Parameter counts of a recipe's model, built on the meta device (no memory, any size)."""

from __future__ import annotations

import torch

from moex.config import Config


def describe(cfg: Config, vocab_size: int | None = None) -> dict:
    """Total / active parameters and per-token FLOPs estimate of `cfg.model`."""
    from moex.models.transformer import GPT, param_counts

    m = cfg.model
    if m.vocab_size <= 0:
        m.vocab_size = vocab_size or _default_vocab(cfg)
    with torch.device("meta"):
        model = GPT(m)
    counts = param_counts(model)
    return {
        "n_layer": m.n_layer, "d_model": m.d_model, "ffn": m.ffn, "vocab_size": m.vocab_size,
        "params_total": counts["total"], "params_active": counts["active"],
        "experts": m.moe.num_experts if m.ffn == "moe" else None,
        "top_k": m.moe.top_k if m.ffn == "moe" else None,
    }


def _default_vocab(cfg: Config) -> int:
    """Vocabulary size implied by the tokenizer setting (sentencepiece: its target size)."""
    return {"chess": 32, "byte": 256, "char": 256}.get(cfg.data.tokenizer, cfg.data.vocab_size)
