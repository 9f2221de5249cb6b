"""Sparse FFN layers other than the router-based MoE layer, looked up by `model.ffn`.

    monet: moex.models.monet (product-key experts, HD or VD; routers shared per group)
    peer:  moex.models.peer  (product-key retrieval over single-neuron experts)

Each entry takes the model config and returns that model's layer builder, `layer -> nn.Module`.
"""

from __future__ import annotations

from moex.config import ModelConfig
from moex.models.monet import MonetStack
from moex.models.peer import peer_layers

BUILDERS: dict = {"monet": MonetStack, "peer": peer_layers}


def builder(cfg: ModelConfig):
    """One model's builder of `cfg.ffn`'s sparse layers (see BUILDERS)."""
    if cfg.ffn not in BUILDERS:
        raise ValueError(f"model.ffn={cfg.ffn!r} is not available; valid: dense, moe, {', '.join(sorted(BUILDERS))}")
    return BUILDERS[cfg.ffn](cfg)
